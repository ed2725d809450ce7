//! Helpers shared by the GPU tests.
#![allow(dead_code)]

use minigpt4::gpu::{Gpu, GpuOptions};

/// Opens the adapter chosen by the environment (MINIGPT4_BACKEND / WGPU_BACKEND,
/// MINIGPT4_ADAPTER). Fails — never skips — when there is none: CI installs lavapipe.
pub fn gpu() -> Gpu {
    gpu_with(GpuOptions::default())
}

pub fn gpu_with(opts: GpuOptions) -> Gpu {
    let opts = opts.merged_with_env().expect("GPU options");
    match pollster::block_on(Gpu::new(&opts)) {
        Ok(g) => g,
        Err(e) => panic!("these tests need a GPU adapter (lavapipe will do): {e}"),
    }
}

/// A file or directory under tests/fixtures.
pub fn fixture(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// A fresh, unique temporary path (not created) for a test to write to.
pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "minigpt4-test-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Deterministic xorshift generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u32() as f64 / 2f64.powi(31) - 1.0) as f32
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

/// Asserts |a - b| <= abs + rel·|b| element-wise, reporting the worst element.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (abs + rel * w.abs());
        if g.is_nan() || excess.is_nan() || excess > worst.1 {
            worst = (i, if g.is_nan() { f32::INFINITY } else { excess });
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i}: got {}, want {} (tolerance {abs} + {rel}·|want|)",
            got[i], want[i]
        );
    }
}

/// A JSON number as usize (fixtures only).
pub fn json_usize(v: &serde_json::Value) -> usize {
    v.as_u64().expect("a non-negative integer") as usize
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| json_usize(x) as u32)
        .collect()
}

/// The ViT configuration of a vision fixture's `config.json` (HF names under `vision`).
pub fn vit_config(c: &serde_json::Value) -> minigpt4::model::vit::VitConfig {
    let v = &c["vision"];
    minigpt4::model::vit::VitConfig {
        image_size: json_usize(&v["image_size"]),
        patch: json_usize(&v["patch_size"]),
        width: json_usize(&v["hidden_size"]),
        layers: json_usize(&v["num_hidden_layers"]),
        heads: json_usize(&v["num_attention_heads"]),
        mlp: json_usize(&v["intermediate_size"]),
        eps: v["layer_norm_eps"].as_f64().expect("eps") as f32,
        ln_vision_eps: c["ln_vision_eps"].as_f64().expect("ln_vision_eps") as f32,
    }
}

/// The Q-Former configuration of a fixture's `config.json` (HF names under `qformer`).
pub fn qformer_config(q: &serde_json::Value) -> minigpt4::model::qformer::QFormerConfig {
    minigpt4::model::qformer::QFormerConfig {
        hidden: json_usize(&q["hidden_size"]),
        layers: json_usize(&q["num_hidden_layers"]),
        heads: json_usize(&q["num_attention_heads"]),
        intermediate: json_usize(&q["intermediate_size"]),
        queries: json_usize(&q["num_query_tokens"]),
        encoder_width: json_usize(&q["encoder_hidden_size"]),
        cross_every: json_usize(&q["cross_attention_frequency"]),
        eps: q["layer_norm_eps"].as_f64().expect("eps") as f32,
    }
}
