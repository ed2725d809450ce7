// GEMV for decode: out[m, out_col + n] (+)= sum_k x[m, k] * W[n, k] (+ bias), for M <= 4 rows
// of x and K a multiple of 32 (one quantisation block).
//
// A workgroup of GW invocations (64, or 16 with WG16) computes 4 ROWS output columns
// (ROWS = GW / LANES; each invocation takes columns n, n + ROWS, n + 2 ROWS, n + 3 ROWS and
// shares every x load among them). The LANES invocations of a column walk its K in whole 32-weight blocks (lane
// j takes blocks j, j + LANES, ...; in decode, for q4 and q8, pairs of blocks, whose scales
// share a word). Quantised weights are read with 16-byte loads (one per q4 block, two per q8
// block) and x as vec4. The LANES partial sums of a column are then added in workgroup
// memory (with one lane, no workgroup memory and no barrier).
//
// Memory-bound kernels on CPU drivers are bound by the number of loads (each is a gather
// across the SIMD lanes), so wide loads and fewer scale loads are what count there; they are
// also what GPUs coalesce best.
//
// With GLU (one row of x, quantised weights), the workgroup computes LLaMA's silu(gate) * up
// for 2 ROWS columns in one pass: an invocation's four weight rows are gate rows n and
// n + ROWS (binding 2) and the same up rows (binding 6), so gate and up share every x load and
// the MLP costs one dispatch fewer per layer.
//
// With ROPE (one row of x), the GEMV is a LLaMA layer's fused QKV projection and also does
// what `rope_kv` in rope.wgsl does after it: an invocation's four weight rows are the
// columns of two rotation pairs (see quad_rows), which it rotates before storing; q goes to
// the output rotated, k and v as computed, and the rotated k with v into the KV cache at the
// position. One dispatch per layer fewer in decode.
//
// LANES (1, 4, 8, 16, 32 or 64) is chosen per adapter by measurement (src/gpu/tune.rs): wide
// for GPUs, whose neighbouring invocations should read neighbouring blocks; 1 suits CPU
// drivers, where no reduction step is needed.
//
// With X_SG (one lane, one row of x, or gemv_rows4's four; subgroups of at least 8 that the
// workgroup fills), x is loaded once per block per subgroup, not per invocation: each invocation loads one of the
// block's 8 x vec4s and the rest come by subgroupBroadcast. On CPU drivers a load that every
// invocation makes at the same address still costs one per invocation (llvmpipe 22.3 loads
// lane by lane), as much as the weights; a broadcast from a constant lane is a register
// shuffle. GPUs save the repeated x traffic through their caches.

#include common
#include weights
#include matmul_out

#if X_UNIFORM
// One row of x through a uniform binding (64 KiB: up to 16384 values), a tuned choice: CPU
// drivers read a uniform buffer with vector gathers, or one load for all invocations where
// the index is the same, instead of element by element; GPUs broadcast it when every
// invocation reads the same place (one lane per column).
@group(0) @binding(1) var<uniform> x: array<vec4<f32>, 4096>;
#else
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
#endif

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
// Invocations per workgroup: 64, or (WG16, a tuned choice) 16, which makes four times as many
// workgroups for the same matrix; CPU drivers run a workgroup per thread, and small matrices
// (SmolLM2's 576 rows) then spread evenly over the threads.
#if WG16
const GW: u32 = 16u;
#else
const GW: u32 = WG;
#endif
const ROWS: u32 = GW / LANES;

#if GLU
// The up projection (same shape and format as the gate projection in `w`).
@group(0) @binding(6) var<storage, read> w2: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> w2_scales: array<u32>;
#endif

#if NORM
// RMSNorm fused in (one row of x): the weights meet x * norm_w, the sum of squares of x is
// gathered from the same loads, and each column's total is scaled by 1 / rms(x) when stored.
// norm_w is bound like x (a uniform with X_UNIFORM).
#if X_UNIFORM
@group(0) @binding(8) var<uniform> norm_w: array<vec4<f32>, 4096>;
#else
@group(0) @binding(8) var<storage, read> norm_w: array<vec4<f32>>;
#endif
// This invocation's share of sum(x * x), one term per x element it reads.
var<private> sumsq: vec4<f32>;
#endif

#if ROPE
// The rotation table of rope.wgsl: table[(pos * half + i) * 2 + {0, 1}] = (cos, sin).
@group(0) @binding(9) var<storage, read> table: array<f32>;
// The layer's KV cache, head-major as rope_kv writes it; f16 pairs with KV_F16.
#if KV_F16
@group(0) @binding(10) var<storage, read_write> cache: array<u32>;
#else
@group(0) @binding(10) var<storage, read_write> cache: array<f32>;
#endif

// The four output columns of quad u: two rotation pairs whose members lie side by side too,
// so that each invocation holds whole pairs to rotate and whole f16 pairs to store. HF's
// rotate-half (rope_mode 0) pairs element i of a head with i + half: the quad is columns
// c, c + 1, c + half, c + half + 1 of a head (c even, half even); interleaved pairs (mode 1)
// are 2i, 2i + 1: the quad is four consecutive columns. Rotation pairs are (x, z) and (y, w)
// in mode 0, (x, y) and (z, w) in mode 1; f16 pairs are (x, y) and (z, w) in both.
fn quad_rows(u: u32) -> vec4<u32> {
    if (p.rope_mode == 1u) {
        return 4u * u + vec4<u32>(0u, 1u, 2u, 3u);
    }
    let per_head = p.rope_hd / 4u;
    let half = p.rope_hd / 2u;
    let c = (u / per_head) * p.rope_hd + 2u * (u % per_head);
    return c + vec4<u32>(0u, 1u, half, half + 1u);
}

// Stores quad u's totals t (of columns quad_rows(u)): q rotated, k and v as they are, and the
// rotated k with v into the cache at position rope_pos. Each rotated value is the same f32
// expression rope_kv computes from the stored values.
fn store_rope(u: u32, t: vec4<f32>) {
    if (u >= p.n / 4u) {
        return;
    }
    let r = quad_rows(u);
    let half = p.rope_hd / 2u;
    let d = r.x % p.rope_hd;
    var v = t;
    if (r.x < p.rope_q + p.rope_kv) {
        // pair i's (cos, sin) at (pos * half + i) * 2; the quad's second pair is i + 1
        var i = d;
        if (p.rope_mode == 1u) {
            i = d / 2u;
        }
        let tb = (p.rope_pos * half + i) * 2u;
        let c0 = table[tb];
        let s0 = table[tb + 1u];
        let c1 = table[tb + 2u];
        let s1 = table[tb + 3u];
        if (p.rope_mode == 1u) {
            v = vec4<f32>(t.x * c0 - t.y * s0, t.y * c0 + t.x * s0,
                          t.z * c1 - t.w * s1, t.w * c1 + t.z * s1);
        } else {
            v = vec4<f32>(t.x * c0 - t.z * s0, t.y * c1 - t.w * s1,
                          t.z * c0 + t.x * s0, t.w * c1 + t.y * s1);
        }
    }
    let q = r.x < p.rope_q;
    let o = select(t, v, q);
    for (var j = 0u; j < 4u; j++) {
        store(0u, r[j], o[j]);
    }
    if (q) {
        return;
    }
    // k rotated or v as it is, at position rope_pos of its head's block of the cache (column
    // cc of [k, v]: block cc / head_dim; the quad lies in one head, its pairs side by side)
    let cc = r - vec4<u32>(p.rope_q);
    let hd = vec4<u32>(p.rope_hd);
    let c = (cc / hd) * (p.rope_ctx * p.rope_hd) + p.rope_pos * p.rope_hd + cc % hd;
#if KV_F16
    cache[c.x / 2u] = pack2x16float(v.xy);
    cache[c.z / 2u] = pack2x16float(v.zw);
#else
    for (var j = 0u; j < 4u; j++) {
        cache[c[j]] = v[j];
    }
#endif
}
#endif

// x[row0 + m, 32 * b + 4 * j ..][0..4] as a vec4 (x_stride is a multiple of 4).
fn xv(m: u32, b: u32, j: u32) -> vec4<f32> {
    return x[((p.row0 + m) * p.x_stride + b * 32u) / 4u + j];
}

// The pair of x vec4s that meets weights 8j .. 8j + 7, scaled to match `w8`.
struct X8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
    sum: vec4<f32>, // lo + hi unscaled (for the per-block offset or minimum of q4 and q4m)
}

fn x8(m: u32, b: u32, j: u32) -> X8 {
#if NORM
    return x8_of(xv(m, b, 2u * j), xv(m, b, 2u * j + 1u), norm_w[b * 8u + 2u * j],
                 norm_w[b * 8u + 2u * j + 1u]);
#else
    return x8_of(xv(m, b, 2u * j), xv(m, b, 2u * j + 1u), vec4<f32>(1.0), vec4<f32>(1.0));
#endif
}

// x8 from the pair of x vec4s as loaded (and, with NORM, the norm weights that meet them).
fn x8_of(x_lo: vec4<f32>, x_hi: vec4<f32>, n_lo: vec4<f32>, n_hi: vec4<f32>) -> X8 {
    var lo = x_lo;
    var hi = x_hi;
#if NORM
    sumsq += lo * lo + hi * hi;
    lo *= n_lo;
    hi *= n_hi;
#endif
#if W_Q4 || W_Q4M
    return X8(lo * XS, hi * XS, lo + hi);
#else
    return X8(lo, hi, vec4<f32>(0.0));
#endif
}

// Eight consecutive weights (elements 8j .. 8j + 7 of a block), before the block scale.
struct W8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

#if W_Q4 || W_Q4M
// 4-bit weights are isolated by masking alone: a word's low half holds weights 8j .. 8j + 3
// at bits 0, 4, 8, 12; `(half & M4)` gives q * (1, 16, 256, 4096), and the matching x elements
// are scaled by XS = (1, 1/16, 1/256, 1/4096) once per load (shared by every column that
// uses them). Powers of two scale exactly, so q * x is unchanged; this saves a shift per
// weight.
const M4 = vec4<i32>(0xF, 0xF0, 0xF00, 0xF000);
const XS = vec4<f32>(1.0, 0.0625, 0.00390625, 0.000244140625);

// A block's weight data as loaded: one 16-byte load.
alias WB = vec4<u32>;

fn wload(second: bool, blk: u32) -> WB {
#if GLU
    if (second) {
        return w2[blk];
    }
#endif
    return w[blk];
}

// Weights 8j .. 8j + 7 of a loaded block: q, each times its nibble's place value (see M4; the
// offset of q4 and the minimum of q4m are applied per block through the sum of x).
fn w8(wb: WB, j: u32) -> W8 {
    let v = bitcast<i32>(wb[j]);
    return W8(vec4<f32>(vec4<i32>(v) & M4), vec4<f32>(vec4<i32>(v >> 16u) & M4));
}
#endif

#if W_Q8
// A block's weight data as loaded: two 16-byte loads.
struct WB {
    a: vec4<u32>,
    b: vec4<u32>,
}

fn wload(second: bool, blk: u32) -> WB {
#if GLU
    if (second) {
        return WB(w2[2u * blk], w2[2u * blk + 1u]);
    }
#endif
    return WB(w[2u * blk], w[2u * blk + 1u]);
}

// Weights 8j .. 8j + 7 of a loaded block: q (sign-extended bytes).
fn w8(wb: WB, j: u32) -> W8 {
    let v = select(wb.a, wb.b, j >= 2u);
    let sh = vec4<u32>(24u, 16u, 8u, 0u);
    let a = bitcast<i32>(v[(2u * j) & 3u]);
    let c = bitcast<i32>(v[(2u * j + 1u) & 3u]);
    return W8(vec4<f32>((vec4<i32>(a) << sh) >> vec4<u32>(24u)),
              vec4<f32>((vec4<i32>(c) << sh) >> vec4<u32>(24u)));
}
#endif

#if W_F16
// A block's 32 halves as loaded: four 16-byte loads (eight weights each).
struct WB {
    a: vec4<u32>,
    b: vec4<u32>,
    c: vec4<u32>,
    d: vec4<u32>,
}

// (`second` is GLU's up projection, which runs on quantised weights only: see glu_lanes.)
fn wload(second: bool, blk: u32) -> WB {
    return WB(w[4u * blk], w[4u * blk + 1u], w[4u * blk + 2u], w[4u * blk + 3u]);
}

// Weights 8j .. 8j + 7 of a loaded block (j a constant where it is called).
fn w8(wb: WB, j: u32) -> W8 {
    let v = select(select(wb.a, wb.b, j == 1u), select(wb.c, wb.d, j == 3u), j >= 2u);
    return W8(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)),
              vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}
#endif

#if W_F32
// f32 blocks are read as they are used (two 16-byte loads per eight weights): the block
// index stands for the data.
alias WB = u32;

fn wload(second: bool, blk: u32) -> WB {
    return blk;
}

fn w8(blk: WB, j: u32) -> W8 {
    return W8(w[blk * 8u + 2u * j], w[blk * 8u + 2u * j + 1u]);
}
#endif

// Whether decode walks K in pairs of blocks (see dm2): for the formats whose scales pair up.
#if W_Q4 || W_Q8
const PAIRED: bool = true;
#else
const PAIRED: bool = false;
#endif

#if W_Q4 || W_Q8 || W_Q4M
// Word i of the scales of `w` or (second) of `w2`.
fn scale_word(second: bool, i: u32) -> u32 {
#if GLU
    if (second) {
        return w2_scales[i];
    }
#endif
    return w_scales[i];
}
#endif

// (scale, minimum) of block blk (of `w`, or of `w2` when second): (d, 0) for q4 and q8,
// (d, m) for q4m, (1, 0) unquantised.
fn dm1(second: bool, blk: u32) -> vec2<f32> {
#if W_Q4 || W_Q8
    return vec2<f32>(unpack2x16float(scale_word(second, blk >> 1u))[blk & 1u], 0.0);
#endif
#if W_Q4M
    return unpack2x16float(scale_word(second, blk));
#endif
#if W_F16 || W_F32
    return vec2<f32>(1.0, 0.0);
#endif
}

// The same for blocks blk and blk + 1, blk even: q4 and q8 keep both scales in one word, so
// a pair of blocks costs one scale load instead of two.
fn dm2(second: bool, blk: u32) -> vec4<f32> {
#if W_Q4 || W_Q8
    let d = unpack2x16float(scale_word(second, blk >> 1u));
    return vec4<f32>(d.x, 0.0, d.y, 0.0);
#else
    return vec4<f32>(dm1(second, blk), dm1(second, blk + 1u));
#endif
}

// A block's dot product from its unscaled sum s, the sum of its x (sx) and its dm.
fn finish(s: vec4<f32>, sx: vec4<f32>, dm: vec2<f32>) -> f32 {
    let t = dot(s, vec4<f32>(1.0));
#if W_Q4
    return (t - 8.0 * dot(sx, vec4<f32>(1.0))) * dm.x;
#endif
#if W_Q4M
    return t * dm.x + dot(sx, vec4<f32>(1.0)) * dm.y;
#endif
#if W_Q8 || W_F16 || W_F32
    return t * dm.x;
#endif
}

// sum_j W[n, 32 b + j] * x[m, 32 b + j] for block b of column n.
fn block_dot(n: u32, b: u32, m: u32) -> f32 {
    let blk = n * (p.k / 32u) + b;
    let wb = wload(false, blk);
    var s = vec4<f32>(0.0);
    var sx = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let xj = x8(m, b, j);
        let q = w8(wb, j);
        s += q.lo * xj.lo + q.hi * xj.hi;
        sx += xj.sum;
    }
    return finish(s, sx, dm1(false, blk));
}

// Unscaled sums of block b of four weight rows and row 0 of x, sharing every x load (on CPU
// drivers each x load is a gather; on GPUs it saves cache traffic). `base` holds each row's
// first block; rows 2 and 3 come from `w2` with GLU.
struct Sums4 {
    s0: vec4<f32>,
    s1: vec4<f32>,
    s2: vec4<f32>,
    s3: vec4<f32>,
    sx: vec4<f32>,
}

#if GLU
const SECOND_HALF: bool = true;
#else
const SECOND_HALF: bool = false;
#endif

fn sums4(base: vec4<u32>, b: u32) -> Sums4 {
    var r = Sums4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let c0 = wload(false, base.x + b);
    let c1 = wload(false, base.y + b);
    let c2 = wload(SECOND_HALF, base.z + b);
    let c3 = wload(SECOND_HALF, base.w + b);
    // written out, not looped: every index into the loaded words is then a constant, whatever
    // the driver's unrolling heuristics decide (a dynamic index into a vector can cost a
    // chain of selects per use)
#if X_SG
    // the block's 8 x vec4s (and norm weights): one load per invocation, shared through the
    // subgroup (lanes 0..7 hold them; broadcasts take a constant lane)
    let xl = xv(0u, b, sg_lane & 7u);
#if NORM
    let nl = norm_w[b * 8u + (sg_lane & 7u)];
#else
    let nl = vec4<f32>(1.0);
#endif
    acc8(&r, c0, c1, c2, c3, x8_of(subgroupBroadcast(xl, 0u), subgroupBroadcast(xl, 1u),
                                   subgroupBroadcast(nl, 0u), subgroupBroadcast(nl, 1u)), 0u);
    acc8(&r, c0, c1, c2, c3, x8_of(subgroupBroadcast(xl, 2u), subgroupBroadcast(xl, 3u),
                                   subgroupBroadcast(nl, 2u), subgroupBroadcast(nl, 3u)), 1u);
    acc8(&r, c0, c1, c2, c3, x8_of(subgroupBroadcast(xl, 4u), subgroupBroadcast(xl, 5u),
                                   subgroupBroadcast(nl, 4u), subgroupBroadcast(nl, 5u)), 2u);
    acc8(&r, c0, c1, c2, c3, x8_of(subgroupBroadcast(xl, 6u), subgroupBroadcast(xl, 7u),
                                   subgroupBroadcast(nl, 6u), subgroupBroadcast(nl, 7u)), 3u);
#else
    acc8(&r, c0, c1, c2, c3, x8(0u, b, 0u), 0u);
    acc8(&r, c0, c1, c2, c3, x8(0u, b, 1u), 1u);
    acc8(&r, c0, c1, c2, c3, x8(0u, b, 2u), 2u);
    acc8(&r, c0, c1, c2, c3, x8(0u, b, 3u), 3u);
#endif
    return r;
}

// Adds weights 8j .. 8j + 7 of four loaded blocks times x to r.
fn acc8(r: ptr<function, Sums4>, c0: WB, c1: WB, c2: WB, c3: WB, xj: X8, j: u32) {
    let q0 = w8(c0, j);
    let q1 = w8(c1, j);
    let q2 = w8(c2, j);
    let q3 = w8(c3, j);
    (*r).s0 += q0.lo * xj.lo + q0.hi * xj.hi;
    (*r).s1 += q1.lo * xj.lo + q1.hi * xj.hi;
    (*r).s2 += q2.lo * xj.lo + q2.hi * xj.hi;
    (*r).s3 += q3.lo * xj.lo + q3.hi * xj.hi;
    (*r).sx += xj.sum;
}

// Block b of the four rows, finished.
fn block_dot4(base: vec4<u32>, b: u32) -> vec4<f32> {
    let r = sums4(base, b);
    return vec4<f32>(
        finish(r.s0, r.sx, dm1(false, base.x + b)),
        finish(r.s1, r.sx, dm1(false, base.y + b)),
        finish(r.s2, r.sx, dm1(SECOND_HALF, base.z + b)),
        finish(r.s3, r.sx, dm1(SECOND_HALF, base.w + b)),
    );
}

// Blocks b and b + 1 (b even, K a multiple of 64) of the four rows, finished: one scale load
// per row for both blocks.
fn block_pair_dot4(base: vec4<u32>, b: u32) -> vec4<f32> {
    let d0 = dm2(false, base.x + b);
    let d1 = dm2(false, base.y + b);
    let d2 = dm2(SECOND_HALF, base.z + b);
    let d3 = dm2(SECOND_HALF, base.w + b);
    let r = sums4(base, b);
    let t = sums4(base, b + 1u);
    return vec4<f32>(
        finish(r.s0, r.sx, d0.xy) + finish(t.s0, t.sx, d0.zw),
        finish(r.s1, r.sx, d1.xy) + finish(t.s1, t.sx, d1.zw),
        finish(r.s2, r.sx, d2.xy) + finish(t.s2, t.sx, d2.zw),
        finish(r.s3, r.sx, d3.xy) + finish(t.s3, t.sx, d3.zw),
    );
}

// Weight rows per invocation: columns n, n + ROWS, n + 2 ROWS, n + 3 ROWS (a workgroup covers
// 4 ROWS columns), or with GLU gate and up rows of columns n and n + ROWS (2 ROWS columns).
const CPI: u32 = 4u;
#if GLU
const COLS: u32 = 2u * ROWS;
#else
const COLS: u32 = CPI * ROWS;
#endif

var<workgroup> part: array<vec4<f32>, 256>; // [CPI][GW] partial sums, one vec4 over m

#if X_SG
// This invocation's index in its subgroup (taken where every invocation is active).
var<private> sg_lane: u32;
#endif

@compute @workgroup_size(GW)
fn gemv(ids: Ids, grp: Grp) {
    let col = ids.lid / LANES;
#if X_SG
    // one lane: every invocation walks the same blocks at the same time (and, for the
    // uniformity analysis, a constant)
    let lane = 0u;
    sg_lane = subgroupExclusiveAdd(1u);
#else
    let lane = ids.lid % LANES;
#endif
#if ROPE
    // n is a quad of columns (see quad_rows)
    let n = group_index(grp) * ROWS + col;
    let live = n < p.n / 4u;
#else
    let n = group_index(grp) * COLS + col;
    let live = n < p.n;
#endif
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // (the block count and the row count are bounded by sizes known only at run time too: a
    // loop bound or a branch that follows parameters alone is one Mesa 22's lavapipe inlines,
    // compiling the shader again whenever they change, e.g. at every dispatch between two
    // weight shapes; see store_cols. GPUs lose nothing by it.)
    let blocks = min(p.k / 32u, arrayLength(&w));
#if X_SG
    // every invocation, those past the last column too (they repeat the last row and store
    // nothing): the x broadcasts need the whole subgroup
    let decode = min(p.m, arrayLength(&out)) == 1u;
#else
    let decode = live && p.m == 1u;
#endif
    if (decode) {
        // decode: one x load serves four weight rows. Rows past the end (the last workgroup)
        // repeat the last row and are not stored, so the tail takes the same path.
#if GLU
        let rows = vec4<u32>(n, n + ROWS, n, n + ROWS);
#else
#if ROPE
        let rows = quad_rows(n);
#else
        let rows = n + vec4<u32>(0u, 1u, 2u, 3u) * ROWS;
#endif
#endif
        let base = min(rows, vec4<u32>(p.n - 1u)) * blocks;
        var d = vec4<f32>(0.0);
        if (PAIRED && blocks % 2u == 0u) {
            // pairs of blocks (lane j takes pairs j, j + LANES, ...)
            for (var b = 2u * lane; b < blocks; b += 2u * LANES) {
                d += block_pair_dot4(base, b);
            }
        } else {
            for (var b = lane; b < blocks; b += LANES) {
                d += block_dot4(base, b);
            }
        }
        acc0.x = d.x;
        acc1.x = d.y;
        acc2.x = d.z;
        acc3.x = d.w;
#if NORM
        // one row of x: .y is free to carry the sum of squares through the lane sums
        acc0.y = dot(sumsq, vec4<f32>(1.0));
#endif
    }
#if GLU || ROPE
#else
    else {
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
#endif
#if LANES1
    // One invocation per column: nothing to add up, so no workgroup memory and no barrier
    // (CPU drivers run a workgroup that has a barrier as one coroutine per SIMD slice).
    store_cols(n, acc0, acc1, acc2, acc3);
#else
    // Add the LANES partial sums of each row (a tree in workgroup memory).
    part[ids.lid] = acc0;
    part[GW + ids.lid] = acc1;
    part[2u * GW + ids.lid] = acc2;
    part[3u * GW + ids.lid] = acc3;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var r = 0u; r < CPI; r++) {
                part[r * GW + ids.lid] += part[r * GW + ids.lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        store_cols(n, part[ids.lid], part[GW + ids.lid], part[2u * GW + ids.lid],
                   part[3u * GW + ids.lid]);
    }
#endif
}

// Stores the totals of an invocation's four weight rows (columns n + r ROWS, one vec4 over m
// each): with GLU, silu(gate) * up of columns n and n + ROWS; with ROPE, quad n's columns
// (store_rope). With NORM, t0.y is sum(x * x).
fn store_cols(n: u32, t0: vec4<f32>, t1: vec4<f32>, t2: vec4<f32>, t3: vec4<f32>) {
    let inv = rms_scale(t0.y);
#if ROPE
    store_rope(n, vec4<f32>(t0.x, t1.x, t2.x, t3.x) * inv);
#else
#if GLU
    if (n < p.n) {
        out[p.out_col + n] = silu_mul(t0.x * inv, t2.x * inv);
    }
    if (n + ROWS < p.n) {
        out[p.out_col + n + ROWS] = silu_mul(t1.x * inv, t3.x * inv);
    }
#else
    let t = array<vec4<f32>, 4>(t0, t1, t2, t3);
    for (var r = 0u; r < CPI; r++) {
        let c = n + r * ROWS;
        if (c >= p.n) {
            break;
        }
        // (bounded by the output's length too, a size known only at run time: Mesa 22's
        // lavapipe inlines a parameter that bounds a loop or a branch into the shader, and
        // where that changes the shader enough it keeps compiling it again at every dispatch;
        // this loop did that to gemv_rows4, 5 to 8 ms a dispatch. GPUs lose nothing by it.)
        for (var m = 0u; m < min(p.m, arrayLength(&out)); m++) {
            store(m, c, t[r][m] * inv);
        }
    }
#endif
#endif
}

// What the totals are scaled by: 1 / rms(x) with NORM (from sum(x * x)), else 1.
fn rms_scale(ss: f32) -> f32 {
#if NORM
    return 1.0 / sqrt(ss / f32(p.k) + p.eps);
#else
    return 1.0;
#endif
}

// LLaMA's MLP activation: silu(gate) * up.
fn silu_mul(gate: f32, up: f32) -> f32 {
    return gate / (1.0 + exp(-gate)) * up;
}

#if SUBGROUPS
// The same GEMV for one row of x with subgroup reductions (subgroup variants; chosen per
// adapter by measurement like the lane counts, as "lanes 0"). Each subgroup takes whole
// groups of four weight rows (four columns, or with GLU two columns' gate and up rows); its
// invocations split K in blocks, neighbours reading neighbouring blocks, and one subgroupAdd
// sums them, with no workgroup memory and no barrier tree. Nothing assumes how invocations map
// to subgroups or how large subgroups are: an invocation's place among its subgroup's active
// invocations is a prefix count, and subgroups number themselves through a workgroup atomic.
const SG_GROUPS: u32 = 2u; // groups of four weight rows per workgroup
#if GLU
const SG_COLS: u32 = 2u; // columns per group
#else
const SG_COLS: u32 = 4u;
#endif

var<workgroup> sg_next: atomic<u32>;

@compute @workgroup_size(64)
fn gemv_sg(ids: Ids, grp: Grp) {
    let rank = subgroupExclusiveAdd(1u);
    let count = subgroupAdd(1u);
    var mine = 0u;
    if (rank == 0u) {
        mine = atomicAdd(&sg_next, 1u);
    }
    let sg = subgroupBroadcastFirst(mine);
    workgroupBarrier();
    let subgroups = atomicLoad(&sg_next);
    let blocks = p.k / 32u;
    for (var g = 0u; g < SG_GROUPS; g++) {
        let owner = g % subgroups == sg;
#if ROPE
        // a quad of columns (see quad_rows)
        let n = group_index(grp) * SG_GROUPS + g;
#else
        let n = (group_index(grp) * SG_GROUPS + g) * SG_COLS;
#endif
        var d = vec4<f32>(0.0);
#if NORM
        sumsq = vec4<f32>(0.0);
#endif
        if (owner) {
#if GLU
            let rows = vec4<u32>(n, n + 1u, n, n + 1u);
#else
#if ROPE
            let rows = quad_rows(n);
#else
            let rows = n + vec4<u32>(0u, 1u, 2u, 3u);
#endif
#endif
            let base = min(rows, vec4<u32>(p.n - 1u)) * blocks;
            if (PAIRED && blocks % 2u == 0u) {
                for (var b = 2u * rank; b < blocks; b += 2u * count) {
                    d += block_pair_dot4(base, b);
                }
            } else {
                for (var b = rank; b < blocks; b += count) {
                    d += block_dot4(base, b);
                }
            }
        }
        // in uniform control flow: every subgroup adds, owners store
        let total = subgroupAdd(d);
#if NORM
        let inv = rms_scale(subgroupAdd(dot(sumsq, vec4<f32>(1.0))));
#else
        let inv = 1.0;
#endif
        if (owner && rank == 0u) {
#if ROPE
            store_rope(n, total * inv);
#else
#if GLU
            for (var r = 0u; r < 2u; r++) {
                if (n + r < p.n) {
                    out[p.out_col + n + r] = silu_mul(total[r] * inv, total[r + 2u] * inv);
                }
            }
#else
            for (var r = 0u; r < 4u; r++) {
                if (n + r < p.n) {
                    store(0u, n + r, total[r] * inv);
                }
            }
#endif
#endif
        }
    }
}
#endif

#if LANES1
// Four rows of x at a time (prefill on CPU drivers, where the tiled GEMM's workgroup memory
// and barriers cost most: a tuned GEMM form, GEMM_ROWS in ops.rs). Each invocation takes four
// weight rows as the decode path does and meets every weight it unpacks with four rows of x,
// so a weight is loaded and unpacked once per four rows of x, and every x load is the same
// for all invocations. One dispatch covers all p.m rows: workgroup g takes row group
// g % groups of four (rows row0 + 4 (g % groups) ..) and column group g / groups, so the
// workgroups that run one after another (or side by side) share one column group's weights
// while they are in the cache, and walk the rows of x. Rows of x past p.m repeat the last and
// are not stored.
fn dot8(q: W8, xj: X8) -> f32 {
    return dot(q.lo, xj.lo) + dot(q.hi, xj.hi);
}

// A block's dot products of four weight rows (components) with one row of x, finished.
fn finish4(t: vec4<f32>, sx: vec4<f32>, d0: vec2<f32>, d1: vec2<f32>, d2: vec2<f32>,
           d3: vec2<f32>) -> vec4<f32> {
    return vec4<f32>(finish(vec4<f32>(t.x, 0.0, 0.0, 0.0), sx, d0),
                     finish(vec4<f32>(t.y, 0.0, 0.0, 0.0), sx, d1),
                     finish(vec4<f32>(t.z, 0.0, 0.0, 0.0), sx, d2),
                     finish(vec4<f32>(t.w, 0.0, 0.0, 0.0), sx, d3));
}

struct R44 {
    t0: vec4<f32>,
    t1: vec4<f32>,
    t2: vec4<f32>,
    t3: vec4<f32>,
    s0: vec4<f32>,
    s1: vec4<f32>,
    s2: vec4<f32>,
    s3: vec4<f32>,
}

// Weights 8j .. 8j + 7 of four loaded blocks times the matching x of four rows (x0 .. x3).
fn acc44(r: ptr<function, R44>, c0: WB, c1: WB, c2: WB, c3: WB, x0: X8, x1: X8, x2: X8,
         x3: X8, j: u32) {
    let q0 = w8(c0, j);
    let q1 = w8(c1, j);
    let q2 = w8(c2, j);
    let q3 = w8(c3, j);
    (*r).t0 += vec4<f32>(dot8(q0, x0), dot8(q1, x0), dot8(q2, x0), dot8(q3, x0));
    (*r).t1 += vec4<f32>(dot8(q0, x1), dot8(q1, x1), dot8(q2, x1), dot8(q3, x1));
    (*r).t2 += vec4<f32>(dot8(q0, x2), dot8(q1, x2), dot8(q2, x2), dot8(q3, x2));
    (*r).t3 += vec4<f32>(dot8(q0, x3), dot8(q1, x3), dot8(q2, x3), dot8(q3, x3));
    (*r).s0 += x0.sum;
    (*r).s1 += x1.sum;
    (*r).s2 += x2.sum;
    (*r).s3 += x3.sum;
}

// Stores the totals of an invocation's four weight rows (t[r]: column n + r ROWS, one vec4
// over the rows m0 .. m0 + cnt - 1 of x).
fn store_rows4(n: u32, m0: u32, cnt: u32, t: array<vec4<f32>, 4>) {
    for (var r = 0u; r < CPI; r++) {
        let c = n + r * ROWS;
        if (c >= p.n) {
            break;
        }
        for (var m = 0u; m < cnt; m++) {
            store(m0 + m, c, t[r][m]);
        }
    }
}

#if X_SG
// x8 of one row from this invocation's share of a block's x (xv of lane sg_lane & 7): pairs
// (0, 1), (2, 3), (4, 5), (6, 7) for j = 0 .. 3. Four functions, not one taking j:
// subgroupBroadcast takes its lane as a constant (a shuffle from a computed lane is a gather
// on CPU drivers).
fn x8_sg0(xl: vec4<f32>) -> X8 {
    return x8_of(subgroupBroadcast(xl, 0u), subgroupBroadcast(xl, 1u), vec4<f32>(1.0),
                 vec4<f32>(1.0));
}

fn x8_sg1(xl: vec4<f32>) -> X8 {
    return x8_of(subgroupBroadcast(xl, 2u), subgroupBroadcast(xl, 3u), vec4<f32>(1.0),
                 vec4<f32>(1.0));
}

fn x8_sg2(xl: vec4<f32>) -> X8 {
    return x8_of(subgroupBroadcast(xl, 4u), subgroupBroadcast(xl, 5u), vec4<f32>(1.0),
                 vec4<f32>(1.0));
}

fn x8_sg3(xl: vec4<f32>) -> X8 {
    return x8_of(subgroupBroadcast(xl, 6u), subgroupBroadcast(xl, 7u), vec4<f32>(1.0),
                 vec4<f32>(1.0));
}
#endif

// With X_SG (subgroups of at least 8 that the workgroup fills), each invocation loads one of
// a block's 8 x vec4s per row of x and the rest come by subgroupBroadcast, as in the decode
// path: 4 x loads per block instead of 32. Every invocation then runs to the end (columns past
// p.n repeat the last weight row and store nothing), so the broadcasts see the whole subgroup.
@compute @workgroup_size(GW)
fn gemv_rows4(ids: Ids, grp: Grp) {
    let groups = (p.m + 3u) / 4u;
    let g = group_index(grp);
    // this workgroup's rows of x: m0 .. m0 + cnt - 1 (of the dispatch's p.m)
    let m0 = 4u * (g % groups);
    let cnt = min(p.m - m0, 4u);
    let n = (g / groups) * COLS + ids.lid;
#if X_SG
    sg_lane = subgroupExclusiveAdd(1u);
#else
    if (n >= p.n) {
        return;
    }
#endif
    let blocks = p.k / 32u;
    let base = min(n + vec4<u32>(0u, 1u, 2u, 3u) * ROWS, vec4<u32>(p.n - 1u)) * blocks;
    let last = m0 + cnt - 1u;
    let m1 = min(m0 + 1u, last);
    let m2 = min(m0 + 2u, last);
    let m3 = min(m0 + 3u, last);
    // acc_m: row m of x against the four weight rows
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var b = 0u; b < blocks; b++) {
        let c0 = wload(false, base.x + b);
        let c1 = wload(false, base.y + b);
        let c2 = wload(false, base.z + b);
        let c3 = wload(false, base.w + b);
        var r = R44(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0),
                    vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
#if X_SG
        let e = sg_lane & 7u;
        let l0 = xv(m0, b, e);
        let l1 = xv(m1, b, e);
        let l2 = xv(m2, b, e);
        let l3 = xv(m3, b, e);
        acc44(&r, c0, c1, c2, c3, x8_sg0(l0), x8_sg0(l1), x8_sg0(l2), x8_sg0(l3), 0u);
        acc44(&r, c0, c1, c2, c3, x8_sg1(l0), x8_sg1(l1), x8_sg1(l2), x8_sg1(l3), 1u);
        acc44(&r, c0, c1, c2, c3, x8_sg2(l0), x8_sg2(l1), x8_sg2(l2), x8_sg2(l3), 2u);
        acc44(&r, c0, c1, c2, c3, x8_sg3(l0), x8_sg3(l1), x8_sg3(l2), x8_sg3(l3), 3u);
#else
        acc44(&r, c0, c1, c2, c3, x8(m0, b, 0u), x8(m1, b, 0u), x8(m2, b, 0u), x8(m3, b, 0u), 0u);
        acc44(&r, c0, c1, c2, c3, x8(m0, b, 1u), x8(m1, b, 1u), x8(m2, b, 1u), x8(m3, b, 1u), 1u);
        acc44(&r, c0, c1, c2, c3, x8(m0, b, 2u), x8(m1, b, 2u), x8(m2, b, 2u), x8(m3, b, 2u), 2u);
        acc44(&r, c0, c1, c2, c3, x8(m0, b, 3u), x8(m1, b, 3u), x8(m2, b, 3u), x8(m3, b, 3u), 3u);
#endif
        let d0 = dm1(false, base.x + b);
        let d1 = dm1(false, base.y + b);
        let d2 = dm1(false, base.z + b);
        let d3 = dm1(false, base.w + b);
        acc0 += finish4(r.t0, r.s0, d0, d1, d2, d3);
        acc1 += finish4(r.t1, r.s1, d0, d1, d2, d3);
        acc2 += finish4(r.t2, r.s2, d0, d1, d2, d3);
        acc3 += finish4(r.t3, r.s3, d0, d1, d2, d3);
    }
    // per weight row, a vec4 over the rows of x
    store_rows4(n, m0, cnt, array<vec4<f32>, 4>(vec4<f32>(acc0.x, acc1.x, acc2.x, acc3.x),
                                               vec4<f32>(acc0.y, acc1.y, acc2.y, acc3.y),
                                               vec4<f32>(acc0.z, acc1.z, acc2.z, acc3.z),
                                               vec4<f32>(acc0.w, acc1.w, acc2.w, acc3.w)));
}
#endif
