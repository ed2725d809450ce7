//! Model stages, one file each.

pub mod llama;
pub mod minigpt4;
pub mod qformer;
pub mod vit;
