// Patch extraction for a stride = kernel convolution (the ViT patch embedding):
// img [C, H, W] -> out [gh * gw, C * patch * patch], patches row-major (y then x), columns in
// the conv weight's (c, ky, kx) order, so the convolution is then one matmul.

#include common

struct Params {
    c: u32,
    h: u32,
    w: u32,
    ps: u32,
    gw: u32,
    gh: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> img: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn im2col(ids: Ids, grp: Grp) {
    let pp = p.ps * p.ps;
    let cols = p.c * pp;
    let e = flat_index(grp, ids);
    if (e >= p.gw * p.gh * cols) {
        return;
    }
    let row = e / cols;
    let col = e % cols;
    let py = row / p.gw;
    let px = row % p.gw;
    let ch = col / pp;
    let r = col % pp;
    let y = py * p.ps + r / p.ps;
    let x = px * p.ps + r % p.ps;
    out[e] = img[(ch * p.h + y) * p.w + x];
}
