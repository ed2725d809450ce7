// out[m, out_col + n] (+)= sum_k x[m, k] * W[n, k] (+ bias[bias_off + n])
//
// x: f32 activations [M, K] with row stride x_stride. W: one row-part [N, K] of a weight in
// any storage format (weights.wgsl). Two entry points: `gemv` (one workgroup per output
// element, a reduction over K; for M of 1 to a few) and `gemm` (64x64 output tiles through
// workgroup memory; for many rows). Accumulation is f32 in both.

#include common
#include weights
#include matmul_out

@group(0) @binding(1) var<storage, read> x: array<f32>;

// Dot product of `count` (<= 8) consecutive weights starting at element wi with x[xi..].
fn w_dot8(wi: u32, xi: u32, count: u32) -> f32 {
    var acc = 0.0;
#if W_Q4
    if (count == 8u) {
        let word = w[wi >> 5u][(wi >> 3u) & 3u];
        let d = scale_at(wi >> 5u);
        var s = 0.0;
        for (var j = 0u; j < 8u; j++) {
            s += (f32(extractBits(word, j * 4u, 4u)) - 8.0) * x[xi + j];
        }
        return s * d;
    }
#endif
    for (var j = 0u; j < count; j++) {
        acc += w_at(wi + j) * x[xi + j];
    }
    return acc;
}

@compute @workgroup_size(64)
fn gemv(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g >= p.n * p.m) {
        return;
    }
    let n = g % p.n;
    let m = g / p.n;
    var acc = 0.0;
    let chunks = (p.k + 7u) / 8u;
    for (var c = ids.lid; c < chunks; c += WG) {
        let k0 = c * 8u;
        acc += w_dot8(n * p.k + k0, m * p.x_stride + k0, min(8u, p.k - k0));
    }
    let total = wg_sum(acc, ids);
    if (ids.lid == 0u) {
        store(m, n, total);
    }
}

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

// The tiles, transposed and four wide: xs4[kk * 16 + i] holds x rows m0 + 4i .. 4i + 3 at
// k0 + kk, ws4 the same for weight rows (output columns). The inner loop reads one vec4 of
// each per step and does 16 multiply-adds with them.
var<workgroup> xs4: array<vec4<f32>, 256>;
var<workgroup> ws4: array<vec4<f32>, 256>;

// Workgroup (x, y) computes output columns x*64.. and rows y*64..; each invocation a 4x4 block
// (rows m0 + 4 l.y .., columns n0 + 4 l.x ..) held in registers.
@compute @workgroup_size(16, 16)
fn gemm(@builtin(local_invocation_id) l: vec3<u32>,
        @builtin(local_invocation_index) li: u32,
        @builtin(workgroup_id) wg: vec3<u32>) {
    let n0 = wg.x * TN;
    let m0 = wg.y * TM;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // This invocation loads 4 consecutive k (k0 + 4 kq ..) of tile row r, for x and for W.
    let r = li / 4u;
    let kq = li % 4u;
    let slot = kq * 64u + r / 4u; // xs4 index of k0 + 4 kq, row r (+ 16 per further k)
    let c = r % 4u;
    let whole = p.k % 4u == 0u; // W rows start on a multiple of 4: one w4_at per 4 weights
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        let gk = k0 + 4u * kq;
        var xv = vec4<f32>(0.0);
        if (m0 + r < p.m) {
            for (var e = 0u; e < 4u; e++) {
                if (gk + e < p.k) {
                    xv[e] = x[(m0 + r) * p.x_stride + gk + e];
                }
            }
        }
        var wv = vec4<f32>(0.0);
        if (n0 + r < p.n && gk < p.k) {
            if (whole) {
                wv = w4_at((n0 + r) * p.k + gk);
            } else {
                for (var e = 0u; e < 4u; e++) {
                    if (gk + e < p.k) {
                        wv[e] = w_at((n0 + r) * p.k + gk + e);
                    }
                }
            }
        }
        for (var e = 0u; e < 4u; e++) {
            xs4[slot + e * 16u][c] = xv[e];
            ws4[slot + e * 16u][c] = wv[e];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = xs4[kk * 16u + l.y];
            let b = ws4[kk * 16u + l.x];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    let acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + l.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + l.x * 4u + j;
            if (m < p.m && n < p.n) {
                store(m, n, acc[i][j]);
            }
        }
    }
}
