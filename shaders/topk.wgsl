// The best 64 entries of a vector, for sampling on the GPU: a token then reads back 64
// candidates (768 bytes) instead of the whole logits vector.
//
// Entries are ranked by key (higher first, then lower index), where the key is the logit with
// HF's repetition penalty applied to the ids set in `mask` (one bit per id): k < 0 ? k * p :
// k / p. Keys compare as their totally ordered bits (see `ord`: -0 below +0, and a NaN above
// everything, so that a NaN logit always reaches the candidates, where sampling sees it and
// leaves the pick to the host). Each candidate is three words: key bits, index, and the logit
// as it was (the host applies the penalty again, exactly, before it samples).
//
// `topk`: workgroup g ranks logits g*1024 .. g*1024+1023 in workgroup memory (see `rank`) and
// writes its best 64 candidates in order at out[g * 64 ..] (padded where fewer); with NEXT,
// the same over p.n candidates of an earlier pass. Passes repeat until 64 remain.
//
// Larger vectors are first cut down without ranking every entry (src/gpu/ops.rs chooses):
// `topk_bests` writes the best entry of each chunk of 16 as a candidate (one invocation per
// chunk, no workgroup memory, no barrier); the passes above find the best 64 of those; and
// `topk` with GATHER ranks the 64 × 16 entries of those 64 chunks. The best 64 entries all lie
// there: an entry outside them ranks below the best of each of the 64 chunks, 64 better
// entries. For Vicuna's 32001 logits that is 4 workgroups ranking 1024 entries instead of 35.

#include common

struct Params {
    n: u32,
    penalty: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read> cand_in: array<u32>;
@group(0) @binding(4) var<storage, read_write> cand_out: array<u32>;

const SPAN: u32 = 1024u;
const KEEP: u32 = 64u;
const CHUNK: u32 = 16u;
const NONE: u32 = 0xffffffffu;

var<workgroup> key4: array<vec4<u32>, SPAN / 4u>;
var<workgroup> idx4: array<vec4<u32>, SPAN / 4u>;

// Whether float bits are a NaN's (by its bits: WGSL lets a compiler assume floats are never
// NaN).
fn nan_bits(bits: u32) -> bool {
    return (bits & 0x7fffffffu) > 0x7f800000u;
}

// Key bits as an unsigned number in the keys' order: positive floats above negative ones,
// each side in the order of its magnitude; any NaN is the largest.
fn ord(bits: u32) -> u32 {
    if (nan_bits(bits)) {
        return NONE;
    }
    return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

// The key bits of an ordered key (a NaN comes back as the NaN 0x7fffffff).
fn unord(o: u32) -> u32 {
    return select(~o, o & 0x7fffffffu, (o & 0x80000000u) != 0u);
}

// An entry: ordered key, index (NONE for padding), raw logit.
struct Entry {
    k: u32,
    at: u32,
    r: f32,
}

fn padding() -> Entry {
    return Entry(ord(bitcast<u32>(NEG_BIG)), NONE, NEG_BIG);
}

// Logit i (< p.n) as an entry: its key is the logit after the repetition penalty.
fn logit_entry(i: u32) -> Entry {
    let r = logits[i];
    var k = r;
    if ((mask[i >> 5u] & (1u << (i & 31u))) != 0u) {
        k = select(r / p.penalty, r * p.penalty, r < 0.0);
    }
    // a NaN logit keeps its NaN bits as the key (the division above need not keep them)
    return Entry(select(ord(bitcast<u32>(k)), NONE, nan_bits(bitcast<u32>(r))), i, r);
}

// Candidate i of an earlier pass.
fn cand_entry(i: u32) -> Entry {
    return Entry(ord(cand_in[i * 3u]), cand_in[i * 3u + 1u], bitcast<f32>(cand_in[i * 3u + 2u]));
}

fn beats(a: Entry, b: Entry) -> bool {
    return a.k > b.k || (a.k == b.k && a.at < b.at);
}

// The ranks of this invocation's four entries (held in slots lid + 256 e) among slots
// 0 .. live - 1: how many entries beat each, ties in key and index (padding) by slot, so that
// the ranks are a permutation. Every invocation reads the same four slots at each step, as one
// vec4 load of keys and one of indices shared by its four entries: a GPU's workgroup memory
// broadcasts them, and a CPU driver (which loads workgroup memory lane by lane) makes few
// loads. A bitonic sort of 1024 slots would wait at 55 barriers instead, the costliest thing
// a CPU driver's kernel does (on lavapipe this ranking takes under half the sort's time).
fn ranks(mine: ptr<function, array<Entry, 4>>, lid: u32, live: u32) -> vec4<u32> {
    var n = array<vec4<u32>, 4>();
    for (var j = 0u; j < live; j += 4u) {
        let kj = key4[j / 4u];
        let aj = idx4[j / 4u];
        let sj = vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u);
        let in_range = sj < vec4<u32>(live);
        for (var e = 0u; e < 4u; e++) {
            let ek = vec4<u32>((*mine)[e].k);
            let ea = vec4<u32>((*mine)[e].at);
            let s = vec4<u32>(lid + e * 256u);
            let beats = (kj > ek) | ((kj == ek) & ((aj < ea) | ((aj == ea) & (sj < s))));
            n[e] += select(vec4<u32>(0u), vec4<u32>(1u), beats & in_range);
        }
    }
    return vec4<u32>(dot(n[0], vec4<u32>(1u)), dot(n[1], vec4<u32>(1u)),
                     dot(n[2], vec4<u32>(1u)), dot(n[3], vec4<u32>(1u)));
}

fn write_entry(o: u32, e: Entry) {
    cand_out[o * 3u] = unord(e.k);
    cand_out[o * 3u + 1u] = e.at;
    cand_out[o * 3u + 2u] = bitcast<u32>(e.r);
}

// Slot s of workgroup g: without NEXT or GATHER logit g*1024 + s, with NEXT that candidate of
// an earlier pass, with GATHER entry s % 16 of the chunk whose best is candidate s / 16.
fn slot_entry(g: u32, s: u32) -> Entry {
#if GATHER
    let best = cand_in[(s / CHUNK) * 3u + 1u];
    let i = (best / CHUNK) * CHUNK + s % CHUNK;
    if (best == NONE || i >= p.n) {
        return padding();
    }
    return logit_entry(i);
#else
    let i = g * SPAN + s;
    if (i >= p.n) {
        return padding();
    }
#if NEXT
    return cand_entry(i);
#else
    return logit_entry(i);
#endif
#endif
}

@compute @workgroup_size(256)
fn topk(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g * SPAN >= p.n) {
        return;
    }
    var mine: array<Entry, 4>;
    for (var e = 0u; e < 4u; e++) {
        let s = ids.lid + e * 256u;
        mine[e] = slot_entry(g, s);
        key4[s / 4u][s % 4u] = mine[e].k;
        idx4[s / 4u][s % 4u] = mine[e].at;
    }
    workgroupBarrier();
#if GATHER
    let live = SPAN;
#else
    let live = min(p.n - g * SPAN, SPAN);
#endif
    // each entry ranked among the others, the best KEEP written at their ranks
    let r4 = ranks(&mine, ids.lid, live);
    for (var e = 0u; e < 4u; e++) {
        let s = ids.lid + e * 256u;
        if (s < live) {
            let r = r4[e];
            if (r < KEEP) {
                write_entry(g * KEEP + r, mine[e]);
            }
        }
    }
    // fewer entries than KEEP: padding after them
    if (ids.lid >= live && ids.lid < KEEP) {
        write_entry(g * KEEP + ids.lid, padding());
    }
}

// The best entry of chunk c (logits 16c .. 16c + 15, those below p.n) as candidate c.
@compute @workgroup_size(256)
fn topk_bests(ids: Ids, grp: Grp) {
    let c = group_index(grp) * 256u + ids.lid;
    if (c * CHUNK >= p.n) {
        return;
    }
    var best = logit_entry(c * CHUNK);
    for (var j = 1u; j < CHUNK; j++) {
        let i = c * CHUNK + j;
        if (i < p.n) {
            let e = logit_entry(i);
            if (beats(e, best)) {
                best = e;
            }
        }
    }
    write_entry(c, best);
}
