//! MiniGPT-4 end to end: image → EVA ViT-g → ln_vision → (Q-Former) → llama_proj → image
//! embeddings spliced between the prompt's text embeddings → Vicuna / LLaMA → answer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chat::{
    generate_from, trim_answer, Conversation, Finish, ModelVariant, Prompt, Sampling, Stop,
    Timings, IMAGE_PLACEHOLDER,
};
use crate::error::{Error, Result};
use crate::gpu::tune::tune_gemm_shapes_of;
use crate::gpu::{Gpu, Ids, Recorder, Tensor};
use crate::loader::TensorSource;
use crate::model::llama::{Llama, LlamaConfig, LlamaFiles, QuantPolicy};
use crate::model::qformer::{QFormer, QFormerConfig};
use crate::model::vit::{Vit, VitConfig};
use crate::quant::DType;
use crate::tokenizer::Tokenizer;
use crate::weights::{Piece, Recipe, TensorMap, TensorSpec};

/// The reference demo's context budget (`max_length`, spec §7.5).
pub const MAX_LENGTH: usize = 2000;

/// How many prompt positions an answer keeps (its last ones, as the reference trims) when
/// `max_new_tokens` are asked of a context of `budget` positions. Below the budget this is the
/// reference's rule: `budget - max_new_tokens`. The reference has no rule where the answer
/// alone would fill the context (its prompt would be cut to nothing): there the prompt keeps up
/// to half the context, and the answer stops when the context is full (see
/// [`MiniGpt4::answer`]), as llama.cpp stops its generation. A tiny test model of 256
/// positions meets this under the demo's default of 300 new tokens.
pub fn answer_keep(budget: usize, max_new_tokens: usize) -> usize {
    if max_new_tokens < budget {
        budget - max_new_tokens
    } else {
        budget.div_ceil(2)
    }
}

pub struct MiniGpt4 {
    pub variant: ModelVariant,
    /// The variant as the package names it (`vicuna0-7b`, ...).
    pub label: String,
    pub vit: Vit,
    /// `None` for the Llama-2 and MiniGPT-v2 variants (4 ViT tokens concatenated instead).
    pub qformer: Option<QFormer>,
    proj_w: Tensor,
    proj_b: Tensor,
    pub llm: Llama,
    pub tok: Tokenizer,
    /// Whether the image half's GEMM shapes have been tuned (where the device tunes GEMMs per
    /// shape; see [`crate::gpu::tune::tune_gemm_shapes`]).
    vision_tuned: AtomicBool,
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

/// MiniGPT-v2's LoRA alpha (`minigptv2_eval.yaml`; the rank comes from the checkpoint).
pub const MINIGPTV2_LORA_ALPHA: f32 = 16.0;

/// MiniGPT-v2 fine-tunes Llama-2's q_proj and v_proj with LoRA adapters stored in its
/// checkpoint (spec §5): the fused QKV matrices take `W + (alpha/r)·B·A` for those rows.
fn merge_minigptv2_lora(specs: &mut [TensorSpec], cfg: &LlamaConfig) {
    let h = cfg.hidden;
    for spec in specs.iter_mut() {
        let Recipe::Concat(pieces) = &mut spec.recipe else {
            continue;
        };
        for p in pieces.iter_mut() {
            let Piece::Tensor { name, shape } = p else {
                continue;
            };
            let Some(module) = name
                .strip_suffix(".weight")
                .filter(|m| m.ends_with(".self_attn.q_proj") || m.ends_with(".self_attn.v_proj"))
            else {
                continue;
            };
            let peft = format!("llama_model.base_model.model.{module}");
            *p = Piece::Lora {
                base: name.clone(),
                adapters: vec![
                    (
                        format!("{peft}.lora_A.weight"),
                        format!("{peft}.lora_B.weight"),
                    ),
                    (
                        format!("{peft}.lora_A.default.weight"),
                        format!("{peft}.lora_B.default.weight"),
                    ),
                ],
                alpha: MINIGPTV2_LORA_ALPHA,
                n: shape[0],
                k: h,
            };
        }
    }
}

/// "7B" / "13B" for the LLaMA widths MiniGPT-4 uses.
fn size_name(hidden: usize) -> String {
    match hidden {
        4096 => "7B".into(),
        5120 => "13B".into(),
        h => format!("{h} wide"),
    }
}

/// Several sources seen as one (the first that has a name answers for it).
pub struct Union<'a>(pub Vec<&'a dyn TensorSource>);

impl TensorSource for Union<'_> {
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(" + ")
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().flat_map(|s| s.names()).collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.iter().find_map(|s| s.shape(name))
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self.0.iter().find(|s| s.shape(name).is_some()) {
            Some(s) => s.read_f32(name),
            None => Err(Error::tensor(
                name,
                format!("present in {}", self.describe()),
                "missing",
            )),
        }
    }
    fn read_q4m(&self, name: &str) -> Result<Option<crate::quant::Encoded>> {
        match self.0.iter().find(|s| s.shape(name).is_some()) {
            Some(s) => s.read_q4m(name),
            None => Ok(None),
        }
    }
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
    /// The prompt's and the answer's time (the image's encode is the caller's).
    pub timings: Timings,
}

/// The shapes of a MiniGPT-4: variant, vision encoder, Q-Former (absent for the Llama-2 and
/// MiniGPT-v2 variants) and LLM.
#[derive(Clone, Debug, PartialEq)]
pub struct MiniGpt4Config {
    pub variant: ModelVariant,
    pub vision: VitConfig,
    pub qformer: Option<QFormerConfig>,
    pub llm: LlamaConfig,
}

/// GPU formats: vision linear layers and projection, and the LLM's policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Formats {
    pub vision: DType,
    pub llm: QuantPolicy,
}

impl MiniGpt4Config {
    /// Width of the projection's input: the Q-Former width, or 4 × the ViT width.
    pub fn proj_in(&self) -> usize {
        match &self.qformer {
            Some(q) => q.hidden,
            None => 4 * self.vision.width,
        }
    }

    /// Checks that the parts fit together (spec §4), naming the classic mix-ups.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidOption {
                name: "model configuration".into(),
                msg,
            })
        };
        self.vision.validate()?;
        match (self.variant, &self.qformer) {
            (ModelVariant::Vicuna0, None) => {
                return bad("the vicuna0 variants need a Q-Former configuration".into())
            }
            (ModelVariant::Vicuna0, Some(q)) => {
                q.validate()?;
                if q.encoder_width != self.vision.width {
                    return bad(format!(
                        "the Q-Former attends to {}-wide image tokens but the ViT is {} wide",
                        q.encoder_width, self.vision.width
                    ));
                }
            }
            (v, Some(_)) => {
                return bad(format!(
                    "the {} variant has no Q-Former (it concatenates 4 ViT tokens, spec §4)",
                    v.name()
                ))
            }
            (_, None) => {}
        }
        Ok(())
    }
}

impl MiniGpt4 {
    /// Every GPU tensor of the model, vision first, and how each comes from the original
    /// checkpoints (MiniGPT-4 names for the vision side, HF names for the LLM).
    pub fn specs(cfg: &MiniGpt4Config, formats: Formats) -> Result<Vec<TensorSpec>> {
        cfg.validate()?;
        let mut s = Vit::specs(&cfg.vision, formats.vision)?;
        if let Some(q) = &cfg.qformer {
            s.extend(QFormer::specs(q, formats.vision)?);
        }
        let (h, k) = (cfg.llm.hidden, cfg.proj_in());
        s.push(TensorSpec::copied(
            "llama_proj.weight",
            &[h, k],
            formats.vision,
        ));
        s.push(TensorSpec::copied("llama_proj.bias", &[h], DType::F32));
        let mut llm = Llama::specs(&cfg.llm, formats.llm);
        if cfg.variant == ModelVariant::MiniGptV2 {
            merge_minigptv2_lora(&mut llm, &cfg.llm);
        }
        s.extend(llm);
        Ok(s)
    }

    /// Checks every source tensor before anything is read, explaining the classic mix-ups
    /// (spec §4, §8.5): a projection from another model size or variant, Vicuna v1.1 (32000
    /// embedding rows) where v0 (32001) is expected.
    pub fn check_sources(
        cfg: &MiniGpt4Config,
        specs: &[TensorSpec],
        src: &dyn TensorSource,
    ) -> Result<()> {
        if cfg.variant == ModelVariant::Vicuna0 && cfg.llm.vocab == 32000 {
            return Err(Error::format(
                src.describe(),
                "the LLM has 32000 embedding rows: this is Vicuna v1.1 / v1.5 or plain LLaMA, but MiniGPT-4's vicuna0 variants need Vicuna v0, which has 32001 (spec §6.1); use the Vicuna v0 weights (Vision-CAIR/vicuna or vicuna-7b), or the llama2-7b variant with its own checkpoint",
            ));
        }
        let (h, k) = (cfg.llm.hidden, cfg.proj_in());
        if let Some(found) = src.shape("llama_proj.weight") {
            if found != [h, k] {
                let why = match (found.first(), found.get(1)) {
                    (Some(_), Some(&fk)) if fk != k && fk == 4 * cfg.vision.width => {
                        format!("a projection from 4 concatenated ViT tokens ({fk} wide): a Llama-2 / MiniGPT-v2 checkpoint, which has no Q-Former; use --variant llama2-7b or minigptv2")
                    }
                    (Some(_), Some(&fk)) if fk != k && cfg.qformer.is_none() => {
                        format!("a projection from the {fk}-wide Q-Former output: a Vicuna-v0 checkpoint; use --variant vicuna0-7b or vicuna0-13b")
                    }
                    (Some(&fh), _) if fh != h => format!(
                        "a projection into a {fh}-wide LLM, but the LLM is {h} wide ({} vs {}): the MiniGPT-4 checkpoint and the LLM are of different sizes (13B is 5120 wide, 7B 4096)",
                        size_name(fh),
                        size_name(h)
                    ),
                    _ => "a projection of another shape".into(),
                };
                return Err(Error::tensor(
                    "llama_proj.weight",
                    format!("[{h}, {k}] in {}", src.describe()),
                    format!("{found:?}: {why} (spec §4)"),
                ));
            }
        }
        crate::weights::check_sources(specs, src)
    }

    /// Builds the model from uploaded tensors (see [`MiniGpt4::specs`]).
    pub fn build(
        gpu: &Gpu,
        cfg: &MiniGpt4Config,
        formats: Formats,
        tok: Tokenizer,
        t: &mut TensorMap,
        ctx: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        if tok.vocab_size() > cfg.llm.vocab {
            return Err(Error::InvalidOption {
                name: "tokenizer".into(),
                msg: format!("the tokenizer has {} tokens but the LLM's embedding has only {} rows: they do not belong together", tok.vocab_size(), cfg.llm.vocab),
            });
        }
        let vit = Vit::build(&cfg.vision, t)?;
        let qformer = match &cfg.qformer {
            Some(q) => Some(QFormer::build(q, t)?),
            None => None,
        };
        let (h, k) = (cfg.llm.hidden, cfg.proj_in());
        let proj_w = t.take("llama_proj.weight", &[h, k])?;
        let proj_b = t.take("llama_proj.bias", &[h])?;
        let llm = Llama::build(gpu, &cfg.llm, formats.llm, t, ctx)?;
        Ok(MiniGpt4 {
            variant: cfg.variant,
            label: cfg.variant.name().into(),
            vit,
            qformer,
            proj_w,
            proj_b,
            llm,
            tok,
            vision_tuned: AtomicBool::new(false),
        })
    }

    /// Loads from the original files: the vision weights (MiniGPT-4 key names) and the LLM
    /// (GGUF or HF directory). Every tensor is checked before the first upload.
    pub fn load(
        gpu: &Gpu,
        cfg: &MiniGpt4Config,
        formats: Formats,
        vision: &dyn TensorSource,
        llm: &LlamaFiles,
        ctx: usize,
    ) -> Result<Self> {
        let tok = llm.tokenizer(&cfg.llm)?;
        let specs = Self::specs(cfg, formats)?;
        let llm_src = llm.source(&cfg.llm);
        let src = Union(vec![vision, &llm_src]);
        Self::check_sources(cfg, &specs, &src)?;
        gpu.require(&cfg.llm.requirements(ctx.min(cfg.llm.max_pos).max(1), 1))?;
        let mut t = TensorMap::upload(gpu, &specs, &src)?;
        Self::build(gpu, cfg, formats, tok, &mut t, ctx)
    }

    /// The image half: preprocessed pixels `[3, S, S]` → embeddings `[n, llm_hidden]`
    /// (n = 32 queries, or tokens/4 without a Q-Former).
    pub async fn encode_image(&self, gpu: &Gpu, pixels: &[f32]) -> Result<Tensor> {
        let s = self.vit.cfg.image_size;
        let px = Tensor::upload(gpu, "pixels", &[3, s, s], DType::F32, pixels)?;
        if !self.vision_tuned.load(Ordering::Relaxed) {
            tune_gemm_shapes_of(gpu, |rec| self.record_image(gpu, rec, &px).map(drop)).await?;
            self.vision_tuned.store(true, Ordering::Relaxed);
        }
        let mut rec = Recorder::new(gpu);
        let out = self.record_image(gpu, &mut rec, &px)?;
        rec.submit().await?;
        Ok(out)
    }

    /// Records the image half for preprocessed pixels `[3, S, S]` (see
    /// [`MiniGpt4::encode_image`]).
    fn record_image(&self, gpu: &Gpu, rec: &mut Recorder, px: &Tensor) -> Result<Tensor> {
        let h = self.llm.cfg.hidden;
        let image = self.vit.record(gpu, rec, px, None)?;
        let (features, n) = match &self.qformer {
            Some(q) => (q.record(gpu, rec, &image, None)?, q.cfg.queries),
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
    /// [`MiniGpt4::encode_image`]), as `Chat.answer` does: at most `max_new_tokens`, and no
    /// more than the context holds after the prompt (see [`answer_keep`]; the answer's finish
    /// reason is then its length).
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
        let budget = MAX_LENGTH.min(self.llm.ctx);
        let keep = answer_keep(budget, max_new_tokens);
        let spliced = self.splice(gpu, &segments, &images, keep).await?;
        // (a no-op below the budget, where the prompt kept leaves room for every new token)
        let max_new_tokens = max_new_tokens.min(budget - spliced.rows());
        self.llm.reset();
        let stop = Stop {
            max_new_tokens,
            eos: self.llm.cfg.eos.clone(),
            sequences: self.variant.stop_sequences(),
        };
        // Vicuna-v0's extra embedding row (id 32000) has no tokenizer piece: never sample it.
        let allowed = self.tok.vocab_size().min(self.llm.cfg.vocab);
        let (ids, finish, timings) = generate_from(
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
            timings,
        })
    }
}
