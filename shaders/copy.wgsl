// Strided 2-D copy between two buffers: dst[dst_off + r * dst_stride + c] =
// src[src_off + r * src_stride + c]. Concatenation, slicing and KV-cache writes are copies.

#include common

struct Params {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_stride: u32,
    dst_off: u32,
    dst_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn copy_rows(ids: Ids, grp: Grp) {
    let e = flat_index(grp, ids);
    if (e >= p.rows * p.cols) {
        return;
    }
    let r = e / p.cols;
    let c = e % p.cols;
    dst[p.dst_off + r * p.dst_stride + c] = src[p.src_off + r * p.src_stride + c];
}

// The bandwidth yardstick of `minigpt4 bench`: a contiguous copy of vec4s (p.rows of them),
// the simplest kernel that moves memory at the device's pace.
@group(0) @binding(3) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dst4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy_vec4(ids: Ids, grp: Grp) {
    let e = flat_index(grp, ids);
    if (e < p.rows) {
        dst4[e] = src4[e];
    }
}

// copy_rows into an f16 destination (a LLaMA KV cache): element pairs rounded to f16 and packed
// in one u32 word. cols, dst_off and dst_stride are even.
@group(0) @binding(5) var<storage, read_write> dst16: array<u32>;

@compute @workgroup_size(256)
fn copy_rows_f16(ids: Ids, grp: Grp) {
    let e = flat_index(grp, ids);
    let pairs = p.cols / 2u;
    if (e >= p.rows * pairs) {
        return;
    }
    let r = e / pairs;
    let c = 2u * (e % pairs);
    let si = p.src_off + r * p.src_stride + c;
    dst16[(p.dst_off + r * p.dst_stride + c) / 2u] = pack2x16float(vec2<f32>(src[si], src[si + 1u]));
}
