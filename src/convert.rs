//! `minigpt4 convert`: the original MiniGPT-4 files (spec §8.1) → a model package.
//!
//! Inputs are read one tensor at a time (PyTorch zip checkpoints through our own reader, HF
//! directories, GGUF), every source tensor is checked before anything is written, and the
//! package is written to `OUT.partial` and renamed into place at the end.

use std::path::{Path, PathBuf};

use crate::chat::ModelVariant;
use crate::error::{Error, Result};
use crate::model::llama::{LlamaFiles, QuantPolicy};
use crate::model::minigpt4::{vision_sources, Formats, MiniGpt4, MiniGpt4Config, Union};
use crate::model::qformer::QFormerConfig;
use crate::model::vit::VitConfig;
use crate::package::{self, PackageConfig};
use crate::quant::DType;

/// What `minigpt4 convert` takes.
#[derive(Clone, Debug)]
pub struct ConvertArgs {
    /// `vicuna0-7b`, `vicuna0-13b`, `llama2-7b`, `minigptv2` (or a bare family name).
    pub variant: String,
    /// The ViT (`eva_vit_g.pth`), the BLIP-2 Q-Former checkpoint, the MiniGPT-4 checkpoint:
    /// any files holding the vision-side tensors.
    pub vision: Vec<PathBuf>,
    /// HF directory or GGUF file.
    pub llm: PathBuf,
    /// Overrides of the standard vision dimensions: JSON with `vit` and/or `qformer` objects.
    pub vision_config: Option<PathBuf>,
    pub out: PathBuf,
    pub llm_quant: DType,
    pub vision_quant: DType,
}

/// The standard dimensions of a variant, overridden by `vision_config`.
pub fn vision_configs(
    variant: ModelVariant,
    vision_config: Option<&Path>,
) -> Result<(VitConfig, Option<QFormerConfig>)> {
    let mut vit = VitConfig::eva_vit_g(variant.image_size());
    let mut qf = QFormerConfig::blip2();
    if let Some(p) = vision_config {
        let shown = p.display().to_string();
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(&shown, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&shown, format!("not valid JSON: {e}")))?;
        if let Some(x) = v.get("vit") {
            vit = serde_json::from_value(x.clone())
                .map_err(|e| Error::format(&shown, format!("`vit`: {e}")))?;
        }
        if let Some(x) = v.get("qformer") {
            qf = serde_json::from_value(x.clone())
                .map_err(|e| Error::format(&shown, format!("`qformer`: {e}")))?;
        }
    }
    Ok((vit, (variant == ModelVariant::Vicuna0).then_some(qf)))
}

/// Converts; `progress(i, n, tensor)` is called before each tensor. Returns the package path.
pub fn convert(a: &ConvertArgs, progress: impl FnMut(usize, usize, &str)) -> Result<PathBuf> {
    let variant = ModelVariant::parse(&a.variant)?;
    let (vision, qformer) = vision_configs(variant, a.vision_config.as_deref())?;
    let paths: Vec<&Path> = a.vision.iter().map(|p| p.as_path()).collect();
    let vision_src = vision_sources(&paths)?;
    let (llm, files) = LlamaFiles::open(&a.llm)?;
    let size = a.variant.rsplit_once('-').map(|(_, s)| s);
    let expect_hidden = match size {
        Some("7b") => Some(4096),
        Some("13b") => Some(5120),
        _ => None,
    };
    if let Some(h) = expect_hidden.filter(|&h| h != llm.hidden) {
        return Err(Error::format(
            a.llm.display(),
            format!(
                "--variant {} expects a {h}-wide LLM, but this one is {} wide: the LLM is of another size",
                a.variant, llm.hidden
            ),
        ));
    }
    let cfg = MiniGpt4Config {
        variant,
        vision,
        qformer,
        llm,
    };
    let formats = Formats {
        vision: a.vision_quant,
        llm: QuantPolicy::for_linear(a.llm_quant),
    };
    let specs = MiniGpt4::specs(&cfg, formats)?;
    let tok = files.tokenizer(&cfg.llm)?;
    let llm_src = files.source(&cfg.llm);
    let src = Union(vec![vision_src.as_ref(), &llm_src]);
    MiniGpt4::check_sources(&cfg, &specs, &src)?;
    package::write(
        &a.out,
        &PackageConfig::new(&a.variant, &cfg, formats),
        &specs,
        &src,
        &tok,
        progress,
    )
}
