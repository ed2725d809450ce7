// Rotary position embedding, in place on rows of x laid out [t, heads, head_dim] at
// x[offset + t * stride + h * head_dim + d]. Row t has position pos0 + t.
// table[(pos * half + i) * 2 + {0,1}] = (cos, sin) of pos * theta^(-2i/head_dim), computed on
// the host in f32 as the reference does (GPU sin/cos lose accuracy at large angles).
// mode 0: HF rotate-half pairs (i, i + half); mode 1: interleaved pairs (2i, 2i + 1).

#include common

struct Params {
    t: u32,
    heads: u32,
    head_dim: u32,
    offset: u32,
    stride: u32,
    pos0: u32,
    mode: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;

@compute @workgroup_size(256)
fn rope(ids: Ids, grp: Grp) {
    let half = p.head_dim / 2u;
    let e = flat_index(grp, ids);
    if (e >= p.t * p.heads * half) {
        return;
    }
    let i = e % half;
    let h = (e / half) % p.heads;
    let t = e / (half * p.heads);
    let tb = ((p.pos0 + t) * half + i) * 2u;
    let c = table[tb];
    let s = table[tb + 1u];
    let base = p.offset + t * p.stride + h * p.head_dim;
    var a = base + i;
    var b = base + i + half;
    if (p.mode == 1u) {
        a = base + 2u * i;
        b = a + 1u;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
}
