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
    /// The tensor as `q4m` blocks converted without requantising, when the file stores it in
    /// a 4-bit format that allows it (GGUF Q4_1, Q4_K); `None` otherwise.
    fn read_q4m(&self, _name: &str) -> Result<Option<crate::quant::Encoded>> {
        Ok(None)
    }
}

/// Another source seen through a renaming: names for which `skip` is true are hidden, and
/// `prefix` is put in front of the others (e.g. `eva_vit_g.pth`, whose keys lack MiniGPT-4's
/// `visual_encoder.` prefix).
pub struct Renamed {
    pub inner: Box<dyn TensorSource>,
    pub prefix: String,
    pub skip: fn(&str) -> bool,
}

impl Renamed {
    fn inner_name<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())
            .filter(|n| !(self.skip)(n))
    }
}

impl TensorSource for Renamed {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn names(&self) -> Vec<String> {
        self.inner
            .names()
            .into_iter()
            .filter(|n| !(self.skip)(n))
            .map(|n| format!("{}{n}", self.prefix))
            .collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner_name(name).and_then(|n| self.inner.shape(n))
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self.inner_name(name) {
            Some(n) => self.inner.read_f32(n),
            None => Err(crate::error::Error::tensor(
                name,
                format!("present in {}", self.describe()),
                "missing",
            )),
        }
    }
    fn read_q4m(&self, name: &str) -> Result<Option<crate::quant::Encoded>> {
        match self.inner_name(name) {
            Some(n) => self.inner.read_q4m(n),
            None => Ok(None),
        }
    }
}

/// Opens a weights file by its contents: safetensors, or a PyTorch checkpoint (`.pth`, `.bin`).
pub fn open_weights(path: &std::path::Path) -> Result<Box<dyn TensorSource>> {
    let p = path.display().to_string();
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| crate::error::Error::io(&p, e))?;
        let _ = f
            .read(&mut head)
            .map_err(|e| crate::error::Error::io(&p, e))?;
    }
    if &head[..2] == b"PK" || head[0] == 0x80 {
        Ok(Box::new(torch::TorchCheckpoint::open(path)?))
    } else {
        Ok(Box::new(safetensors::SafetensorsFile::open(path)?))
    }
}
