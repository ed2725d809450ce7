//! minigpt4-wgpu: MiniGPT-4 (EVA ViT-g → Q-Former → projection → Vicuna) on any GPU through
//! wgpu, natively (Vulkan, Metal, DX12, GL) and in the browser (WebGPU).
//!
//! Layers, bottom up: [`quant`] (weight formats, CPU side), [`gpu`] (device, tensors, WGSL
//! kernels, recorder), [`cpu`] (plain reference implementations the kernels are tested against).

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod chat;
#[cfg(not(target_arch = "wasm32"))]
pub mod convert;
pub mod cpu;
#[cfg(not(target_arch = "wasm32"))]
pub mod download;
pub mod error;
pub mod gpu;
pub mod image;
pub mod jpeg;
pub mod loader;
pub mod model;
pub mod package;
pub mod quant;
#[cfg(not(target_arch = "wasm32"))]
pub mod server;
pub mod synthetic;
pub mod tokenizer;
#[cfg(target_arch = "wasm32")]
pub mod wasm;
pub mod weights;

pub use error::{Error, Result};
