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
    kv_heads: u32, // rope_kv only
    ctx: u32, // rope_kv only: the cache's positions
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
    rotate_pair(p.offset + t * p.stride + h * p.head_dim, i, p.pos0 + t);
}

// Rotates pair i of the head starting at x[base] in place, at position pos.
fn rotate_pair(base: u32, i: u32, pos: u32) {
    let half = p.head_dim / 2u;
    let tb = (pos * half + i) * 2u;
    let c = table[tb];
    let s = table[tb + 1u];
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

// A LLaMA layer's rotary step and KV-cache write in one pass. x holds rows of the fused
// projection [q (heads), k (kv_heads), v (kv_heads)] (p.stride apart, from p.offset); row t
// has position pos0 + t. q is rotated in place; k is rotated and written with v into the
// cache at position pos0 + t. The cache is head-major: 2 kv_heads blocks (the k heads, then
// the v heads) of ctx positions of head_dim values (f16 pairs with KV_F16). Every
// value is the same f32 expression the separate rotation computes, so both paths agree bit
// for bit. Work items per row: one per q rotation pair, one per pair of adjacent k values and
// one per pair of v values.
#if KV_F16
@group(0) @binding(3) var<storage, read_write> cache: array<u32>;
#else
@group(0) @binding(3) var<storage, read_write> cache: array<f32>;
#endif

// Element d of the rotated head starting at x[base], at position pos.
fn rotated(base: u32, d: u32, pos: u32) -> f32 {
    let half = p.head_dim / 2u;
    var i = d % half;
    var partner = select(d + half, d - half, d >= half);
    if (p.mode == 1u) {
        i = d / 2u;
        partner = d ^ 1u;
    }
    let tb = (pos * half + i) * 2u;
    let c = table[tb];
    let s = table[tb + 1u];
    // the first of a pair takes x0 c - x1 s, the second x1 c + x0 s (x0 the first's value)
    let first = select(d < half, (d & 1u) == 0u, p.mode == 1u);
    if (first) {
        return x[base + d] * c - x[base + partner] * s;
    }
    return x[base + d] * c + x[base + partner] * s;
}

@compute @workgroup_size(256)
fn rope_kv(ids: Ids, grp: Grp) {
    let half = p.head_dim / 2u;
    let kv = p.kv_heads * p.head_dim;
    let per_row = p.heads * half + kv;
    let e = flat_index(grp, ids);
    if (e >= p.t * per_row) {
        return;
    }
    let t = e / per_row;
    let u = e % per_row;
    let pos = p.pos0 + t;
    let row = p.offset + t * p.stride;
    if (u < p.heads * half) {
        // q: rotation pair u % half of head u / half, in place
        rotate_pair(row + (u / half) * p.head_dim, u % half, pos);
        return;
    }
    // c: the first of two adjacent values of [k, v] (head_dim is even: both in one head)
    let c = 2u * (u - p.heads * half);
    let q_width = p.heads * p.head_dim;
    var v0: f32;
    var v1: f32;
    if (c < kv) {
        let base = row + q_width + (c / p.head_dim) * p.head_dim;
        let d = c % p.head_dim;
        v0 = rotated(base, d, pos);
        v1 = rotated(base, d + 1u, pos);
    } else {
        v0 = x[row + q_width + c];
        v1 = x[row + q_width + c + 1u];
    }
    let o = (c / p.head_dim) * p.ctx * p.head_dim + pos * p.head_dim + c % p.head_dim;
#if KV_F16
    cache[o / 2u] = pack2x16float(vec2<f32>(v0, v1));
#else
    cache[o] = v0;
    cache[o + 1u] = v1;
#endif
}
