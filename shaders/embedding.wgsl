// Embedding row gather: out[t, c] = table[ids[t], c] as f32, for the ids that fall in this
// tensor part's rows [row_start, row_start + rows). One invocation per output element.

#include common
#include weights

struct Params {
    n_tokens: u32,
    cols: u32,
    row_start: u32,
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids_buf: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn embedding(ids: Ids, grp: Grp) {
    let e = flat_index(grp, ids);
    if (e >= p.n_tokens * p.cols) {
        return;
    }
    let t = e / p.cols;
    let c = e % p.cols;
    let id = ids_buf[t];
    if (id >= p.row_start && id < p.row_start + p.rows) {
        out[e] = w_at((id - p.row_start) * p.cols + c);
    }
}
