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

var<workgroup> xs: array<f32, 1024>; // [TK][TM]
var<workgroup> ws: array<f32, 1024>; // [TK][TN]

// Workgroup (x, y) computes output columns x*64.. and rows y*64..; each invocation a 4x4 block.
@compute @workgroup_size(16, 16)
fn gemm(@builtin(local_invocation_id) l: vec3<u32>,
        @builtin(local_invocation_index) li: u32,
        @builtin(workgroup_id) wg: vec3<u32>) {
    let n0 = wg.x * TN;
    let m0 = wg.y * TM;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = li + e * 256u;
            let r = idx / TK;
            let kk = idx % TK;
            let gk = k0 + kk;
            var xv = 0.0;
            if (m0 + r < p.m && gk < p.k) {
                xv = x[(m0 + r) * p.x_stride + gk];
            }
            xs[kk * TM + r] = xv;
            var wv = 0.0;
            if (n0 + r < p.n && gk < p.k) {
                wv = w_at((n0 + r) * p.k + gk);
            }
            ws[kk * TN + r] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[kk * TM + l.y * 4u + i];
                b[i] = ws[kk * TN + l.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + l.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + l.x * 4u + j;
            if (m < p.m && n < p.n) {
                store(m, n, acc[i * 4u + j]);
            }
        }
    }
}
