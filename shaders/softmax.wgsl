// In-place row softmax of (x * scale), one workgroup per row, max-subtracted, f32.

#include common

struct Params {
    rows: u32,
    cols: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn softmax(ids: Ids, grp: Grp) {
    let row = group_index(grp);
    if (row >= p.rows) {
        return;
    }
    let b = row * p.cols;
    var m = NEG_BIG;
    for (var c = ids.lid; c < p.cols; c += WG) {
        m = max(m, x[b + c] * p.scale);
    }
    let mx = wg_max(m, ids);
    var s = 0.0;
    for (var c = ids.lid; c < p.cols; c += WG) {
        s += exp(x[b + c] * p.scale - mx);
    }
    let inv = 1.0 / wg_sum(s, ids);
    for (var c = ids.lid; c < p.cols; c += WG) {
        x[b + c] = exp(x[b + c] * p.scale - mx) * inv;
    }
}
