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
// `topk`: workgroup g sorts logits g*1024 .. g*1024+1023 in workgroup memory (bitonic) and
// writes its best 64 candidates at out[g * 64 ..]; with NEXT, the same over p.n candidates of
// an earlier pass. Passes repeat until 64 remain.
//
// Larger vectors are first cut down without sorting them (src/gpu/ops.rs chooses):
// `topk_bests` writes the best entry of each chunk of 16 as a candidate (one invocation per
// chunk, no workgroup memory, no barrier); the passes above find the best 64 of those; and
// `topk` with GATHER sorts the 64 × 16 entries of those 64 chunks. The best 64 entries all lie
// there: an entry outside them ranks below the best of each of the 64 chunks, 64 better
// entries. For Vicuna's 32001 logits that is 4 workgroups sorting instead of 35; a sort is 55
// rounds of compare-and-swap between barriers, the costliest kind of kernel on CPU drivers.

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

var<workgroup> key: array<u32, SPAN>;
var<workgroup> idx: array<u32, SPAN>;
var<workgroup> raw: array<f32, SPAN>;

// Key bits as an unsigned number in the keys' order: positive floats above negative ones,
// each side in the order of its magnitude; any NaN (by its bits: WGSL lets a compiler assume
// floats are never NaN) is the largest.
fn ord(bits: u32) -> u32 {
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
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
    let nan = (bitcast<u32>(r) & 0x7fffffffu) > 0x7f800000u;
    return Entry(select(ord(bitcast<u32>(k)), NONE, nan), i, r);
}

// Candidate i of an earlier pass.
fn cand_entry(i: u32) -> Entry {
    return Entry(ord(cand_in[i * 3u]), cand_in[i * 3u + 1u], bitcast<f32>(cand_in[i * 3u + 2u]));
}

fn beats(a: Entry, b: Entry) -> bool {
    return a.k > b.k || (a.k == b.k && a.at < b.at);
}

fn better(a: u32, b: u32) -> bool {
    return key[a] > key[b] || (key[a] == key[b] && idx[a] < idx[b]);
}

// Sorts key/idx/raw best first (bitonic; 256 invocations, 4 slots each).
fn sort(lid: u32) {
    for (var k = 2u; k <= SPAN; k <<= 1u) {
        for (var j = k >> 1u; j > 0u; j >>= 1u) {
            for (var e = 0u; e < 4u; e++) {
                let i = lid + e * 256u;
                let l = i ^ j;
                if (l > i) {
                    let best_first = (i & k) == 0u;
                    if (best_first == better(l, i)) {
                        let tk = key[i];
                        key[i] = key[l];
                        key[l] = tk;
                        let ti = idx[i];
                        idx[i] = idx[l];
                        idx[l] = ti;
                        let tr = raw[i];
                        raw[i] = raw[l];
                        raw[l] = tr;
                    }
                }
            }
            workgroupBarrier();
        }
    }
}

fn write_entry(o: u32, e: Entry) {
    cand_out[o * 3u] = unord(e.k);
    cand_out[o * 3u + 1u] = e.at;
    cand_out[o * 3u + 2u] = bitcast<u32>(e.r);
}

fn write_best(g: u32, lid: u32) {
    if (lid < KEEP) {
        write_entry(g * KEEP + lid, Entry(key[lid], idx[lid], raw[lid]));
    }
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
    for (var e = 0u; e < 4u; e++) {
        let s = ids.lid + e * 256u;
        let en = slot_entry(g, s);
        key[s] = en.k;
        idx[s] = en.at;
        raw[s] = en.r;
    }
    workgroupBarrier();
    sort(ids.lid);
    write_best(g, ids.lid);
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
