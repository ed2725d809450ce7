//! MiniGPT-4 end to end: image → EVA ViT-g → ln_vision → (Q-Former) → llama_proj → image
//! embeddings spliced between the prompt's text embeddings → Vicuna / LLaMA → answer.

use std::path::Path;

use crate::chat::{
    generate_from, trim_answer, Conversation, Finish, ModelVariant, Prompt, Sampling, Stop,
    IMAGE_PLACEHOLDER,
};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Ids, Recorder, Tensor};
use crate::loader::TensorSource;
use crate::model::llama::{Llama, LlamaFiles, QuantPolicy};
use crate::model::qformer::{QFormer, QFormerConfig};
use crate::model::vit::{read_checked, Vit, VitConfig};
use crate::quant::DType;
use crate::tokenizer::Tokenizer;

/// The reference demo's context budget (`max_length`, spec §7.5).
pub const MAX_LENGTH: usize = 2000;

pub struct MiniGpt4 {
    pub variant: ModelVariant,
    pub vit: Vit,
    /// `None` for the Llama-2 and MiniGPT-v2 variants (4 ViT tokens concatenated instead).
    pub qformer: Option<QFormer>,
    proj_w: Tensor,
    proj_b: Tensor,
    pub llm: Llama,
    pub tok: Tokenizer,
}

/// The vision-side weights from the files users have (spec §8.1): the ViT (`eva_vit_g.pth`,
/// whose keys lack the `visual_encoder.` prefix, or any file with MiniGPT-4 names), the BLIP-2
/// Q-Former checkpoint, and the MiniGPT-4 checkpoint (`llama_proj`), seen as one source. A name
/// present in two files is an error naming both.
pub fn vision_sources(paths: &[&Path]) -> Result<Box<dyn TensorSource>> {
    let mut v: Vec<Box<dyn TensorSource>> = Vec::new();
    for p in paths {
        let src = crate::loader::open_weights(p)?;
        let names = src.names();
        let bare_vit = names
            .iter()
            .any(|n| n == "blocks.0.norm1.weight" || n == "cls_token");
        v.push(Box::new(crate::loader::Renamed {
            inner: src,
            prefix: if bare_vit {
                "visual_encoder.".into()
            } else {
                String::new()
            },
            // training-side extras MiniGPT-4 never uses (spec §8.2)
            skip: |n| n.starts_with("t5_proj.") || n.ends_with("position_ids"),
        }));
    }
    Ok(Box::new(crate::loader::safetensors::Sharded::new(
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        v,
    )?))
}

/// One generated answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Token ids of each text segment of the prompt (BOS only on the first).
    pub prompt_token_ids: Vec<Vec<u32>>,
    pub image_tokens: usize,
    /// Generated ids (stop tokens included).
    pub token_ids: Vec<u32>,
    /// The answer after the reference's trimming.
    pub text: String,
    pub finish: Finish,
}

impl MiniGpt4 {
    /// Loads the vision weights (MiniGPT-4 key names) and the LLM (GGUF or HF directory).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        variant: ModelVariant,
        vit_cfg: &VitConfig,
        qformer_cfg: Option<&QFormerConfig>,
        vision: &dyn TensorSource,
        llm_path: &Path,
        vision_dtype: DType,
        llm_quant: DType,
        ctx: usize,
    ) -> Result<Self> {
        let (cfg, files) = LlamaFiles::open(llm_path)?;
        let tok = files.tokenizer(&cfg)?;
        let vit = Vit::load(gpu, vit_cfg, vision, vision_dtype)?;
        let (qformer, in_width) = match (variant, qformer_cfg) {
            (ModelVariant::Vicuna0, Some(q)) => {
                (Some(QFormer::load(gpu, q, vision, vision_dtype)?), q.hidden)
            }
            (ModelVariant::Vicuna0, None) => {
                return Err(Error::InvalidOption {
                    name: "variant".into(),
                    msg: "vicuna0 needs a Q-Former configuration".into(),
                })
            }
            (_, _) => (None, 4 * vit_cfg.width),
        };
        let w = read_checked(vision, "llama_proj.weight", &[cfg.hidden, in_width]).map_err(
            |e| match e {
                Error::Tensor { name, found, .. } => Error::Tensor {
                    name,
                    expected: format!(
                        "[{}, {in_width}] (LLM width {} × {})",
                        cfg.hidden,
                        cfg.hidden,
                        if qformer_cfg.is_some() {
                            "Q-Former width"
                        } else {
                            "4 × ViT width"
                        }
                    ),
                    found: format!(
                        "{found}: the projection does not belong to this LLM / variant (spec §4)"
                    ),
                },
                e => e,
            },
        )?;
        let proj_w = Tensor::upload(
            gpu,
            "llama_proj.weight",
            &[cfg.hidden, in_width],
            vision_dtype,
            &w,
        )?;
        let b = read_checked(vision, "llama_proj.bias", &[cfg.hidden])?;
        let proj_b = Tensor::upload(gpu, "llama_proj.bias", &[cfg.hidden], DType::F32, &b)?;
        let llm = Llama::load(gpu, &cfg, &files, QuantPolicy::for_linear(llm_quant), ctx)?;
        Ok(MiniGpt4 {
            variant,
            vit,
            qformer,
            proj_w,
            proj_b,
            llm,
            tok,
        })
    }

    /// The image half: preprocessed pixels `[3, S, S]` → embeddings `[n, llm_hidden]`
    /// (n = 32 queries, or tokens/4 without a Q-Former).
    pub async fn encode_image(&self, gpu: &Gpu, pixels: &[f32]) -> Result<Tensor> {
        let s = self.vit.cfg.image_size;
        let px = Tensor::upload(gpu, "pixels", &[3, s, s], DType::F32, pixels)?;
        let h = self.llm.cfg.hidden;
        let mut rec = Recorder::new(gpu);
        let image = self.vit.record(gpu, &mut rec, &px, None)?;
        let (features, n) = match &self.qformer {
            Some(q) => (q.record(gpu, &mut rec, &image, None)?, q.cfg.queries),
            None => {
                // drop CLS; 4 consecutive tokens side by side are the same bytes as [n, 4·width]
                let w = self.vit.cfg.width;
                let n = (self.vit.cfg.tokens() - 1) / 4;
                let cat = Tensor::zeros(gpu, "concat4", &[n, 4 * w])?;
                rec.copy_rows(&image, w, 4 * w, &cat, 0, 4 * w, n, 4 * w)?;
                (cat, n)
            }
        };
        let out = Tensor::zeros(gpu, "image_embeds", &[n, h])?;
        rec.matmul(&features, &self.proj_w, Some(&self.proj_b), &out, false)?;
        rec.submit().await?;
        Ok(out)
    }

    /// The prompt split at `<ImageHere>`, each segment tokenized on its own, BOS only on the
    /// first (spec §6.3).
    pub fn segment_ids(&self, prompt: &str) -> Result<Vec<Vec<u32>>> {
        prompt
            .split(IMAGE_PLACEHOLDER)
            .enumerate()
            .map(|(i, seg)| self.tok.encode(seg, i == 0))
            .collect()
    }

    /// Text embeddings of the segments with one image's embeddings between consecutive
    /// segments, keeping only the last `keep` rows (the reference's context truncation).
    pub async fn splice(
        &self,
        gpu: &Gpu,
        segments: &[Vec<u32>],
        images: &[&Tensor],
        keep: usize,
    ) -> Result<Tensor> {
        if segments.len() != images.len() + 1 {
            return Err(Error::InvalidOption {
                name: "prompt".into(),
                msg: format!(
                    "{} image placeholders for {} images",
                    segments.len() - 1,
                    images.len()
                ),
            });
        }
        let h = self.llm.cfg.hidden;
        let total: usize = segments.iter().map(|s| s.len()).sum::<usize>()
            + images.iter().map(|i| i.rows()).sum::<usize>();
        let skip = total.saturating_sub(keep);
        let rows = total - skip;
        let out = Tensor::zeros(gpu, "spliced", &[rows.max(1), h])?;
        let mut rec = Recorder::new(gpu);
        let mut texts = Vec::new();
        for seg in segments.iter().filter(|s| !s.is_empty()) {
            let t = Tensor::zeros(gpu, "segment", &[seg.len(), h])?;
            self.llm.embed_into(&mut rec, &Ids::new(gpu, seg), &t)?;
            texts.push(t);
        }
        let mut texts = texts.iter();
        let mut at = 0usize; // row in the untruncated sequence
        let place = |rec: &mut Recorder, src: &Tensor, n: usize, at: &mut usize| -> Result<()> {
            let start = skip.max(*at);
            if start < *at + n {
                let from = start - *at;
                rec.copy_rows(src, from * h, h, &out, (start - skip) * h, h, n - from, h)?;
            }
            *at += n;
            Ok(())
        };
        for (i, seg) in segments.iter().enumerate() {
            if !seg.is_empty() {
                let t = texts
                    .next()
                    .ok_or_else(|| Error::Gpu("segment bookkeeping".into()))?;
                place(&mut rec, t, seg.len(), &mut at)?;
            }
            if let Some(img) = images.get(i) {
                place(&mut rec, img, img.rows(), &mut at)?;
            }
        }
        rec.submit().await?;
        Ok(out)
    }

    /// Answers the conversation's open turn about `image` (embeddings from
    /// [`MiniGpt4::encode_image`]), as `Chat.answer` does.
    pub async fn answer(
        &mut self,
        gpu: &Gpu,
        conv: &Conversation,
        image: &Tensor,
        sampling: &Sampling,
        max_new_tokens: usize,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Answer> {
        let prompt = conv.prompt();
        let segments = self.segment_ids(&prompt)?;
        let n_images = segments.len() - 1;
        let images: Vec<&Tensor> = std::iter::repeat_n(image, n_images).collect();
        let keep = MAX_LENGTH.min(self.llm.ctx).saturating_sub(max_new_tokens);
        let spliced = self.splice(gpu, &segments, &images, keep).await?;
        self.llm.reset();
        let stop = Stop {
            max_new_tokens,
            eos: self.llm.cfg.eos.clone(),
            sequences: self.variant.stop_sequences(),
        };
        // Vicuna-v0's extra embedding row (id 32000) has no tokenizer piece: never sample it.
        let allowed = self.tok.vocab_size().min(self.llm.cfg.vocab);
        let (ids, finish) = generate_from(
            gpu,
            &mut self.llm,
            Prompt::Embeds(&spliced),
            sampling,
            &stop,
            allowed,
            on_token,
        )
        .await?;
        let text = trim_answer(&self.tok.decode(&ids, true)?);
        Ok(Answer {
            prompt_token_ids: segments,
            image_tokens: image.rows() * n_images,
            token_ids: ids,
            text,
            finish,
        })
    }
}
