//! EVA ViT-g/14 as MiniGPT-4 uses it (spec §2): patch embedding (conv = im2col + matmul, with
//! bias), CLS token, learned position table, pre-LN blocks (LayerNorm eps 1e-6, fused qkv with
//! q and v biases but no k bias, exact-erf GELU MLP), then `ln_vision` (eps 1e-5).
//!
//! Weight names are MiniGPT-4's (`visual_encoder.*`, `ln_vision.*`); transformers' fused
//! `attn.qkv.bias` is accepted in place of `q_bias`/`v_bias`.

use crate::error::{Error, Result};
use crate::gpu::{AttnShape, Gpu, HeadView, Recorder, Tensor};
use crate::loader::TensorSource;
use crate::quant::DType;
use crate::weights::{Piece, Recipe, TensorMap, TensorSpec};

/// ViT hyper-parameters (ViT-g: width 1408, 39 layers, 16 heads, MLP 6144, patch 14).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    /// LayerNorm eps inside the blocks (1e-6).
    pub eps: f32,
    /// `ln_vision` eps (1e-5, PyTorch's default; spec §8.4).
    pub ln_vision_eps: f32,
}

impl VitConfig {
    /// EVA ViT-g as BLIP-2 / MiniGPT-4 use it, at 224 px (448 for MiniGPT-v2).
    pub fn eva_vit_g(image_size: usize) -> Self {
        VitConfig {
            image_size,
            patch: 14,
            width: 1408,
            layers: 39,
            heads: 16,
            mlp: 6144,
            eps: 1e-6,
            ln_vision_eps: 1e-5,
        }
    }
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    /// Tokens out: CLS + grid².
    pub fn tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch == 0
            || self.image_size == 0
            || self.width == 0
            || self.mlp == 0
            || !self.image_size.is_multiple_of(self.patch)
            || self.heads == 0
            || !self.width.is_multiple_of(self.heads)
            || self.head_dim() > 256
        {
            return Err(Error::InvalidOption {
                name: "vision config".into(),
                msg: format!("inconsistent dimensions: {self:?}"),
            });
        }
        // Sane maxima (EVA ViT-g at 448 px: 1408 wide, 39 layers, 1025 tokens), so that no
        // size derived from them overflows or asks for absurd memory.
        if self.image_size > 4096
            || self.width > 1 << 16
            || self.layers > 1024
            || self.mlp > 1 << 18
            || self.tokens() > 1 << 16
        {
            return Err(Error::InvalidOption {
                name: "vision config".into(),
                msg: format!(
                    "implausible dimensions (expected image_size <= 4096, width <= 65536, layers <= 1024, mlp <= 262144, at most 65536 tokens): {self:?}"
                ),
            });
        }
        Ok(())
    }
}

struct Block {
    norm1_w: Tensor,
    norm1_b: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    norm2_w: Tensor,
    norm2_b: Tensor,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
}

pub struct Vit {
    pub cfg: VitConfig,
    cls: Tensor,
    pos: Tensor,
    patch_w: Tensor,
    patch_b: Tensor,
    blocks: Vec<Block>,
    ln_w: Tensor,
    ln_b: Tensor,
}

impl Vit {
    /// The GPU tensors of the ViT and `ln_vision` and how each comes from the original
    /// checkpoint (MiniGPT-4 names; `ln_vision` is the identity when the checkpoint has none,
    /// spec §2.3). Linear weights are stored as `dtype`; the patch embedding (K = 3·p², not a
    /// multiple of 32) as f16 unless `dtype` is f32.
    pub fn specs(cfg: &VitConfig, dtype: DType) -> Result<Vec<TensorSpec>> {
        cfg.validate()?;
        let (w, t, m, p) = (cfg.width, cfg.tokens(), cfg.mlp, cfg.patch);
        let v = "visual_encoder.";
        let mut s = Vec::new();
        let vec = |name: String, n: usize| TensorSpec::copied(name, &[n], DType::F32);
        let mat =
            |name: String, rows: usize, cols: usize| TensorSpec::copied(name, &[rows, cols], dtype);
        s.push(TensorSpec::new(
            format!("{v}cls_token"),
            &[1, w],
            DType::F32,
            Recipe::copy(format!("{v}cls_token"), &[1, 1, w]),
        ));
        // A table for another grid (MiniGPT-v2 runs the 224-px table at 448 px) is resized
        // bicubically as MiniGPT-v2 does at load time (spec §2.1).
        s.push(TensorSpec::new(
            format!("{v}pos_embed"),
            &[t, w],
            DType::F32,
            Recipe::PosEmbed {
                name: format!("{v}pos_embed"),
                width: w,
                grid: cfg.grid(),
            },
        ));
        s.push(TensorSpec::new(
            format!("{v}patch_embed.proj.weight"),
            &[w, 3 * p * p],
            if dtype == DType::F32 {
                DType::F32
            } else {
                DType::F16
            },
            Recipe::copy(format!("{v}patch_embed.proj.weight"), &[w, 3, p, p]),
        ));
        s.push(vec(format!("{v}patch_embed.proj.bias"), w));
        for i in 0..cfg.layers {
            let b = format!("{v}blocks.{i}.");
            s.push(vec(format!("{b}norm1.weight"), w));
            s.push(vec(format!("{b}norm1.bias"), w));
            s.push(mat(format!("{b}attn.qkv.weight"), 3 * w, w));
            // transformers' fused bias, or MiniGPT-4's q and v biases around a zero k bias
            s.push(TensorSpec::new(
                format!("{b}attn.qkv.bias"),
                &[3 * w],
                DType::F32,
                Recipe::FirstOf(vec![
                    Recipe::copy(format!("{b}attn.qkv.bias"), &[3 * w]),
                    Recipe::Concat(vec![
                        Piece::tensor(format!("{b}attn.q_bias"), &[w]),
                        Piece::Fill { value: 0.0, n: w },
                        Piece::tensor(format!("{b}attn.v_bias"), &[w]),
                    ]),
                ]),
            ));
            s.push(mat(format!("{b}attn.proj.weight"), w, w));
            s.push(vec(format!("{b}attn.proj.bias"), w));
            s.push(vec(format!("{b}norm2.weight"), w));
            s.push(vec(format!("{b}norm2.bias"), w));
            s.push(mat(format!("{b}mlp.fc1.weight"), m, w));
            s.push(vec(format!("{b}mlp.fc1.bias"), m));
            s.push(mat(format!("{b}mlp.fc2.weight"), w, m));
            s.push(vec(format!("{b}mlp.fc2.bias"), w));
        }
        for (name, value) in [("ln_vision.weight", 1.0), ("ln_vision.bias", 0.0)] {
            s.push(TensorSpec::new(
                name,
                &[w],
                DType::F32,
                Recipe::FirstOf(vec![
                    Recipe::copy(name, &[w]),
                    Recipe::Concat(vec![Piece::Fill { value, n: w }]),
                ]),
            ));
        }
        Ok(s)
    }

    /// Builds the ViT from uploaded tensors (see [`Vit::specs`]).
    pub fn build(cfg: &VitConfig, t: &mut TensorMap) -> Result<Self> {
        cfg.validate()?;
        let (w, m, p) = (cfg.width, cfg.mlp, cfg.patch);
        let v = "visual_encoder.";
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let b = format!("{v}blocks.{i}.");
            blocks.push(Block {
                norm1_w: t.take(&format!("{b}norm1.weight"), &[w])?,
                norm1_b: t.take(&format!("{b}norm1.bias"), &[w])?,
                qkv_w: t.take(&format!("{b}attn.qkv.weight"), &[3 * w, w])?,
                qkv_b: t.take(&format!("{b}attn.qkv.bias"), &[3 * w])?,
                proj_w: t.take(&format!("{b}attn.proj.weight"), &[w, w])?,
                proj_b: t.take(&format!("{b}attn.proj.bias"), &[w])?,
                norm2_w: t.take(&format!("{b}norm2.weight"), &[w])?,
                norm2_b: t.take(&format!("{b}norm2.bias"), &[w])?,
                fc1_w: t.take(&format!("{b}mlp.fc1.weight"), &[m, w])?,
                fc1_b: t.take(&format!("{b}mlp.fc1.bias"), &[m])?,
                fc2_w: t.take(&format!("{b}mlp.fc2.weight"), &[w, m])?,
                fc2_b: t.take(&format!("{b}mlp.fc2.bias"), &[w])?,
            });
        }
        Ok(Vit {
            cfg: cfg.clone(),
            cls: t.take(&format!("{v}cls_token"), &[1, w])?,
            pos: t.take(&format!("{v}pos_embed"), &[cfg.tokens(), w])?,
            patch_w: t.take(&format!("{v}patch_embed.proj.weight"), &[w, 3 * p * p])?,
            patch_b: t.take(&format!("{v}patch_embed.proj.bias"), &[w])?,
            blocks,
            ln_w: t.take("ln_vision.weight", &[w])?,
            ln_b: t.take("ln_vision.bias", &[w])?,
        })
    }

    /// Loads the ViT and `ln_vision` from the original checkpoint tensors.
    pub fn load(gpu: &Gpu, cfg: &VitConfig, src: &dyn TensorSource, dtype: DType) -> Result<Self> {
        let specs = Self::specs(cfg, dtype)?;
        Self::build(cfg, &mut TensorMap::upload(gpu, &specs, src)?)
    }

    /// Records the encoder for one preprocessed image `[3, S, S]`; returns the `ln_vision`
    /// output `[tokens, width]`. With `taps`, the residual stream after each block is also
    /// copied out (for golden tests).
    pub fn record(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        pixels: &Tensor,
        taps: Option<&[Tensor]>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (s, w, t, g, p) = (c.image_size, c.width, c.tokens(), c.grid(), c.patch);
        pixels.expect(Some(DType::F32), &[3, s, s])?;
        let cols = Tensor::zeros(gpu, "patches", &[g * g, 3 * p * p])?;
        let tok = Tensor::zeros(gpu, "patch_tokens", &[g * g, w])?;
        let x = Tensor::zeros(gpu, "vit_x", &[t, w])?;
        let h = Tensor::zeros(gpu, "vit_h", &[t, w])?;
        let qkv = Tensor::zeros(gpu, "vit_qkv", &[t, 3 * w])?;
        let attn = Tensor::zeros(gpu, "vit_attn", &[t, w])?;
        let mlp = Tensor::zeros(gpu, "vit_mlp", &[t, c.mlp])?;
        let out = Tensor::zeros(gpu, "image_embeds", &[t, w])?;
        rec.im2col(pixels, p, &cols)?;
        rec.matmul(&cols, &self.patch_w, Some(&self.patch_b), &tok, false)?;
        rec.copy_rows(&self.cls, 0, w, &x, 0, w, 1, w)?;
        rec.copy_rows(&tok, 0, w, &x, w, w, g * g, w)?;
        rec.add(&x, &self.pos)?;
        let shape = AttnShape {
            t,
            s: t,
            heads: c.heads,
            kv_heads: c.heads,
            head_dim: c.head_dim(),
            causal: false,
            scale: (c.head_dim() as f32).powf(-0.5),
        };
        for (i, b) in self.blocks.iter().enumerate() {
            rec.layer_norm(&x, &b.norm1_w, &b.norm1_b, c.eps, &h)?;
            rec.matmul(&h, &b.qkv_w, Some(&b.qkv_b), &qkv, false)?;
            rec.attention(
                HeadView::rows(&qkv, 0, 3 * w),
                HeadView::rows(&qkv, w, 3 * w),
                HeadView::rows(&qkv, 2 * w, 3 * w),
                HeadView::whole(&attn),
                shape,
            )?;
            rec.matmul(&attn, &b.proj_w, Some(&b.proj_b), &x, true)?;
            rec.layer_norm(&x, &b.norm2_w, &b.norm2_b, c.eps, &h)?;
            rec.matmul(&h, &b.fc1_w, Some(&b.fc1_b), &mlp, false)?;
            rec.gelu(&mlp)?;
            rec.matmul(&mlp, &b.fc2_w, Some(&b.fc2_b), &x, true)?;
            if let Some(taps) = taps {
                if let Some(tap) = taps.get(i) {
                    rec.copy_rows(&x, 0, w, tap, 0, w, t, w)?;
                }
            }
        }
        rec.layer_norm(&x, &self.ln_w, &self.ln_b, c.ln_vision_eps, &out)?;
        Ok(out)
    }
}

/// PyTorch's bicubic kernel (A = −0.75) weights for fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Source index and fraction for output `o` (align_corners = false). The index may fall
/// outside the grid; the taps are clamped to the edge when read (as PyTorch's bicubic does).
fn source_index(o: usize, in_size: usize, out_size: usize) -> (isize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let real = scale * (o as f32 + 0.5) - 0.5;
    let idx = real.floor();
    (idx as isize, real - idx)
}

/// MiniGPT-v2's position-table resize (spec §2.1): the `old × old` grid part of
/// `pos [1 + old², width]` is resized to `new × new` with `F.interpolate(mode='bicubic',
/// align_corners=False)` (A = −0.75, edges clamped); the CLS row is kept as is.
pub fn interpolate_pos_embed(
    pos: &[f32],
    width: usize,
    old: usize,
    new: usize,
) -> Result<Vec<f32>> {
    if pos.len() != (1 + old * old) * width {
        return Err(Error::tensor(
            "pos_embed",
            format!("[{}, {width}] for a {old}x{old} grid", 1 + old * old),
            format!("{} values", pos.len()),
        ));
    }
    let mut out = Vec::with_capacity((1 + new * new) * width);
    out.extend_from_slice(&pos[..width]);
    let grid = &pos[width..];
    let at = |y: isize, x: isize, c: usize| -> f32 {
        let y = y.clamp(0, old as isize - 1) as usize;
        let x = x.clamp(0, old as isize - 1) as usize;
        grid[(y * old + x) * width + c]
    };
    for oy in 0..new {
        let (iy, ty) = source_index(oy, old, new);
        let wy = cubic_weights(ty);
        for ox in 0..new {
            let (ix, tx) = source_index(ox, old, new);
            let wx = cubic_weights(tx);
            for c in 0..width {
                let mut acc = 0f32;
                for (j, wyj) in wy.iter().enumerate() {
                    let y = iy - 1 + j as isize;
                    let row = wx[0] * at(y, ix - 1, c)
                        + wx[1] * at(y, ix, c)
                        + wx[2] * at(y, ix + 1, c)
                        + wx[3] * at(y, ix + 2, c);
                    acc += wyj * row;
                }
                out.push(acc);
            }
        }
    }
    Ok(out)
}
