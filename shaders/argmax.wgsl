// Index of the first maximum of x[0..n] (ties go to the lower index, as torch.argmax), written
// to out[0]. One workgroup; lets greedy decoding read back 4 bytes instead of the logits.

#include common

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(64)
fn argmax(ids: Ids) {
    var v = NEG_BIG;
    var idx = 0xffffffffu;
    for (var i = ids.lid; i < p.n; i += WG) {
        let xi = x[i];
        if (xi > v) {
            v = xi;
            idx = i;
        }
    }
    best_v[ids.lid] = v;
    best_i[ids.lid] = idx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (ids.lid < s) {
            let ov = best_v[ids.lid + s];
            let oi = best_i[ids.lid + s];
            if (ov > best_v[ids.lid] || (ov == best_v[ids.lid] && oi < best_i[ids.lid])) {
                best_v[ids.lid] = ov;
                best_i[ids.lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if (ids.lid == 0u) {
        out[0] = select(best_i[0], 0u, best_i[0] == 0xffffffffu);
    }
}
