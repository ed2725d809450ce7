//! `minigpt4 bench`: speed as ratios measured in one run on one device.
//!
//! - the device's own copy-kernel bandwidth (our `copy_vec4` kernel), the yardstick;
//! - what a dispatch of next to no work takes (with 1 and with 16 workgroups), the floor under
//!   every dispatch of a decode step;
//! - GEMV (decode) GB/s and % of the copy bandwidth for q4 / q8 / f16 at the real shapes, each
//!   run walking through enough copies of the matrix that its weights come from memory (as in
//!   decode), not from a cache, and timed next to a run of the copy kernel (the percentage is
//!   the median of the pairs' ratios);
//! - decode attention (one query row over an f16 KV cache, as the LLM's layers read it) GB/s
//!   of the cache and % of the copy bandwidth, at SmolLM2's and the Vicunas' heads and three
//!   context lengths, split-K where the model splits;
//! - attention over many query rows (prefill, the ViT, the Q-Former: the tiled kernel) ms per
//!   layer and GFLOP/s;
//! - GEMM (prefill, ViT) GFLOP/s;
//! - end to end on synthetic weights at the real dimensions (`--synthetic vicuna0-7b|vicuna0-13b`,
//!   `--layers N` when the machine is too small for all): ViT-g + Q-Former image encode, prefill
//!   and decode at two context lengths, time to first token, GPU memory; `--synthetic vit-g`:
//!   the image encode alone;
//! - end to end on a model package (`--model`), as `chat` runs it: the same figures for its
//!   real weights and its first turn's prompt;
//! - decode on a real LLaMA (`--llm`, GGUF or HF directory) against what the GEMV rates predict,
//!   with and without the dispatch floor of its step.
//!
//! Kernel parts are timed on the device's clock where it has timestamp queries, by the wall
//! clock otherwise; end-to-end figures by the wall clock around a submit and a wait for the
//! device (several runs; median, min and max). `--tiny` shrinks everything so CI can prove the
//! command works; no test is timed.

use std::time::Instant;

use serde_json::{json, Value};

use crate::error::Result;
use crate::gpu::recorder::grid;
use crate::gpu::{gemm_form_for, tune, Gpu, Recorder, Tensor};
use crate::model::llama::{Input, Llama, QuantPolicy};
use crate::model::qformer::{QFormer, QFormerConfig};
use crate::model::vit::{Vit, VitConfig};
use crate::package::PackageConfig;
use crate::quant::DType;
use crate::synthetic::{self, fill_random, llm_config, tensors as synthetic_tensors, Picks};

pub struct BenchArgs {
    /// Small shapes and few runs (CI).
    pub tiny: bool,
    pub runs: usize,
    /// `vicuna0-7b`, `vicuna0-13b` or `vit-g` (the image encode alone): the end-to-end part;
    /// `None` skips it.
    pub synthetic: Option<String>,
    /// LLM and ViT layers for the synthetic model (default: all).
    pub layers: Option<usize>,
    pub quant: DType,
    /// Which parts to run: `copy`, `gemv`, `attention`, `gemm`, `e2e`, `decode` (the copy
    /// bandwidth is always measured).
    pub parts: Vec<String>,
    /// A LLaMA model (GGUF or HF directory) to measure decode on, against the GEMV prediction.
    pub llm: Option<std::path::PathBuf>,
    /// A model package to measure end to end, as `chat` runs it.
    pub model: Option<std::path::PathBuf>,
}

/// The synthetic models of `--synthetic`: the LLMs (image encode, prefill, decode) and the
/// image encoder alone.
pub const SYNTHETIC: [&str; 3] = ["vicuna0-7b", "vicuna0-13b", VIT_G];
const VIT_G: &str = "vit-g";

/// Every part of the report, in order. `decode` (the synthetic LLM's decode alone, the same
/// code as the page's `MiniGPT4.benchDecode`) runs only when asked for.
pub const PARTS: [&str; 7] = [
    "copy",
    "gemv",
    "attention",
    "sampling",
    "gemm",
    "e2e",
    "decode",
];

/// Median, min and max of `runs` measurements (seconds) by `run`, after one unmeasured run
/// (pipelines compiled, buffers touched).
fn measure(runs: usize, mut run: impl FnMut() -> Result<f64>) -> Result<(f64, f64, f64)> {
    run()?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        v.push(run()?);
    }
    Ok(synthetic::spread(v))
}

/// [`measure`] of kernels submitted by `f`: GPU time from timestamp queries where the device
/// has them (see [`kernel_clock`]), wall clock otherwise.
fn time_kernels(
    gpu: &Gpu,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, f64)> {
    measure(runs, || kernel_seconds(gpu, &mut f))
}

/// One measurement of [`time_kernels`]: the seconds of the kernels `f` submits.
fn kernel_seconds(gpu: &Gpu, f: &mut impl FnMut() -> Result<()>) -> Result<f64> {
    let (s, on_gpu) = pollster::block_on(tune::gpu_or_wall(gpu, async { f() }))?;
    if gpu.has_timestamps() && !on_gpu {
        WALL_FALLBACK.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(s)
}

/// Set when a [`time_kernels`] measurement fell back to the wall clock on a device with
/// timestamp queries (its clock did not move, or a profiled run timed each dispatch itself).
static WALL_FALLBACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What [`time_kernels`] measured with on `gpu` in this run.
fn kernel_clock(gpu: &Gpu) -> &'static str {
    if gpu.has_timestamps() && !WALL_FALLBACK.load(std::sync::atomic::Ordering::Relaxed) {
        "gpu timestamps"
    } else {
        "wall"
    }
}

/// [`measure`] by the wall clock around `f` (end to end: what a user waits for).
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    measure(runs, || {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    })
}

fn random_weight(
    gpu: &Gpu,
    name: &str,
    shape: &[usize],
    dtype: DType,
    seed: u64,
) -> Result<Tensor> {
    let t = Tensor::empty(gpu, name, shape, dtype)?;
    fill_random(gpu, &t, seed);
    Ok(t)
}

/// Weight bytes a timed GEMV run streams through (unless the matrix alone is larger): more
/// than a GPU's last-level cache (an H200's L2 is 50 MB, RDNA's Infinity Cache up to 128 MB)
/// and a CPU driver's L3, so the GEMV reads its weights from memory, as decode does, and its
/// rate compares with the copy kernel's.
fn cold_bytes(tiny: bool) -> usize {
    if tiny {
        1 << 20
    } else {
        256 << 20
    }
}

/// Copies of one random `shape` matrix, enough of them (at most 64) to hold `bytes` together:
/// a GEMV that walks through them finds none of its weights in a cache. The first is filled
/// from the host; the others are copied from it on the GPU.
fn cold_copies(
    gpu: &Gpu,
    name: &str,
    shape: &[usize],
    dtype: DType,
    bytes: usize,
) -> Result<Vec<Tensor>> {
    let first = random_weight(
        gpu,
        name,
        shape,
        dtype,
        shape.iter().product::<usize>() as u64,
    )?;
    let each = dtype.bytes(first.numel()).max(1);
    let count = bytes.div_ceil(each).clamp(1, 64);
    let mut all = vec![first];
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    for _ in 1..count {
        let t = Tensor::empty(gpu, name, shape, dtype)?;
        for (from, to) in all[0].parts.iter().zip(&t.parts) {
            enc.copy_buffer_to_buffer(&from.data, 0, &to.data, 0, from.data.size());
            if let (Some(f), Some(o)) = (&from.scales, &to.scales) {
                enc.copy_buffer_to_buffer(f, 0, o, 0, f.size());
            }
        }
        all.push(t);
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wait();
    gpu.take_error()?;
    Ok(all)
}

fn stats(v: (f64, f64, f64)) -> Value {
    json!({"median_s": v.0, "min_s": v.1, "max_s": v.2})
}

/// The bandwidth yardstick: `copy.wgsl` `copy_vec4`, a contiguous vec4 copy of 128 MiB (more
/// than any cache), `reps` times in one submit.
struct CopyKernel {
    src: Tensor,
    dst: Tensor,
    reps: usize,
}

impl CopyKernel {
    fn new(gpu: &Gpu, a: &BenchArgs, reps: usize) -> Result<Self> {
        let bytes: usize = if a.tiny { 4 << 20 } else { 128 << 20 };
        let n = bytes.min(gpu.max_binding as usize / 2) / 4;
        Ok(CopyKernel {
            src: Tensor::zeros(gpu, "copy.src", &[n])?,
            dst: Tensor::zeros(gpu, "copy.dst", &[n])?,
            reps,
        })
    }

    /// Bytes read + written by one run.
    fn moved(&self) -> usize {
        2 * self.src.numel() * 4 * self.reps
    }

    fn run(&self, gpu: &Gpu) -> Result<()> {
        let vec4s = (self.src.numel() / 4) as u32;
        let mut rec = Recorder::new(gpu);
        for _ in 0..self.reps {
            copy_vec4(&mut rec, &self.src, &self.dst, vec4s, vec4s.div_ceil(256))?;
        }
        pollster::block_on(rec.submit())?;
        gpu.wait();
        Ok(())
    }
}

/// Workgroup counts [`dispatch_cost`] measures at: one (a decode step's norms, argmax), and 16
/// (the order of the rest: SmolLM2's take 3 to 192 workgroups, a 7B's 16 to 500).
const DISPATCH_GROUPS: [usize; 2] = [1, 16];

/// What one dispatch costs the device beyond its work: a chain of `copy_vec4` dispatches that
/// copy one vec4 per workgroup (the rest of each workgroup's invocations only check the
/// bound), each reading what the one before it wrote (ping-pong between two buffers, so each
/// waits for the one before, as a forward's do), in one submit; µs per dispatch for each of
/// [`DISPATCH_GROUPS`].
fn dispatch_cost(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    let chain = if a.tiny { 16 } else { 200 };
    let mut out = serde_json::Map::new();
    let x = Tensor::zeros(gpu, "dispatch.a", &[256 * 4])?;
    let y = Tensor::zeros(gpu, "dispatch.b", &[256 * 4])?;
    for groups in DISPATCH_GROUPS {
        let vec4s = groups as u32;
        let t = time_kernels(gpu, a.runs, || {
            let mut rec = Recorder::new(gpu);
            for i in 0..chain {
                let (from, to) = if i % 2 == 0 { (&x, &y) } else { (&y, &x) };
                copy_vec4(&mut rec, from, to, vec4s, groups as u32)?;
            }
            pollster::block_on(rec.submit())?;
            gpu.wait();
            Ok(())
        })?;
        out.insert(
            format!("us_{groups}_groups"),
            json!(t.0 / chain as f64 * 1e6),
        );
    }
    out.insert("chain".into(), json!(chain));
    Ok(Value::Object(out))
}

/// Records `copy.wgsl` `copy_vec4`: the first `vec4s` vec4s of `from` into `to`, over `groups`
/// workgroups of 256 invocations (those past `vec4s` only check the bound).
fn copy_vec4(
    rec: &mut Recorder,
    from: &Tensor,
    to: &Tensor,
    vec4s: u32,
    groups: u32,
) -> Result<()> {
    rec.dispatch(
        "copy",
        "copy_vec4",
        &[],
        &[vec4s],
        &[(3, from.buffer()), (4, to.buffer())],
        grid(groups),
    )
}

/// The copy kernel's bandwidth (bytes read + written per second), timed on its own.
fn copy_bandwidth(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    let copy = CopyKernel::new(gpu, a, if a.tiny { 2 } else { 8 })?;
    let t = time_kernels(gpu, a.runs, || copy.run(gpu))?;
    let moved = copy.moved() as f64;
    Ok(json!({"bytes": copy.src.numel() * 4, "gb_per_s": moved / t.0 / 1e9, "time": stats(t)}))
}

fn gemv_shapes(tiny: bool) -> Vec<(usize, usize)> {
    if tiny {
        vec![(256, 256), (512, 256)]
    } else {
        vec![
            (4096, 4096),
            (11008, 4096),
            (4096, 11008),
            (32001, 4096),
            (5120, 5120),
            (13824, 5120),
            (5120, 13824),
        ]
    }
}

/// GEMV at the real shapes, each timed run next to a run of the copy kernel (one pass over
/// 128 MiB, about a GEMV run's bytes): `percent_of_copy` is the median of the runs' ratios, so
/// a machine whose speed drifts during the report (a shared one) moves both sides of each.
fn gemv(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    let copy = CopyKernel::new(gpu, a, 1)?;
    let mut out = Vec::new();
    for dtype in [DType::Q4, DType::Q4M, DType::Q8, DType::F16] {
        for (n, k) in gemv_shapes(a.tiny) {
            eprintln!("bench: gemv {dtype} {n}×{k}");
            let bytes = dtype.bytes(n * k);
            let ws = cold_copies(gpu, "gemv.w", &[n, k], dtype, cold_bytes(a.tiny))?;
            let x = Tensor::zeros(gpu, "gemv.x", &[1, k])?;
            let y = Tensor::zeros(gpu, "gemv.y", &[1, n])?;
            // every matrix once, at least two dispatches
            let reps = ws.len().max(2);
            let run_gemv = || {
                let mut rec = Recorder::new(gpu);
                for w in ws.iter().cycle().take(reps) {
                    rec.matmul(&x, w, None, &y, false)?;
                }
                pollster::block_on(rec.submit())?;
                gpu.wait();
                Ok(())
            };
            let (t, c, r) = timed_against_copy(gpu, a, &copy, run_gemv, bytes * reps)?;
            out.push(json!({
                "dtype": dtype.name(), "n": n, "k": k, "weight_bytes": bytes,
                "copies": ws.len(),
                "gb_per_s": (bytes * reps) as f64 / t.0 / 1e9,
                "copy_gb_per_s": copy.moved() as f64 / c.0 / 1e9,
                "percent_of_copy": 100.0 * r.0,
                "percent_of_copy_min": 100.0 * r.1, "percent_of_copy_max": 100.0 * r.2,
                "time": stats(t),
            }));
        }
    }
    Ok(Value::from(out))
}

/// The decode attention cases: (model, query heads, KV heads, head_dim, contexts).
type AttnCase = (&'static str, usize, usize, usize, &'static [usize]);

fn attention_cases(tiny: bool) -> Vec<AttnCase> {
    if tiny {
        // one context below the split-K threshold and one above it
        vec![("tiny", 4, 2, 64, &[16, 300])]
    } else {
        vec![
            ("smollm2-135m", 9, 3, 64, &[128, 1024, 2048]),
            ("vicuna0-7b", 32, 32, 128, &[128, 1024, 2048]),
            ("vicuna0-13b", 40, 40, 128, &[2048]),
        ]
    }
}

/// Decode attention as the LLM's layers run it: one query row (an activation, so read as a
/// uniform where the kernel can) over an f16 KV cache of `context` positions, head-major as
/// `Llama` keeps it ([`crate::gpu::kv_cache_shape`]), split-K from [`ATTN_SPLIT`] keys on (the
/// model's rule). Each run walks through enough copies of the cache that it comes from memory,
/// as the layers' caches do, and is timed next to a copy-kernel run (the percentage is the
/// median of the pairs' ratios of cache bytes per second to copy bytes per second).
fn attention(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    use crate::gpu::ATTN_SPLIT;
    use crate::gpu::{attention_partials, kv_cache_shape, kv_cache_views, AttnShape, HeadView};
    let copy = CopyKernel::new(gpu, a, 1)?;
    let mut out = Vec::new();
    for (model, hq, hkv, d, contexts) in attention_cases(a.tiny) {
        let (qd, kv) = (hq * d, hkv * d);
        let q = Tensor::zeros(gpu, "attn.q", &[1, qd])?;
        q.write_f32(
            gpu,
            &(0..qd)
                .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                .collect::<Vec<_>>(),
        )?;
        let o = Tensor::zeros(gpu, "attn.out", &[1, qd])?;
        for &s in contexts {
            eprintln!("bench: attention {model} ({hq} heads, {hkv} KV heads × {d}) at {s}");
            let bytes = DType::F16.bytes(s * 2 * kv);
            let shape = kv_cache_shape(hkv, s, d);
            let caches = cold_copies(gpu, "attn.kv", &shape, DType::F16, cold_bytes(a.tiny))?;
            let split = s > ATTN_SPLIT;
            let part = Tensor::zeros(gpu, "attn.part", &[attention_partials(1, hq, s, d)])?;
            let reps = caches.len().max(2);
            let run_attn = || -> Result<()> {
                let mut rec = Recorder::new(gpu);
                for c in caches.iter().cycle().take(reps) {
                    let (keys, values) = kv_cache_views(c)?;
                    rec.attention_with(
                        HeadView::whole(&q),
                        keys,
                        values,
                        HeadView::whole(&o),
                        AttnShape {
                            t: 1,
                            s,
                            heads: hq,
                            kv_heads: hkv,
                            head_dim: d,
                            causal: true,
                            scale: 1.0 / (d as f32).sqrt(),
                        },
                        split.then_some(&part),
                    )?;
                }
                pollster::block_on(rec.submit())?;
                gpu.wait();
                Ok(())
            };
            let (t, c, r) = timed_against_copy(gpu, a, &copy, run_attn, bytes * reps)?;
            out.push(json!({
                "model": model, "heads": hq, "kv_heads": hkv, "head_dim": d, "context": s,
                "split_k": split, "kv_bytes": bytes, "copies": caches.len(),
                "gb_per_s": (bytes * reps) as f64 / t.0 / 1e9,
                "copy_gb_per_s": copy.moved() as f64 / c.0 / 1e9,
                "percent_of_copy": 100.0 * r.0,
                "percent_of_copy_min": 100.0 * r.1, "percent_of_copy_max": 100.0 * r.2,
                "us_per_layer": t.0 / reps as f64 * 1e6,
                "time": stats(t),
            }));
        }
    }
    Ok(Value::from(out))
}

/// A many-row attention case: (name, query rows, key rows, query heads, KV heads, head_dim,
/// causal, key/value dtype).
type AttnRowsCase = (&'static str, usize, usize, usize, usize, usize, bool, DType);

fn attention_rows_cases(tiny: bool) -> Vec<AttnRowsCase> {
    if tiny {
        vec![
            ("tiny prefill", 20, 20, 4, 2, 64, true, DType::F16),
            ("tiny vit", 17, 17, 2, 2, 88, false, DType::F32),
        ]
    } else {
        vec![
            ("smollm2-135m prefill", 98, 98, 9, 3, 64, true, DType::F16),
            ("smollm2-135m prefill", 512, 512, 9, 3, 64, true, DType::F16),
            ("vicuna0-7b prefill", 98, 98, 32, 32, 128, true, DType::F16),
            ("vit-g", 257, 257, 16, 16, 88, false, DType::F32),
            ("qformer self", 32, 32, 12, 12, 64, false, DType::F32),
            ("qformer cross", 32, 257, 12, 12, 64, false, DType::F32),
        ]
    }
}

/// Attention over many query rows (`attention_tiled`): prefill over an f16 KV cache laid out
/// as `Llama` keeps it (head-major), the ViT's and the
/// Q-Former's over f32 keys and values, the queries a row-major activation. Compute-bound, so
/// timed on warm buffers: ms per call (one layer's attention) and GFLOP/s, counting 4 flops
/// per (query row, visible key, head dim, head): q·k and the weighted sum of v.
fn attention_rows(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    use crate::gpu::{kv_cache_shape, kv_cache_views, AttnShape, HeadView};
    const REPS: usize = 2;
    let mut out = Vec::new();
    for (name, t, s, hq, hkv, d, causal, kv_dtype) in attention_rows_cases(a.tiny) {
        eprintln!("bench: attention {name}: {t} rows over {s} keys, {hq}/{hkv} heads × {d}");
        let qd = hq * d;
        // small finite pseudo-random values, as the synthetic weights get
        let q = random_weight(gpu, "attn_rows.q", &[t, qd], DType::F32, 1)?;
        let kvs = random_weight(gpu, "attn_rows.kv", &kv_cache_shape(hkv, s, d), kv_dtype, 2)?;
        let (keys, values) = kv_cache_views(&kvs)?;
        let o = Tensor::zeros(gpu, "attn_rows.out", &[t, qd])?;
        let run_attn = || -> Result<()> {
            let mut rec = Recorder::new(gpu);
            for _ in 0..REPS {
                rec.attention(
                    HeadView::whole(&q),
                    keys,
                    values,
                    HeadView::whole(&o),
                    AttnShape {
                        t,
                        s,
                        heads: hq,
                        kv_heads: hkv,
                        head_dim: d,
                        causal,
                        scale: 1.0 / (d as f32).sqrt(),
                    },
                )?;
            }
            pollster::block_on(rec.submit())?;
            gpu.wait();
            Ok(())
        };
        let tm = time_kernels(gpu, a.runs, run_attn)?;
        // visible (row, key) pairs: a causal row i sees the s - t keys before the rows and
        // i + 1 of theirs
        let pairs = if causal {
            (0..t).map(|i| s - t + i + 1).sum::<usize>()
        } else {
            t * s
        };
        let flops = 4.0 * (pairs * d * hq) as f64;
        out.push(json!({
            "case": name, "rows": t, "keys": s, "heads": hq, "kv_heads": hkv, "head_dim": d,
            "causal": causal, "kv_dtype": kv_dtype.to_string(),
            "ms_per_call": tm.0 / REPS as f64 * 1e3,
            "gflop_per_s": flops * REPS as f64 / tm.0 / 1e9,
            "time": stats(tm),
        }));
    }
    Ok(Value::from(out))
}

/// Vocabulary sizes the `sampling` part measures: Vicuna's and SmolLM2's, or (tiny) one
/// under the top-k's single pass and one over it.
fn sampling_cases(tiny: bool) -> &'static [(&'static str, usize)] {
    if tiny {
        &[("tiny", 300), ("tiny", 3000)]
    } else {
        &[("vicuna0", 32001), ("smollm2-135m", 49152)]
    }
}

/// A sampled token's picking on the GPU, as decode runs it after the LM head: the top-k's 64
/// candidates among the logits (`topk.wgsl`, with the demo's repetition penalty on a few
/// ids), and the top-k plus the sampling kernel (the demo's top-k 50, top-p 0.9). Each run
/// submits `REPS` of them; µs per token.
fn sampling(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    use crate::gpu::{Ids, SampleParams};
    const REPS: usize = 10;
    let mut out = Vec::new();
    for &(model, n) in sampling_cases(a.tiny) {
        eprintln!("bench: sampling over {n} logits ({model})");
        let logits = Tensor::zeros(gpu, "sampling.logits", &[n])?;
        logits.write_f32(
            gpu,
            &(0..n)
                .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 20.0)
                .collect::<Vec<_>>(),
        )?;
        let mut mask = vec![0u32; n.div_ceil(32)];
        for i in (0..n).step_by(n / 16) {
            mask[i / 32] |= 1 << (i % 32);
        }
        let mask = Ids::new(gpu, &mask);
        let words = crate::gpu::ops::topk_words(n);
        let (ping, pong) = (
            Ids::new(gpu, &vec![0; words]),
            Ids::new(gpu, &vec![0; words]),
        );
        let (token, picked) = (Ids::new(gpu, &[0]), Ids::new(gpu, &[0]));
        let params = SampleParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            u: 0.5,
        };
        let run = |with_sample: bool| -> Result<()> {
            let mut rec = Recorder::new(gpu);
            for _ in 0..REPS {
                let best = rec.topk(&logits, n, &mask, 1.05, &ping, &pong)?;
                if with_sample {
                    rec.sample(best, &params, &mask, &token, &picked)?;
                }
            }
            pollster::block_on(rec.submit())?;
            gpu.wait();
            Ok(())
        };
        let per = |t: Spread| (t.0 / REPS as f64, t.1 / REPS as f64, t.2 / REPS as f64);
        let topk = per(time_kernels(gpu, a.runs, || run(false))?);
        let both = per(time_kernels(gpu, a.runs, || run(true))?);
        out.push(json!({
            "model": model, "vocab": n,
            "topk_us": topk.0 * 1e6, "topk": stats(topk),
            "topk_sample_us": both.0 * 1e6, "topk_sample": stats(both),
        }));
    }
    Ok(Value::from(out))
}

/// Median, min and max.
type Spread = (f64, f64, f64);

/// `runs` timings of `run` (which moves `bytes`), each next to a copy-kernel run, after one
/// unmeasured pair: (its times, the copy's times, the ratios of its bytes per second to the
/// copy's), each as median, min and max.
fn timed_against_copy(
    gpu: &Gpu,
    a: &BenchArgs,
    copy: &CopyKernel,
    mut run: impl FnMut() -> Result<()>,
    bytes: usize,
) -> Result<(Spread, Spread, Spread)> {
    let mut run_copy = || copy.run(gpu);
    let (mut tk, mut tc, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=a.runs.max(1) {
        let c = kernel_seconds(gpu, &mut run_copy)?;
        let k = kernel_seconds(gpu, &mut run)?;
        if i > 0 {
            ratios.push((bytes as f64 / k) / (copy.moved() as f64 / c));
            tk.push(k);
            tc.push(c);
        }
    }
    Ok((
        synthetic::spread(tk),
        synthetic::spread(tc),
        synthetic::spread(ratios),
    ))
}

fn gemm(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    let cases: Vec<(&str, usize, usize, usize, DType)> = if a.tiny {
        vec![
            ("prefill", 32, 256, 256, DType::Q4),
            ("vit", 17, 192, 64, DType::F16),
        ]
    } else {
        let mut v: Vec<(&str, usize, usize, usize, DType)> = [64, 128, 256, 512]
            .iter()
            .map(|&m| ("prefill", m, 4096, 4096, DType::Q4))
            .collect();
        v.extend([
            ("vit qkv", 257, 4224, 1408, DType::F16),
            ("vit fc1", 257, 6144, 1408, DType::F16),
            ("vit fc2", 257, 1408, 6144, DType::F16),
            ("qformer ffn", 32, 3072, 768, DType::F16),
        ]);
        v
    };
    // the forms as the tuning measures them (its small shape, and its large one on a fast
    // device), then at a prefill, a ViT and a Q-Former shape (the ratios show whether the
    // tuning's shapes choose right, and what the cases' own tiles gain: the ViT's last row on
    // the GEMV, 32-row tiles for the Q-Former); the chosen form runs the cases
    let (small, large) = if a.tiny {
        ((32, 128, 64), (64, 256, 128))
    } else {
        (tune::GEMM_TUNE_SHAPE, tune::GEMM_TUNE_SHAPE_LARGE)
    };
    let by_shape_override = tune::override_gemm_shapes()?;
    eprintln!("bench: GEMM forms, f16 {}×{}×{}", small.0, small.1, small.2);
    let tuning = pollster::block_on(tune::measure_gemm_tuning(gpu, small, large, a.runs))?;
    let pinned = tune::override_gemm()?;
    let (chosen, by_shape) = match pinned {
        Some(f) => (f, false),
        None => tune::gemm_choice(&tuning),
    };
    gpu.set_gemm_form(chosen);
    // the form for quantised weights, as the tuning chooses it (measured where shapes are not
    // tuned one by one)
    let quant_trials = match pinned {
        None => {
            if !by_shape {
                eprintln!("bench: GEMM forms, q4 {}×{}×{}", small.0, small.1, small.2);
            }
            pollster::block_on(tune::measure_gemm_quant(gpu, small, by_shape, a.runs))?
        }
        Some(_) => None,
    };
    let chosen_quant = tune::gemm_quant_choice(quant_trials.as_deref(), chosen);
    gpu.set_gemm_form_quant(chosen_quant);
    let by_shape = by_shape_override.unwrap_or(by_shape);
    gpu.set_gemm_by_shape(by_shape);
    let small_shapes = tune::small_shapes_tuned(pinned, by_shape_override);
    gpu.set_gemm_small_shapes(small_shapes);
    let form_cases: Vec<(&str, usize, usize, usize, DType)> = if a.tiny {
        vec![("prefill", 40, 192, 64, DType::Q4)]
    } else {
        vec![
            ("prefill", 256, 4096, 4096, DType::Q4),
            ("vit fc1", 257, 6144, 1408, DType::F16),
            ("qformer ffn", 32, 3072, 768, DType::F16),
        ]
    };
    let mut at_shapes = Vec::new();
    for (what, m, n, k, dtype) in form_cases {
        eprintln!("bench: GEMM forms, {what} {m}×{n}×{k} {dtype}");
        let t = pollster::block_on(tune::measure_gemm(gpu, (m, n, k), dtype, a.runs))?;
        at_shapes.push(json!({
            "case": what, "m": m, "n": n, "k": k, "dtype": dtype.name(),
            "trials": gemm_trials(&t),
        }));
    }
    let shape_trials = |i: usize| {
        tuning.get(i).map(|((m, n, k), t)| {
            json!({"m": m, "n": n, "k": k, "dtype": "f16", "trials": gemm_trials(t)})
        })
    };
    let forms = json!({
        "tune_shape": shape_trials(0),
        // measured only where the small shape ran fast (a GPU); the choice is made on it then
        "tune_shape_large": shape_trials(1),
        // measured where forms are not tuned per shape; chooses the quantised weights' form
        "tune_shape_quant": quant_trials.as_deref().map(|t| {
            json!({"m": small.0, "n": small.1, "k": small.2, "dtype": "q4",
                   "trials": gemm_trials(t)})
        }),
        "chosen": chosen,
        "chosen_quant": chosen_quant,
        "by_shape": by_shape,
        // small weights' shapes are tuned per shape on any device
        "small_shapes": small_shapes,
        "at_shapes": at_shapes,
    });
    let mut out = Vec::new();
    for (what, m, n, k, dtype) in cases {
        eprintln!("bench: gemm {what} {m}×{n}×{k} {dtype}");
        // each case in its own form where GEMMs are tuned per shape (from the cache, or
        // measured now)
        pollster::block_on(tune::tune_gemm_shapes(gpu, &[(m, n, k, dtype)]))?;
        let w = random_weight(gpu, "gemm.w", &[n, k], dtype, (m * n) as u64)?;
        let x = Tensor::zeros(gpu, "gemm.x", &[m, k])?;
        let y = Tensor::zeros(gpu, "gemm.y", &[m, n])?;
        let t = time_kernels(gpu, a.runs, || {
            let mut rec = Recorder::new(gpu);
            rec.matmul(&x, &w, None, &y, false)?;
            pollster::block_on(rec.submit())?;
            gpu.wait();
            Ok(())
        })?;
        let flop = 2.0 * (m * n * k) as f64;
        out.push(json!({
            "case": what, "m": m, "n": n, "k": k, "dtype": dtype.name(),
            "form": gemm_form_for(gpu.gemm_form_at(m, n, k, dtype), m, n, dtype),
            "gflop_per_s": flop / t.0 / 1e9, "time": stats(t),
        }));
    }
    Ok(json!({"forms": forms, "cases": out}))
}

fn gemm_trials(trials: &[tune::GemmTrial]) -> Value {
    trials
        .iter()
        .map(|t| {
            json!({"form": t.form, "gflop_per_s": t.gflop_per_s,
                   "median_s": t.seconds, "min_s": t.min_seconds})
        })
        .collect()
}

/// A GEMM form as printed: its tile (rows × columns of output) and arithmetic.
fn gemm_form_name(v: &Value) -> String {
    use crate::gpu::{GEMM_HALF, GEMM_ROWS, GEMM_SHORT, GEMM_TALL, GEMM_WIDE};
    match v.as_u64().and_then(|f| u32::try_from(f).ok()) {
        Some(GEMM_ROWS) => "4 rows untiled".into(),
        Some(f) => format!(
            "{}×{} {}",
            match (f & GEMM_TALL != 0, f & GEMM_SHORT != 0) {
                (true, _) => 128,
                (_, true) => 32,
                _ => 64,
            },
            if f & GEMM_WIDE != 0 { 128 } else { 64 },
            if f & GEMM_HALF != 0 { "f16" } else { "f32" }
        ),
        None => v.to_string(),
    }
}

fn end_to_end(gpu: &Gpu, a: &BenchArgs, name: &str) -> Result<Value> {
    let (mut vit_cfg, mut qf_cfg) = (VitConfig::eva_vit_g(224), QFormerConfig::blip2());
    if a.tiny {
        vit_cfg = VitConfig {
            image_size: 56,
            patch: 14,
            width: 64,
            layers: 2,
            heads: 2,
            mlp: 128,
            eps: 1e-6,
            ln_vision_eps: 1e-5,
        };
        qf_cfg = QFormerConfig {
            hidden: 64,
            layers: 2,
            heads: 2,
            intermediate: 128,
            queries: 8,
            encoder_width: 64,
            cross_every: 2,
            eps: 1e-12,
        };
    }
    let layers = |all: usize| a.layers.map_or(all, |l| l.clamp(1, all));
    vit_cfg.layers = layers(vit_cfg.layers);
    let llm_cfg = match name {
        VIT_G => None,
        _ => {
            let mut c = llm_config(name, a.tiny)?;
            c.layers = layers(c.layers);
            Some(c)
        }
    };
    let (ctx_short, ctx_long) = decode_contexts(a, usize::MAX);
    let policy = QuantPolicy::for_linear(a.quant);
    let vision_dtype = DType::F16;
    let mut specs = Vit::specs(&vit_cfg, vision_dtype)?;
    specs.extend(QFormer::specs(&qf_cfg, vision_dtype)?);
    if let Some(c) = &llm_cfg {
        specs.extend(Llama::specs(c, policy));
    }
    eprintln!("bench: end to end, synthetic {name}");
    let t_load = Instant::now();
    let (mut tensors, weight_bytes) = synthetic_tensors(gpu, &specs)?;
    let vit = Vit::build(&vit_cfg, &mut tensors)?;
    let qf = QFormer::build(&qf_cfg, &mut tensors)?;
    let ctx = ctx_long + 64;
    let llm = match &llm_cfg {
        Some(c) => Some(Llama::build(gpu, c, policy, &mut tensors, ctx)?),
        None => None,
    };
    gpu.wait();
    let load_s = t_load.elapsed().as_secs_f64();

    // image encode: ViT + Q-Former
    let s = vit_cfg.image_size;
    let px = Tensor::zeros(gpu, "pixels", &[3, s, s])?;
    pollster::block_on(tune::tune_gemm_shapes_of(gpu, |rec| {
        let image = vit.record(gpu, rec, &px, None)?;
        qf.record(gpu, rec, &image, None).map(drop)
    }))?;
    let encode = time(a.runs, || {
        // the profile keeps the last run (not the warm-up, which compiles the pipelines)
        let _ = crate::gpu::recorder::profile::take();
        let mut rec = Recorder::new(gpu);
        let image = vit.record(gpu, &mut rec, &px, None)?;
        qf.record(gpu, &mut rec, &image, None)?;
        pollster::block_on(rec.submit())?;
        gpu.wait();
        Ok(())
    })?;
    print_profile(&synthetic::profile_per(1), "image", "");
    let (Some(mut llm), Some(llm_cfg)) = (llm, llm_cfg) else {
        return Ok(json!({
            "model": name, "vit_layers": vit_cfg.layers, "vision_quant": vision_dtype.name(),
            "image_size": vit_cfg.image_size, "load_s": load_s,
            "image_encode_ms": encode.0 * 1e3, "image_encode": stats(encode),
            "gpu_memory_bytes": {"weights": weight_bytes, "total": weight_bytes},
        }));
    };
    let (_, kv_bytes, _) = Llama::memory(&llm_cfg, policy, ctx);

    // prefill of a MiniGPT-4-sized prompt (text + 32 image rows), then decode
    let prompt: Vec<u32> = (0..if a.tiny { 12 } else { 98 })
        .map(|i| 3 + i as u32)
        .collect();
    let prefill = time(a.runs, || {
        llm.reset();
        pollster::block_on(llm.forward_argmax(gpu, Input::Ids(&prompt), llm_cfg.vocab))?;
        Ok(())
    })?;
    let ahead = gpu.submits_ahead()?;
    let short = decode_at(gpu, a, &mut llm, ctx_short, ahead, Picks::Greedy)?;
    let long = decode_at(gpu, a, &mut llm, ctx_long, ahead, Picks::Greedy)?;
    let ttft = encode.0 + prefill.0;
    Ok(json!({
        "model": name, "llm_layers": llm_cfg.layers, "vit_layers": vit_cfg.layers,
        "llm_quant": a.quant.name(), "vision_quant": vision_dtype.name(),
        "load_s": load_s,
        "image_encode_ms": encode.0 * 1e3, "image_encode": stats(encode),
        "prefill_tokens": prompt.len(), "prefill_tok_per_s": prompt.len() as f64 / prefill.0,
        "prefill": stats(prefill),
        "submits_ahead": ahead,
        "decode_tok_per_s_ctx_short": 1.0 / short.0, "ctx_short": ctx_short,
        "decode_short": stats(short),
        "decode_tok_per_s_ctx_long": 1.0 / long.0, "ctx_long": ctx_long,
        "decode_long": stats(long),
        "time_to_first_token_s": ttft,
        "gpu_memory_bytes": {"weights": weight_bytes, "kv_cache": kv_bytes, "total": weight_bytes + kv_bytes},
    }))
}

/// The block GEMV at every lane count (the auto-tune's measurement, in this run); the fastest
/// is used for the rest of the report.
fn gemv_lanes(gpu: &Gpu, a: &BenchArgs, copy_gbs: f64) -> Result<Value> {
    let (n, k) = if a.tiny { (512, 256) } else { (4096, 4096) };
    eprintln!("bench: block GEMV lanes, q4 {n}×{k}");
    let trials = pollster::block_on(tune::measure_gemv(gpu, n, k, 4, a.runs))?;
    if std::env::var_os("MINIGPT4_GEMV_LANES").is_some() {
        // the override wins over this run's measurement too
        pollster::block_on(tune::autotune(gpu))?;
    } else if let Some(best) = tune::fastest(&trials) {
        gpu.set_gemv_lanes(best);
    }
    // RMSNorm fused into the GEMV or a dispatch of its own, at the lanes chosen
    let (fused, separate) = pollster::block_on(tune::measure_fuse_norm(gpu, k, 4, a.runs))?;
    gpu.set_fuse_norm(tune::override_fuse_norm()?.unwrap_or(fused <= separate));
    Ok(json!({
        "n": n, "k": k, "chosen": gpu.gemv_lanes(),
        "fuse_norm": {"fused_s": fused, "separate_s": separate, "chosen": gpu.fuse_norm()},
        "trials": trials.iter().map(|t| json!({
            "lanes": t.lanes, "median_s": t.seconds, "gb_per_s": t.gb_per_s,
            "percent_of_copy": 100.0 * t.gb_per_s / copy_gbs,
        })).collect::<Vec<_>>(),
    }))
}

/// Timed decode steps per run of [`decode_at`].
fn decode_steps(a: &BenchArgs) -> usize {
    if a.tiny {
        4
    } else {
        16
    }
}

/// Greedy decode seconds per token (median, min, max over up to 3 runs) with the KV cache filled
/// to `context` positions (untimed) before the timed steps.
fn decode_at(
    gpu: &Gpu,
    a: &BenchArgs,
    llm: &mut Llama,
    context: usize,
    ahead: bool,
    picks: Picks,
) -> Result<(f64, f64, f64)> {
    pollster::block_on(synthetic::decode_seconds(
        gpu,
        llm,
        context,
        decode_steps(a),
        a.runs.clamp(1, 3),
        ahead,
        picks,
    ))
}

/// `MINIGPT4_PROFILE=1`: where each repetition (`per`: "token", "image", "prefill") went, the
/// 16 costliest kernels and shapes of a [`synthetic::profile_per`] list, each line after `tag`
/// (a decode mode's `[name] `, or nothing). Prints nothing when profiling is off.
fn print_profile(kernels: &Value, per: &str, tag: &str) {
    for k in kernels.as_array().into_iter().flatten().take(16) {
        eprintln!(
            "profile: {:>9.3} ms/{per} {:>6.1} dispatches/{per}  {tag}{}",
            k["ms"].as_f64().unwrap_or(0.0),
            k["dispatches"].as_f64().unwrap_or(0.0),
            k["kernel"].as_str().unwrap_or("")
        );
    }
}

/// Each decode mode's profile (per token, tagged with the mode's name).
fn print_mode_profiles(profiles: &serde_json::Map<String, Value>) {
    for (mode, kernels) in profiles {
        print_profile(kernels, "token", &format!("[{mode}] "));
    }
}

/// Decode on a real LLaMA model, next to what this run's GEMV rates predict for the weight
/// bytes one token reads (every matrix as loaded but the embedding table, at its dtype's
/// median rate).
fn llm_decode(
    gpu: &Gpu,
    a: &BenchArgs,
    path: &std::path::Path,
    gemv: &Value,
    cost: &Value,
) -> Result<Value> {
    use crate::model::llama::LlamaFiles;
    eprintln!("bench: decode on {}", path.display());
    let (cfg, files) = LlamaFiles::open(path)?;
    let policy = QuantPolicy::for_linear(a.quant);
    // (the model's own limit on positions may shorten them)
    let (_, ctx_long) = decode_contexts(a, usize::MAX);
    let mut llm = Llama::load(gpu, &cfg, &files, policy, ctx_long + 64)?;
    let (ctx_short, ctx_long) = decode_contexts(a, llm.ctx);
    let rate = |dtype: &str| -> Option<f64> {
        let mut v: Vec<f64> = gemv
            .as_array()?
            .iter()
            .filter(|g| g["dtype"] == dtype)
            .filter_map(|g| g["gb_per_s"].as_f64())
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    let (mut bytes, mut predicted_s) = (0u64, 0f64);
    let mut by_dtype = serde_json::Map::new();
    // formats of matrices this run has no GEMV rate for (all of them without the gemv part)
    let mut unrated = std::collections::BTreeSet::new();
    for t in llm.decode_matrices() {
        let b = t.dtype.bytes(t.numel()) as u64;
        bytes += b;
        let e = by_dtype.entry(t.dtype.name()).or_insert(json!(0u64));
        *e = json!(e.as_u64().unwrap_or(0) + b);
        match rate(t.dtype.name()) {
            Some(r) => predicted_s += b as f64 / (r * 1e9),
            None => {
                unrated.insert(t.dtype.name());
            }
        }
    }
    // a prediction only from a rate for every byte
    let predicted_s = Some(predicted_s).filter(|&p| unrated.is_empty() && p > 0.0);
    // prefill of a MiniGPT-4-sized prompt (a first turn: text and 32 image rows); the
    // warm-up run tunes the model's shapes
    let prompt: Vec<u32> = (0..98.min(llm.ctx))
        .map(|i| ((3 + i) % cfg.vocab) as u32)
        .collect();
    let prefill = time(a.runs, || {
        // the profile keeps the last run
        let _ = crate::gpu::recorder::profile::take();
        llm.reset();
        pollster::block_on(llm.forward_argmax(gpu, Input::Ids(&prompt), cfg.vocab))?;
        Ok(())
    })?;
    print_profile(&synthetic::profile_per(1), "prefill", "");
    // decode at the short context, the modes in turns (see `synthetic::decode_modes`):
    // greedy and chat's default, the reference demo's sampling on the GPU, each token
    // submitted ahead of the readback of the one before and each read back before the next is
    // submitted (what overlapping the host's round trip with the device's work gains here);
    // and that sampling from the logits on the host (chat's way with MINIGPT4_GPU_SAMPLING=0,
    // see `Gpu::samples_on_gpu`)
    let chat_ahead = gpu.submits_ahead()?;
    let modes = [
        ("greedy", true, Picks::Greedy),
        ("greedy_waiting", false, Picks::Greedy),
        ("sampled", true, Picks::Sampled),
        ("sampled_waiting", false, Picks::Sampled),
        ("sampled_host", false, Picks::SampledOnHost),
    ];
    let steps = decode_steps(a);
    let runs = a.runs.clamp(1, 3);
    let (t, profiles) = pollster::block_on(synthetic::decode_modes(
        gpu, &mut llm, ctx_short, steps, runs, &modes,
    ))?;
    print_mode_profiles(&profiles);
    let (ahead, waiting, sampled_ahead, sampled_waiting, sampled_host) =
        (t[0], t[1], t[2], t[3], t[4]);
    // a greedy step's dispatches at the short context (the long one splits attention in two)
    let groups = llm.step_workgroups();
    let chats = |[ahead, waiting]: [(f64, f64, f64); 2]| if chat_ahead { ahead } else { waiting };
    let short = chats([ahead, waiting]);
    let on_gpu = gpu.samples_on_gpu()?;
    let sampled = if on_gpu {
        chats([sampled_ahead, sampled_waiting])
    } else {
        sampled_host
    };
    let long = decode_at(gpu, a, &mut llm, ctx_long, chat_ahead, Picks::Greedy)?;
    // the prediction again with what the step's dispatches cost beyond their work (each
    // priced at the cost measured with 1 workgroup if it has one, with 16 otherwise): how much
    // of the gap to the prediction per-dispatch overhead alone explains
    let dispatches = groups.as_ref().map(Vec::len);
    let price = |g: u32| {
        let k = if g <= 1 {
            "us_1_groups"
        } else {
            "us_16_groups"
        };
        cost[k].as_f64().unwrap_or(0.0) * 1e-6
    };
    let floor_s = groups.map(|g| g.into_iter().map(price).sum::<f64>());
    let with_floor = predicted_s.zip(floor_s).map(|(p, f)| 1.0 / (p + f));
    Ok(json!({
        "dispatches_per_token": dispatches,
        "dispatch_floor_s": floor_s,
        "predicted_tok_per_s_with_dispatches": with_floor,
        "percent_of_prediction_with_dispatches": with_floor.map(|w| 100.0 * (1.0 / w) / short.0),
        "model": path.display().to_string(), "layers": cfg.layers, "hidden": cfg.hidden,
        "weight_bytes_per_token": bytes, "bytes_by_dtype": by_dtype,
        "predicted_tok_per_s": predicted_s.map(|p| 1.0 / p),
        "unrated_dtypes": unrated.into_iter().collect::<Vec<_>>(),
        "prefill_tokens": prompt.len(), "prefill_tok_per_s": prompt.len() as f64 / prefill.0,
        "prefill": stats(prefill),
        "submits_ahead": chat_ahead, "samples_on_gpu": on_gpu,
        "decode_tok_per_s_ctx_short": 1.0 / short.0, "decode_short": stats(short),
        "decode_tok_per_s_ctx_short_ahead": 1.0 / ahead.0, "decode_short_ahead": stats(ahead),
        "decode_tok_per_s_ctx_short_waiting": 1.0 / waiting.0, "decode_short_waiting": stats(waiting),
        "decode_tok_per_s_ctx_short_sampled": 1.0 / sampled.0, "decode_short_sampled": stats(sampled),
        "decode_tok_per_s_ctx_short_sampled_ahead": 1.0 / sampled_ahead.0,
        "decode_short_sampled_ahead": stats(sampled_ahead),
        "decode_tok_per_s_ctx_short_sampled_waiting": 1.0 / sampled_waiting.0,
        "decode_short_sampled_waiting": stats(sampled_waiting),
        "decode_tok_per_s_ctx_short_sampled_host": 1.0 / sampled_host.0,
        "decode_short_sampled_host": stats(sampled_host),
        "decode_tok_per_s_ctx_long": 1.0 / long.0, "decode_long": stats(long),
        "ctx_short": ctx_short, "ctx_long": ctx_long,
        "percent_of_prediction": predicted_s.map(|p| 100.0 * p / short.0),
        "profile": profiles,
    }))
}

/// The two contexts decode is timed at (128 and 1024 tokens, 16 and 48 in tiny mode), within a
/// model's context of `ctx` positions, where the timed steps must fit after them.
fn decode_contexts(a: &BenchArgs, ctx: usize) -> (usize, usize) {
    let room = ctx.saturating_sub(decode_steps(a) + 2).max(1);
    let (short, long) = if a.tiny { (16, 48) } else { (128, 1024) };
    (short.min(room), long.min(room))
}

/// End to end on a model package, as `chat` runs it (`chat`'s context, its tuning, the
/// variant's own template and sampling): the image encode of a (blank) image, the prefill of a
/// first turn about it (splicing its rows into the prompt, then the forward), decode at two
/// contexts (greedy, and the demo's sampling), time to first token, GPU memory.
fn package_e2e(
    gpu: &Gpu,
    a: &BenchArgs,
    dir: &std::path::Path,
    config: &PackageConfig,
) -> Result<Value> {
    use crate::chat::Conversation;
    eprintln!("bench: end to end on the package {}", dir.display());
    let t_load = Instant::now();
    let mut m = crate::package::load(gpu, dir, 2048)?;
    gpu.wait();
    let load_s = t_load.elapsed().as_secs_f64();
    let weight_bytes: u64 = config.specs()?.iter().map(|t| t.gpu_bytes()).sum();
    let (_, kv_bytes, _) = Llama::memory(&m.llm.cfg, config.formats().llm, m.llm.ctx);

    let s = m.vit.cfg.image_size;
    let pixels = vec![0f32; 3 * s * s];
    // the warm-up run tunes the image half's GEMM shapes where the device tunes per shape
    let encode = time(a.runs, || {
        let _ = crate::gpu::recorder::profile::take();
        pollster::block_on(m.encode_image(gpu, &pixels))?;
        gpu.wait();
        Ok(())
    })?;
    print_profile(&synthetic::profile_per(1), "image", "");
    let image = pollster::block_on(m.encode_image(gpu, &pixels))?;
    let mut conv = Conversation::new(m.variant);
    conv.add_image();
    conv.ask("Describe this image in detail.");
    let segments = m.segment_ids(&conv.prompt())?;
    let images = vec![&image; segments.len() - 1];
    let vocab = m.llm.cfg.vocab;
    let mut rows = 0;
    let prefill = time(a.runs, || {
        let spliced = pollster::block_on(m.splice(gpu, &segments, &images, usize::MAX))?;
        rows = spliced.rows();
        m.llm.reset();
        pollster::block_on(m.llm.forward_argmax(gpu, Input::Embeds(&spliced), vocab))?;
        Ok(())
    })?;
    let (ctx_short, ctx_long) = decode_contexts(a, m.llm.ctx);
    let ahead = gpu.submits_ahead()?;
    let short = decode_at(gpu, a, &mut m.llm, ctx_short, ahead, Picks::Greedy)?;
    let sampling = Picks::chats_sampling(gpu)?;
    let sampled = decode_at(gpu, a, &mut m.llm, ctx_short, ahead, sampling)?;
    let long = decode_at(gpu, a, &mut m.llm, ctx_long, ahead, Picks::Greedy)?;
    let formats = config.formats();
    Ok(json!({
        "model": dir.display().to_string(), "variant": m.label,
        "llm_layers": m.llm.cfg.layers, "vit_layers": m.vit.cfg.layers,
        "image_size": s, "vision_quant": formats.vision.name(),
        "llm_quant": formats.llm.linear.name(), "load_s": load_s,
        "image_encode_ms": encode.0 * 1e3, "image_encode": stats(encode),
        "prefill_tokens": rows, "prefill_tok_per_s": rows as f64 / prefill.0,
        "prefill": stats(prefill),
        "submits_ahead": ahead, "samples_on_gpu": sampling == Picks::Sampled,
        "decode_tok_per_s_ctx_short": 1.0 / short.0, "ctx_short": ctx_short,
        "decode_short": stats(short),
        "decode_tok_per_s_ctx_short_sampled": 1.0 / sampled.0,
        "decode_short_sampled": stats(sampled),
        "decode_tok_per_s_ctx_long": 1.0 / long.0, "ctx_long": ctx_long,
        "decode_long": stats(long),
        "time_to_first_token_s": encode.0 + prefill.0,
        "gpu_memory_bytes": {"weights": weight_bytes, "kv_cache": kv_bytes, "total": weight_bytes + kv_bytes},
    }))
}

/// Runs the chosen parts; returns the JSON report.
pub fn run(gpu: &Gpu, a: &BenchArgs) -> Result<Value> {
    for p in &a.parts {
        if !PARTS.contains(&p.as_str()) {
            return Err(crate::Error::InvalidOption {
                name: "--parts".into(),
                msg: format!("expected some of {}, found '{p}'", PARTS.join(",")),
            });
        }
    }
    // names checked before minutes of other parts
    if let Some(s) = a.synthetic.as_deref().filter(|s| !SYNTHETIC.contains(s)) {
        return Err(crate::Error::InvalidOption {
            name: "--synthetic".into(),
            msg: format!("expected one of {}, found '{s}'", SYNTHETIC.join(", ")),
        });
    }
    let package = a
        .model
        .as_deref()
        .map(crate::package::read_config)
        .transpose()?;
    if a.synthetic.as_deref() == Some(VIT_G) && a.parts.iter().any(|p| p == "decode") {
        return Err(crate::Error::InvalidOption {
            name: "--parts".into(),
            msg: "decode needs a synthetic LLM (vicuna0-7b or vicuna0-13b), found vit-g".into(),
        });
    }
    let want = |p: &str| a.parts.is_empty() || a.parts.iter().any(|q| q == p);
    let copy = copy_bandwidth(gpu, a)?;
    let copy_gbs = copy["gb_per_s"].as_f64().unwrap_or(1.0);
    let mut report = json!({
        "adapter": gpu.info.name,
        "backend": format!("{:?}", gpu.info.backend),
        "driver": format!("{} {}", gpu.info.driver, gpu.info.driver_info),
        "kernel_variant": gpu.best_variant.name(),
        "tiny": a.tiny,
        "runs": a.runs,
        "copy": copy,
        "dispatch": dispatch_cost(gpu, a)?,
    });
    // what the real models need, computed from their tensor lists (nothing allocated)
    let mut memory = Vec::new();
    for name in ["vicuna0-7b", "vicuna0-13b"] {
        let cfg = llm_config(name, false)?;
        let (w, kv, scratch) = Llama::memory(&cfg, QuantPolicy::for_linear(a.quant), 2048);
        memory.push(
            json!({"model": name, "llm_quant": a.quant.name(), "ctx": 2048,
            "weights": w, "kv_cache": kv, "scratch": scratch, "total": w + kv + scratch}),
        );
    }
    report["llm_memory"] = Value::from(memory);
    if want("gemv") || want("e2e") {
        report["gemv_lanes"] = gemv_lanes(gpu, a, copy_gbs)?;
    }
    if want("gemv") {
        report["gemv"] = gemv(gpu, a)?;
    }
    if want("attention") {
        report["attention"] = attention(gpu, a)?;
        report["attention_rows"] = attention_rows(gpu, a)?;
    }
    if want("sampling") {
        report["sampling"] = sampling(gpu, a)?;
    }
    if want("gemm") {
        report["gemm"] = gemm(gpu, a)?;
    } else if want("e2e") {
        // the GEMM form the chat would use (override, cache or measurement)
        pollster::block_on(tune::tune_gemm(gpu))?;
    }
    if let Some(s) = &a.synthetic {
        if want("e2e") {
            report["end_to_end"] = end_to_end(gpu, a, s)?;
        }
    }
    if let Some(s) = &a.synthetic {
        if a.parts.iter().any(|p| p == "decode") {
            let b = synthetic::DecodeBench {
                model: s.clone(),
                layers: a.layers,
                quant: a.quant.name().into(),
                context: 128,
                steps: if a.tiny { 4 } else { 16 },
                runs: a.runs.clamp(1, 5),
                tiny: a.tiny,
            };
            // tuned as the page tunes (or as MINIGPT4_GEMV_LANES says)
            pollster::block_on(tune::autotune(gpu))?;
            eprintln!("bench: decode alone, synthetic {s}");
            report["decode"] = pollster::block_on(synthetic::decode(gpu, &b))?;
            if let Some(profiles) = report["decode"]["profile"].as_object() {
                print_mode_profiles(profiles);
            }
        }
    }
    if let Some(p) = &a.llm {
        if want("e2e") {
            report["llm_decode"] = llm_decode(gpu, a, p, &report["gemv"], &report["dispatch"])?;
        }
    }
    if let (Some(p), Some(c)) = (&a.model, &package) {
        if want("e2e") {
            report["package"] = package_e2e(gpu, a, p, c)?;
        }
    }
    report["kernel_clock"] = kernel_clock(gpu).into();
    report["targets"] = targets(&report);
    Ok(report)
}

/// The share of the copy bandwidth the q4 GEMV must reach at every real decode shape.
const GEMV_TARGET_PERCENT: f64 = 80.0;
/// The share of its GEMV prediction a real LLaMA's decode must reach (within 20 % of it).
const DECODE_TARGET_PERCENT: f64 = 80.0;
/// The memory budget a Vicuna-7B q4 with a 2048-token cache must fit (bytes).
const MEMORY_TARGET_BYTES: u64 = 6_000_000_000;

/// The speed and memory targets (see the README's Speed section) that this report holds the
/// figures for, each judged from this run alone: the q4 GEMV's share of the copy bandwidth at
/// its worst real shape, decode on `--llm` against what the run's GEMV rates predict for its
/// bytes, and Vicuna-7B's q4 weights plus a 2048-token cache against 6 GB. A figure the run
/// did not measure leaves its target out; a tiny run's shapes are not the real ones, so its
/// GEMV and decode targets are listed with `met: null` (not judged).
fn targets(r: &Value) -> Value {
    let judged = r["tiny"] != true;
    let verdict = |ok: bool| if judged { Value::Bool(ok) } else { Value::Null };
    let mut out = Vec::new();
    // (share of copy, shape) of every q4 GEMV row
    let q4: Vec<(f64, &Value)> = r["gemv"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["dtype"] == "q4")
        .filter_map(|g| Some((g["percent_of_copy"].as_f64()?, g)))
        .collect();
    if let Some(&(pc, g)) = q4.iter().min_by(|a, b| a.0.total_cmp(&b.0)) {
        let best = q4.iter().map(|e| e.0).fold(f64::MIN, f64::max);
        out.push(json!({
            "target": "q4 GEMV at every real decode shape, % of the copy bandwidth",
            "measured": pc, "at_least": GEMV_TARGET_PERCENT, "met": verdict(pc >= GEMV_TARGET_PERCENT),
            "detail": format!("worst {}×{} {pc:.1} %, best {best:.1} %, over {} shapes", g["n"], g["k"], q4.len()),
        }));
    }
    let d = &r["llm_decode"];
    if let Some(pc) = d["percent_of_prediction"].as_f64() {
        out.push(json!({
            "target": "decode on --llm, % of what the GEMV rates predict for its weight bytes",
            "measured": pc, "at_least": DECODE_TARGET_PERCENT,
            "met": verdict(pc >= DECODE_TARGET_PERCENT),
            "detail": format!(
                "{}: {:.1} tok/s at context {} against {:.1} predicted; {:.1} with the dispatch floor",
                d["model"].as_str().unwrap_or(""),
                d["decode_tok_per_s_ctx_short"].as_f64().unwrap_or(0.0),
                d["ctx_short"],
                d["predicted_tok_per_s"].as_f64().unwrap_or(0.0),
                d["predicted_tok_per_s_with_dispatches"].as_f64().unwrap_or(0.0),
            ),
        }));
    }
    let mem = r["llm_memory"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["model"] == "vicuna0-7b" && m["llm_quant"] == "q4");
    if let Some((m, total)) = mem.and_then(|m| Some((m, m["total"].as_u64()?))) {
        // computed from the tensor lists, the same at any size of run
        out.push(json!({
            "target": "Vicuna-7B q4 with a 2048-token KV cache, GB of GPU memory",
            "measured": total as f64 / 1e9, "at_most": MEMORY_TARGET_BYTES as f64 / 1e9,
            "met": total <= MEMORY_TARGET_BYTES,
            "detail": format!("weights {:.2} GB, KV cache {:.2} GB",
                m["weights"].as_u64().unwrap_or(0) as f64 / 1e9,
                m["kv_cache"].as_u64().unwrap_or(0) as f64 / 1e9),
        }));
    }
    Value::from(out)
}

/// The targets' lines of the human report.
fn target_lines(t: &Value) -> String {
    let items = t.as_array().map(Vec::as_slice).unwrap_or_default();
    if items.is_empty() {
        return String::new();
    }
    let mut s = String::from("\ntargets, each judged from this run:\n");
    for e in items {
        let bound = match (e["at_least"].as_f64(), e["at_most"].as_f64()) {
            (Some(b), _) => format!("≥ {b}"),
            (_, Some(b)) => format!("≤ {b}"),
            _ => String::new(),
        };
        let verdict = match e["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not judged (tiny shapes)",
        };
        s += &format!(
            "  {}: {:.1} (target {bound}): {verdict}; {}\n",
            e["target"].as_str().unwrap_or(""),
            e["measured"].as_f64().unwrap_or(0.0),
            e["detail"].as_str().unwrap_or(""),
        );
    }
    s
}

/// A block GEMV lane value as printed: the subgroup form (lanes 0) as "subgroups", the bits
/// after the lane count in brackets: `4 | GEMV_UNIFORM_X | GEMV_WG16` as
/// "4 (x uniform, wg 16)".
fn lanes_name(v: &Value) -> String {
    use crate::gpu::{GEMV_SUBGROUP, GEMV_UNIFORM_X, GEMV_WG16, GEMV_X_SUBGROUP};
    match v.as_u64().and_then(|l| u32::try_from(l).ok()) {
        Some(GEMV_SUBGROUP) => "subgroups".into(),
        Some(l) => {
            let mut bits = Vec::new();
            if l & GEMV_UNIFORM_X != 0 {
                bits.push("x uniform");
            }
            if l & GEMV_WG16 != 0 {
                bits.push("wg 16");
            }
            if l & GEMV_X_SUBGROUP != 0 {
                bits.push("x shared in subgroup");
            }
            let count = l & !(GEMV_UNIFORM_X | GEMV_WG16 | GEMV_X_SUBGROUP);
            if bits.is_empty() {
                count.to_string()
            } else {
                format!("{count} ({})", bits.join(", "))
            }
        }
        None => v.to_string(),
    }
}

/// The lines of an end-to-end report (synthetic or a package's) for humans: image encode,
/// prefill, decode (and sampled decode where measured), time to first token, GPU memory.
fn end_to_end_lines(e: &Value) -> String {
    let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
    let gib = |k: &str| e["gpu_memory_bytes"][k].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let sampled = match e.get("decode_tok_per_s_ctx_short_sampled") {
        Some(v) => format!(
            "; sampled (the demo's settings) {:.2} tok/s at {}",
            v.as_f64().unwrap_or(0.0),
            e["ctx_short"]
        ),
        None => String::new(),
    };
    let waiting = if e["submits_ahead"] == false {
        " (each token read back before the next is submitted: a CPU device)"
    } else {
        ""
    };
    format!(
        "  image encode {:.1} ms\n  prefill {:.1} tok/s ({} tokens)\n  decode {:.2} tok/s at context {}, {:.2} tok/s at {}{sampled}{waiting}\n  time to first token {:.2} s\n  GPU memory {:.2} GiB (weights {:.2} + KV cache {:.2})\n",
        f("image_encode_ms"),
        f("prefill_tok_per_s"),
        e["prefill_tokens"],
        f("decode_tok_per_s_ctx_short"),
        e["ctx_short"],
        f("decode_tok_per_s_ctx_long"),
        e["ctx_long"],
        f("time_to_first_token_s"),
        gib("total"),
        gib("weights"),
        gib("kv_cache"),
    )
}

/// The report as a table for humans.
pub fn human(r: &Value) -> String {
    let mut s = format!(
        "adapter {} ({}), kernels {}, kernels timed by {}\ncopy kernel: {:.2} GB/s\ndispatch of next to no work (a chain of {}, each waiting for the one before): {:.1} µs with 1 workgroup, {:.1} µs with 16\n",
        r["adapter"].as_str().unwrap_or(""),
        r["backend"].as_str().unwrap_or(""),
        r["kernel_variant"].as_str().unwrap_or(""),
        r["kernel_clock"].as_str().unwrap_or("wall"),
        r["copy"]["gb_per_s"].as_f64().unwrap_or(0.0),
        r["dispatch"]["chain"],
        r["dispatch"]["us_1_groups"].as_f64().unwrap_or(0.0),
        r["dispatch"]["us_16_groups"].as_f64().unwrap_or(0.0),
    );
    if r.get("gemv_lanes").is_some() || r.get("gemv").is_some() {
        s += "\nGEMV (decode)            GB/s   % of copy (each run against a copy run next to it: median, min–max)\n";
    }
    if let Some(l) = r.get("gemv_lanes") {
        s += &format!("  block GEMV lanes (q4 {}×{}):", l["n"], l["k"]);
        for t in l["trials"].as_array().into_iter().flatten() {
            s += &format!(
                " {} → {:.2} GB/s;",
                lanes_name(&t["lanes"]),
                t["gb_per_s"].as_f64().unwrap_or(0.0)
            );
        }
        s += &format!(" chosen {}\n", lanes_name(&l["chosen"]));
        let f = &l["fuse_norm"];
        s += &format!(
            "  RMSNorm + q4 GEMV ({}×{}): fused {:.1} µs, separate {:.1} µs; {}\n",
            l["k"],
            l["k"],
            f["fused_s"].as_f64().unwrap_or(0.0) * 1e6,
            f["separate_s"].as_f64().unwrap_or(0.0) * 1e6,
            if f["chosen"] == true {
                "fused"
            } else {
                "separate"
            }
        );
    }
    for g in r["gemv"].as_array().into_iter().flatten() {
        s += &format!(
            "  {:>4} {:>6}×{:<6} {:>8.2} {:>8.1} % ({:.0}–{:.0})   ({} copies, read from memory)\n",
            g["dtype"].as_str().unwrap_or(""),
            g["n"],
            g["k"],
            g["gb_per_s"].as_f64().unwrap_or(0.0),
            g["percent_of_copy"].as_f64().unwrap_or(0.0),
            g["percent_of_copy_min"].as_f64().unwrap_or(0.0),
            g["percent_of_copy_max"].as_f64().unwrap_or(0.0),
            g["copies"]
        );
    }
    if let Some(at) = r["attention"].as_array() {
        s += "\nDecode attention (1 query row, f16 KV cache)       GB/s   % of copy (median, min–max)   µs per layer\n";
        for e in at {
            let case = format!(
                "{} {}/{} heads × {}, ctx {}{}",
                e["model"].as_str().unwrap_or(""),
                e["heads"],
                e["kv_heads"],
                e["head_dim"],
                e["context"],
                if e["split_k"] == true { " split-K" } else { "" },
            );
            s += &format!(
                "  {case:<47} {:>7.2} {:>8.1} % ({:.0}–{:.0}) {:>12.1}\n",
                e["gb_per_s"].as_f64().unwrap_or(0.0),
                e["percent_of_copy"].as_f64().unwrap_or(0.0),
                e["percent_of_copy_min"].as_f64().unwrap_or(0.0),
                e["percent_of_copy_max"].as_f64().unwrap_or(0.0),
                e["us_per_layer"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if let Some(at) = r["attention_rows"].as_array() {
        s += "\nAttention over many rows (tiled)                             ms per layer   GFLOP/s\n";
        for e in at {
            let case = format!(
                "{}: {} rows × {} keys, {}/{} heads × {}{}",
                e["case"].as_str().unwrap_or(""),
                e["rows"],
                e["keys"],
                e["heads"],
                e["kv_heads"],
                e["head_dim"],
                if e["causal"] == true { ", causal" } else { "" },
            );
            s += &format!(
                "  {case:<58} {:>12.2} {:>9.2}\n",
                e["ms_per_call"].as_f64().unwrap_or(0.0),
                e["gflop_per_s"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if let Some(sm) = r["sampling"].as_array() {
        s += "\nSampling on the GPU (a token's pick)   top-k µs   top-k + sample µs\n";
        for e in sm {
            s += &format!(
                "  {:<36} {:>8.0} {:>19.0}\n",
                format!(
                    "{} logits ({})",
                    e["vocab"],
                    e["model"].as_str().unwrap_or("")
                ),
                e["topk_us"].as_f64().unwrap_or(0.0),
                e["topk_sample_us"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if let Some(g) = r.get("gemm") {
        s += "\nGEMM                          GFLOP/s\n";
        let f = &g["forms"];
        let trials = |t: &Value| {
            let mut s = String::new();
            for t in t["trials"].as_array().into_iter().flatten() {
                s += &format!(
                    " {} → {:.2};",
                    gemm_form_name(&t["form"]),
                    t["gflop_per_s"].as_f64().unwrap_or(0.0)
                );
            }
            s
        };
        for (what, ts) in [
            ("small", &f["tune_shape"]),
            ("large", &f["tune_shape_large"]),
            ("small", &f["tune_shape_quant"]),
        ] {
            if ts.is_object() {
                s += &format!(
                    "  forms at the tuning's {what} {}×{}×{} {}:{}\n",
                    ts["m"],
                    ts["n"],
                    ts["k"],
                    ts["dtype"].as_str().unwrap_or(""),
                    trials(ts),
                );
            }
        }
        s += &format!(
            "  chosen: {}{}{}\n",
            gemm_form_name(&f["chosen"]),
            if f["chosen_quant"] != f["chosen"] {
                format!(
                    ", for quantised weights {}",
                    gemm_form_name(&f["chosen_quant"])
                )
            } else {
                String::new()
            },
            if f["by_shape"] == true {
                ", and a form per shape (the cases below)"
            } else {
                ""
            }
        );
        for c in f["at_shapes"].as_array().into_iter().flatten() {
            s += &format!(
                "  forms at {} {}×{}×{} {}:{}\n",
                c["case"].as_str().unwrap_or(""),
                c["m"],
                c["n"],
                c["k"],
                c["dtype"].as_str().unwrap_or(""),
                trials(c)
            );
        }
        for g in g["cases"].as_array().into_iter().flatten() {
            s += &format!(
                "  {:<11} {:>4}×{:>5}×{:<5} {:>4} {:>9.2}  ({})\n",
                g["case"].as_str().unwrap_or(""),
                g["m"],
                g["n"],
                g["k"],
                g["dtype"].as_str().unwrap_or(""),
                g["gflop_per_s"].as_f64().unwrap_or(0.0),
                gemm_form_name(&g["form"])
            );
        }
    }
    if let Some(e) = r.get("end_to_end").filter(|e| e["llm_layers"].is_null()) {
        s += &format!(
            "\nimage encode ({}, {} layers, {} px, {}): {:.1} ms\n  GPU memory {:.2} GiB\n",
            e["model"].as_str().unwrap_or(""),
            e["vit_layers"],
            e["image_size"],
            e["vision_quant"].as_str().unwrap_or(""),
            e["image_encode_ms"].as_f64().unwrap_or(0.0),
            e["gpu_memory_bytes"]["total"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
        );
    } else if let Some(e) = r.get("end_to_end") {
        s += &format!(
            "\nend to end ({}, {} LLM layers, {} ViT layers, LLM {}):\n{}",
            e["model"].as_str().unwrap_or(""),
            e["llm_layers"],
            e["vit_layers"],
            e["llm_quant"].as_str().unwrap_or(""),
            end_to_end_lines(e)
        );
    }
    for m in r["llm_memory"].as_array().into_iter().flatten() {
        let gb = |k: &str| m[k].as_f64().unwrap_or(0.0) / 1e9;
        s += &format!(
            "\nGPU memory of {} {} with a {}-token cache: {:.2} GB (weights {:.2}, KV cache {:.2}, scratch {:.2})",
            m["model"].as_str().unwrap_or(""),
            m["llm_quant"].as_str().unwrap_or(""),
            m["ctx"],
            gb("total"),
            gb("weights"),
            gb("kv_cache"),
            gb("scratch"),
        );
    }
    s += "\n";
    if let Some(d) = r.get("decode") {
        s += &format!(
            "\ndecode alone ({}, {} layers, {}): {:.2} tok/s at context {} ({} GEMV lanes); {:.2} tok/s reading each token back before submitting the next\n  sampled (the demo's top-k 50, top-p 0.9, on the GPU): {:.2} tok/s; {:.2} tok/s reading each token back\n",
            d["model"].as_str().unwrap_or(""),
            d["layers"],
            d["quant"].as_str().unwrap_or(""),
            d["decode_tok_per_s"].as_f64().unwrap_or(0.0),
            d["context"],
            lanes_name(&d["gemv_lanes"]),
            d["decode_tok_per_s_waiting"].as_f64().unwrap_or(0.0),
            d["decode_tok_per_s_sampled"].as_f64().unwrap_or(0.0),
            d["decode_tok_per_s_sampled_waiting"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(e) = r.get("package") {
        s += &format!(
            "\nend to end on {} ({}, {} LLM layers {}, {} ViT layers {}; a first turn with the image):\n{}",
            e["model"].as_str().unwrap_or(""),
            e["variant"].as_str().unwrap_or(""),
            e["llm_layers"],
            e["llm_quant"].as_str().unwrap_or(""),
            e["vit_layers"],
            e["vision_quant"].as_str().unwrap_or(""),
            end_to_end_lines(e)
        );
    }
    if let Some(e) = r.get("llm_decode") {
        let (prediction, against) = match (
            e["predicted_tok_per_s"].as_f64(),
            e["percent_of_prediction"].as_f64(),
        ) {
            (Some(p), Some(pc)) => (
                format!("the GEMV rates predict {p:.1} tok/s"),
                format!(" ({pc:.0} % of the prediction)"),
            ),
            _ => (
                format!(
                    "no prediction: this run has no GEMV rate for {} (run the gemv part too)",
                    e["unrated_dtypes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|d| d.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                String::new(),
            ),
        };
        let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
        let chats = if e["submits_ahead"] == true {
            "each token submitted ahead of the readback of the one before"
        } else {
            "each token read back before the next is submitted (a CPU device)"
        };
        let host_chat = if e["samples_on_gpu"] == false {
            " (chat's way here: MINIGPT4_GPU_SAMPLING=0)"
        } else {
            ""
        };
        s += &format!(
            "\ndecode on {} ({} layers):\n  {:.1} MB of weights per token; {prediction}\n  measured {:.1} tok/s at context {}{against}, {:.1} tok/s at {}, as chat runs it: {chats}\n  greedy {:.1} tok/s submitting ahead, {:.1} tok/s reading each token back first\n  sampled (the demo's top-k 50, top-p 0.9) on the GPU {:.1} tok/s submitting ahead, {:.1} tok/s reading each token back first; from the logits on the host {:.1} tok/s{host_chat}\n  prefill of {} tokens: {:.1} tok/s\n",
            e["model"].as_str().unwrap_or(""),
            e["layers"],
            f("weight_bytes_per_token") / 1e6,
            f("decode_tok_per_s_ctx_short"),
            e["ctx_short"],
            f("decode_tok_per_s_ctx_long"),
            e["ctx_long"],
            f("decode_tok_per_s_ctx_short_ahead"),
            f("decode_tok_per_s_ctx_short_waiting"),
            f("decode_tok_per_s_ctx_short_sampled_ahead"),
            f("decode_tok_per_s_ctx_short_sampled_waiting"),
            f("decode_tok_per_s_ctx_short_sampled_host"),
            e["prefill_tokens"],
            f("prefill_tok_per_s"),
        );
        if let Some(n) = e["dispatches_per_token"].as_u64() {
            s += &format!(
                "  {n} dispatches per token, {:.1} ms per token at the dispatch costs above",
                f("dispatch_floor_s") * 1e3,
            );
            if let (Some(w), Some(pc)) = (
                e["predicted_tok_per_s_with_dispatches"].as_f64(),
                e["percent_of_prediction_with_dispatches"].as_f64(),
            ) {
                s +=
                    &format!("; with it the prediction is {w:.1} tok/s ({pc:.0} % of it measured)");
            }
            s += "\n";
        }
    }
    s += &target_lines(&r["targets"]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_contexts_fit_the_model_with_the_timed_steps() {
        let mut a = BenchArgs {
            tiny: false,
            runs: 1,
            synthetic: None,
            layers: None,
            quant: DType::Q4,
            parts: Vec::new(),
            llm: None,
            model: None,
        };
        assert_eq!(decode_contexts(&a, 2048), (128, 1024));
        // 16 timed steps and the step before them after the context
        assert_eq!(decode_contexts(&a, 256), (128, 238));
        assert_eq!(decode_contexts(&a, 100), (82, 82));
        assert_eq!(decode_contexts(&a, 3), (1, 1));
        a.tiny = true;
        assert_eq!(decode_contexts(&a, 2048), (16, 48));
        assert_eq!(decode_contexts(&a, 40), (16, 34));
    }

    fn gemv_row(dtype: &str, n: usize, pc: f64) -> Value {
        json!({"dtype": dtype, "n": n, "k": 4096, "percent_of_copy": pc})
    }

    #[test]
    fn targets_judge_the_worst_q4_shape_the_llm_decode_and_the_7b_memory() {
        let mut r = json!({
            "tiny": false,
            "gemv": [gemv_row("q4", 4096, 85.0), gemv_row("q4", 11008, 79.5),
                     gemv_row("q8", 4096, 10.0), gemv_row("q4", 32001, 92.0)],
            "llm_decode": {"model": "m.gguf", "percent_of_prediction": 81.0,
                           "decode_tok_per_s_ctx_short": 40.5, "ctx_short": 128,
                           "predicted_tok_per_s": 50.0},
            "llm_memory": [
                {"model": "vicuna0-7b", "llm_quant": "q4", "total": 5_120_000_000u64,
                 "weights": 4_050_000_000u64, "kv_cache": 1_070_000_000u64},
                {"model": "vicuna0-13b", "llm_quant": "q4", "total": 9_320_000_000u64},
            ],
        });
        let t = targets(&r);
        let t = t.as_array().unwrap();
        assert_eq!(t.len(), 3);
        // the worst q4 shape decides (the q8 row is another format)
        assert_eq!(t[0]["measured"], 79.5);
        assert_eq!(t[0]["met"], false);
        assert!(t[0]["detail"].as_str().unwrap().contains("11008×4096"));
        assert!(t[0]["detail"].as_str().unwrap().contains("best 92.0 %"));
        assert_eq!(t[1]["met"], true);
        assert_eq!(t[2]["met"], true);
        assert_eq!(t[2]["measured"], 5.12);
        let lines = target_lines(&json!(t));
        assert!(lines.contains("79.5 (target ≥ 80): NOT met"), "{lines}");
        assert!(lines.contains("5.1 (target ≤ 6): met"), "{lines}");

        r["gemv"] = json!([gemv_row("q4", 4096, 80.0)]);
        r["llm_decode"]["percent_of_prediction"] = json!(79.9);
        r["llm_memory"][0]["total"] = json!(6_000_000_001u64);
        let t = targets(&r);
        assert_eq!(t[0]["met"], true);
        assert_eq!(t[1]["met"], false);
        assert_eq!(t[2]["met"], false);

        // a tiny run's shapes are not judged; the memory (computed) still is
        r["tiny"] = json!(true);
        let t = targets(&r);
        assert_eq!(t[0]["met"], Value::Null);
        assert_eq!(t[1]["met"], Value::Null);
        assert_eq!(t[2]["met"], false);
        assert!(target_lines(&t).contains("not judged (tiny shapes)"));

        // figures the run did not take leave their targets out
        let t = targets(&json!({"tiny": false}));
        assert_eq!(t, json!([]));
        assert_eq!(target_lines(&t), "");
    }
}
