//! minigpt4-wgpu: MiniGPT-4 (EVA ViT-g → Q-Former → projection → Vicuna) on any GPU through
//! wgpu, natively (Vulkan, Metal, DX12, GL) and in the browser (WebGPU).
//!
//! Layers, bottom up: [`quant`] (weight formats, CPU side), [`gpu`] (device, tensors, WGSL
//! kernels, recorder), [`cpu`] (plain reference implementations the kernels are tested against).

pub mod chat;
pub mod cpu;
pub mod error;
pub mod gpu;
pub mod image;
pub mod loader;
pub mod model;
pub mod quant;
pub mod tokenizer;

pub use error::{Error, Result};
