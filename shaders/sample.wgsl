// Sampling on the GPU among the top-k kernel's candidates (topk.wgsl), so that a sampled token
// can be the next forward's input without the host: what `chat::sample_candidates` does on
// the host, in f32 (the host works in f64; the two pick differently only where the draw lies
// within rounding of a boundary between two tokens' shares).
//
// The candidates (three words each: ranking key bits, id or NONE for padding, raw logit) are
// ranked by their key, the logit after HF's repetition penalty, which is what the host computes
// again from the raw logit. Then, as the host does: temperature (key / T); top-k (values below
// the k-th best removed); top-p (in ascending order of value, ties in id order, the values
// whose cumulative share stays within 1 - top_p removed, never the best); softmax; and the draw
// `u` in [0, 1) walks the shares in id order: the first id whose cumulative share exceeds u,
// or the last one kept.
//
// Outputs: `picked[0]`, the id, or NONE where the host must sample from the full logits
// instead: no candidate; a NaN among them (the host's own rule only for a larger vocabulary);
// or the 64 candidates standing for a larger vocabulary while the worst of them ties with the
// k-th best, so that ids outside them might tie too. `token[0]`, the id the next one-token
// forward embeds (the pick, or with NONE some candidate's id: that forward is discarded). And
// the pick's bit set in `mask`, the repetition penalty's set for the next token's top-k.
//
// One workgroup of KEEP invocations, one per candidate, ranks them (by id, and by value with
// ties in id order); the walks in order, which are short and sequential, are invocation 0's.

#include common

struct Params {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    // the draw, uniform in [0, 1)
    u: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cand: array<u32>;
@group(0) @binding(2) var<storage, read_write> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> token: array<u32>;
@group(0) @binding(4) var<storage, read_write> picked: array<u32>;

const KEEP: u32 = 64u;
const NONE: u32 = 0xffffffffu;

var<workgroup> key: array<f32, KEEP>;
var<workgroup> cid: array<u32, KEEP>;
// the candidate at each rank: by id, and by value after the temperature (ties by id)
var<workgroup> by_id: array<u32, KEEP>;
var<workgroup> by_val: array<u32, KEEP>;

// Candidate c's value after the temperature (the host divides only for T != 1: the same).
fn val(c: u32) -> f32 {
    return key[c] / p.temperature;
}

@compute @workgroup_size(64)
fn sample(ids: Ids) {
    let i = ids.lid;
    let at = cand[3u * i + 1u];
    cid[i] = at;
    key[i] = bitcast<f32>(cand[3u * i]);
    workgroupBarrier();
    if (at != NONE) {
        let l = val(i);
        var rid = 0u;
        var rval = 0u;
        for (var j = 0u; j < KEEP; j++) {
            let o = cid[j];
            if (o == NONE || j == i) {
                continue;
            }
            if (o < at) {
                rid++;
            }
            let lj = val(j);
            if (lj < l || (lj == l && o < at)) {
                rval++;
            }
        }
        by_id[rid] = i;
        by_val[rval] = i;
    }
    workgroupBarrier();
    if (i != 0u) {
        return;
    }
    var n = 0u;
    var fallback = false;
    for (var j = 0u; j < KEEP; j++) {
        if (cid[j] != NONE) {
            n++;
            // NaN, by its bits (WGSL lets a compiler assume floats are never NaN)
            fallback = fallback || (bitcast<u32>(key[j]) & 0x7fffffffu) > 0x7f800000u;
        }
    }
    fallback = fallback || n == 0u;
    // distinct ids (then both rankings are permutations)
    for (var r = 1u; r < n; r++) {
        fallback = fallback || cid[by_id[r]] <= cid[by_id[r - 1u]];
    }
    let k = max(p.top_k, 1u);
    if (!fallback && n >= KEEP && k < n) {
        // standing for a larger vocabulary: fewer than k keys above the worst means the worst
        // is within the best k, and an id outside the candidates could tie with it
        var worst = key[0];
        for (var j = 1u; j < KEEP; j++) {
            worst = min(worst, key[j]);
        }
        var above = 0u;
        for (var j = 0u; j < KEEP; j++) {
            above += u32(key[j] > worst);
        }
        fallback = above < k;
    }
    if (fallback) {
        picked[0] = NONE;
        token[0] = select(cid[0], 0u, n == 0u || cid[0] == NONE);
        return;
    }
    // kept candidates, one bit each
    var kept = vec2<u32>(0u);
    // top-k: the k-th best value, at ascending rank n - k
    var kth = val(by_val[0]);
    if (k < n) {
        kth = val(by_val[n - k]);
    }
    for (var r = 0u; r < n; r++) {
        let c = by_val[r];
        if (val(c) >= kth) {
            kept[c / 32u] |= 1u << (c % 32u);
        }
    }
    let top = val(by_val[n - 1u]);
    if (p.top_p < 1.0) {
        // shares of what top-k kept, summed in ascending order
        var s = 0.0;
        for (var r = 0u; r < n; r++) {
            let c = by_val[r];
            if ((kept[c / 32u] & (1u << (c % 32u))) != 0u) {
                s += exp(val(c) - top);
            }
        }
        var cum = 0.0;
        let drop_to = 1.0 - p.top_p;
        for (var r = 0u; r < n; r++) {
            let c = by_val[r];
            let bit = 1u << (c % 32u);
            if ((kept[c / 32u] & bit) != 0u) {
                cum += exp(val(c) - top) / s;
            }
            if (cum <= drop_to && r + 1u != n) {
                kept[c / 32u] &= ~bit;
            }
        }
    }
    // the draw, over the shares in id order
    var s = 0.0;
    for (var r = 0u; r < n; r++) {
        let c = by_id[r];
        if ((kept[c / 32u] & (1u << (c % 32u))) != 0u) {
            s += exp(val(c) - top);
        }
    }
    var chosen = NONE;
    var last = NONE;
    var cum = 0.0;
    for (var r = 0u; r < n; r++) {
        let c = by_id[r];
        let share = exp(val(c) - top) / s;
        if ((kept[c / 32u] & (1u << (c % 32u))) != 0u && share > 0.0) {
            last = cid[c];
            cum += share;
            if (chosen == NONE && p.u < cum) {
                chosen = cid[c];
            }
        }
    }
    if (chosen == NONE) {
        chosen = last;
    }
    picked[0] = chosen;
    token[0] = chosen;
    mask[chosen / 32u] |= 1u << (chosen % 32u);
}
