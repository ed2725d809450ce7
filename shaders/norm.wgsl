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

@compute @workgroup_size(64)
fn layer_norm(ids: Ids, grp: Grp) {
    let row = group_index(grp);
    if (row >= p.rows) {
        return;
    }
    let xb = row * p.x_stride;
    let ob = row * p.cols;
    var s = 0.0;
    for (var c = ids.lid; c < p.cols; c += WG) {
        s += x[xb + c];
    }
    let mean = wg_sum(s, ids) / f32(p.cols);
    var v = 0.0;
    for (var c = ids.lid; c < p.cols; c += WG) {
        let d = x[xb + c] - mean;
        v += d * d;
    }
    let variance = wg_sum(v, ids) / f32(p.cols);
    let inv = 1.0 / sqrt(variance + p.eps);
    for (var c = ids.lid; c < p.cols; c += WG) {
        out[ob + c] = (x[xb + c] - mean) * inv * weight[c] + bias[c];
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
    for (var c = ids.lid; c < p.cols; c += WG) {
        let v = x[xb + c];
        s += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(s, ids) / f32(p.cols) + p.eps);
    for (var c = ids.lid; c < p.cols; c += WG) {
        out[ob + c] = x[xb + c] * inv * weight[c];
    }
}
