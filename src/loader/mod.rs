//! Weight file readers. Each reads its header up front (validating every tensor's byte range
//! against the file) and then one tensor at a time, so peak host memory is about one tensor.

pub mod gguf;
pub mod safetensors;
pub mod torch;

use crate::error::Result;

/// A set of named tensors (one file, or a sharded model directory), read one at a time as f32.
pub trait TensorSource {
    /// Where the tensors come from (for error messages).
    fn describe(&self) -> String;
    /// All tensor names.
    fn names(&self) -> Vec<String>;
    /// Shape of a tensor (PyTorch order), if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor's values converted to f32, row-major.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
}
