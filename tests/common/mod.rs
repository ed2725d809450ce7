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
