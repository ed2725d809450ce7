// Row normalisations, one workgroup per row, statistics in f32.
// layer_norm: out = (x - mean) / sqrt(var + eps) * weight + bias   (two-pass mean/variance)
// rms_norm:   out = x / sqrt(mean(x^2) + eps) * weight              (LLaMA)

#include common

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    x_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Four elements of row xb at columns c + (0, 1, 2, 3) WG (each step of a row loop loads four
// before it uses any: a GPU runs an invocation's steps one after another, each waiting for its
// loads, so a 4096-wide row takes 16 such waits instead of 64), and which of them lie within
// the row. Columns past the end read the row's last element and count as zero.
struct Four {
    v: vec4<f32>,
    live: vec4<bool>,
    // the columns read: the four columns where they are live, else the row's last
    col: vec4<u32>,
}

fn four(xb: u32, c: u32) -> Four {
    let want = c + vec4<u32>(0u, 1u, 2u, 3u) * WG;
    let live = want < vec4<u32>(p.cols);
    let col = min(want, vec4<u32>(p.cols - 1u));
    let j = xb + col;
    let v = vec4<f32>(x[j.x], x[j.y], x[j.z], x[j.w]);
    return Four(select(vec4<f32>(0.0), v, live), live, col);
}

@compute @workgroup_size(64)
fn layer_norm(ids: Ids, grp: Grp) {
    let row = group_index(grp);
    if (row >= p.rows) {
        return;
    }
    let xb = row * p.x_stride;
    let ob = row * p.cols;
    var s = 0.0;
    for (var c = ids.lid; c < p.cols; c += 4u * WG) {
        s += dot(four(xb, c).v, vec4<f32>(1.0));
    }
    let mean = wg_sum(s, ids) / f32(p.cols);
    var v = 0.0;
    for (var c = ids.lid; c < p.cols; c += 4u * WG) {
        let f = four(xb, c);
        let d = select(vec4<f32>(0.0), f.v - mean, f.live);
        v += dot(d, d);
    }
    let variance = wg_sum(v, ids) / f32(p.cols);
    let inv = 1.0 / sqrt(variance + p.eps);
    for (var c = ids.lid; c < p.cols; c += 4u * WG) {
        let f = four(xb, c);
        let k = f.col; // the clamped columns: in range for the weight loads
        let w = vec4<f32>(weight[k.x], weight[k.y], weight[k.z], weight[k.w]);
        let b = vec4<f32>(bias[k.x], bias[k.y], bias[k.z], bias[k.w]);
        let o = (f.v - mean) * inv * w + b;
        for (var r = 0u; r < 4u; r++) {
            if (f.live[r]) {
                out[ob + f.col[r]] = o[r];
            }
        }
    }
}

@compute @workgroup_size(64)
fn rms_norm(ids: Ids, grp: Grp) {
    let row = group_index(grp);
    if (row >= p.rows) {
        return;
    }
    let xb = row * p.x_stride;
    let ob = row * p.cols;
    var s = 0.0;
    for (var c = ids.lid; c < p.cols; c += 4u * WG) {
        let v = four(xb, c).v;
        s += dot(v, v);
    }
    let inv = 1.0 / sqrt(wg_sum(s, ids) / f32(p.cols) + p.eps);
    for (var c = ids.lid; c < p.cols; c += 4u * WG) {
        let f = four(xb, c);
        let k = f.col; // the clamped columns: in range for the weight loads
        let w = vec4<f32>(weight[k.x], weight[k.y], weight[k.z], weight[k.w]);
        let o = f.v * inv * w;
        for (var r = 0u; r < 4u; r++) {
            if (f.live[r]) {
                out[ob + f.col[r]] = o[r];
            }
        }
    }
}
