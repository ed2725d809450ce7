// Index of the first maximum of x[0..n] (ties go to the lower index, as torch.argmax), written
// to out[0]. One workgroup of AW = 256 invocations; lets greedy decoding read back 4 bytes
// instead of the logits. Each step of an invocation's loop issues four loads before it
// compares any of them: a GPU runs one invocation's steps one after another, each waiting for
// its loads, so 32000 logits take 32 such waits instead of 500 with 64 invocations and one
// load a step (on lavapipe it costs about 7 µs more a token).

const AW: u32 = 256u;

#include common

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, AW>;
var<workgroup> best_i: array<u32, AW>;

@compute @workgroup_size(AW)
fn argmax(ids: Ids) {
    var v = NEG_BIG;
    var idx = 0xffffffffu;
    let last = max(p.n, 1u) - 1u;
    for (var i = ids.lid; i < p.n; i += 4u * AW) {
        // indices past the end read the last element under its own index, which changes
        // neither the maximum nor (ties keep the lower index) where it is
        let j = min(i + vec4<u32>(0u, 1u, 2u, 3u) * AW, vec4<u32>(last));
        let xs = vec4<f32>(x[j.x], x[j.y], x[j.z], x[j.w]);
        for (var r = 0u; r < 4u; r++) {
            if (xs[r] > v) {
                v = xs[r];
                idx = j[r];
            }
        }
    }
    best_v[ids.lid] = v;
    best_i[ids.lid] = idx;
    workgroupBarrier();
    for (var s = AW / 2u; s > 0u; s >>= 1u) {
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
