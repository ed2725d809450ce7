//! Model stages, one file each.

pub mod llama;
pub mod qformer;
pub mod vit;
