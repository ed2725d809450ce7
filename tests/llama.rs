//! The LLaMA decoder against logits from transformers (tests/golden/make_llama_goldens.py):
//! tiny random models covering MHA and GQA, tied and untied embeddings, head dim 64 and 128,
//! single-file, sharded safetensors and PyTorch `.bin` checkpoints.

mod common;

use std::path::{Path, PathBuf};

use common::gpu;
use minigpt4::gpu::Gpu;
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::loader::TensorSource;
use minigpt4::model::llama::{Input, Llama, LlamaFiles, QuantPolicy};
use minigpt4::quant::DType;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

struct Golden {
    ids: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn golden(name: &str) -> Golden {
    let g = SafetensorsFile::open(&fixture(name).join("golden.safetensors")).unwrap();
    let ids: Vec<u32> = g
        .read_ints("input_ids")
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let logits = g.read_f32("logits").unwrap();
    let vocab = logits.len() / ids.len();
    Golden { ids, logits, vocab }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(gpu: &Gpu, name: &str, q: DType) -> Llama {
    let (cfg, files) = LlamaFiles::open(&fixture(name)).unwrap();
    Llama::load(gpu, &cfg, &files, QuantPolicy::for_linear(q), 64).unwrap()
}

/// f32 logits at every position of one full forward within 1e-4 of the reference, and the
/// same through prefill(5) + 7 single-token decode steps against the KV cache.
fn check_f32(name: &str) {
    let gpu = gpu();
    let g = golden(name);
    let mut m = load(&gpu, name, DType::F32);
    let all = pollster::block_on(m.forward(&gpu, Input::Ids(&g.ids), true)).unwrap();
    let err = max_abs(&all, &g.logits);
    assert!(err <= 1e-4, "{name}: full forward max-abs {err}");

    m.reset();
    let pre = pollster::block_on(m.forward(&gpu, Input::Ids(&g.ids[..5]), true)).unwrap();
    let err = max_abs(&pre, &g.logits[..5 * g.vocab]);
    assert!(err <= 1e-4, "{name}: prefill max-abs {err}");
    for t in 5..g.ids.len() {
        let l = pollster::block_on(m.forward(&gpu, Input::Ids(&g.ids[t..t + 1]), false)).unwrap();
        let err = max_abs(&l, &g.logits[t * g.vocab..(t + 1) * g.vocab]);
        assert!(
            err <= 1e-4,
            "{name}: decode step at position {t} max-abs {err}"
        );
    }
    assert_eq!(m.pos, g.ids.len());
}

#[test]
fn mha_untied_head_dim_64_single_safetensors() {
    check_f32("mha_untied_hd64");
}

#[test]
fn gqa_tied_head_dim_64_sharded_safetensors() {
    check_f32("gqa_tied_hd64");
}

#[test]
fn gqa_untied_head_dim_128_sharded_fp16_pytorch_bin() {
    check_f32("gqa_untied_hd128");
}

#[test]
fn mha_tied_head_dim_128_single_pytorch_bin() {
    check_f32("mha_tied_hd128");
}

/// Quantised weights stay close to the f32 reference (same argmax at most positions).
#[test]
fn quantized_formats_track_the_reference() {
    let gpu = gpu();
    let name = "gqa_tied_hd64";
    let g = golden(name);
    // (dtype, max-abs bound relative to the logit scale, minimum cosine similarity). Random
    // weights are the worst case for block quantisation; real-weight quality is measured by the
    // SmolLM2 top-1 agreement test.
    for (q, max_err, min_cos) in [
        (DType::F16, 2e-3, 0.99999),
        (DType::Q8, 2e-2, 0.9995),
        (DType::Q4, 0.35, 0.95),
    ] {
        let mut m = load(&gpu, name, q);
        let all = pollster::block_on(m.forward(&gpu, Input::Ids(&g.ids), true)).unwrap();
        let err = max_abs(&all, &g.logits);
        let scale = g.logits.iter().fold(0f32, |a, v| a.max(v.abs()));
        let dot: f64 = all
            .iter()
            .zip(&g.logits)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let na: f64 = all.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = g
            .logits
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let cos = dot / (na * nb);
        eprintln!("{name} {q}: max-abs {err}, cosine {cos}");
        assert!(
            err <= max_err * scale.max(1.0),
            "{name} {q}: max-abs {err} (logit scale {scale})"
        );
        assert!(cos >= min_cos, "{name} {q}: cosine similarity {cos}");
    }
}

#[test]
fn context_overflow_is_an_error() {
    let gpu = gpu();
    let (cfg, files) = LlamaFiles::open(&fixture("mha_untied_hd64")).unwrap();
    let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::F32), 8).unwrap();
    let e = pollster::block_on(m.forward(&gpu, Input::Ids(&[5; 9]), false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 8 tokens"), "{e}");
    let e = pollster::block_on(m.forward(&gpu, Input::Ids(&[100_000]), false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary size"), "{e}");
}

/// Decode steps on both sides of `ATTN_SPLIT` keys (one attention pass below it, split-K with
/// a combine pass above it; the recorded plan changes at the switch) give the logits of one
/// full forward over the same ids (f32 weights: the two differ only in summation order).
#[test]
fn decode_across_the_split_attention_threshold_matches_a_full_forward() {
    let gpu = gpu();
    let (mut cfg, files) = LlamaFiles::open(&fixture("mha_untied_hd64")).unwrap();
    let n = minigpt4::gpu::ATTN_SPLIT + 24;
    cfg.max_pos = n + 8; // rotary positions past the fixture's 64 are fine for a self-comparison
    let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::F32), n).unwrap();
    let ids: Vec<u32> = (0..n).map(|i| 3 + (i * 37 % 300) as u32).collect();
    let all = pollster::block_on(m.forward(&gpu, Input::Ids(&ids), true)).unwrap();
    let vocab = cfg.vocab;
    m.reset();
    let start = minigpt4::gpu::ATTN_SPLIT - 8;
    pollster::block_on(m.forward(&gpu, Input::Ids(&ids[..start]), false)).unwrap();
    for t in start..n {
        let l = pollster::block_on(m.forward(&gpu, Input::Ids(&ids[t..t + 1]), false)).unwrap();
        let err = max_abs(&l, &all[t * vocab..(t + 1) * vocab]);
        assert!(err <= 1e-4, "decode at position {t}: max-abs {err}");
    }
}

/// Sampling from the GPU's 64 top-k candidates gives exactly the tokens that sampling from the
/// full logits gives (same seeds, penalty, temperature, top-k, top-p), token after token.
#[test]
fn gpu_top_k_sampling_equals_host_sampling() {
    use minigpt4::chat::{Picker, Rng, Sampling};
    let gpu = gpu();
    let mut m = load(&gpu, "mha_untied_hd64", DType::Q8);
    let prompt: Vec<u32> = vec![1, 17, 200, 45, 3];
    let vocab = m.cfg.vocab;
    // (greedy with a penalty also takes the candidates: the penalty's argmax)
    for (seed, greedy, temperature, top_k, top_p, penalty) in [
        (1, false, 1.0, 50, 0.9, 1.05),
        (2, false, 0.7, 10, 1.0, 1.0),
        (3, false, 1.3, 63, 0.5, 1.3),
        (4, false, 1.0, 1, 1.0, 1.0),
        (5, true, 1.0, 0, 1.0, 1.3),
    ] {
        let s = Sampling {
            greedy,
            temperature,
            top_k,
            top_p,
            repetition_penalty: penalty,
            seed,
        };
        assert_eq!(Picker::for_sampling(&s), Picker::TopK);
        let mut runs = Vec::new();
        for picker in [Picker::TopK, Picker::Host] {
            m.reset();
            let mut rng = Rng::new(seed);
            let mut out: Vec<u32> = Vec::new();
            let mut input = prompt.clone();
            for _ in 0..24 {
                let id = pollster::block_on(picker.pick(
                    &gpu,
                    &mut m,
                    Input::Ids(&input),
                    &out,
                    vocab,
                    &s,
                    &mut rng,
                ))
                .unwrap();
                out.push(id);
                input = vec![id];
            }
            runs.push(out);
        }
        assert_eq!(runs[0], runs[1], "seed {seed}");
        if top_k > 1 || greedy {
            // the setting actually samples: not every token is the same
            assert!(runs[0].iter().any(|&t| t != runs[0][0]), "{:?}", runs[0]);
        }
    }
}

/// Sampled decoding on the GPU (`decode_sampled`: each token sampled among its candidates on
/// the GPU and fed to the next forward before it is read back) gives the tokens of sampling
/// each on the host (`Picker::TopK`, the same draws), submitting ahead or not, and stops where
/// it is told with the position where the plain loop leaves it. With a zero LM head every
/// logit ties, the candidates never decide, and every token is the host's turn (the forwards
/// submitted after it undone, its own run again for the full logits): the same tokens again.
#[test]
fn sampled_decode_ahead_equals_sampling_each_token_on_the_host() {
    use minigpt4::chat::{Picker, Rng, Sampling};
    use minigpt4::model::llama::Sampler;
    let gpu = gpu();
    // the fixture with its LM head zeroed, beside it in a temporary directory
    let zero = std::env::temp_dir().join(format!("minigpt4-zero-head-{}", std::process::id()));
    std::fs::create_dir_all(&zero).unwrap();
    let src = fixture("mha_untied_hd64");
    std::fs::copy(src.join("config.json"), zero.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "lm_head.weight" {
            data.fill(0);
        }
        tensors.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &zero.join("model.safetensors")).unwrap();
    let zero_model = {
        let (cfg, files) = LlamaFiles::open(&zero).unwrap();
        Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::Q8), 64).unwrap()
    };
    std::fs::remove_dir_all(&zero).unwrap();
    let prompt: Vec<u32> = vec![1, 17, 200, 45, 3];
    let cases = [
        (1, false, 1.0, 50, 0.9, 1.05),
        (2, false, 0.7, 10, 1.0, 1.0),
        (3, false, 1.3, 63, 0.5, 1.3),
        // greedy with a penalty: the penalty's argmax on the GPU (top-k 1, a draw of 0)
        (4, true, 1.0, 0, 1.0, 1.3),
    ];
    for (model, mut m) in [
        ("fixture", load(&gpu, "mha_untied_hd64", DType::Q8)),
        ("zero head", zero_model),
    ] {
        let vocab = m.cfg.vocab;
        for (seed, greedy, temperature, top_k, top_p, penalty) in cases {
            let s = Sampling {
                greedy,
                temperature,
                top_k,
                top_p,
                repetition_penalty: penalty,
                seed,
            };
            let first_pick = |m: &mut Llama, rng: &mut Rng| {
                pollster::block_on(Picker::TopK.pick(
                    &gpu,
                    m,
                    Input::Ids(&prompt),
                    &[],
                    vocab,
                    &s,
                    rng,
                ))
                .unwrap()
            };
            // the host's way: 1 + 16 tokens, and where each leaves the position
            m.reset();
            let mut rng = Rng::new(seed);
            let mut want = vec![first_pick(&mut m, &mut rng)];
            let mut pos = vec![m.pos];
            for _ in 0..16 {
                let last = *want.last().unwrap();
                let id = pollster::block_on(Picker::TopK.pick(
                    &gpu,
                    &mut m,
                    Input::Ids(&[last]),
                    &want,
                    vocab,
                    &s,
                    &mut rng,
                ))
                .unwrap();
                want.push(id);
                pos.push(m.pos);
            }
            let mut distinct = want.clone();
            distinct.sort();
            distinct.dedup();
            // (greedy on the zero head: every logit ties, always id 0)
            if !(greedy && model == "zero head") {
                assert!(distinct.len() >= 3, "{model}, seed {seed}: {want:?}");
            }
            for ahead in [true, false] {
                for stop_after in [2, 5, 16] {
                    m.reset();
                    let mut rng = Rng::new(seed);
                    let first = first_pick(&mut m, &mut rng);
                    assert_eq!(first, want[0]);
                    let mut draw = || rng.uniform();
                    let sampler = Sampler {
                        sampling: &s,
                        draw: &mut draw,
                    };
                    let mut got = vec![first];
                    pollster::block_on(m.decode_sampled(
                        &gpu,
                        first,
                        vocab,
                        16,
                        ahead,
                        &[first],
                        sampler,
                        |id| {
                            got.push(id);
                            got.len() <= stop_after
                        },
                    ))
                    .unwrap();
                    let what = format!("{model}, seed {seed}, ahead {ahead}, {stop_after} more");
                    assert_eq!(got, want[..=stop_after], "{what}");
                    // the last token picked is not run, as in the host's loop
                    assert_eq!(m.pos, pos[stop_after], "{what}");
                }
            }
        }
    }
}

/// Greedy decoding with each token submitted before the previous one is read back (its input
/// id read on the GPU) picks the tokens one `forward_argmax` after another picks, stops where
/// it is told with the forward submitted past the end undone, and leaves the model as the
/// plain loop leaves it: the next forward's logits are the same bits. The same without
/// submitting ahead.
#[test]
fn greedy_decode_ahead_equals_one_token_at_a_time() {
    let gpu = gpu();
    let mut m = load(&gpu, "gqa_untied_hd128", DType::Q4);
    let prompt = [1u32, 17, 200, 45, 3];
    let vocab = m.cfg.vocab;
    let argmax = |m: &mut Llama, ids: &[u32]| {
        pollster::block_on(m.forward_argmax(&gpu, Input::Ids(ids), vocab)).unwrap()
    };
    let first = argmax(&mut m, &prompt);
    let mut want = Vec::new();
    let mut tok = first;
    for _ in 0..12 {
        tok = argmax(&mut m, &[tok]);
        want.push(tok);
    }
    // a sequence that depends on each input (a stale or wrong input id would show)
    let mut distinct = want.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 4, "{want:?}");
    for ahead in [true, false] {
        for stop_after in [1, 2, 7, 12] {
            // the plain loop to the same place: the next forward's logits
            m.reset();
            let mut tok = argmax(&mut m, &prompt);
            for _ in 0..stop_after {
                tok = argmax(&mut m, &[tok]);
            }
            let (pos, next_tok) = (m.pos, tok);
            assert_eq!(tok, want[stop_after - 1]);
            let plain =
                pollster::block_on(m.forward(&gpu, Input::Ids(&[next_tok]), false)).unwrap();
            m.reset();
            assert_eq!(argmax(&mut m, &prompt), first);
            let mut got = Vec::new();
            pollster::block_on(m.decode_greedy(&gpu, first, vocab, 12, ahead, |id| {
                got.push(id);
                got.len() < stop_after
            }))
            .unwrap();
            assert_eq!(
                got,
                want[..stop_after],
                "ahead {ahead}, {stop_after} tokens"
            );
            assert_eq!(m.pos, pos, "ahead {ahead}, {stop_after} tokens");
            let l = pollster::block_on(m.forward(&gpu, Input::Ids(&[next_tok]), false)).unwrap();
            assert!(
                l.iter()
                    .zip(&plain)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "ahead {ahead}, {stop_after} tokens: max-abs {}",
                max_abs(&l, &plain)
            );
        }
    }
    // and a second decode after one that stopped early (its abandoned readback finished first)
    m.reset();
    argmax(&mut m, &prompt);
    let mut got = Vec::new();
    pollster::block_on(m.decode_greedy(&gpu, first, vocab, 12, true, |id| {
        got.push(id);
        got.len() < 3
    }))
    .unwrap();
    let mut more = Vec::new();
    pollster::block_on(m.decode_greedy(&gpu, got[2], vocab, 9, true, |id| {
        more.push(id);
        true
    }))
    .unwrap();
    got.extend(more);
    assert_eq!(got, want);
    // the context bound holds before anything is submitted
    let e = pollster::block_on(m.decode_greedy(&gpu, 5, vocab, 64, true, |_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
}

/// A device lost in the middle of generation (simulated with `destroy`) ends the request with
/// a clear error instead of a hang or a panic, and so does every later use.
#[test]
fn a_lost_device_is_an_error_not_a_hang() {
    let gpu = gpu();
    let mut m = load(&gpu, "mha_untied_hd64", DType::Q4);
    let first = pollster::block_on(m.forward_argmax(&gpu, Input::Ids(&[1, 2, 3]), 320)).unwrap();
    assert!(first < 320);
    gpu.device.destroy();
    let e = pollster::block_on(m.forward_argmax(&gpu, Input::Ids(&[first]), 320))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lost") && e.contains("reload"), "{e}");
    let e = pollster::block_on(m.decode_greedy(&gpu, first, 320, 4, true, |_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lost"), "{e}");
    let e = minigpt4::gpu::Tensor::zeros(&gpu, "after", &[4])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("lost"), "{e}");
    assert!(gpu.is_lost());
    // what the server does next: a new device, the model again, the same answer
    let fresh = pollster::block_on(gpu.reopen()).unwrap();
    let mut m = load(&fresh, "mha_untied_hd64", DType::Q4);
    let again = pollster::block_on(m.forward_argmax(&fresh, Input::Ids(&[1, 2, 3]), 320)).unwrap();
    assert_eq!(again, first);
}

/// Small weights' GEMM forms are tuned per shape on any device (`gemm_small_shapes`, set by
/// the tuning unless a form is pinned): `prepare` measures each layer matrix at the prefill
/// row counts the context holds (not the output head, which prefill runs on one row), and a prefill in those
/// forms gives the logits of the adapter-wide form. Without the switch nothing is tuned.
#[test]
fn small_weights_have_their_gemm_forms_tuned_per_shape() {
    use minigpt4::gpu::tune::{small_shapes_tuned, GEMM_PREFILL_ROWS};
    let name = "gqa_untied_hd128";
    let (cfg, files) = LlamaFiles::open(&fixture(name)).unwrap();
    let open = |small: bool| {
        let gpu = gpu();
        assert!(!gpu.gemm_by_shape());
        gpu.set_gemm_small_shapes(small);
        let m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::Q4), 64).unwrap();
        (gpu, m)
    };
    let (plain, mut m0) = open(false);
    let (tuned, mut m1) = open(true);
    // the bound: SmolLM2-135M's matrices are under it, a 7B's are not
    assert!(tuned.gemm_tuned_at(1536, 576) && tuned.gemm_tuned_at(576, 1536));
    assert!(!tuned.gemm_tuned_at(4096, 4096) && !plain.gemm_tuned_at(1536, 576));
    assert!(!small_shapes_tuned(None, Some(false)));
    assert!(!small_shapes_tuned(Some(16), None) && small_shapes_tuned(None, None));
    pollster::block_on(m0.prepare(&plain)).unwrap();
    pollster::block_on(m1.prepare(&tuned)).unwrap();
    // (the row counts the context holds: this fixture's is 64)
    let prefill_rows: Vec<usize> = GEMM_PREFILL_ROWS
        .into_iter()
        .filter(|&r| r <= m1.ctx)
        .collect();
    assert!(!prefill_rows.is_empty());
    for w in m1.decode_matrices() {
        for &rows in &prefill_rows {
            let head = w.rows() == m1.cfg.vocab;
            assert_eq!(
                tuned.has_gemm_form_at(rows, w.rows(), w.cols(), w.dtype),
                !head,
                "{rows} rows over {:?}",
                w.shape
            );
            assert!(!plain.has_gemm_form_at(rows, w.rows(), w.cols(), w.dtype));
        }
    }
    // the same logits: to f32 rounding where the forms that run on either side have f32
    // tiles (or are the untiled form), to f16 rounding where one of them is an f16 form (the
    // measurement may pick one for a shape, timing decides; the f16 forms' own accuracy is
    // checked against the CPU in the kernel tests). The LM head runs on the GEMV on both.
    let half = m1
        .decode_matrices()
        .iter()
        .filter(|w| w.rows() != m1.cfg.vocab)
        .any(|w| {
            prefill_rows.iter().any(|&rows| {
                let form = |g: &Gpu| g.gemm_form_at(rows, w.rows(), w.cols(), w.dtype);
                (form(&plain) | form(&tuned)) & minigpt4::gpu::GEMM_HALF != 0
            })
        });
    let tol = if half { 3e-2 } else { 1e-3 };
    let vocab = m1.cfg.vocab as u32;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % vocab).collect();
    let a = pollster::block_on(m0.forward(&plain, Input::Ids(&ids), true)).unwrap();
    let b = pollster::block_on(m1.forward(&tuned, Input::Ids(&ids), true)).unwrap();
    assert!(
        max_abs(&a, &b) < tol,
        "max-abs {} (f16 forms tuned: {half})",
        max_abs(&a, &b)
    );
}
