//! Sampling and the generation loop (the chat templates join them with the MiniGPT-4 issue).
//!
//! Sampling reproduces transformers' `generate()` (4.30, the version MiniGPT-4 pins): per step,
//! repetition penalty over the given tokens → temperature (skipped at exactly 1.0) → top-k
//! (ties with the k-th value kept) → top-p (ascending sort, cumulative softmax, drop while
//! `cum <= 1 − top_p`, keep at least one) → softmax → one multinomial draw. The random numbers
//! come from our own seeded generator, so a seed reproduces our runs, not PyTorch's.

use crate::error::{Error, Result};
use crate::gpu::ops::TOPK_KEEP;
use crate::gpu::{Gpu, Tensor};
use crate::model::llama::{Candidate, Input, Llama, Sampler};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Argmax (first index of the maximum, as `torch.argmax`); the other fields are ignored
    /// except `repetition_penalty`.
    pub greedy: bool,
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 1.0 disables. HF formula: `logit < 0 ? logit·p : logit/p` for every id in the penalty set.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    /// transformers' defaults for a plain `generate(do_sample=True)`.
    fn default() -> Self {
        Sampling {
            greedy: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            greedy: true,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, msg: String| {
            Err(Error::InvalidOption {
                name: name.into(),
                msg,
            })
        };
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("expected a positive number, found {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top-p",
                format!("expected a number in (0, 1], found {}", self.top_p),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition-penalty",
                format!(
                    "expected a positive number, found {}",
                    self.repetition_penalty
                ),
            );
        }
        Ok(())
    }
}

/// A small seeded generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Applies HF's repetition penalty in place to each distinct id of `ids`.
pub fn repetition_penalty(logits: &mut [f32], ids: &[u32], p: f32) {
    if p == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            if seen.insert(id) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
}

/// The probability distribution after temperature, top-k and top-p (zeros for removed ids).
pub fn warp(logits: &[f32], s: &Sampling) -> Vec<f64> {
    let mut l: Vec<f32> = logits.to_vec();
    if s.temperature != 1.0 {
        for v in l.iter_mut() {
            *v /= s.temperature;
        }
    }
    let ninf = f32::NEG_INFINITY;
    if s.top_k > 0 && s.top_k < l.len() {
        let mut sorted: Vec<f32> = l.iter().copied().filter(|v| !v.is_nan()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        for v in l.iter_mut() {
            if *v < kth {
                *v = ninf;
            }
        }
    }
    if s.top_p < 1.0 {
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[a].total_cmp(&l[b]));
        let probs = softmax(&idx.iter().map(|&i| l[i]).collect::<Vec<_>>());
        let mut cum = 0f64;
        let last = idx.len() - 1;
        let mut remove = Vec::new();
        for (j, &i) in idx.iter().enumerate() {
            cum += probs[j];
            if cum <= (1.0 - s.top_p as f64) && j != last {
                remove.push(i);
            }
        }
        for i in remove {
            l[i] = ninf;
        }
    }
    softmax(&l)
}

fn softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l
        .iter()
        .map(|&v| {
            if v == f32::NEG_INFINITY {
                0.0
            } else {
                (v as f64 - m).exp()
            }
        })
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Index of the first maximum.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Chooses the next token. `penalty_ids` are the ids the repetition penalty applies to;
/// ids at or above `allowed` (e.g. Vicuna-v0's row 32000, which has no tokenizer piece) are
/// never chosen.
pub fn sample(
    logits: &mut [f32],
    penalty_ids: &[u32],
    allowed: usize,
    s: &Sampling,
    rng: &mut Rng,
) -> u32 {
    sample_with(logits, penalty_ids, allowed, s, draw(s, rng))
}

/// A token's draw: uniform in [0, 1) from `rng`, or none (0, unused) when greedy.
fn draw(s: &Sampling, rng: &mut Rng) -> f64 {
    if s.greedy {
        0.0
    } else {
        rng.uniform()
    }
}

/// [`sample`] with its draw `u` (uniform in [0, 1), one per sampled token; unused when
/// greedy) taken by the caller: a token sampled on the GPU ahead of its readback and the same
/// token sampled again on the host use the same draw.
pub fn sample_with(
    logits: &mut [f32],
    penalty_ids: &[u32],
    allowed: usize,
    s: &Sampling,
    u: f64,
) -> u32 {
    let n = allowed.min(logits.len()).max(1);
    let logits = &mut logits[..n];
    repetition_penalty(logits, penalty_ids, s.repetition_penalty);
    if s.greedy {
        return argmax(logits);
    }
    let probs = warp(logits, s);
    let mut cum = 0f64;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_nonzero = i;
            cum += p;
            if u < cum {
                return i as u32;
            }
        }
    }
    last_nonzero as u32
}

/// When generation ends.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    pub max_new_tokens: usize,
    pub eos: Vec<u32>,
    /// Stop when the generated ids end with any of these.
    pub sequences: Vec<Vec<u32>>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    StopSequence,
    MaxTokens,
    Cancelled,
}

/// Where a generation's time went, in the shape llama.cpp's server reports it: the prompt
/// (its forward through the first token's pick: the time to the first token, from the prompt
/// rows on the GPU) and the answer (from the first token picked to the last).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Prompt rows run (text tokens and image rows).
    pub prompt_n: usize,
    pub prompt_ms: f64,
    /// `prompt_n` per second of `prompt_ms`.
    pub prompt_per_second: Option<f64>,
    /// Tokens generated (stop tokens included).
    pub predicted_n: usize,
    /// From the first token picked to the last.
    pub predicted_ms: f64,
    /// Tokens after the first per second of `predicted_ms` (none with fewer than two tokens).
    pub predicted_per_second: Option<f64>,
}

impl Timings {
    /// From the prompt's rows, the seconds to the first token, the tokens generated and the
    /// seconds from the first to the last.
    pub fn new(prompt_n: usize, prompt_s: f64, predicted_n: usize, predicted_s: f64) -> Self {
        let rate = |n: usize, s: f64| (n > 0 && s > 0.0).then(|| n as f64 / s);
        Timings {
            prompt_n,
            prompt_ms: prompt_s * 1e3,
            prompt_per_second: rate(prompt_n, prompt_s),
            predicted_n,
            predicted_ms: predicted_s * 1e3,
            predicted_per_second: rate(predicted_n.saturating_sub(1), predicted_s),
        }
    }

    /// One line for people: `prompt 98 tokens in 1.21 s (81.0 tok/s), answer 57 tokens in
    /// 2.32 s (24.1 tok/s)`.
    pub fn summary(&self) -> String {
        let rate = |r: Option<f64>| r.map(|r| format!(" ({r:.1} tok/s)")).unwrap_or_default();
        let tokens = |n: usize| format!("{n} token{}", if n == 1 { "" } else { "s" });
        format!(
            "prompt {} in {:.2} s{}, answer {} in {:.2} s{}",
            tokens(self.prompt_n),
            self.prompt_ms / 1e3,
            rate(self.prompt_per_second),
            tokens(self.predicted_n),
            self.predicted_ms / 1e3,
            rate(self.predicted_per_second),
        )
    }
}

/// What generation starts from.
#[derive(Clone, Copy)]
pub enum Prompt<'a> {
    /// Token ids, prefilled in chunks of [`PREFILL_CHUNK`].
    Ids(&'a [u32]),
    /// Input rows `[t, hidden]` (text embeddings with image embeddings spliced in).
    Embeds(&'a Tensor),
}

/// Prefills `prompt` (in chunks) and decodes until a stop. `on_token(id)` is called for every
/// generated id (streaming); returning false cancels. Returns the generated ids (stop tokens
/// included, as transformers returns them), why it finished, and how long it took.
pub async fn generate(
    gpu: &Gpu,
    model: &mut Llama,
    prompt: &[u32],
    sampling: &Sampling,
    stop: &Stop,
    allowed: usize,
    on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Finish, Timings)> {
    generate_from(
        gpu,
        model,
        Prompt::Ids(prompt),
        sampling,
        stop,
        allowed,
        on_token,
    )
    .await
}

/// [`generate`] from ids or from input embeddings.
pub async fn generate_from(
    gpu: &Gpu,
    model: &mut Llama,
    prompt: Prompt<'_>,
    sampling: &Sampling,
    stop: &Stop,
    allowed: usize,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Finish, Timings)> {
    use crate::gpu::tune::now_s;
    // one-time tuning of the model's shapes, outside the answer's timings
    model.prepare(gpu).await?;
    let t0 = now_s();
    // when the first and the latest token were known
    let (mut first, mut last) = (None, t0);
    let mut on_token = |id| {
        let t = now_s();
        first.get_or_insert(t);
        last = t;
        on_token(id)
    };
    let len = match prompt {
        Prompt::Ids(ids) => ids.len(),
        Prompt::Embeds(e) => e.rows(),
    };
    let generated: Result<(Vec<u32>, Finish)> = async {
        sampling.validate()?;
        if len == 0 {
            return Err(Error::InvalidOption {
                name: "prompt".into(),
                msg: "the prompt has no tokens".into(),
            });
        }
        let need = model.pos + len + stop.max_new_tokens;
        if need > model.ctx {
            return Err(Error::InvalidOption {
                name: "max-new-tokens".into(),
                msg: format!(
                    "prompt ({} tokens) + max new tokens ({}) = {} exceeds the context of {} tokens",
                    model.pos + len,
                    stop.max_new_tokens,
                    need,
                    model.ctx
                ),
            });
        }
        let mut rng = Rng::new(sampling.seed);
        let picker = match Picker::for_sampling(sampling) {
            Picker::TopK if !gpu.samples_on_gpu()? => Picker::Host,
            p => p,
        };
        let inputs: Vec<Input> = match prompt {
            Prompt::Ids(ids) => ids.chunks(PREFILL_CHUNK).map(Input::Ids).collect(),
            Prompt::Embeds(e) => vec![Input::Embeds(e)],
        };
        let n = inputs.len();
        let mut out: Vec<u32> = Vec::new();
        let mut next = 0u32;
        for (i, input) in inputs.into_iter().enumerate() {
            if i + 1 < n {
                model.forward(gpu, input, false).await?;
            } else {
                next = picker
                    .pick(gpu, model, input, &out, allowed, sampling, &mut rng)
                    .await?;
            }
        }
        if stop.max_new_tokens == 0 {
            return Ok((out, Finish::MaxTokens));
        }
        // takes a picked token: Some(why) when generation ends with it
        let mut accept = |out: &mut Vec<u32>, id: u32| {
            out.push(id);
            if !on_token(id) {
                return Some(Finish::Cancelled);
            }
            if stop.eos.contains(&id) {
                return Some(Finish::Eos);
            }
            if stop
                .sequences
                .iter()
                .any(|s| !s.is_empty() && out.ends_with(s))
            {
                return Some(Finish::StopSequence);
            }
            (out.len() >= stop.max_new_tokens).then_some(Finish::MaxTokens)
        };
        if let Some(why) = accept(&mut out, next) {
            return Ok((out, why));
        }
        if picker != Picker::Host {
            // the GPU picks and feeds itself, a token submitted ahead of each readback (except
            // on a CPU device, see `Gpu::submits_ahead`): greedy, or sampled among the
            // candidates (the host sampling the full logits with the same draw where the
            // candidates cannot decide)
            let mut finish = Finish::MaxTokens;
            let more = stop.max_new_tokens - out.len();
            let penalized = out.clone();
            let on = |id| match accept(&mut out, id) {
                Some(why) => {
                    finish = why;
                    false
                }
                None => true,
            };
            let ahead = gpu.submits_ahead()?;
            if picker == Picker::Argmax {
                model
                    .decode_greedy(gpu, next, allowed, more, ahead, on)
                    .await?;
            } else {
                let mut draw = || rng.uniform();
                let sampler = Sampler {
                    sampling,
                    draw: &mut draw,
                };
                model
                    .decode_sampled(gpu, next, allowed, more, ahead, &penalized, sampler, on)
                    .await?;
            }
            return Ok((out, finish));
        }
        loop {
            let last = *out.last().expect("a token was accepted");
            next = picker
                .pick(
                    gpu,
                    model,
                    Input::Ids(&[last]),
                    &out,
                    allowed,
                    sampling,
                    &mut rng,
                )
                .await?;
            if let Some(why) = accept(&mut out, next) {
                return Ok((out, why));
            }
        }
    }
    .await;
    let (ids, finish) = generated?;
    // no token picked (max_new_tokens 0): the prompt took all of it
    let first = first.unwrap_or_else(now_s);
    let timings = Timings::new(len, first - t0, ids.len(), (last - first).max(0.0));
    Ok((ids, finish, timings))
}

/// Where the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Picker {
    /// Greedy without a penalty: the GPU's argmax (4 bytes read back).
    Argmax,
    /// Sampling with a top-k below [`TOPK_KEEP`], or greedy with a repetition penalty: the GPU
    /// ranks (with the penalty) and returns 64 candidates; the host samples among them (or
    /// takes the best) exactly as from the full logits.
    TopK,
    /// Everything else: the logits are read back and sampled on the host.
    Host,
}

impl Picker {
    pub fn for_sampling(s: &Sampling) -> Picker {
        if s.greedy && s.repetition_penalty == 1.0 {
            Picker::Argmax
        } else if s.greedy || (s.top_k > 0 && s.top_k < TOPK_KEEP) {
            Picker::TopK
        } else {
            Picker::Host
        }
    }

    /// Runs `input` and chooses the next token; `out` are the tokens generated so far (the
    /// repetition penalty's ids).
    #[allow(clippy::too_many_arguments)]
    pub async fn pick(
        self,
        gpu: &Gpu,
        model: &mut Llama,
        input: Input<'_>,
        out: &[u32],
        allowed: usize,
        s: &Sampling,
        rng: &mut Rng,
    ) -> Result<u32> {
        match self {
            Picker::Argmax => model.forward_argmax(gpu, input, allowed).await,
            Picker::TopK => {
                let cands = model
                    .forward_topk(gpu, input, allowed, out, s.repetition_penalty)
                    .await?;
                // one draw, from the candidates or from the full logits
                let u = draw(s, rng);
                match sample_candidates(&cands, out, s, u) {
                    Some(id) => Ok(id),
                    None => {
                        let mut logits = model.last_logits(gpu).await?;
                        Ok(sample_with(&mut logits, out, allowed, s, u))
                    }
                }
            }
            Picker::Host => {
                let mut logits = model.forward(gpu, input, false).await?;
                Ok(sample(&mut logits, out, allowed, s, rng))
            }
        }
    }
}

/// Samples among the GPU's top-k candidates exactly as [`sample`] would from the full logits:
/// the candidates in id order, the penalty applied again on the host, then the same warp and
/// the draw `u` (see [`sample_with`]). `None` (the caller then samples the full logits with
/// the same draw) when the candidates might not hold every token top-k keeps: a tie at the
/// k-th value reaching the last candidate. Greedy (the penalty's argmax) is decided as top-k 1:
/// the best value must be above the worst candidate.
pub fn sample_candidates(
    cands: &[Candidate],
    penalized: &[u32],
    s: &Sampling,
    u: f64,
) -> Option<u32> {
    let top_k = if s.greedy { 1 } else { s.top_k };
    if cands.is_empty() || top_k == 0 || top_k >= TOPK_KEEP {
        return None;
    }
    let mut c: Vec<Candidate> = cands.to_vec();
    c.sort_by_key(|c| c.id);
    c.dedup_by_key(|c| c.id);
    let mut logits: Vec<f32> = c.iter().map(|c| c.logit).collect();
    let seen: std::collections::HashSet<u32> = penalized.iter().copied().collect();
    let pos: Vec<u32> = (0..c.len() as u32)
        .filter(|&i| seen.contains(&c[i as usize].id))
        .collect();
    if c.len() >= TOPK_KEEP {
        // the candidates stand for a larger vocabulary: safe only if the k-th best value is
        // above the worst candidate (then nothing outside can tie with it)
        let mut pen = logits.clone();
        repetition_penalty(&mut pen, &pos, s.repetition_penalty);
        let mut sorted = pen.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[top_k - 1];
        let worst = sorted[sorted.len() - 1];
        if worst >= kth || pen.iter().any(|v| v.is_nan()) {
            return None;
        }
    }
    let n = logits.len();
    let i = sample_with(&mut logits, &pos, n, s, u);
    Some(c[i as usize].id)
}

/// Rows per prefill dispatch batch (bounds activation memory for long prompts).
pub const PREFILL_CHUNK: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    /// The best `TOPK_KEEP` of `logits` ranked after the penalty, as the GPU returns them.
    fn candidates(logits: &[f32], penalized: &[u32], p: f32) -> Vec<Candidate> {
        let mut pen = logits.to_vec();
        repetition_penalty(&mut pen, penalized, p);
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| pen[b].total_cmp(&pen[a]).then(a.cmp(&b)));
        idx.truncate(TOPK_KEEP);
        idx.iter()
            .map(|&i| Candidate {
                id: i as u32,
                logit: logits[i],
            })
            .collect()
    }

    #[test]
    fn sampling_among_candidates_equals_sampling_the_full_logits() {
        let mut r = Rng::new(3);
        for case in 0..200u64 {
            let n = 70 + (case as usize * 37) % 3000;
            let logits: Vec<f32> = (0..n).map(|_| (r.uniform() * 12.0 - 6.0) as f32).collect();
            let penalized: Vec<u32> = (0..10)
                .map(|j| ((j * 31 + case as usize) % n) as u32)
                .collect();
            let s = Sampling {
                greedy: false,
                temperature: 0.5 + (case % 5) as f32 * 0.3,
                top_k: 1 + (case as usize % 62),
                top_p: [1.0, 0.9, 0.5][case as usize % 3],
                repetition_penalty: [1.0, 1.05, 1.5][case as usize % 3],
                seed: case,
            };
            let c = candidates(&logits, &penalized, s.repetition_penalty);
            let u = Rng::new(case).uniform();
            let got = sample_candidates(&c, &penalized, &s, u).unwrap();
            let want = sample(&mut logits.clone(), &penalized, n, &s, &mut Rng::new(case));
            assert_eq!(got, want, "case {case}");
        }
    }

    #[test]
    fn greedy_with_a_penalty_is_the_best_candidate() {
        let s = Sampling {
            greedy: true,
            repetition_penalty: 1.3,
            ..Sampling::default()
        };
        assert_eq!(Picker::for_sampling(&s), Picker::TopK);
        let plain = Sampling {
            repetition_penalty: 1.0,
            ..s.clone()
        };
        assert_eq!(Picker::for_sampling(&plain), Picker::Argmax);
        let mut r = Rng::new(5);
        let mut decided = 0;
        for case in 0..100u64 {
            let n = 70 + (case as usize * 53) % 2000;
            // coarse values: ties at the top are common
            let logits: Vec<f32> = (0..n).map(|_| (r.uniform() * 8.0).floor() as f32).collect();
            let penalized: Vec<u32> = (0..20)
                .map(|j| ((j * 17 + case as usize) % n) as u32)
                .collect();
            let c = candidates(&logits, &penalized, s.repetition_penalty);
            let want = sample(&mut logits.clone(), &penalized, n, &s, &mut Rng::new(0));
            // the penalty's argmax, lowest id among ties
            let mut pen = logits.clone();
            repetition_penalty(&mut pen, &penalized, s.repetition_penalty);
            assert_eq!(want, argmax(&pen));
            match sample_candidates(&c, &penalized, &s, 0.99) {
                Some(got) => {
                    assert_eq!(got, want, "case {case}");
                    decided += 1;
                }
                // undecided only where the best value reaches the last candidate
                None => assert!(pen.iter().filter(|&&v| v == pen[want as usize]).count() >= 64),
            }
        }
        assert!(decided >= 20, "{decided}");
        // 100 tied logits: the candidates cannot show which id is lowest among them
        let c = candidates(&[2.0; 100], &[], 1.3);
        assert_eq!(sample_candidates(&c, &[], &s, 0.0), None);
    }

    #[test]
    fn a_tie_reaching_the_last_candidate_falls_back_to_the_full_logits() {
        // 100 equal logits: the 64 candidates cannot show which of the tied ids top-k keeps
        let logits = vec![1.0f32; 100];
        let s = Sampling {
            greedy: false,
            top_k: 50,
            ..Sampling::default()
        };
        let c = candidates(&logits, &[], 1.0);
        assert_eq!(sample_candidates(&c, &[], &s, 0.5), None);
        // top-k off or too large for the list: not for candidates either
        let s0 = Sampling {
            top_k: 0,
            ..s.clone()
        };
        assert_eq!(Picker::for_sampling(&s0), Picker::Host);
        let big = Sampling { top_k: 64, ..s };
        assert_eq!(Picker::for_sampling(&big), Picker::Host);
    }

    #[test]
    fn timings_count_rates_between_tokens() {
        // 98 prompt rows in 0.5 s; 11 tokens, the last 2 s after the first: 10 intervals
        let t = Timings::new(98, 0.5, 11, 2.0);
        assert_eq!((t.prompt_n, t.predicted_n), (98, 11));
        assert_eq!((t.prompt_ms, t.predicted_ms), (500.0, 2000.0));
        assert_eq!(t.prompt_per_second, Some(196.0));
        assert_eq!(t.predicted_per_second, Some(5.0));
        assert_eq!(
            t.summary(),
            "prompt 98 tokens in 0.50 s (196.0 tok/s), answer 11 tokens in 2.00 s (5.0 tok/s)"
        );
        // one token (or none): no rate between tokens, and none printed
        let one = Timings::new(5, 0.1, 1, 0.0);
        assert_eq!(one.predicted_per_second, None);
        assert_eq!(
            one.summary(),
            "prompt 5 tokens in 0.10 s (50.0 tok/s), answer 1 token in 0.00 s"
        );
        let v = serde_json::to_value(one).unwrap();
        assert!(v["predicted_per_second"].is_null(), "{v}");
        assert_eq!(v["prompt_n"], 5);
    }

    #[test]
    fn repetition_penalty_uses_the_hf_formula_once_per_id() {
        let mut l = vec![2.0, -2.0, 1.0];
        repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_smallest_set_reaching_p() {
        let s = Sampling {
            top_k: 2,
            ..Default::default()
        };
        let p = warp(&[1.0, 3.0, 3.0, 2.0], &s);
        assert_eq!(p[0], 0.0);
        assert_eq!(p[3], 0.0);
        assert!((p[1] - 0.5).abs() < 1e-12);
        // probs 0.5, 0.3, 0.2: top_p 0.7 keeps {0.5, 0.3} (0.2 <= 0.3 removed)
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let s = Sampling {
            top_k: 0,
            top_p: 0.7,
            ..Default::default()
        };
        let p = warp(&l, &s);
        assert_eq!(p[2], 0.0);
        assert!((p[0] - 0.625).abs() < 1e-6);
        // top_p tiny still keeps the best one
        let s = Sampling {
            top_k: 0,
            top_p: 1e-6,
            ..Default::default()
        };
        assert_eq!(warp(&l, &s), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn temperature_sharpens_and_sampling_is_seeded_and_respects_allowed() {
        let l = vec![0.0f32, 1.0];
        let cold = warp(
            &l,
            &Sampling {
                temperature: 0.5,
                top_k: 0,
                ..Default::default()
            },
        );
        let warm = warp(
            &l,
            &Sampling {
                top_k: 0,
                ..Default::default()
            },
        );
        assert!(cold[1] > warm[1]);
        let s = Sampling {
            top_k: 0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| sample(&mut [0.0, 0.1, 0.2, 9.0], &[], 3, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|&i| i < 3), "id 3 is beyond `allowed`");
        assert!(draw(7).contains(&0) && draw(7).contains(&2));
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn bad_sampling_values_are_named() {
        let e = Sampling {
            top_p: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("top-p") && e.contains("1.5"), "{e}");
    }
}

/// The MiniGPT-4 family members (they differ in template, visual path and stops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelVariant {
    /// MiniGPT-4 with Vicuna v0 7B or 13B (Q-Former path).
    Vicuna0,
    /// MiniGPT-4 with Llama-2-chat 7B (no Q-Former: 4 ViT tokens concatenated).
    Llama2,
    /// MiniGPT-v2 (Llama-2-chat 7B, 448 px, 4-token concatenation).
    MiniGptV2,
}

impl ModelVariant {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "vicuna0" | "vicuna0-7b" | "vicuna0-13b" => Ok(ModelVariant::Vicuna0),
            "llama2" | "llama2-7b" => Ok(ModelVariant::Llama2),
            "minigptv2" => Ok(ModelVariant::MiniGptV2),
            _ => Err(Error::InvalidOption {
                name: "variant".into(),
                msg: format!(
                    "expected vicuna0-7b, vicuna0-13b, llama2-7b or minigptv2, found '{s}'"
                ),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelVariant::Vicuna0 => "vicuna0",
            ModelVariant::Llama2 => "llama2",
            ModelVariant::MiniGptV2 => "minigptv2",
        }
    }

    /// Image side the variant's preprocessing resizes to.
    pub fn image_size(self) -> usize {
        if self == ModelVariant::MiniGptV2 {
            448
        } else {
            224
        }
    }

    /// The reference demo's sampling (spec §7.5): temperature 1, top-k 50, top-p 0.9,
    /// repetition penalty 1.05 on generated tokens.
    pub fn demo_sampling(self) -> Sampling {
        Sampling {
            greedy: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.05,
            seed: 0,
        }
    }

    /// The conversation template, verbatim from the reference (spec §7.2).
    pub fn template(self) -> Template {
        const SYSTEM: &str = "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to you. Please answer my questions.";
        match self {
            ModelVariant::Vicuna0 => Template {
                system: SYSTEM,
                roles: ["Human: ", "Assistant: "],
                sep: "###",
            },
            ModelVariant::Llama2 => Template {
                system: SYSTEM,
                roles: ["<s>[INST] ", " [/INST] "],
                sep: "",
            },
            ModelVariant::MiniGptV2 => Template {
                system: "",
                roles: ["<s>[INST] ", " [/INST]"],
                sep: "",
            },
        }
    }

    /// Stop sequences of the reference demo: `###` as `▁###` or `##`,`#` for MiniGPT-4
    /// (`demo.py`), `</s>` for MiniGPT-v2 (`demo_v2.py`).
    pub fn stop_sequences(self) -> Vec<Vec<u32>> {
        match self {
            ModelVariant::Vicuna0 | ModelVariant::Llama2 => vec![vec![835], vec![2277, 29937]],
            ModelVariant::MiniGptV2 => vec![vec![2]],
        }
    }
}

/// A `SeparatorStyle.SINGLE` conversation template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template {
    pub system: &'static str,
    pub roles: [&'static str; 2],
    pub sep: &'static str,
}

/// The image placeholder the prompt is split at.
pub const IMAGE_PLACEHOLDER: &str = "<ImageHere>";

/// A conversation as the reference `Chat` builds it (spec §7.1): uploading an image adds the
/// user message `<Img><ImageHere></Img>`; the first question is appended to it with a space.
#[derive(Clone, Debug)]
pub struct Conversation {
    pub template: Template,
    /// (role index 0 = user, 1 = assistant, message)
    pub messages: Vec<(usize, String)>,
}

impl Conversation {
    pub fn new(variant: ModelVariant) -> Self {
        Conversation {
            template: variant.template(),
            messages: Vec::new(),
        }
    }

    /// Adds the image placeholder message.
    pub fn add_image(&mut self) {
        self.messages
            .push((0, format!("<Img>{IMAGE_PLACEHOLDER}</Img>")));
    }

    /// Adds a user question (`Chat.ask`).
    pub fn ask(&mut self, text: &str) {
        match self.messages.last_mut() {
            Some((0, m)) if m.ends_with("</Img>") => *m = format!("{m} {text}"),
            _ => self.messages.push((0, text.to_string())),
        }
    }

    /// Records the assistant's (trimmed) answer for the next turn.
    pub fn add_answer(&mut self, text: &str) {
        self.messages.push((1, text.to_string()));
    }

    /// The prompt with an open assistant turn (`get_prompt` after `answer_prepare`).
    pub fn prompt(&self) -> String {
        let t = &self.template;
        let mut ret = format!("{}{}", t.system, t.sep);
        for (role, msg) in &self.messages {
            ret.push_str(t.roles[*role]);
            ret.push_str(msg);
            ret.push_str(t.sep);
        }
        ret.push_str(t.roles[1]);
        ret
    }
}

/// The visible text of an answer while its tokens arrive (for streaming it): decoded
/// incrementally, ending before the template's `###` separator or a caller's stop string. A tail
/// that could still grow into one of those is held back until it cannot.
pub struct AnswerStream {
    tok: crate::tokenizer::Tokenizer,
    /// `###` and the caller's stop strings.
    stops: Vec<String>,
    ids: Vec<u32>,
    emitted: usize,
    shown: String,
    sent: usize,
    /// A caller's stop string (not `###`) ended the answer.
    pub stopped_by_string: bool,
}

impl AnswerStream {
    pub fn new(tok: crate::tokenizer::Tokenizer, caller_stops: &[String]) -> Self {
        let mut stops = vec!["###".to_string()];
        stops.extend(caller_stops.iter().filter(|s| !s.is_empty()).cloned());
        AnswerStream {
            tok,
            stops,
            ids: Vec::new(),
            emitted: 0,
            shown: String::new(),
            sent: 0,
            stopped_by_string: false,
        }
    }

    /// Where the visible answer ends, if a stop string has appeared, and whether it was a
    /// caller's.
    fn cut(&self) -> Option<(usize, bool)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| self.shown.find(s.as_str()).map(|i| (i, k > 0)))
            .min_by_key(|&(i, caller)| (i, caller))
    }

    /// Adds a generated token; returns the text that became visible (often empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        if let Ok((piece, n)) = self.tok.decode_incremental(&self.ids, self.emitted) {
            self.emitted = n;
            self.shown.push_str(&piece);
        }
        let safe = match self.cut() {
            Some((i, caller)) => {
                self.stopped_by_string |= caller;
                i
            }
            None => {
                let hold = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
                let mut s = self.shown.len().saturating_sub(hold);
                while !self.shown.is_char_boundary(s) {
                    s -= 1;
                }
                s
            }
        };
        self.take(safe)
    }

    /// The held-back rest of the visible text, once generation has ended.
    pub fn finish(&mut self) -> String {
        let end = self.cut().map_or(self.shown.len(), |(i, _)| i);
        self.take(end)
    }

    fn take(&mut self, end: usize) -> String {
        if end <= self.sent {
            return String::new();
        }
        let piece = self.shown[self.sent..end].to_string();
        self.sent = end;
        piece
    }
}

/// `Chat.answer`'s trimming: cut at `###`, keep what follows the last `Assistant:`, strip.
pub fn trim_answer(decoded: &str) -> String {
    let first = decoded.split("###").next().unwrap_or("");
    first
        .rsplit("Assistant:")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn prompts_are_the_reference_strings() {
        let mut c = Conversation::new(ModelVariant::Vicuna0);
        c.add_image();
        c.ask("Describe this image in detail.");
        assert_eq!(
            c.prompt(),
            "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> Describe this image in detail.###Assistant: "
        );
        c.add_answer("A cat.");
        c.ask("What colour?");
        assert!(c.prompt().ends_with("###Human: <Img><ImageHere></Img> Describe this image in detail.###Assistant: A cat.###Human: What colour?###Assistant: "));

        let mut l = Conversation::new(ModelVariant::Llama2);
        l.add_image();
        l.ask("Q");
        assert!(l
            .prompt()
            .ends_with("Please answer my questions.<s>[INST] <Img><ImageHere></Img> Q [/INST] "));
        l.add_answer("A1");
        l.ask("Q2");
        assert!(l.prompt().ends_with(" [/INST] A1<s>[INST] Q2 [/INST] "));

        let mut v = Conversation::new(ModelVariant::MiniGptV2);
        v.add_image();
        v.ask("[vqa] What is in the image?");
        assert_eq!(
            v.prompt(),
            "<s>[INST] <Img><ImageHere></Img> [vqa] What is in the image? [/INST]"
        );
    }

    #[test]
    fn answers_are_trimmed_like_chat_answer() {
        assert_eq!(
            trim_answer(" A cat on a mat.###Human: more"),
            "A cat on a mat."
        );
        assert_eq!(trim_answer("Assistant: hello ###"), "hello");
        assert_eq!(trim_answer("plain"), "plain");
    }
}
