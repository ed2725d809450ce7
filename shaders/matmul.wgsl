// out[m, out_col + n] (+)= sum_k x[m, k] * W[n, k] (+ bias[bias_off + n])
//
// x: f32 activations [M, K] with row stride x_stride. W: one row-part [N, K] of a weight in
// any storage format (weights.wgsl). Two entry points: `gemv` (one workgroup per output
// element, a reduction over K; for M of 1 to a few) and `gemm` (64x64 to 128x128 output tiles
// through workgroup memory; for many rows). Accumulation is f32 in both (the f16 form of
// `gemm` sums 16 products in f16 before each f32 addition).

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
        acc += w_dot8(n * p.k + k0, (p.row0 + m) * p.x_stride + k0, min(8u, p.k - k0));
    }
    let total = wg_sum(acc, ids);
    if (ids.lid == 0u) {
        store(m, n, total);
    }
}

const TK: u32 = 16u;

// The tiled GEMM comes in forms chosen per adapter by measurement (src/gpu/tune.rs):
// - the default: 64x64 output tiles, each invocation a 4x4 block;
// - GEMM_WIDE: 128 columns per tile, each invocation a second 4x4 block 64 columns further;
// - GEMM_TALL: 128 rows per tile, each invocation a second 4x4 block 64 rows further;
//   WIDE and TALL together make 128x128 tiles of 8x8 blocks (the workgroup memory then fills
//   the portable 16 KiB). Larger blocks mean fewer workgroup-memory loads per multiply-add and
//   more accumulator registers;
// - GEMM_SHORT: 32 rows per tile in workgroups of 16x8 invocations, for at most 32 rows of x
//   (the Q-Former's 32 queries, a short prompt), which would leave half of a 64-row tile
//   multiplying zeros;
// - GEMM_HALF (with F16): the tiles held as f16 and each 16-deep step of the tile multiplied
//   and summed in f16, added to f32 accumulators once per step: half the workgroup memory
//   traffic and packed f16 arithmetic where GPUs have it, at f16 precision for x and the
//   products (the precision MiniGPT-4 itself runs its ViT and LLM in);
// - ROWS_SG (f32 tiles, subgroup variants on CPU drivers: `rows_subgroup_fits`): the inner
//   loop's x vec4s, which the 16 invocations of a row (l.y) all read, loaded once per 8 steps
//   by 8 lanes and handed round by subgroupBroadcast from constant lanes (on llvmpipe every
//   lane's workgroup-memory load is a gather, same address or not; a broadcast is a register
//   shuffle). It relies on a subgroup lying within one row of invocations (see
//   attention.wgsl's attention_tiled).
// TM rows per tile; invocations: 16 x WGY, each loading 4 consecutive k of a tile row, so RP
// tile rows per pass
#if GEMM_SHORT
const TM: u32 = 32u;
const WGY: u32 = 8u;
#else
const WGY: u32 = 16u;
#if GEMM_TALL
const TM: u32 = 128u;
#else
const TM: u32 = 64u;
#endif
#endif
const RP: u32 = 4u * WGY;
#if GEMM_WIDE
const TN: u32 = 128u;
#else
const TN: u32 = 64u;
#endif
// vec4s of x rows and of weight columns per tile row of k
const XV: u32 = TM / 4u;
const WV: u32 = TN / 4u;

#if GEMM_HALF
alias T4 = vec4<f16>;
alias TS = f16;
#else
alias T4 = vec4<f32>;
alias TS = f32;
#endif

// The tiles, transposed and four wide: xs4[kk * XV + i] holds x rows m0 + 4i .. 4i + 3 at
// k0 + kk, ws4[kk * WV + j] weight rows (output columns) n0 + 4j .. 4j + 3. Each step of the
// inner loop reads one vec4 of x and one of weights per 4x4 block (a 4x8 or 8x8 block shares
// them) and does 16 multiply-adds per block.
var<workgroup> xs4: array<T4, TK * XV>;
var<workgroup> ws4: array<T4, TK * WV>;

// A 4x4 block of sums in the tiles' type (rows of x .. x + 3, each a vec4 over 4 columns).
struct Blk {
    r0: T4,
    r1: T4,
    r2: T4,
    r3: T4,
}

fn blk_fma(c: ptr<function, Blk>, a: T4, b: T4) {
    (*c).r0 += a.x * b;
    (*c).r1 += a.y * b;
    (*c).r2 += a.z * b;
    (*c).r3 += a.w * b;
}

#if GEMM_HALF
// The f32 accumulators of a block, to which each 16-deep step's f16 sums are added.
struct Acc {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

fn acc_add(c: ptr<function, Acc>, s: Blk) {
    (*c).r0 += vec4<f32>(s.r0);
    (*c).r1 += vec4<f32>(s.r1);
    (*c).r2 += vec4<f32>(s.r2);
    (*c).r3 += vec4<f32>(s.r3);
}
#else
// f32 tiles: the sums are the accumulators.
alias Acc = Blk;
#endif

// One step (kk) of the inner loop: the x vec4s a (rows 4 l.y ..) and a2 (64 rows further,
// GEMM_TALL) times the weight vec4s of columns 4 lx .. (and 64 columns further, GEMM_WIDE).
fn tile_step(s_a: ptr<function, Blk>, s_b: ptr<function, Blk>, s_c: ptr<function, Blk>,
             s_d: ptr<function, Blk>, a: T4, a2: T4, kk: u32, lx: u32) {
    let b = ws4[kk * WV + lx];
    blk_fma(s_a, a, b);
#if GEMM_WIDE
    let b2 = ws4[kk * WV + 16u + lx];
    blk_fma(s_b, a, b2);
#endif
#if GEMM_TALL
    blk_fma(s_c, a2, b);
#if GEMM_WIDE
    blk_fma(s_d, a2, b2);
#endif
#endif
}

// Workgroup (x, y) computes output columns x*TN.. and rows y*TM..; each invocation the 4x4
// block at rows m0 + 4 l.y .., columns n0 + 4 l.x .., and with GEMM_WIDE / GEMM_TALL the
// blocks 64 columns / 64 rows further, held in registers.
@compute @workgroup_size(16, WGY)
fn gemm(@builtin(local_invocation_id) l: vec3<u32>,
        @builtin(local_invocation_index) li: u32,
        @builtin(workgroup_id) wg: vec3<u32>) {
    let n0 = wg.x * TN;
    let m0 = wg.y * TM;
#if ROWS_SG
    // (every invocation runs to the end: the broadcasts see the whole subgroup)
    let lane = subgroupExclusiveAdd(1u);
#endif
    // blocks: a (rows +0, cols +0), b (cols +64), c (rows +64), d (both)
    var acc_a = Acc();
    var acc_b = Acc();
    var acc_c = Acc();
    var acc_d = Acc();
    // This invocation loads 4 consecutive k (k0 + 4 kq ..) of tile row r, for x and for W
    // (and rows r + RP, ... where the tile has them).
    let r = li / 4u;
    let kq = li % 4u;
    let c = r % 4u;
    let whole = p.k % 4u == 0u; // W rows start on a multiple of 4: one w4_at per 4 weights
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        let gk = k0 + 4u * kq;
        for (var h = 0u; h < TM / RP; h++) {
            let xr = m0 + r + RP * h;
            var xv = vec4<f32>(0.0);
            if (xr < p.m) {
                for (var e = 0u; e < 4u; e++) {
                    if (gk + e < p.k) {
                        xv[e] = x[(p.row0 + xr) * p.x_stride + gk + e];
                    }
                }
            }
            for (var e = 0u; e < 4u; e++) {
                xs4[(4u * kq + e) * XV + (RP / 4u) * h + r / 4u][c] = TS(xv[e]);
            }
        }
        for (var h = 0u; h < TN / RP; h++) {
            let wr = n0 + r + RP * h;
            var wv = vec4<f32>(0.0);
            if (wr < p.n && gk < p.k) {
                if (whole) {
                    wv = w4_at(wr * p.k + gk);
                } else {
                    for (var e = 0u; e < 4u; e++) {
                        if (gk + e < p.k) {
                            wv[e] = w_at(wr * p.k + gk + e);
                        }
                    }
                }
            }
            for (var e = 0u; e < 4u; e++) {
                ws4[(4u * kq + e) * WV + (RP / 4u) * h + r / 4u][c] = TS(wv[e]);
            }
        }
        workgroupBarrier();
        // where this step's products go: f16 sums of the step (added to the f32 accumulators
        // after it), or the f32 accumulators themselves
#if GEMM_HALF
        var t_a = Blk();
        var t_b = Blk();
        var t_c = Blk();
        var t_d = Blk();
        let s_a = &t_a;
        let s_b = &t_b;
        let s_c = &t_c;
        let s_d = &t_d;
#else
        let s_a = &acc_a;
        let s_b = &acc_b;
        let s_c = &acc_c;
        let s_d = &acc_d;
#endif
#if ROWS_SG
        // x's vec4s at 8 steps loaded by 8 lanes, taken by the others from constant lanes
        for (var k8 = 0u; k8 < TK; k8 += 8u) {
            let al = xs4[(k8 + lane % 8u) * XV + l.y];
#if GEMM_TALL
            let al2 = xs4[(k8 + lane % 8u) * XV + 16u + l.y];
#else
            let al2 = al;
#endif
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 0u), subgroupBroadcast(al2, 0u),
                      k8 + 0u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 1u), subgroupBroadcast(al2, 1u),
                      k8 + 1u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 2u), subgroupBroadcast(al2, 2u),
                      k8 + 2u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 3u), subgroupBroadcast(al2, 3u),
                      k8 + 3u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 4u), subgroupBroadcast(al2, 4u),
                      k8 + 4u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 5u), subgroupBroadcast(al2, 5u),
                      k8 + 5u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 6u), subgroupBroadcast(al2, 6u),
                      k8 + 6u, l.x);
            tile_step(s_a, s_b, s_c, s_d, subgroupBroadcast(al, 7u), subgroupBroadcast(al2, 7u),
                      k8 + 7u, l.x);
        }
#else
        for (var kk = 0u; kk < TK; kk++) {
#if GEMM_TALL
            let a2 = xs4[kk * XV + 16u + l.y];
#else
            let a2 = T4();
#endif
            tile_step(s_a, s_b, s_c, s_d, xs4[kk * XV + l.y], a2, kk, l.x);
        }
#endif
#if GEMM_HALF
        acc_add(&acc_a, t_a);
#if GEMM_WIDE
        acc_add(&acc_b, t_b);
#endif
#if GEMM_TALL
        acc_add(&acc_c, t_c);
#if GEMM_WIDE
        acc_add(&acc_d, t_d);
#endif
#endif
#endif
        workgroupBarrier();
    }
    let m = m0 + l.y * 4u;
    let n = n0 + l.x * 4u;
    store_blk(m, n, acc_a);
#if GEMM_WIDE
    store_blk(m, n + 64u, acc_b);
#endif
#if GEMM_TALL
    store_blk(m + 64u, n, acc_c);
#if GEMM_WIDE
    store_blk(m + 64u, n + 64u, acc_d);
#endif
#endif
}

// Stores a 4x4 block at rows m .. m + 3, columns n .. n + 3 (those inside the output).
fn store_blk(m: u32, n: u32, b: Acc) {
    let rows = array<vec4<f32>, 4>(b.r0, b.r1, b.r2, b.r3);
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            if (m + i < p.m && n + j < p.n) {
                store(m + i, n + j, rows[i][j]);
            }
        }
    }
}
