//! The tensors a model keeps on the GPU, described before any of them exists.
//!
//! Every stage lists its GPU tensors as [`TensorSpec`]s: the name (the model-package name, see
//! [`crate::package`]), the shape and format on the GPU, and a [`Recipe`] saying how the tensor
//! is derived from the original checkpoints (fused Q/K/V, the ViT's q/v biases with a zero k
//! bias, the resized position table, ...). The same list drives three things:
//! - loading from the original files: each recipe is run, encoded and uploaded;
//! - conversion to a package: each recipe is run, encoded and written to a shard;
//! - loading a package: each tensor is allocated, validated against the files and filled.
//!
//! Stages are then built from a [`TensorMap`] holding the uploaded tensors by name.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::tensor::UNIFORM_X_BYTES;
use crate::gpu::{Gpu, Tensor};
use crate::loader::TensorSource;
use crate::quant::{self, DType, Encoded};

/// One piece of a derived tensor: a source tensor of a given shape (leading dimensions of size
/// one ignored), or `n` copies of a constant.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Tensor {
        name: String,
        shape: Vec<usize>,
    },
    Fill {
        value: f32,
        n: usize,
    },
    /// `W + (alpha / r) · B·A`, a merged LoRA adapter (spec §5): W `[n, k]`, A `[r, k]`,
    /// B `[n, r]`, the rank `r` read from A. The first of `adapters` (A name, B name) whose
    /// tensors exist is used (peft ≥ 0.3 inserts `.default` into the names).
    Lora {
        base: String,
        adapters: Vec<(String, String)>,
        alpha: f32,
        n: usize,
        k: usize,
    },
}

impl Piece {
    pub fn tensor(name: impl Into<String>, shape: &[usize]) -> Self {
        Piece::Tensor {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// How a GPU tensor is made from the original checkpoint tensors.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    /// The pieces' values one after the other (rows stacked for matrices of equal width).
    Concat(Vec<Piece>),
    /// The first alternative whose source tensors are all present.
    FirstOf(Vec<Recipe>),
    /// A ViT position table `[1, 1 + g², width]` for any grid `g`, resized bicubically to the
    /// target grid when `g` differs (spec §2.1).
    PosEmbed {
        name: String,
        width: usize,
        grid: usize,
    },
}

impl Recipe {
    /// One source tensor as it is.
    pub fn copy(name: impl Into<String>, shape: &[usize]) -> Self {
        Recipe::Concat(vec![Piece::tensor(name, shape)])
    }

    /// Source tensors of shape `[rows, cols]` stacked by rows.
    pub fn stack(names: &[String], rows: usize, cols: usize) -> Self {
        Recipe::Concat(
            names
                .iter()
                .map(|n| Piece::tensor(n.clone(), &[rows, cols]))
                .collect(),
        )
    }

    /// The source tensors this recipe reads (every alternative's).
    pub fn sources(&self) -> Vec<String> {
        match self {
            Recipe::Concat(p) => p
                .iter()
                .flat_map(|p| match p {
                    Piece::Tensor { name, .. } => vec![name.clone()],
                    Piece::Fill { .. } => vec![],
                    Piece::Lora { base, .. } => vec![base.clone()],
                })
                .collect(),
            Recipe::FirstOf(v) => v.iter().flat_map(|r| r.sources()).collect(),
            Recipe::PosEmbed { name, .. } => vec![name.clone()],
        }
    }

    fn available(&self, src: &dyn TensorSource) -> bool {
        match self {
            Recipe::FirstOf(v) => v.iter().any(|r| r.available(src)),
            r => r.sources().iter().all(|n| src.shape(n).is_some()),
        }
    }

    /// The alternative that will be used (self unless `FirstOf`), or the last one so that its
    /// missing tensor is what an error names.
    fn resolve<'a>(&'a self, src: &dyn TensorSource) -> &'a Recipe {
        match self {
            Recipe::FirstOf(v) => v
                .iter()
                .find(|r| r.available(src))
                .or(v.last())
                .map(|r| r.resolve(src))
                .unwrap_or(self),
            r => r,
        }
    }

    /// Checks that every source tensor exists with the expected shape, without reading data.
    pub fn check(&self, src: &dyn TensorSource) -> Result<()> {
        match self.resolve(src) {
            Recipe::Concat(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Tensor { name, shape } => check_shape(src, name, shape)?,
                        Piece::Lora { .. } => {
                            lora_parts(p, src)?;
                        }
                        Piece::Fill { .. } => {}
                    }
                }
                Ok(())
            }
            Recipe::PosEmbed { name, width, .. } => pos_grid(src, name, *width).map(|_| ()),
            Recipe::FirstOf(_) => Err(Error::format(
                src.describe(),
                "an empty list of alternatives",
            )),
        }
    }

    /// Runs the recipe: the tensor's values, row-major, as f32.
    pub fn run(&self, src: &dyn TensorSource) -> Result<Vec<f32>> {
        match self.resolve(src) {
            Recipe::Concat(pieces) => {
                if let [Piece::Tensor { name, shape }] = pieces.as_slice() {
                    // one source tensor: no copy
                    check_shape(src, name, shape)?;
                    return src.read_f32(name);
                }
                let mut out = Vec::new();
                for p in pieces {
                    match p {
                        Piece::Tensor { name, shape } => {
                            check_shape(src, name, shape)?;
                            out.extend(src.read_f32(name)?);
                        }
                        Piece::Fill { value, n } => out.extend(std::iter::repeat_n(*value, *n)),
                        Piece::Lora { .. } => out.extend(run_lora(p, src)?),
                    }
                }
                Ok(out)
            }
            Recipe::PosEmbed { name, width, grid } => {
                let old = pos_grid(src, name, *width)?;
                let x = src.read_f32(name)?;
                if old == *grid {
                    Ok(x)
                } else {
                    crate::model::vit::interpolate_pos_embed(&x, *width, old, *grid)
                }
            }
            Recipe::FirstOf(_) => Err(Error::format(
                src.describe(),
                "an empty list of alternatives",
            )),
        }
    }
}

/// The adapter names and rank of a LoRA piece, checked against the source.
fn lora_parts<'a>(p: &'a Piece, src: &dyn TensorSource) -> Result<(&'a str, &'a str, usize)> {
    let Piece::Lora {
        base,
        adapters,
        n,
        k,
        ..
    } = p
    else {
        return Err(Error::Gpu("not a LoRA piece".into()));
    };
    check_shape(src, base, &[*n, *k])?;
    let (a, b) = adapters
        .iter()
        .find(|(a, b)| src.shape(a).is_some() && src.shape(b).is_some())
        .ok_or_else(|| {
            Error::tensor(
                adapters.first().map(|x| x.0.as_str()).unwrap_or(base),
                format!(
                    "a LoRA adapter for `{base}` in {} (MiniGPT-v2's checkpoint holds one for every q_proj and v_proj)",
                    src.describe()
                ),
                "missing",
            )
        })?;
    let r = src
        .shape(a)
        .and_then(|s| s.first().copied())
        .filter(|&r| r > 0)
        .ok_or_else(|| Error::tensor(a, "a LoRA A matrix [r, k]", "an empty tensor"))?;
    check_shape(src, a, &[r, *k])?;
    check_shape(src, b, &[*n, r])?;
    Ok((a, b, r))
}

/// `W + (alpha / r) · B·A`.
fn run_lora(p: &Piece, src: &dyn TensorSource) -> Result<Vec<f32>> {
    let (a, b, r) = lora_parts(p, src)?;
    let Piece::Lora {
        base, alpha, n, k, ..
    } = p
    else {
        return Err(Error::Gpu("not a LoRA piece".into()));
    };
    let (n, k) = (*n, *k);
    let scale = alpha / r as f32;
    let mut w = src.read_f32(base)?;
    let a = src.read_f32(a)?;
    let b = src.read_f32(b)?;
    for i in 0..n {
        let row = &mut w[i * k..(i + 1) * k];
        for j in 0..r {
            let c = scale * b[i * r + j];
            if c != 0.0 {
                for (x, y) in row.iter_mut().zip(&a[j * k..(j + 1) * k]) {
                    *x += c * y;
                }
            }
        }
    }
    Ok(w)
}

/// `name`'s shape must equal `shape` up to leading dimensions of size one.
pub fn check_shape(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<()> {
    let found = src.shape(name).ok_or_else(|| {
        Error::tensor(
            name,
            format!("present with shape {shape:?} in {}", src.describe()),
            "missing",
        )
    })?;
    let squeeze = |s: &[usize]| {
        s.iter()
            .copied()
            .skip_while(|&d| d == 1)
            .collect::<Vec<_>>()
    };
    if squeeze(&found) != squeeze(shape) {
        return Err(Error::tensor(
            name,
            format!("shape {shape:?} in {}", src.describe()),
            format!("{found:?}"),
        ));
    }
    Ok(())
}

/// The grid of a position table `[1, 1 + g², width]`.
fn pos_grid(src: &dyn TensorSource, name: &str, width: usize) -> Result<usize> {
    let found = src
        .shape(name)
        .ok_or_else(|| Error::tensor(name, format!("present in {}", src.describe()), "missing"))?;
    let rows = found.iter().rev().nth(1).copied().unwrap_or(0);
    let g = ((rows.max(1) - 1) as f64).sqrt().round() as usize;
    if found.last() != Some(&width) || rows < 2 || 1 + g * g != rows {
        return Err(Error::tensor(
            name,
            format!(
                "a position table [1, 1 + g², {width}] in {}",
                src.describe()
            ),
            format!("{found:?}"),
        ));
    }
    Ok(g)
}

/// One GPU tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub recipe: Recipe,
    /// An f32 vector a kernel binds as a uniform (an RMSNorm's weights, fused into the GEMV
    /// that follows it): allocated at least [`UNIFORM_X_BYTES`] like an activation.
    pub uniform: bool,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType, recipe: Recipe) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            recipe,
            uniform: false,
        }
    }

    /// This spec with [`TensorSpec::uniform`] set.
    pub fn bound_as_uniform(self) -> Self {
        TensorSpec {
            uniform: true,
            ..self
        }
    }

    /// Whether this tensor gets a padded buffer: [`TensorSpec::uniform`] (which only f32 uses).
    fn padded(&self) -> bool {
        self.uniform && self.dtype == DType::F32
    }

    /// An empty GPU tensor for this spec (padded as [`TensorSpec::uniform`] asks).
    pub fn allocate(&self, gpu: &Gpu) -> Result<Tensor> {
        if self.padded() {
            Tensor::zeros(gpu, &self.name, &self.shape)
        } else {
            Tensor::empty(gpu, &self.name, &self.shape, self.dtype)
        }
    }

    /// GPU bytes of this tensor once allocated.
    pub fn gpu_bytes(&self) -> u64 {
        let b = self.dtype.bytes(self.shape.iter().product()) as u64;
        match self.padded() {
            true => b.max(UNIFORM_X_BYTES),
            false => b,
        }
    }

    /// A GPU tensor that is the source tensor of the same name, as it is.
    pub fn copied(name: impl Into<String>, shape: &[usize], dtype: DType) -> Self {
        let name = name.into();
        TensorSpec::new(name.clone(), shape, dtype, Recipe::copy(name, shape))
    }

    /// Whether a stored tensor of `dtype` may stand for this one: a 4-bit layer may be `q4` or
    /// `q4m` (GGUF Q4_1 / Q4_K sources convert to `q4m` without requantising).
    pub fn accepts(&self, dtype: DType) -> bool {
        dtype == self.dtype || (self.dtype == DType::Q4 && dtype == DType::Q4M)
    }

    /// Runs the recipe and encodes the result. A 4-bit tensor whose sources all convert to
    /// `q4m` without loss (see [`TensorSource::read_q4m`]) is taken that way.
    pub fn produce(&self, src: &dyn TensorSource) -> Result<Encoded> {
        let cols = *self.shape.last().unwrap_or(&1);
        if matches!(self.dtype, DType::Q4 | DType::Q4M) {
            if let Recipe::Concat(pieces) = &self.recipe {
                let mut all = Encoded {
                    dtype: DType::Q4M,
                    data: vec![],
                    scales: vec![],
                };
                let mut lossless = !pieces.is_empty();
                for p in pieces {
                    match p {
                        Piece::Tensor { name, shape } if lossless => {
                            check_shape(src, name, shape)?;
                            match src.read_q4m(name)? {
                                Some(e) => {
                                    all.data.extend(e.data);
                                    all.scales.extend(e.scales);
                                }
                                None => lossless = false,
                            }
                        }
                        _ => lossless = false,
                    }
                }
                if lossless {
                    return Ok(all);
                }
            }
        }
        let x = self.recipe.run(src)?;
        let n: usize = self.shape.iter().product();
        if x.len() != n {
            return Err(Error::tensor(
                &self.name,
                format!("{n} values for shape {:?}", self.shape),
                x.len(),
            ));
        }
        self.dtype.check_cols(&self.name, cols)?;
        if self.dtype == DType::F32 {
            // in place: the f32 layout is the values' bits
            return Ok(Encoded {
                dtype: DType::F32,
                data: x.into_iter().map(f32::to_bits).collect(),
                scales: vec![],
            });
        }
        quant::encode(self.dtype, &x, cols)
    }
}

/// Checks every spec's sources (presence and shape) before anything is read or uploaded.
pub fn check_sources(specs: &[TensorSpec], src: &dyn TensorSource) -> Result<()> {
    for s in specs {
        s.recipe.check(src)?;
    }
    Ok(())
}

/// Uploaded tensors by name, taken out one by one as a model is built.
#[derive(Default)]
pub struct TensorMap {
    map: HashMap<String, Tensor>,
}

impl TensorMap {
    pub fn insert(&mut self, t: Tensor) {
        self.map.insert(t.name.clone(), t);
    }

    /// Removes `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| Error::tensor(name, "a loaded tensor", "missing"))?;
        if t.shape != shape {
            return Err(Error::tensor(
                name,
                format!("shape {shape:?}"),
                format!("{:?}", t.shape),
            ));
        }
        Ok(t)
    }

    /// Uploads every spec from the original checkpoints (all sources checked first).
    pub fn upload(gpu: &Gpu, specs: &[TensorSpec], src: &dyn TensorSource) -> Result<Self> {
        check_sources(specs, src)?;
        let mut m = TensorMap::default();
        for s in specs {
            let enc = s.produce(src)?;
            let t = if s.padded() && enc.dtype == DType::F32 {
                // allocated as the package loader allocates it, then written
                let t = s.allocate(gpu)?;
                t.write_f32(gpu, bytemuck::cast_slice(&enc.data))?;
                t
            } else {
                Tensor::upload_encoded(gpu, &s.name, &s.shape, &enc)?
            };
            m.insert(t);
        }
        Ok(m)
    }
}
