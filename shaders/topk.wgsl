// The best 64 entries of a vector, for sampling on the GPU: a token then reads back 64
// candidates (768 bytes) instead of the whole logits vector.
//
// Entries are ranked by key (higher first, then lower index), where the key is the logit with
// HF's repetition penalty applied to the ids set in `mask` (one bit per id): k < 0 ? k * p :
// k / p. Each candidate is three words: key bits, index, and the logit as it was (the host
// applies the penalty again, exactly, before it samples).
//
// `topk`: workgroup g sorts logits g*1024 .. g*1024+1023 in workgroup memory (bitonic) and
// writes its best 64 candidates at out[g * 64 ..]; with NEXT, the same over p.n candidates of
// an earlier pass. Passes repeat until 64 remain.

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

var<workgroup> key: array<f32, SPAN>;
var<workgroup> idx: array<u32, SPAN>;
var<workgroup> raw: array<f32, SPAN>;

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

fn write_best(g: u32, lid: u32) {
    if (lid < KEEP) {
        let o = (g * KEEP + lid) * 3u;
        cand_out[o] = bitcast<u32>(key[lid]);
        cand_out[o + 1u] = idx[lid];
        cand_out[o + 2u] = bitcast<u32>(raw[lid]);
    }
}

// One entry point; without NEXT it reads logits (first pass), with NEXT the candidates of an
// earlier pass.
@compute @workgroup_size(256)
fn topk(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g * SPAN >= p.n) {
        return;
    }
    for (var e = 0u; e < 4u; e++) {
        let s = ids.lid + e * 256u;
        let i = g * SPAN + s;
        var k = NEG_BIG;
        var r = NEG_BIG;
        var at = 0xffffffffu;
        if (i < p.n) {
#if NEXT
            k = bitcast<f32>(cand_in[i * 3u]);
            at = cand_in[i * 3u + 1u];
            r = bitcast<f32>(cand_in[i * 3u + 2u]);
#else
            r = logits[i];
            k = r;
            if ((mask[i >> 5u] & (1u << (i & 31u))) != 0u) {
                k = select(r / p.penalty, r * p.penalty, r < 0.0);
            }
            at = i;
#endif
        }
        key[s] = k;
        idx[s] = at;
        raw[s] = r;
    }
    workgroupBarrier();
    sort(ids.lid);
    write_best(g, ids.lid);
}
