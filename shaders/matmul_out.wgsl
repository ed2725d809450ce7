// The output side every matmul kernel shares (pulled in with `#include matmul_out` by
// matmul.wgsl and gemv.wgsl): the parameter block `ops.rs` fills the same way for both, the
// bias and output bindings, and `store`, which adds the bias and (with accumulate, a fused
// residual) the output's previous value. Each includer declares its own x binding.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    x_stride: u32,
    out_stride: u32,
    out_col: u32,
    bias_off: u32,
    accumulate: u32,
    eps: f32, // RMSNorm's epsilon (NORM in gemv.wgsl)
    // The first row of x and of the output this dispatch covers: rows m of the kernels are
    // rows row0 + m of both (a GEMM's ragged last rows dispatched on their own).
    row0: u32,
#if ROPE
    // the rotary step fused into a QKV GEMV (gemv.wgsl): the position, the widths of q and of
    // k (= of v) in columns, the head dim, the pairing (0 rotate-half, 1 interleaved) and the
    // KV cache's positions (its head-major blocks' rows)
    rope_pos: u32,
    rope_q: u32,
    rope_kv: u32,
    rope_hd: u32,
    rope_mode: u32,
    rope_ctx: u32,
#endif
}

@group(0) @binding(0) var<uniform> p: Params;
#if BIAS
@group(0) @binding(4) var<storage, read> bias: array<f32>;
#endif
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// out[row0 + m, out_col + n] (+)= acc (+ bias[bias_off + n]); with OUT_SILU the value is silu(value)
// (LLaMA's gate projection), with OUT_MUL it multiplies what out holds (the up projection
// times silu(gate) written there just before): the MLP's silu(gate) * up costs no pass of its
// own and no exp per read in the down projection.
fn store(m: u32, n: u32, acc: f32) {
    var v = acc;
#if BIAS
    v += bias[p.bias_off + n];
#endif
#if OUT_SILU
    v = v / (1.0 + exp(-v));
#endif
    let o = (p.row0 + m) * p.out_stride + p.out_col + n;
    if (p.accumulate != 0u) {
        v += out[o];
    }
#if OUT_MUL
    v *= out[o];
#endif
    out[o] = v;
}
