// Scaled dot-product attention, one workgroup per (query row, head), online softmax over
// chunks of up to CH keys, any head_dim up to 256 (88 for the ViT, 64 Q-Former, 128 LLaMA).
// Decode over a long cache splits the keys (`attention_split`); many query rows take tiles
// of rows and keys (`attention_tiled`, at the end).
//
// q row t, head h at q[q_off + t * q_stride + h * d]; key j of kv head g = h / (hq / hkv)
// (grouped-query attention) at k[k_off + j * k_stride + g * k_hs], values likewise (k_hs = d:
// heads side by side in a row; a head-major KV cache has k_stride = d, k_hs = ctx * d, so
// that a head's keys are contiguous). With causal != 0, query t sees keys 0 ..= t + past
// (past = tokens already in the KV cache). out[o_off + t * o_stride + h * d + i].
// score = (q . k) * scale; softmax in f32.
//
// HEADS2, HEADS3, HEADS4 (grouped-query attention, q read as a uniform): a workgroup takes
// p.hr = 2, 3 or 4 query heads of one KV group together, so every key and value load serves
// all of them; scores, softmax statistics and sums are vectors over those heads. Otherwise a
// workgroup takes one head (p.hr = 1).

#include common

struct Params {
    t: u32,
    s: u32,
    hq: u32,
    hkv: u32,
    d: u32,
    q_off: u32,
    q_stride: u32,
    k_off: u32,
    k_stride: u32,
    v_off: u32,
    v_stride: u32,
    o_off: u32,
    o_stride: u32,
    causal: u32,
    past: u32,
    scale: f32,
    hr: u32, // query heads per workgroup
    k_hs: u32, // elements between KV heads h and h + 1 of keys (d: side by side in a row)
    v_hs: u32, // and of values
}

// Per-head values of the heads in hand (RED: a vector with HEADS2/3/4, an f32 otherwise).
alias HV = RED;

#if HEADS2 || HEADS3 || HEADS4
#if HEADS2
const NH: u32 = 2u;
#endif
#if HEADS3
const NH: u32 = 3u;
#endif
#if HEADS4
const NH: u32 = 4u;
#endif
#else
const NH: u32 = 1u;
#endif

// Head r's component of v.
fn comp(v: HV, r: u32) -> f32 {
#if HEADS2 || HEADS3 || HEADS4
    return v[r];
#else
    return v;
#endif
}

// The per-head values a[0 .. NH] as an HV.
fn hv(a: array<f32, NH>) -> HV {
#if HEADS2 || HEADS3 || HEADS4
#if HEADS2
    return vec2<f32>(a[0], a[1]);
#endif
#if HEADS3
    return vec3<f32>(a[0], a[1], a[2]);
#endif
#if HEADS4
    return vec4<f32>(a[0], a[1], a[2], a[3]);
#endif
#else
    return a[0];
#endif
}

@group(0) @binding(0) var<uniform> p: Params;
#if Q_UNIFORM
// The query rows through a uniform binding (decode: q is a row of an activation buffer, which
// is at least 64 KiB): every invocation of a workgroup reads the same query element at the same
// time, which a uniform read broadcasts, so the row is not staged in workgroup memory.
@group(0) @binding(1) var<uniform> qu: array<vec4<f32>, 4096>;
#else
@group(0) @binding(1) var<storage, read> q: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Keys and values: f32, or (KV_F16, a LLaMA KV cache) f16 pairs, read as 16-byte words of
// eight halves (tensor buffers are whole 16-byte units).
struct H8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

#if KV_F16
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;

fn halves8(w: vec4<u32>) -> H8 {
    return H8(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
              vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
}

fn k_at(i: u32) -> f32 {
    return unpack2x16float(k[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

fn v_at(i: u32) -> f32 {
    return unpack2x16float(v[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

// Elements i .. i + 7 (i a multiple of 8): one load.
fn k8(i: u32) -> H8 {
    return halves8(k[i >> 3u]);
}

fn v8(i: u32) -> H8 {
    return halves8(v[i >> 3u]);
}
#else
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;

fn k_at(i: u32) -> f32 {
    return k[i];
}

fn v_at(i: u32) -> f32 {
    return v[i];
}

fn k8(i: u32) -> H8 {
    return H8(vec4<f32>(k[i], k[i + 1u], k[i + 2u], k[i + 3u]),
              vec4<f32>(k[i + 4u], k[i + 5u], k[i + 6u], k[i + 7u]));
}

fn v8(i: u32) -> H8 {
    return H8(vec4<f32>(v[i], v[i + 1u], v[i + 2u], v[i + 3u]),
              vec4<f32>(v[i + 4u], v[i + 5u], v[i + 6u], v[i + 7u]));
}
#endif

const MAXD: u32 = 256u;
const CH: u32 = 256u; // keys per split of attention_split: 4 per invocation
#if !Q_UNIFORM
var<workgroup> qs: array<vec4<f32>, 64>; // the query row (MAXD floats)
#endif
var<workgroup> pw: array<HV, CH>; // softmax weights of the keys in hand
var<workgroup> vpart: array<vec4<f32>, 128 * NH>; // v_sum's partial sums, per head

// This workgroup's first query row: its first vec4 in qu and the factor it is read with
// (Q_UNIFORM); head r's row follows at r * d / 4 vec4s.
var<private> q_first: u32;
var<private> q_mul: f32;

// Elements 4i .. 4i + 3 of the query row of head r in hand (times q_mul with Q_UNIFORM; as
// staged in qs otherwise, one head).
fn qv(r: u32, i: u32) -> vec4<f32> {
#if Q_UNIFORM
    return qu[q_first + r * (p.d / 4u) + i] * q_mul;
#else
    return qs[i];
#endif
}

// Query element d of each head in hand.
fn qe(d: u32) -> HV {
    var a: array<f32, NH>;
    for (var r = 0u; r < NH; r++) {
        a[r] = qv(r, d / 4u)[d % 4u];
    }
    return hv(a);
}

// Makes the query row starting at element qb, times mul, readable through qv. Called by the
// whole workgroup in uniform control flow.
fn load_query(qb: u32, mul: f32, lid: u32) {
#if Q_UNIFORM
    q_first = qb / 4u;
    q_mul = mul;
#else
    for (var d = lid; d < p.d; d += WG) {
        qs[d / 4u][d % 4u] = q[qb + d] * mul;
    }
    workgroupBarrier();
#endif
}

// Whether heads are read eight elements at a time: head_dim and every offset and stride of K
// and V multiples of 8 (always for LLaMA, the ViT and the Q-Former).
fn by8() -> bool {
    return (p.d | p.k_off | p.k_stride | p.k_hs | p.v_off | p.v_stride | p.v_hs) % 8u == 0u;
}

// q . k of each head in hand for the key whose first element is kb, element by element (head
// dims or offsets that are not multiples of 8; see qk_keys).
fn qk(kb: u32) -> HV {
    var s = HV(0.0);
    for (var d = 0u; d < p.d; d++) {
        s += qe(d) * k_at(kb + d);
    }
    return s;
}

// Where head r's partial sums of key group kg, dim group dg start in vpart.
fn vp(r: u32, kg: u32, groups: u32, dg: u32) -> u32 {
    return 2u * (r * WG + kg * groups + dg);
}

// sum_{j < cnt} pw[j] * V[j] for each head in hand, where V[j] starts at element
// vb + j * v_stride, for dims lid + i * WG (i = 0..3) of this invocation. Called by the whole
// workgroup with pw written and visible. With by8, invocations split into groups of 8 dims x
// groups of keys, each reading 8 values per load (one load for every head); the key groups'
// sums meet in vpart.
fn v_sum(vb: u32, cnt: u32, lid: u32) -> array<HV, 4> {
    var out: array<HV, 4>;
    if (by8()) {
        let groups = p.d / 8u;
        let kgs = WG / groups;
        let dg = lid % groups;
        let kg = lid / groups;
        if (kg < kgs) {
            // zeroed by hand: a declaration without initialiser inside a loop or a branch was
            // seen zeroed only once per invocation by Chromium's WebGPU on SwiftShader
            var lo: array<vec4<f32>, NH>;
            var hi: array<vec4<f32>, NH>;
            for (var r = 0u; r < NH; r++) {
                lo[r] = vec4<f32>(0.0);
                hi[r] = vec4<f32>(0.0);
            }
            for (var j = kg; j < cnt; j += kgs) {
                let w = pw[j];
                let vv = v8(vb + j * p.v_stride + 8u * dg);
                for (var r = 0u; r < NH; r++) {
                    lo[r] += comp(w, r) * vv.lo;
                    hi[r] += comp(w, r) * vv.hi;
                }
            }
            for (var r = 0u; r < NH; r++) {
                vpart[vp(r, kg, groups, dg)] = lo[r];
                vpart[vp(r, kg, groups, dg) + 1u] = hi[r];
            }
        }
        workgroupBarrier();
        for (var i = 0u; i < 4u; i++) {
            let d = lid + i * WG;
            if (d < p.d) {
                var s: array<f32, NH>;
                for (var r = 0u; r < NH; r++) {
                    s[r] = 0.0;
                }
                for (var g = 0u; g < kgs; g++) {
                    for (var r = 0u; r < NH; r++) {
                        s[r] += vpart[vp(r, g, groups, 0u) + d / 4u][d % 4u];
                    }
                }
                out[i] = hv(s);
            }
        }
        workgroupBarrier();
    } else {
        for (var i = 0u; i < 4u; i++) {
            let d = lid + i * WG;
            if (d < p.d) {
                var s = HV(0.0);
                for (var j = 0u; j < cnt; j++) {
                    s += pw[j] * v_at(vb + j * p.v_stride + d);
                }
                out[i] = s;
            }
        }
    }
    return out;
}

// The softmax statistics of a chunk of keys, for each head in hand.
struct Chunk {
    m: HV, // the larger of the running maximum and the chunk's highest score
    l: HV, // sum over the chunk of exp(score - m)
}

// q . k of each head in hand for keys j0 + lid + i WG, i < per (at most CH / WG = 4): with
// by8 in one pass over the head's dims, so that each query load serves every key of the
// invocation (q is re-read per key otherwise: on CPU drivers a read of the uniform at an
// address that follows the loop counter is a load per SIMD lane, like the key's own). Keys
// from j1 on read key j1 - 1 instead (any key in the buffer would do: their scores are
// dropped by the caller).
fn qk_keys(j0: u32, j1: u32, per: u32, kvh: u32, lid: u32) -> array<HV, 4> {
    var s: array<HV, 4>;
    var kb: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        s[i] = HV(0.0);
        let j = min(j0 + lid + i * WG, max(j1, 1u) - 1u);
        kb[i] = p.k_off + j * p.k_stride + kvh * p.k_hs;
    }
    if (!by8()) {
        for (var i = 0u; i < per; i++) {
            s[i] = qk(kb[i]);
        }
        return s;
    }
    for (var d = 0u; d < p.d; d += 8u) {
        var qa: array<vec4<f32>, NH>;
        var qb: array<vec4<f32>, NH>;
        for (var r = 0u; r < NH; r++) {
            qa[r] = qv(r, d / 4u);
            qb[r] = qv(r, d / 4u + 1u);
        }
        for (var i = 0u; i < 4u; i++) {
            if (i < per) {
                let kk = k8(kb[i] + d);
                var a: array<f32, NH>;
                for (var r = 0u; r < NH; r++) {
                    a[r] = dot(qa[r], kk.lo) + dot(qb[r], kk.hi);
                }
                s[i] += hv(a);
            }
        }
    }
    return s;
}

// Scores (times mul) of keys j0 + lid + i WG, i < per, those below j1, for the query row in
// hand; leaves exp(score - m) in pw (0 for keys from j1 on), m the larger of m_prev and the
// chunk's highest score. Called by the whole workgroup in uniform control flow; every pw
// write is visible after it returns (wg_sum starts with a barrier).
fn chunk_weights(j0: u32, j1: u32, per: u32, kvh: u32, mul: f32, m_prev: HV, ids: Ids) -> Chunk {
    let scores = qk_keys(j0, j1, per, kvh, ids.lid);
    var mx = HV(NEG_BIG);
    for (var i = 0u; i < per; i++) {
        let jj = ids.lid + i * WG;
        var sc = HV(NEG_BIG);
        if (j0 + jj < j1) {
            sc = scores[i] * mul;
        }
        pw[jj] = sc;
        mx = max(mx, sc);
    }
    let m = max(m_prev, wg_max(mx, ids));
    var l = HV(0.0);
    for (var i = 0u; i < per; i++) {
        let jj = ids.lid + i * WG;
        var e = HV(0.0);
        if (j0 + jj < j1) {
            e = exp(pw[jj] - m);
        }
        pw[jj] = e;
        l += e;
    }
    return Chunk(m, wg_sum(l, ids));
}

// Groups of p.hr query heads (workgroups per query row).
fn head_groups() -> u32 {
    return p.hq / p.hr;
}

@compute @workgroup_size(64)
fn attention(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g >= p.t * head_groups()) {
        return;
    }
    let h = (g % head_groups()) * p.hr;
    let ti = g / head_groups();
    let kvh = h / (p.hq / p.hkv);
    let qb = p.q_off + ti * p.q_stride + h * p.d;
    load_query(qb, 1.0, ids.lid);
    let kv_len = visible(ti);
    var m_run = HV(NEG_BIG);
    var l_run = HV(0.0);
    var acc: array<HV, 4>;
    // chunks of up to CH keys (WG per step of `per`), but no more steps than the keys need:
    // each chunk costs two reductions and a pass over pw whatever its length
    let per = min(CH / WG, (kv_len + WG - 1u) / WG);
    for (var base = 0u; base < kv_len; base += per * WG) {
        let st = chunk_weights(base, kv_len, per, kvh, p.scale, m_run, ids);
        let corr = exp(m_run - st.m);
        l_run = l_run * corr + st.l;
        let cnt = min(per * WG, kv_len - base);
        let chunk = v_sum(p.v_off + base * p.v_stride + kvh * p.v_hs, cnt, ids.lid);
        for (var i = 0u; i < 4u; i++) {
            acc[i] = acc[i] * corr + chunk[i];
        }
        m_run = st.m;
        workgroupBarrier();
    }
    let ob = p.o_off + ti * p.o_stride + h * p.d;
    for (var i = 0u; i < 4u; i++) {
        let d = ids.lid + i * WG;
        if (d < p.d) {
            let o = acc[i] / l_run;
            for (var r = 0u; r < p.hr; r++) {
                out[ob + r * p.d + d] = comp(o, r);
            }
        }
    }
}

// ---- Split-K decode attention (flash-decoding) for a few query rows over a long cache ----
//
// `attention_split`: one workgroup per (query row, head, split of CH keys) writes the split's
// maximum score m, its sum of exp(score - m), and its unnormalised output
// sum_j exp(score_j - m) v_j to part[((t * hq + h) * splits + c) * (d + 2) ..]: [m, l, acc[d]].
// `attention_combine`: one workgroup per (query row, head) rescales the splits to the common
// maximum and divides. Long contexts then keep every compute unit busy instead of one
// workgroup per head walking the whole cache.

@group(0) @binding(5) var<storage, read_write> part: array<f32>;

fn splits() -> u32 {
    return (p.s + CH - 1u) / CH;
}

// Keys query row ti sees: 0 .. visible(ti).
fn visible(ti: u32) -> u32 {
    if (p.causal != 0u) {
        return min(p.s, ti + p.past + 1u);
    }
    return p.s;
}

@compute @workgroup_size(64)
fn attention_split(ids: Ids, grp: Grp) {
    let ns = splits();
    let g = group_index(grp);
    if (g >= p.t * head_groups() * ns) {
        return;
    }
    let c = g % ns;
    let h = ((g / ns) % head_groups()) * p.hr;
    let ti = g / (ns * head_groups());
    let kvh = h / (p.hq / p.hkv);
    let qb = p.q_off + ti * p.q_stride + h * p.d;
    load_query(qb, p.scale, ids.lid);
    let j0 = c * CH;
    let j1 = min(j0 + CH, visible(ti));
    let st = chunk_weights(j0, j1, CH / WG, kvh, 1.0, HV(NEG_BIG), ids);
    let cnt = select(0u, j1 - j0, j1 > j0);
    let sums = v_sum(p.v_off + j0 * p.v_stride + kvh * p.v_hs, cnt, ids.lid);
    for (var r = 0u; r < p.hr; r++) {
        let pb = ((ti * p.hq + h + r) * ns + c) * (p.d + 2u);
        for (var i = 0u; i < 4u; i++) {
            let d = ids.lid + i * WG;
            if (d < p.d) {
                part[pb + 2u + d] = comp(sums[i], r);
            }
        }
        if (ids.lid == 0u) {
            part[pb] = comp(st.m, r);
            part[pb + 1u] = comp(st.l, r);
        }
    }
}

@compute @workgroup_size(64)
fn attention_combine(ids: Ids, grp: Grp) {
    let ns = splits();
    let g = group_index(grp);
    if (g >= p.t * p.hq) {
        return;
    }
    let h = g % p.hq;
    let ti = g / p.hq;
    let base = (ti * p.hq + h) * ns * (p.d + 2u);
    var mx = NEG_BIG;
    for (var c = 0u; c < ns; c++) {
        mx = max(mx, part[base + c * (p.d + 2u)]);
    }
    var l = 0.0;
    for (var c = 0u; c < ns; c++) {
        let pb = base + c * (p.d + 2u);
        l += part[pb + 1u] * exp(part[pb] - mx);
    }
    let ob = p.o_off + ti * p.o_stride + h * p.d;
    for (var d = ids.lid; d < p.d; d += WG) {
        var a = 0.0;
        for (var c = 0u; c < ns; c++) {
            let pb = base + c * (p.d + 2u);
            a += part[pb + 2u + d] * exp(part[pb] - mx);
        }
        out[ob + d] = a / l;
    }
}

// ---- Tiled attention for many query rows (the ViT, the Q-Former, prefill) ----
//
// `attention_tiled`: one workgroup per (tile of TR query rows, head), head_dim up to 128
// (`ATTN_TILE_DIM`, the size of the t_q tile). The row kernel above reloads every key and
// value for each query row; here a tile of TC keys is staged once in workgroup memory and
// serves TR rows, and each invocation keeps a 4 x 4 block
// of scores and a 4 x NJ block of outputs in registers (rows x keys, rows x dims), so every
// workgroup-memory load feeds several multiply-adds, as in the tiled GEMM. NJ follows the
// head (TD64, TD96 or neither), so a 64-dim head does not stage or multiply 128 dims' worth.
// Where heads go by eight (`by8`), keys and values are staged eight halves (f16 cache) or
// floats per load. Per key tile:
//   1. scores S = (q * scale) . K^T over the head in chunks of 16 dims (K staged per chunk);
//   2. invisible keys at NEG_BIG; each row's running maximum and sum (online softmax) are
//      updated from the maxima and sums of the 16 invocations holding its scores, and the
//      weights go to workgroup memory;
//   3. the outputs are rescaled by exp(old max - new max) and take P . V, V staged KS keys
//      at a time (16 with TD64, 8 otherwise).
// Workgroup memory: 8 + 4 + 4 KiB, the portable 16 KiB.
// With ROWS_SG (subgroup variants on CPU drivers: see `rows_subgroup_fits`), the inner loops'
// row operands (a query dim of the invocation's 4 rows, a key's weights for them), which the
// 16 invocations of a row group all read, are loaded once per 8 steps, each of 8 lanes
// loading one, and handed round by subgroupBroadcast from constant lanes. On CPU drivers
// every lane's workgroup-memory load is a gather, same address or not; a broadcast is a
// register shuffle. It relies on each subgroup lying within one row group: subgroups of 8 or
// 16 consecutive invocations, as llvmpipe runs them (SIMD chunks in invocation order). A
// check inside the kernel with the plain loops as a fallback cost the whole gain on
// llvmpipe (the branch around the inner loops), so the condition is the host's.
// Defined without Q_UNIFORM (the rows are read from storage when staged).
#if !Q_UNIFORM
const TR: u32 = 16u; // query rows per workgroup: rows 4 rr .. 4 rr + 3 per invocation
const TC: u32 = 64u; // keys per tile: keys kk + 16 b (b < 4) per invocation
// NJ: dims kk + 16 j (j < NJ) per invocation, for heads of up to 16 NJ dims (TD64: 64, the
// LLaMA-style small heads and the Q-Former; TD96: 96, the ViT's 88; neither: 128)
#if TD64
const NJ: u32 = 4u;
#endif
#if TD96
const NJ: u32 = 6u;
#endif
#if !TD64
#if !TD96
const NJ: u32 = 8u;
#endif
#endif
// A V chunk holds VW vec4s per (key, dim % 16) and KS keys (the 256 vec4s of t_kv)
const VW: u32 = (NJ + 3u) / 4u;
const KS: u32 = 16u / VW;

// The query tile times p.scale, [dim][row / 4] (zero past the head and the last row).
var<workgroup> t_q: array<vec4<f32>, 512>;
// A K chunk [dim][kk] (keys kk + 16 b as the components), a V chunk [key][dd][2] (dims
// dd + 16 j as the components of the two vec4s), or the invocations' partial sums.
var<workgroup> t_kv: array<vec4<f32>, 256>;
// The invocations' partial maxima, then the tile's softmax weights: [key][row / 4].
var<workgroup> t_p: array<vec4<f32>, 256>;

// One step of the scores: rows' q times p.scale at a dim (qa) times keys kk + 16 b there (kb).
fn qk_step(sc: ptr<function, array<vec4<f32>, 4>>, qa: vec4<f32>, kb: vec4<f32>) {
    (*sc)[0] += qa * kb.x;
    (*sc)[1] += qa * kb.y;
    (*sc)[2] += qa * kb.z;
    (*sc)[3] += qa * kb.w;
}

// One step of P . V: rows' weights of key c of the V chunk (pw) times its dims kk + 16 j.
fn pv_step(o: ptr<function, array<vec4<f32>, NJ>>, pw: vec4<f32>, c: u32, kk: u32) {
    let va = t_kv[(c * 16u + kk) * VW];
    (*o)[0] += pw * va.x;
    (*o)[1] += pw * va.y;
    (*o)[2] += pw * va.z;
    (*o)[3] += pw * va.w;
#if !TD64
    let vb = t_kv[(c * 16u + kk) * VW + 1u];
    (*o)[4] += pw * vb.x;
    (*o)[5] += pw * vb.y;
#if !TD96
    (*o)[6] += pw * vb.z;
    (*o)[7] += pw * vb.w;
#endif
#endif
}

@compute @workgroup_size(64)
fn attention_tiled(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g >= ((p.t + TR - 1u) / TR) * p.hq) {
        return;
    }
    let lid = ids.lid;
    let h = g % p.hq;
    let t0 = (g / p.hq) * TR;
    let kvh = h / (p.hq / p.hkv);
    let rr = lid / 16u;
    let kk = lid % 16u;
#if ROWS_SG
    // (every invocation is active here and in the loops below)
    let lane = subgroupExclusiveAdd(1u);
#endif
    let dpad = (p.d + 15u) / 16u * 16u;
    for (var e = lid; e < dpad * TR; e += WG) {
        let r = e / dpad;
        let dim = e % dpad;
        var val = 0.0;
        if (dim < p.d && t0 + r < p.t) {
            val = q[p.q_off + (t0 + r) * p.q_stride + h * p.d + dim] * p.scale;
        }
        t_q[dim * 4u + r / 4u][r % 4u] = val;
    }
    // keys up to the last row's last visible one
    let kv_len = visible(min(t0 + TR, p.t) - 1u);
    // the running maxima and sums of rows 4 rr .. 4 rr + 3
    var m_row = vec4<f32>(NEG_BIG);
    var l_row = vec4<f32>(0.0);
    // o[j][a]: row 4 rr + a, dim kk + 16 j (zeroed by hand, see v_sum)
    var o: array<vec4<f32>, NJ>;
    for (var j = 0u; j < NJ; j++) {
        o[j] = vec4<f32>(0.0);
    }
    for (var j0 = 0u; j0 < kv_len; j0 += TC) {
        // 1. sc[b][a]: row 4 rr + a, key j0 + kk + 16 b
        var sc: array<vec4<f32>, 4>;
        for (var b = 0u; b < 4u; b++) {
            sc[b] = vec4<f32>(0.0);
        }
        for (var d0 = 0u; d0 < p.d; d0 += 16u) {
            workgroupBarrier();
            if (by8()) {
                // eight dims of a key per load: keys e / 2, dims d0 + 8 (e % 2) ..
                for (var e = lid; e < 2u * TC; e += WG) {
                    let key = e / 2u;
                    let dd = 8u * (e % 2u);
                    var kv8 = H8(vec4<f32>(0.0), vec4<f32>(0.0));
                    if (j0 + key < kv_len && d0 + dd < p.d) {
                        kv8 = k8(p.k_off + (j0 + key) * p.k_stride + kvh * p.k_hs + d0 + dd);
                    }
                    let at = dd * 16u + key % 16u;
                    let c = key / 16u;
                    t_kv[at][c] = kv8.lo.x;
                    t_kv[at + 16u][c] = kv8.lo.y;
                    t_kv[at + 32u][c] = kv8.lo.z;
                    t_kv[at + 48u][c] = kv8.lo.w;
                    t_kv[at + 64u][c] = kv8.hi.x;
                    t_kv[at + 80u][c] = kv8.hi.y;
                    t_kv[at + 96u][c] = kv8.hi.z;
                    t_kv[at + 112u][c] = kv8.hi.w;
                }
            } else {
                for (var e = lid; e < 16u * TC; e += WG) {
                    let key = e / 16u;
                    let dd = e % 16u;
                    var val = 0.0;
                    if (j0 + key < kv_len && d0 + dd < p.d) {
                        val = k_at(p.k_off + (j0 + key) * p.k_stride + kvh * p.k_hs + d0 + dd);
                    }
                    t_kv[dd * 16u + key % 16u][key / 16u] = val;
                }
            }
            workgroupBarrier();
#if ROWS_SG
            for (var dd = 0u; dd < 16u; dd += 8u) {
                let ql = t_q[(d0 + dd + lane % 8u) * 4u + rr];
                qk_step(&sc, subgroupBroadcast(ql, 0u), t_kv[(dd + 0u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 1u), t_kv[(dd + 1u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 2u), t_kv[(dd + 2u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 3u), t_kv[(dd + 3u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 4u), t_kv[(dd + 4u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 5u), t_kv[(dd + 5u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 6u), t_kv[(dd + 6u) * 16u + kk]);
                qk_step(&sc, subgroupBroadcast(ql, 7u), t_kv[(dd + 7u) * 16u + kk]);
            }
#else
            for (var dd = 0u; dd < 16u; dd++) {
                qk_step(&sc, t_q[(d0 + dd) * 4u + rr], t_kv[dd * 16u + kk]);
            }
#endif
        }
        // 2. online softmax: invisible keys at NEG_BIG; each row's maximum and sum over the
        //    tile gathered from the 16 invocations holding its scores (partials in t_p, then
        //    t_kv, both free here); the weights to t_p
        var mx = vec4<f32>(NEG_BIG);
        for (var b = 0u; b < 4u; b++) {
            let j = j0 + kk + 16u * b;
            for (var a = 0u; a < 4u; a++) {
                if (j >= visible(t0 + 4u * rr + a)) {
                    sc[b][a] = NEG_BIG;
                }
            }
            mx = max(mx, sc[b]);
        }
        t_p[lid] = mx;
        workgroupBarrier();
        mx = m_row;
        for (var i = 0u; i < 16u; i++) {
            mx = max(mx, t_p[rr * 16u + i]);
        }
        var sum = vec4<f32>(0.0);
        for (var b = 0u; b < 4u; b++) {
            sc[b] = exp(sc[b] - mx);
            sum += sc[b];
        }
        t_kv[lid] = sum;
        workgroupBarrier();
        sum = vec4<f32>(0.0);
        for (var i = 0u; i < 16u; i++) {
            sum += t_kv[rr * 16u + i];
        }
        let corr = exp(m_row - mx);
        l_row = l_row * corr + sum;
        m_row = mx;
        for (var b = 0u; b < 4u; b++) {
            t_p[(kk + 16u * b) * 4u + rr] = sc[b];
        }
        // 3. rescale, then add P . V (the first barrier below makes the weights visible)
        for (var j = 0u; j < NJ; j++) {
            o[j] *= corr;
        }
        let cnt = min(TC, kv_len - j0);
        for (var c0 = 0u; c0 < cnt; c0 += KS) {
            workgroupBarrier();
            if (by8()) {
                // eight dims of a value per load: key e / (2 NJ), dims 8 (e % (2 NJ)) ..
                for (var e = lid; e < 2u * NJ * KS; e += WG) {
                    let key = e / (2u * NJ);
                    let dim = 8u * (e % (2u * NJ));
                    var kv8 = H8(vec4<f32>(0.0), vec4<f32>(0.0));
                    if (c0 + key < cnt && dim < p.d) {
                        kv8 = v8(p.v_off + (j0 + c0 + key) * p.v_stride + kvh * p.v_hs + dim);
                    }
                    // dims dim .. dim + 7 share dim / 16, dim / 64; dim % 16 is 0 or 8
                    let at = (key * 16u + dim % 16u) * VW + dim / 64u;
                    let c = (dim / 16u) % 4u;
                    t_kv[at][c] = kv8.lo.x;
                    t_kv[at + VW][c] = kv8.lo.y;
                    t_kv[at + 2u * VW][c] = kv8.lo.z;
                    t_kv[at + 3u * VW][c] = kv8.lo.w;
                    t_kv[at + 4u * VW][c] = kv8.hi.x;
                    t_kv[at + 5u * VW][c] = kv8.hi.y;
                    t_kv[at + 6u * VW][c] = kv8.hi.z;
                    t_kv[at + 7u * VW][c] = kv8.hi.w;
                }
            } else {
                for (var e = lid; e < 16u * NJ * KS; e += WG) {
                    let key = e / (16u * NJ);
                    let dim = e % (16u * NJ);
                    var val = 0.0;
                    if (c0 + key < cnt && dim < p.d) {
                        val = v_at(p.v_off + (j0 + c0 + key) * p.v_stride + kvh * p.v_hs + dim);
                    }
                    t_kv[(key * 16u + dim % 16u) * VW + dim / 64u][(dim / 16u) % 4u] = val;
                }
            }
            workgroupBarrier();
#if ROWS_SG
            // (KS is 16 or 8)
            for (var c = 0u; c < KS; c += 8u) {
                let pl = t_p[(c0 + c + lane % 8u) * 4u + rr];
                pv_step(&o, subgroupBroadcast(pl, 0u), c + 0u, kk);
                pv_step(&o, subgroupBroadcast(pl, 1u), c + 1u, kk);
                pv_step(&o, subgroupBroadcast(pl, 2u), c + 2u, kk);
                pv_step(&o, subgroupBroadcast(pl, 3u), c + 3u, kk);
                pv_step(&o, subgroupBroadcast(pl, 4u), c + 4u, kk);
                pv_step(&o, subgroupBroadcast(pl, 5u), c + 5u, kk);
                pv_step(&o, subgroupBroadcast(pl, 6u), c + 6u, kk);
                pv_step(&o, subgroupBroadcast(pl, 7u), c + 7u, kk);
            }
#else
            for (var c = 0u; c < KS; c++) {
                pv_step(&o, t_p[(c0 + c) * 4u + rr], c, kk);
            }
#endif
        }
        workgroupBarrier();
    }
    for (var a = 0u; a < 4u; a++) {
        let row = t0 + 4u * rr + a;
        if (row < p.t) {
            for (var j = 0u; j < NJ; j++) {
                let dim = kk + 16u * j;
                if (dim < p.d) {
                    out[p.o_off + row * p.o_stride + h * p.d + dim] = o[j][a] / l_row[a];
                }
            }
        }
    }
}
#endif
