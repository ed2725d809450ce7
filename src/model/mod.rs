//! Model stages, one file each.

pub mod llama;
