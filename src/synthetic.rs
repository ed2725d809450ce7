//! Random weights at a real model's dimensions, and the decode measurement that both
//! `minigpt4 bench` and the page (`MiniGPT4.benchDecode`) run, so that native and browser
//! numbers come from the same code on the same shapes.

use serde_json::{json, Value};

use crate::chat::{ModelVariant, Picker, Rng};
use crate::error::{Error, Result};
use crate::gpu::tune::now_s;
use crate::gpu::{Gpu, Tensor};
use crate::model::llama::{Input, Llama, LlamaConfig, QuantPolicy, Sampler};
use crate::quant::DType;
use crate::weights::{TensorMap, TensorSpec};

/// The LLaMA of a synthetic model name (`vicuna0-7b`, `vicuna0-13b`); `tiny` shrinks it to a
/// few kilobytes (proves the code runs, measures nothing).
pub fn llm_config(name: &str, tiny: bool) -> Result<LlamaConfig> {
    let (hidden, layers, heads, inter) = match name {
        "vicuna0-7b" | "vicuna0-13b" if tiny => (64, 2, 2, 128),
        "vicuna0-7b" => (4096, 32, 32, 11008),
        "vicuna0-13b" => (5120, 40, 40, 13824),
        other => {
            return Err(Error::InvalidOption {
                name: "synthetic model".into(),
                msg: format!("expected vicuna0-7b or vicuna0-13b, found '{other}'"),
            })
        }
    };
    let mut cfg = LlamaConfig::vicuna_v0(hidden, layers, heads, inter);
    if tiny {
        cfg.vocab = 1024;
    }
    Ok(cfg)
}

/// Fills a weight tensor with pseudo-random codes and small valid f16 scales.
pub fn fill_random(gpu: &Gpu, t: &Tensor, seed: u64) {
    let n = t.numel();
    let words = t.dtype.data_words(n);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let chunk = 1 << 20;
    let mut at = 0;
    while at < words {
        let m = chunk.min(words - at);
        let data: Vec<u32> = (0..m)
            .map(|_| {
                let r = next() as u32;
                match t.dtype {
                    // f32 / f16: small finite values (exponent bits forced low)
                    DType::F32 => (r & 0x807f_ffff) | 0x3c00_0000,
                    DType::F16 => (r & 0x83ff_83ff) | 0x2c00_2c00,
                    _ => r,
                }
            })
            .collect();
        t.write_stored(
            &gpu.queue,
            false,
            (at * 4) as u64,
            bytemuck::cast_slice(&data),
        );
        at += m;
    }
    if t.dtype.is_quantized() {
        // f16 0.01 ≈ 0x211f (and a zero minimum for q4m)
        let sw = t.dtype.scale_words(n);
        let word = match t.dtype {
            DType::Q4M => 0x0000_211f,
            _ => 0x211f_211f,
        };
        let mut at = 0;
        while at < sw {
            let m = chunk.min(sw - at);
            t.write_stored(
                &gpu.queue,
                true,
                (at * 4) as u64,
                bytemuck::cast_slice(&vec![word; m]),
            );
            at += m;
        }
    }
}

/// Tensors of `specs`, allocated and filled with pseudo-random values (norm weights ones,
/// biases zeros, so activations stay finite); also their bytes in all.
pub fn tensors(gpu: &Gpu, specs: &[TensorSpec]) -> Result<(TensorMap, u64)> {
    let mut m = TensorMap::default();
    let mut bytes = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let t = s.allocate(gpu)?;
        if s.dtype == DType::F32 && s.shape.len() == 1 {
            let one = if s.name.contains("bias") { 0.0f32 } else { 1.0 };
            t.write_stored(
                &gpu.queue,
                false,
                0,
                bytemuck::cast_slice(&vec![one; s.shape[0]]),
            );
        } else {
            fill_random(gpu, &t, i as u64 + 1);
        }
        bytes += s.dtype.bytes(t.numel()) as u64;
        m.insert(t);
        if i % 64 == 0 {
            // bound the staging memory the queued writes hold
            gpu.queue.submit([]);
            gpu.wait();
        }
    }
    Ok((m, bytes))
}

/// Median, min and max of a list of seconds.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// How [`decode_seconds`] picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picks {
    /// Greedy, on the GPU ([`Llama::decode_greedy`]).
    Greedy,
    /// The reference demo's sampling (top-k 50, top-p 0.9, repetition penalty 1.05, seeded)
    /// on the GPU among the candidates ([`Llama::decode_sampled`]).
    Sampled,
    /// The same sampling from each token's logits, read back and sampled on the host
    /// ([`Picker::Host`]; never submitted ahead).
    SampledOnHost,
}

impl Picks {
    /// The demo's sampling as chat runs it on `gpu` (see [`Gpu::samples_on_gpu`]).
    pub fn chats_sampling(gpu: &Gpu) -> Result<Picks> {
        Ok(if gpu.samples_on_gpu()? {
            Picks::Sampled
        } else {
            Picks::SampledOnHost
        })
    }
}

/// Decode seconds per token (median, min, max over `runs`), with the KV cache filled to
/// `context` positions (untimed) before `steps` timed tokens, picked as `picks` says; `ahead`:
/// each token submitted before the previous one is read back, as chat runs it on a GPU.
pub async fn decode_seconds(
    gpu: &Gpu,
    llm: &mut Llama,
    context: usize,
    steps: usize,
    runs: usize,
    ahead: bool,
    picks: Picks,
) -> Result<(f64, f64, f64)> {
    let vocab = llm.cfg.vocab;
    let mut per_token = Vec::new();
    for _ in 0..runs.max(1) {
        llm.reset();
        let fill: Vec<u32> = (0..context)
            .map(|i| 3 + (i % 500.min(vocab - 3)) as u32)
            .collect();
        for chunk in fill.chunks(512) {
            llm.forward(gpu, Input::Ids(chunk), false).await?;
        }
        // one untimed step of the timed kind: its plan is recorded and its pipelines compiled
        let tok = match picks {
            Picks::Greedy => llm.forward_argmax(gpu, Input::Ids(&[5]), vocab).await?,
            _ => sampled_decode(gpu, llm, 5, 1, ahead, picks).await?,
        };
        // MINIGPT4_PROFILE: per-kernel totals of the timed steps only
        #[cfg(not(target_arch = "wasm32"))]
        crate::gpu::recorder::profile::take();
        let t = now_s();
        // `steps` forwards: tok's and those of the tokens picked but the last
        if picks == Picks::Greedy {
            llm.decode_greedy(gpu, tok, vocab, steps.max(1), ahead, |_| true)
                .await?;
        } else {
            sampled_decode(gpu, llm, tok, steps.max(1), ahead, picks).await?;
        }
        per_token.push((now_s() - t) / steps.max(1) as f64);
    }
    Ok(spread(per_token))
}

/// [`decode_seconds`] for several modes (`(name, ahead, picks)`) taken in turns: run r of
/// every mode before run r + 1 of any, so that load arriving on the machine during a bench
/// lands on all of them alike (it once made sampled tokens, timed after the greedy ones, look
/// 30 % dearer). Each mode's seconds per token (median, min, max over `runs`), and each mode's
/// profile by name ([`profile_per`] of its last run's tokens).
pub async fn decode_modes(
    gpu: &Gpu,
    llm: &mut Llama,
    context: usize,
    steps: usize,
    runs: usize,
    modes: &[(&str, bool, Picks)],
) -> Result<(Vec<(f64, f64, f64)>, serde_json::Map<String, Value>)> {
    let mut times = vec![Vec::new(); modes.len()];
    let mut profiles = serde_json::Map::new();
    for _ in 0..runs.max(1) {
        for (i, &(name, ahead, picks)) in modes.iter().enumerate() {
            let t = decode_seconds(gpu, llm, context, steps, 1, ahead, picks).await?;
            times[i].push(t.0);
            profiles.insert(name.to_string(), profile_per(steps));
        }
    }
    Ok((times.into_iter().map(spread).collect(), profiles))
}

/// `steps` tokens sampled from `first` with the reference demo's sampling (seeded), on the GPU
/// ([`Llama::decode_sampled`]) or from the logits on the host ([`Picks::SampledOnHost`]), as
/// chat samples them; returns the last one.
async fn sampled_decode(
    gpu: &Gpu,
    llm: &mut Llama,
    first: u32,
    steps: usize,
    ahead: bool,
    picks: Picks,
) -> Result<u32> {
    let vocab = llm.cfg.vocab;
    let s = ModelVariant::Vicuna0.demo_sampling();
    let mut rng = Rng::new(s.seed);
    if picks == Picks::SampledOnHost {
        // a forward for each token but the last picked, as `decode_sampled` runs them
        let mut out = vec![first];
        for _ in 0..steps {
            let last = out[out.len() - 1];
            let input = Input::Ids(std::slice::from_ref(&last));
            let id = Picker::Host
                .pick(gpu, llm, input, &out, vocab, &s, &mut rng)
                .await?;
            out.push(id);
        }
        return Ok(out[out.len() - 1]);
    }
    let mut draw = || rng.uniform();
    let sampler = Sampler {
        sampling: &s,
        draw: &mut draw,
    };
    let mut last = first;
    let on = |id| {
        last = id;
        true
    };
    llm.decode_sampled(gpu, first, vocab, steps, ahead, &[first], sampler, on)
        .await?;
    Ok(last)
}

/// What [`decode`] measures.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeBench {
    /// `vicuna0-7b` or `vicuna0-13b`.
    pub model: String,
    /// LLaMA layers (the machine may be too small for all); `None`: all.
    pub layers: Option<usize>,
    /// GPU format of the linear layers: `q4`, `q4m`, `q8`, `f16`, `f32`.
    pub quant: String,
    /// KV positions filled before the timed tokens.
    pub context: usize,
    /// Timed tokens per run.
    pub steps: usize,
    pub runs: usize,
    /// Tiny dimensions (CI: proves it works).
    pub tiny: bool,
}

impl Default for DecodeBench {
    fn default() -> Self {
        DecodeBench {
            model: "vicuna0-7b".into(),
            layers: Some(1),
            quant: "q4".into(),
            context: 128,
            steps: 8,
            runs: 3,
            tiny: false,
        }
    }
}

/// Builds the synthetic LLaMA of `b` and measures greedy decode on it: the same code natively
/// (`minigpt4 bench --parts decode`) and in the page (`MiniGPT4.benchDecode`).
pub async fn decode(gpu: &Gpu, b: &DecodeBench) -> Result<Value> {
    let mut cfg = llm_config(&b.model, b.tiny)?;
    if let Some(l) = b.layers {
        cfg.layers = l.clamp(1, cfg.layers);
    }
    let quant = DType::parse(&b.quant)?;
    let policy = QuantPolicy::for_linear(quant);
    let context = if b.tiny { b.context.min(32) } else { b.context };
    let (mut tensors, weight_bytes) = tensors(gpu, &Llama::specs(&cfg, policy))?;
    let mut llm = Llama::build(gpu, &cfg, policy, &mut tensors, context + b.steps + 2)?;
    let (steps, runs) = (b.steps, b.runs);
    // greedy and chat's default sampling (on the GPU), each submitted ahead and with each
    // token read back before the next is submitted (what submitting ahead gains here)
    let modes = [
        ("greedy", true, Picks::Greedy),
        ("greedy_waiting", false, Picks::Greedy),
        ("sampled", true, Picks::Sampled),
        ("sampled_waiting", false, Picks::Sampled),
    ];
    // (and with MINIGPT4_PROFILE, each mode's kernels)
    let (timed, profiles) = decode_modes(gpu, &mut llm, context, steps, runs, &modes).await?;
    let [s, w, ss, sw] = [0, 1, 2, 3].map(|i| timed[i]);
    let rate = |t: (f64, f64, f64)| if t.0 > 0.0 { 1.0 / t.0 } else { 0.0 };
    Ok(json!({
        "adapter": gpu.info.name,
        "kernel_variant": gpu.best_variant.name(),
        "gemv_lanes": gpu.gemv_lanes(),
        "model": b.model, "layers": cfg.layers, "hidden": cfg.hidden, "quant": quant.name(),
        "tiny": b.tiny, "context": context, "steps": b.steps, "runs": b.runs,
        "weight_bytes": weight_bytes,
        "decode_tok_per_s": rate(s),
        "per_token": {"median_s": s.0, "min_s": s.1, "max_s": s.2},
        "decode_tok_per_s_waiting": rate(w),
        "per_token_waiting": {"median_s": w.0, "min_s": w.1, "max_s": w.2},
        "decode_tok_per_s_sampled": rate(ss),
        "per_token_sampled": {"median_s": ss.0, "min_s": ss.1, "max_s": ss.2},
        "decode_tok_per_s_sampled_waiting": rate(sw),
        "per_token_sampled_waiting": {"median_s": sw.0, "min_s": sw.1, "max_s": sw.2},
        "profile": profiles,
    }))
}

/// The kernels of the last `count` repetitions (timed decode tokens, image encodes), costliest
/// first, per repetition: `[{kernel, ms, dispatches}]`; empty unless `MINIGPT4_PROFILE=1`
/// (native only).
pub fn profile_per(count: usize) -> Value {
    #[cfg(not(target_arch = "wasm32"))]
    let totals = crate::gpu::recorder::profile::take();
    #[cfg(target_arch = "wasm32")]
    let totals: Vec<(String, f64, u64)> = Vec::new();
    let n = count.max(1) as f64;
    totals
        .into_iter()
        .map(|(kernel, secs, dispatches)| {
            json!({"kernel": kernel, "ms": secs * 1e3 / n, "dispatches": dispatches as f64 / n})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_options_parse_with_defaults_and_unknown_fields_are_named() {
        let b: DecodeBench = serde_json::from_str(r#"{"layers": 2, "tiny": true}"#).unwrap();
        assert_eq!((b.layers, b.tiny, b.context), (Some(2), true, 128));
        assert_eq!(b.model, "vicuna0-7b");
        let e = serde_json::from_str::<DecodeBench>(r#"{"layer": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer"), "{e}");
        let e = llm_config("vicuna0-70b", false).unwrap_err().to_string();
        assert!(e.contains("vicuna0-70b") && e.contains("vicuna0-7b"), "{e}");
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![]), (0.0, 0.0, 0.0));
    }
}
