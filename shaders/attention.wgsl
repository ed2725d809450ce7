// Scaled dot-product attention, one workgroup per (query row, head), online softmax over
// chunks of WG keys, any head_dim up to 256 (88 for the ViT, 64 Q-Former, 128 LLaMA).
//
// q row t, head h at q[q_off + t * q_stride + h * d]; keys/values likewise with the kv head
// h / (hq / hkv) (grouped-query attention). With causal != 0, query t sees keys 0 ..= t + past
// (past = tokens already in the KV cache). out[o_off + t * o_stride + h * d + i].
// score = (q . k) * scale; softmax in f32.

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
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const MAXD: u32 = 256u;
var<workgroup> qs: array<f32, MAXD>;
var<workgroup> pw: array<f32, WG>;

@compute @workgroup_size(64)
fn attention(ids: Ids, grp: Grp) {
    let g = group_index(grp);
    if (g >= p.t * p.hq) {
        return;
    }
    let h = g % p.hq;
    let ti = g / p.hq;
    let kvh = h / (p.hq / p.hkv);
    let qb = p.q_off + ti * p.q_stride + h * p.d;
    for (var d = ids.lid; d < p.d; d += WG) {
        qs[d] = q[qb + d];
    }
    workgroupBarrier();
    var kv_len = p.s;
    if (p.causal != 0u) {
        kv_len = min(p.s, ti + p.past + 1u);
    }
    var m_run = NEG_BIG;
    var l_run = 0.0;
    var acc: array<f32, 4>;
    for (var base = 0u; base < kv_len; base += WG) {
        let j = base + ids.lid;
        var sc = NEG_BIG;
        if (j < kv_len) {
            let kb = p.k_off + j * p.k_stride + kvh * p.d;
            var dot = 0.0;
            for (var d = 0u; d < p.d; d++) {
                dot += qs[d] * k[kb + d];
            }
            sc = dot * p.scale;
        }
        let m_new = max(m_run, wg_max(sc, ids));
        var pj = 0.0;
        if (j < kv_len) {
            pj = exp(sc - m_new);
        }
        pw[ids.lid] = pj;
        // wg_sum starts with a barrier, so every pw write is visible after it.
        let chunk_sum = wg_sum(pj, ids);
        let corr = exp(m_run - m_new);
        l_run = l_run * corr + chunk_sum;
        let cnt = min(WG, kv_len - base);
        for (var i = 0u; i < 4u; i++) {
            let d = ids.lid + i * WG;
            if (d < p.d) {
                var a = acc[i] * corr;
                let vb = p.v_off + base * p.v_stride + kvh * p.d + d;
                for (var jj = 0u; jj < cnt; jj++) {
                    a += pw[jj] * v[vb + jj * p.v_stride];
                }
                acc[i] = a;
            }
        }
        m_run = m_new;
        workgroupBarrier();
    }
    let ob = p.o_off + ti * p.o_stride + h * p.d;
    for (var i = 0u; i < 4u; i++) {
        let d = ids.lid + i * WG;
        if (d < p.d) {
            out[ob + d] = acc[i] / l_run;
        }
    }
}
