//! The BLIP-2 Q-Former as MiniGPT-4 runs it (spec §3): learned query tokens through the
//! embedding LayerNorm, then post-LN BERT layers — self-attention over the queries,
//! cross-attention to the image tokens on even layers, the `*_query` feed-forward — LayerNorm
//! eps 1e-12 computed in f32; then `llama_proj`.

use crate::error::{Error, Result};
use crate::gpu::{AttnShape, Gpu, HeadView, Recorder, Tensor};
use crate::loader::TensorSource;
use crate::quant::DType;
use crate::weights::{Piece, Recipe, TensorMap, TensorSpec};

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct QFormerConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub queries: usize,
    /// Width of the image tokens (the ViT width).
    pub encoder_width: usize,
    pub cross_every: usize,
    pub eps: f32,
}

impl QFormerConfig {
    /// BERT-base with cross-attention every other layer, 32 queries, ViT-g image tokens.
    pub fn blip2() -> Self {
        QFormerConfig {
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            queries: 32,
            encoder_width: 1408,
            cross_every: 2,
            eps: 1e-12,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn validate(&self) -> Result<()> {
        if self.heads == 0
            || self.hidden == 0
            || self.queries == 0
            || self.intermediate == 0
            || !self.hidden.is_multiple_of(self.heads)
            || self.cross_every == 0
            || self.head_dim() > 256
        {
            return Err(Error::InvalidOption {
                name: "Q-Former config".into(),
                msg: format!("inconsistent dimensions: {self:?}"),
            });
        }
        // Sane maxima (BLIP-2: 768 wide, 12 layers, 32 queries), so that no size derived from
        // them overflows or asks for absurd memory.
        if self.hidden > 1 << 16
            || self.layers > 1024
            || self.intermediate > 1 << 18
            || self.queries > 1 << 12
            || self.encoder_width > 1 << 16
        {
            return Err(Error::InvalidOption {
                name: "Q-Former config".into(),
                msg: format!(
                    "implausible dimensions (expected hidden <= 65536, layers <= 1024, intermediate <= 262144, queries <= 4096, encoder_width <= 65536): {self:?}"
                ),
            });
        }
        Ok(())
    }
}

struct Attn {
    qkv_w: Option<Tensor>,
    qkv_b: Option<Tensor>,
    q_w: Option<Tensor>,
    q_b: Option<Tensor>,
    kv_w: Option<Tensor>,
    kv_b: Option<Tensor>,
    out_w: Tensor,
    out_b: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
}

struct QLayer {
    self_attn: Attn,
    cross: Option<Attn>,
    inter_w: Tensor,
    inter_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
}

pub struct QFormer {
    pub cfg: QFormerConfig,
    queries: Tensor,
    emb_ln_w: Tensor,
    emb_ln_b: Tensor,
    layers: Vec<QLayer>,
}

impl QFormer {
    /// The GPU tensors and how each comes from the BLIP-2 checkpoint: the query, key and value
    /// projections of self-attention are fused into one matrix, key and value of
    /// cross-attention into another.
    pub fn specs(cfg: &QFormerConfig, dtype: DType) -> Result<Vec<TensorSpec>> {
        cfg.validate()?;
        let (d, e, f) = (cfg.hidden, cfg.encoder_width, cfg.intermediate);
        let mut s = Vec::new();
        let vec = |name: String, n: usize| TensorSpec::copied(name, &[n], DType::F32);
        let mat =
            |name: String, rows: usize, cols: usize| TensorSpec::copied(name, &[rows, cols], dtype);
        s.push(TensorSpec::new(
            "query_tokens",
            &[cfg.queries, d],
            DType::F32,
            Recipe::copy("query_tokens", &[1, cfg.queries, d]),
        ));
        let p = "Qformer.bert.";
        s.push(vec(format!("{p}embeddings.LayerNorm.weight"), d));
        s.push(vec(format!("{p}embeddings.LayerNorm.bias"), d));
        for i in 0..cfg.layers {
            let l = format!("{p}encoder.layer.{i}.");
            let names = |kind: &str, parts: &[&str], suffix: &str| -> Vec<String> {
                parts
                    .iter()
                    .map(|x| format!("{l}{kind}.self.{x}.{suffix}"))
                    .collect()
            };
            let fused = |s: &mut Vec<TensorSpec>, kind: &str, parts: &[&str], out: &str, cols| {
                let n = parts.len();
                s.push(TensorSpec::new(
                    format!("{l}{kind}.{out}.weight"),
                    &[n * d, cols],
                    dtype,
                    Recipe::stack(&names(kind, parts, "weight"), d, cols),
                ));
                s.push(TensorSpec::new(
                    format!("{l}{kind}.{out}.bias"),
                    &[n * d],
                    DType::F32,
                    Recipe::Concat(
                        names(kind, parts, "bias")
                            .into_iter()
                            .map(|b| Piece::tensor(b, &[d]))
                            .collect(),
                    ),
                ));
            };
            let output = |s: &mut Vec<TensorSpec>, kind: &str| {
                s.push(mat(format!("{l}{kind}.output.dense.weight"), d, d));
                s.push(vec(format!("{l}{kind}.output.dense.bias"), d));
                s.push(vec(format!("{l}{kind}.output.LayerNorm.weight"), d));
                s.push(vec(format!("{l}{kind}.output.LayerNorm.bias"), d));
            };
            fused(&mut s, "attention", &["query", "key", "value"], "qkv", d);
            output(&mut s, "attention");
            if i % cfg.cross_every == 0 {
                s.push(mat(format!("{l}crossattention.self.query.weight"), d, d));
                s.push(vec(format!("{l}crossattention.self.query.bias"), d));
                fused(&mut s, "crossattention", &["key", "value"], "kv", e);
                output(&mut s, "crossattention");
            }
            s.push(mat(format!("{l}intermediate_query.dense.weight"), f, d));
            s.push(vec(format!("{l}intermediate_query.dense.bias"), f));
            s.push(mat(format!("{l}output_query.dense.weight"), d, f));
            s.push(vec(format!("{l}output_query.dense.bias"), d));
            s.push(vec(format!("{l}output_query.LayerNorm.weight"), d));
            s.push(vec(format!("{l}output_query.LayerNorm.bias"), d));
        }
        Ok(s)
    }

    /// Builds the Q-Former from uploaded tensors (see [`QFormer::specs`]).
    pub fn build(cfg: &QFormerConfig, t: &mut TensorMap) -> Result<Self> {
        cfg.validate()?;
        let (d, e, f) = (cfg.hidden, cfg.encoder_width, cfg.intermediate);
        let p = "Qformer.bert.";
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let l = format!("{p}encoder.layer.{i}.");
            let mut take = |name: &str, shape: &[usize]| t.take(&format!("{l}{name}"), shape);
            let self_attn = Attn {
                qkv_w: Some(take("attention.qkv.weight", &[3 * d, d])?),
                qkv_b: Some(take("attention.qkv.bias", &[3 * d])?),
                q_w: None,
                q_b: None,
                kv_w: None,
                kv_b: None,
                out_w: take("attention.output.dense.weight", &[d, d])?,
                out_b: take("attention.output.dense.bias", &[d])?,
                ln_w: take("attention.output.LayerNorm.weight", &[d])?,
                ln_b: take("attention.output.LayerNorm.bias", &[d])?,
            };
            let cross = if i % cfg.cross_every == 0 {
                Some(Attn {
                    qkv_w: None,
                    qkv_b: None,
                    q_w: Some(take("crossattention.self.query.weight", &[d, d])?),
                    q_b: Some(take("crossattention.self.query.bias", &[d])?),
                    kv_w: Some(take("crossattention.kv.weight", &[2 * d, e])?),
                    kv_b: Some(take("crossattention.kv.bias", &[2 * d])?),
                    out_w: take("crossattention.output.dense.weight", &[d, d])?,
                    out_b: take("crossattention.output.dense.bias", &[d])?,
                    ln_w: take("crossattention.output.LayerNorm.weight", &[d])?,
                    ln_b: take("crossattention.output.LayerNorm.bias", &[d])?,
                })
            } else {
                None
            };
            layers.push(QLayer {
                self_attn,
                cross,
                inter_w: take("intermediate_query.dense.weight", &[f, d])?,
                inter_b: take("intermediate_query.dense.bias", &[f])?,
                out_w: take("output_query.dense.weight", &[d, f])?,
                out_b: take("output_query.dense.bias", &[d])?,
                ln_w: take("output_query.LayerNorm.weight", &[d])?,
                ln_b: take("output_query.LayerNorm.bias", &[d])?,
            });
        }
        Ok(QFormer {
            cfg: cfg.clone(),
            queries: t.take("query_tokens", &[cfg.queries, d])?,
            emb_ln_w: t.take(&format!("{p}embeddings.LayerNorm.weight"), &[d])?,
            emb_ln_b: t.take(&format!("{p}embeddings.LayerNorm.bias"), &[d])?,
            layers,
        })
    }

    /// Loads the Q-Former from the original checkpoint tensors.
    pub fn load(
        gpu: &Gpu,
        cfg: &QFormerConfig,
        src: &dyn TensorSource,
        dtype: DType,
    ) -> Result<Self> {
        let specs = Self::specs(cfg, dtype)?;
        Self::build(cfg, &mut TensorMap::upload(gpu, &specs, src)?)
    }

    /// Records the Q-Former over `image [tokens, encoder_width]`; returns `[queries, hidden]`.
    /// With `taps`, each layer's output is also copied out (for golden tests).
    pub fn record(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        image: &Tensor,
        taps: Option<&[Tensor]>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (n, d, hd) = (c.queries, c.hidden, c.head_dim());
        let t_img = image.rows();
        image.expect(Some(DType::F32), &[t_img, c.encoder_width])?;
        let h = Tensor::zeros(gpu, "qf_h", &[n, d])?;
        let tmp = Tensor::zeros(gpu, "qf_tmp", &[n, d])?;
        let qkv = Tensor::zeros(gpu, "qf_qkv", &[n, 3 * d])?;
        let q = Tensor::zeros(gpu, "qf_q", &[n, d])?;
        let kv = Tensor::zeros(gpu, "qf_kv", &[t_img, 2 * d])?;
        let attn = Tensor::zeros(gpu, "qf_attn", &[n, d])?;
        let ffn = Tensor::zeros(gpu, "qf_ffn", &[n, c.intermediate])?;
        let scale = 1.0 / (hd as f32).sqrt();
        rec.layer_norm(&self.queries, &self.emb_ln_w, &self.emb_ln_b, c.eps, &h)?;
        // h = LN(h + attn·Wo + bo), through `tmp` (LayerNorm reads and writes distinct buffers)
        let residual_ln = |rec: &mut Recorder, a: &Attn| -> Result<()> {
            rec.matmul(&attn, &a.out_w, Some(&a.out_b), &h, true)?;
            rec.layer_norm(&h, &a.ln_w, &a.ln_b, c.eps, &tmp)?;
            rec.copy_rows(&tmp, 0, d, &h, 0, d, n, d)
        };
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            if let (Some(w), Some(b)) = (&a.qkv_w, &a.qkv_b) {
                rec.matmul(&h, w, Some(b), &qkv, false)?;
            }
            rec.attention(
                HeadView::rows(&qkv, 0, 3 * d),
                HeadView::rows(&qkv, d, 3 * d),
                HeadView::rows(&qkv, 2 * d, 3 * d),
                HeadView::whole(&attn),
                AttnShape {
                    t: n,
                    s: n,
                    heads: c.heads,
                    kv_heads: c.heads,
                    head_dim: hd,
                    causal: false,
                    scale,
                },
            )?;
            residual_ln(rec, a)?;
            if let Some(x) = &l.cross {
                if let (Some(qw), Some(qb), Some(kw), Some(kb)) = (&x.q_w, &x.q_b, &x.kv_w, &x.kv_b)
                {
                    rec.matmul(&h, qw, Some(qb), &q, false)?;
                    rec.matmul(image, kw, Some(kb), &kv, false)?;
                }
                rec.attention(
                    HeadView::whole(&q),
                    HeadView::rows(&kv, 0, 2 * d),
                    HeadView::rows(&kv, d, 2 * d),
                    HeadView::whole(&attn),
                    AttnShape {
                        t: n,
                        s: t_img,
                        heads: c.heads,
                        kv_heads: c.heads,
                        head_dim: hd,
                        causal: false,
                        scale,
                    },
                )?;
                residual_ln(rec, x)?;
            }
            rec.matmul(&h, &l.inter_w, Some(&l.inter_b), &ffn, false)?;
            rec.gelu(&ffn)?;
            rec.matmul(&ffn, &l.out_w, Some(&l.out_b), &h, true)?;
            rec.layer_norm(&h, &l.ln_w, &l.ln_b, c.eps, &tmp)?;
            rec.copy_rows(&tmp, 0, d, &h, 0, d, n, d)?;
            if let Some(tap) = taps.and_then(|t| t.get(i)) {
                rec.copy_rows(&h, 0, d, tap, 0, d, n, d)?;
            }
        }
        Ok(h)
    }
}
