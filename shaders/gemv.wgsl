// GEMV for decode: out[m, out_col + n] (+)= sum_k x[m, k] * W[n, k] (+ bias), for M <= 4 rows
// of x and K a multiple of 32 (one quantisation block).
//
// A workgroup of 64 invocations computes ROWS = 64 / LANES output columns n. The LANES
// invocations of one column walk its K in whole 32-weight blocks (lane j takes blocks j,
// j + LANES, ...), with u32 weight loads (8 four-bit or 4 eight-bit weights per load), one
// scale per block, and x read as vec4. The LANES partial sums of a column are then added in
// workgroup memory.
// LANES (1, 4, 8, 16, 32 or 64) is chosen per adapter by measurement (src/gpu/tune.rs): wide
// for GPUs, whose neighbouring invocations should read neighbouring blocks; 1 suits CPU
// drivers, where every invocation then reads the same x block at the same time (one load for
// the whole SIMD vector) and no reduction step is needed.

#include common
#include weights
#include matmul_out

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

#if LANES1
const LANES: u32 = 1u;
#endif
#if LANES4
const LANES: u32 = 4u;
#endif
#if LANES8
const LANES: u32 = 8u;
#endif
#if LANES16
const LANES: u32 = 16u;
#endif
#if LANES32
const LANES: u32 = 32u;
#endif
#if LANES64
const LANES: u32 = 64u;
#endif
const ROWS: u32 = WG / LANES;
const MMAX: u32 = 4u;

#if X_SILU
// The input is silu(gate) * up, computed as it is read (LLaMA's down projection): x holds
// the gate, x_up the up projection. Saves the pass that would write the product.
@group(0) @binding(6) var<storage, read> x_up: array<vec4<f32>>;
#endif

// x[m, 32 * b + 4 * j ..][0..4] as a vec4 (x_stride is a multiple of 4).
fn xv(m: u32, b: u32, j: u32) -> vec4<f32> {
    let i = (m * p.x_stride + b * 32u) / 4u + j;
#if X_SILU
    let g = x[i];
    return g / (1.0 + exp(-g)) * x_up[i];
#else
    return x[i];
#endif
}

// Eight consecutive weights (elements 8j .. 8j + 7 of a block), before the block scale.
struct W8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Four nibbles of `word` starting at bit `shift`, as f32 (signed conversions are the cheap ones).
fn nibbles(word: i32, shift: u32) -> vec4<f32> {
    let s = vec4<u32>(shift, shift + 4u, shift + 8u, shift + 12u);
    return vec4<f32>((vec4<i32>(word) >> s) & vec4<i32>(15));
}

// Weights 8j .. 8j + 7 of block `blk` (block index within the tensor part): q - 8 for q4, q
// for q4m and q8, the values themselves for f16 and f32.
fn w8(blk: u32, j: u32) -> W8 {
#if W_Q4
    let word = bitcast<i32>(w[blk * 4u + j]);
    return W8(nibbles(word, 0u) - 8.0, nibbles(word, 16u) - 8.0);
#endif
#if W_Q4M
    let word = bitcast<i32>(w[blk * 4u + j]);
    return W8(nibbles(word, 0u), nibbles(word, 16u));
#endif
#if W_Q8
    let sh = vec4<u32>(24u, 16u, 8u, 0u);
    let a = bitcast<i32>(w[blk * 8u + 2u * j]);
    let c = bitcast<i32>(w[blk * 8u + 2u * j + 1u]);
    return W8(vec4<f32>((vec4<i32>(a) << sh) >> vec4<u32>(24u)),
              vec4<f32>((vec4<i32>(c) << sh) >> vec4<u32>(24u)));
#endif
#if W_F16
    let i = blk * 16u + 4u * j;
#if F16
    return W8(vec4<f32>(vec2<f32>(w[i]), vec2<f32>(w[i + 1u])),
              vec4<f32>(vec2<f32>(w[i + 2u]), vec2<f32>(w[i + 3u])));
#else
    return W8(vec4<f32>(unpack2x16float(w[i]), unpack2x16float(w[i + 1u])),
              vec4<f32>(unpack2x16float(w[i + 2u]), unpack2x16float(w[i + 3u])));
#endif
#endif
#if W_F32
    let e = blk * 32u + 8u * j;
    return W8(vec4<f32>(w[e], w[e + 1u], w[e + 2u], w[e + 3u]),
              vec4<f32>(w[e + 4u], w[e + 5u], w[e + 6u], w[e + 7u]));
#endif
}

// A block's dot product from its unscaled sum s and (q4m) the sum of its x.
fn finish(blk: u32, s: vec4<f32>, sx: vec4<f32>) -> f32 {
    let t = dot(s, vec4<f32>(1.0));
#if W_Q4
    return t * scale_at(blk);
#endif
#if W_Q8
    return t * scale_at(blk);
#endif
#if W_Q4M
    let dm = unpack2x16float(w_scales[blk]);
    return t * dm.x + dot(sx, vec4<f32>(1.0)) * dm.y;
#endif
#if W_F16
    return t;
#endif
#if W_F32
    return t;
#endif
}

// sum_j W[n, 32 b + j] * x[m, 32 b + j] for block b of column n.
fn block_dot(n: u32, b: u32, m: u32) -> f32 {
    let blk = n * (p.k / 32u) + b;
    var s = vec4<f32>(0.0);
    var sx = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let x0 = xv(m, b, 2u * j);
        let x1 = xv(m, b, 2u * j + 1u);
        let q = w8(blk, j);
        s += q.lo * x0 + q.hi * x1;
#if W_Q4M
        sx += x0 + x1;
#endif
    }
    return finish(blk, s, sx);
}

// The same for four columns n, n + ROWS, n + 2 ROWS, n + 3 ROWS and row 0 of x, sharing
// every x load (on CPU drivers each x load is a gather; on GPUs it saves cache traffic).
fn block_dot4(n: u32, b: u32) -> vec4<f32> {
    let stride = ROWS * (p.k / 32u);
    let blk = n * (p.k / 32u) + b;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
    var sx = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let x0 = xv(0u, b, 2u * j);
        let x1 = xv(0u, b, 2u * j + 1u);
        let q0 = w8(blk, j);
        let q1 = w8(blk + stride, j);
        let q2 = w8(blk + 2u * stride, j);
        let q3 = w8(blk + 3u * stride, j);
        s0 += q0.lo * x0 + q0.hi * x1;
        s1 += q1.lo * x0 + q1.hi * x1;
        s2 += q2.lo * x0 + q2.hi * x1;
        s3 += q3.lo * x0 + q3.hi * x1;
#if W_Q4M
        sx += x0 + x1;
#endif
    }
    return vec4<f32>(
        finish(blk, s0, sx),
        finish(blk + stride, s1, sx),
        finish(blk + 2u * stride, s2, sx),
        finish(blk + 3u * stride, s3, sx),
    );
}

// Output columns per invocation: n, n + ROWS, n + 2 ROWS, n + 3 ROWS (so a workgroup covers
// 4 ROWS columns).
const CPI: u32 = 4u;

var<workgroup> part: array<vec4<f32>, 256>; // [CPI][WG] partial sums, one vec4 over m

@compute @workgroup_size(64)
fn gemv(ids: Ids, grp: Grp) {
    let col = ids.lid / LANES;
    let lane = ids.lid % LANES;
    let n = group_index(grp) * CPI * ROWS + col;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let blocks = p.k / 32u;
    if (n + 3u * ROWS < p.n && p.m == 1u) {
        // decode, all four columns present: one x load serves four weight loads
        for (var b = lane; b < blocks; b += LANES) {
            let d = block_dot4(n, b);
            acc0.x += d.x;
            acc1.x += d.y;
            acc2.x += d.z;
            acc3.x += d.w;
        }
    } else {
        for (var b = lane; b < blocks; b += LANES) {
            for (var m = 0u; m < p.m; m++) {
                if (n < p.n) {
                    acc0[m] += block_dot(n, b, m);
                }
                if (n + ROWS < p.n) {
                    acc1[m] += block_dot(n + ROWS, b, m);
                }
                if (n + 2u * ROWS < p.n) {
                    acc2[m] += block_dot(n + 2u * ROWS, b, m);
                }
                if (n + 3u * ROWS < p.n) {
                    acc3[m] += block_dot(n + 3u * ROWS, b, m);
                }
            }
        }
    }
    // Add the LANES partial sums of each column (a tree in workgroup memory).
    part[ids.lid] = acc0;
    part[WG + ids.lid] = acc1;
    part[2u * WG + ids.lid] = acc2;
    part[3u * WG + ids.lid] = acc3;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var r = 0u; r < CPI; r++) {
                part[r * WG + ids.lid] += part[r * WG + ids.lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        for (var r = 0u; r < CPI; r++) {
            let c = n + r * ROWS;
            if (c >= p.n) {
                break;
            }
            let total = part[r * WG + ids.lid];
            for (var m = 0u; m < p.m; m++) {
                store(m, c, total[m]);
            }
        }
    }
}
