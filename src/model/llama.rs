//! The LLaMA / Vicuna decoder on the GPU: configuration, loading (HF directories and GGUF),
//! KV cache, prefill and decode.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::chat::{sample_with, Sampling};
use crate::error::{Error, Result};
use crate::gpu::ops::{topk_words, MatmulPath, SampleParams, GEMV_MAX_ROWS, TOPK_KEEP};
use crate::gpu::tensor::{map_for_read, read_mapped, read_words, Mapping};
use crate::gpu::{
    attention_partials, kv_cache_shape, kv_cache_views, AttnShape, Gpu, HeadView, Ids, Plan,
    Recorder, Requirements, RopeKv, RopeMode, RopeTable, Tensor, ATTN_SPLIT,
};
use crate::loader::gguf::{self, GgmlType, GgufFile};
use crate::loader::safetensors::{index_shards, SafetensorsFile, Sharded};
use crate::loader::torch::TorchCheckpoint;
use crate::loader::TensorSource;
use crate::quant::{DType, Encoded};
use crate::tokenizer::Tokenizer;
use crate::weights::{Piece, Recipe, TensorMap, TensorSpec};

/// Decoder hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub tied: bool,
    pub max_pos: usize,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

fn cfg_err(path: &str, key: &str, expected: &str, found: impl std::fmt::Debug) -> Error {
    Error::format(
        path,
        format!("config `{key}`: expected {expected}, found {found:?}"),
    )
}

impl LlamaConfig {
    /// From a transformers `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(&p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))?;
        let int = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| cfg_err(&p, k, "a non-negative integer", x)),
            }
        };
        let need = |k: &str| -> Result<usize> {
            int(k)?
                .filter(|n| *n > 0)
                .ok_or_else(|| cfg_err(&p, k, "a positive integer", v.get(k)))
        };
        let float = |k: &str, d: f64| -> Result<f32> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d as f32),
                Some(x) => x
                    .as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| cfg_err(&p, k, "a number", x)),
            }
        };
        if let Some(mt) = v.get("model_type").and_then(|m| m.as_str()) {
            if mt != "llama" {
                return Err(cfg_err(&p, "model_type", "\"llama\"", mt));
            }
        }
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let head_dim = int("head_dim")?.unwrap_or(hidden / heads);
        let eos = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|n| n as u32))
                .collect(),
            Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            None => vec![],
        };
        // transformers >= 5 nests rope settings in `rope_parameters`; older files use `rope_theta`
        // and `rope_scaling`. Only the default (unscaled) rotary embedding is supported.
        let rope_params = v.get("rope_parameters").filter(|r| !r.is_null());
        for (key, r) in [
            ("rope_parameters", rope_params),
            (
                "rope_scaling",
                v.get("rope_scaling").filter(|r| !r.is_null()),
            ),
        ] {
            if let Some(r) = r {
                let ty = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                if ty != "default" {
                    return Err(cfg_err(
                        &p,
                        key,
                        "the default rotary embedding (no scaling)",
                        ty,
                    ));
                }
            }
        }
        let rope_theta = match rope_params.and_then(|r| r.get("rope_theta")) {
            Some(t) => t
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| cfg_err(&p, "rope_parameters.rope_theta", "a number", t))?,
            None => float("rope_theta", 10000.0)?,
        };
        let cfg = LlamaConfig {
            hidden,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: int("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            intermediate: need("intermediate_size")?,
            vocab: need("vocab_size")?,
            rope_theta,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            tied: v
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
            max_pos: int("max_position_embeddings")?.unwrap_or(2048),
            bos: int("bos_token_id")?.map(|n| n as u32),
            eos,
        };
        cfg.validate(&p)?;
        cfg.with_generation_config(path)
    }

    /// transformers' `generate()` stops on `generation_config.json`'s `eos_token_id` when the
    /// file exists (Vision-CAIR's Vicuna-v0 sets 1 there, spec §7.5), so we do too.
    fn with_generation_config(mut self, config_json: &Path) -> Result<Self> {
        let path = config_json.with_file_name("generation_config.json");
        if !path.exists() {
            return Ok(self);
        }
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => {
                self.eos = a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect()
            }
            Some(x) if x.is_u64() => {
                self.eos = x.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Null) | None => {}
            Some(x) => return Err(cfg_err(&p, "eos_token_id", "an id or a list of ids", x)),
        }
        Ok(self)
    }

    /// From GGUF metadata (`general.architecture` must be `llama`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let p = g.path.display().to_string();
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if arch != "llama" {
            return Err(cfg_err(&p, "general.architecture", "\"llama\"", arch));
        }
        let int = |k: &str| {
            g.get(&format!("llama.{k}"))
                .and_then(|v| v.as_u64())
                .map(|n| n as usize)
        };
        let need = |k: &str| {
            int(k).filter(|n| *n > 0).ok_or_else(|| {
                cfg_err(
                    &p,
                    &format!("llama.{k}"),
                    "a positive integer",
                    g.get(&format!("llama.{k}")),
                )
            })
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let embd = g.tensor("token_embd.weight").ok_or_else(|| {
            Error::tensor("token_embd.weight", format!("present in {p}"), "missing")
        })?;
        let tok = |k: &str| {
            g.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .map(|n| n as u32)
        };
        let cfg = LlamaConfig {
            hidden,
            layers: need("block_count")?,
            heads,
            kv_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim: int("attention.key_length").unwrap_or(hidden / heads),
            intermediate: need("feed_forward_length")?,
            vocab: embd.shape[0],
            rope_theta: g
                .get("llama.rope.freq_base")
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0) as f32,
            rms_eps: g
                .get("llama.attention.layer_norm_rms_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5) as f32,
            tied: g.tensor("output.weight").is_none(),
            max_pos: int("context_length").unwrap_or(2048),
            bos: tok("bos_token_id"),
            eos: tok("eos_token_id").into_iter().collect(),
        };
        cfg.validate(&p)?;
        Ok(cfg)
    }

    pub fn validate(&self, p: &str) -> Result<()> {
        if self.heads == 0 || self.hidden == 0 || self.layers == 0 || self.vocab == 0 {
            return Err(Error::format(p, format!("zero dimensions: {self:?}")));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(cfg_err(
                p,
                "num_key_value_heads",
                &format!("a divisor of num_attention_heads ({})", self.heads),
                self.kv_heads,
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return Err(cfg_err(
                p,
                "head_dim",
                "an even number up to 256",
                self.head_dim,
            ));
        }
        if self.layers > 1024
            || self.hidden > 1 << 16
            || self.vocab > 1 << 22
            || self.intermediate > 1 << 18
            || self.heads > 1 << 10
            || self.max_pos > 1 << 24
        {
            return Err(Error::format(
                p,
                format!("implausible dimensions: {self:?}"),
            ));
        }
        Ok(())
    }

    /// The expected tensors, HF names, with shapes.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, f) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        );
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            let l = format!("model.layers.{i}");
            v.push((format!("{l}.input_layernorm.weight"), vec![h]));
            v.push((format!("{l}.self_attn.q_proj.weight"), vec![q, h]));
            v.push((format!("{l}.self_attn.k_proj.weight"), vec![kv, h]));
            v.push((format!("{l}.self_attn.v_proj.weight"), vec![kv, h]));
            v.push((format!("{l}.self_attn.o_proj.weight"), vec![h, q]));
            v.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
            v.push((format!("{l}.mlp.gate_proj.weight"), vec![f, h]));
            v.push((format!("{l}.mlp.up_proj.weight"), vec![f, h]));
            v.push((format!("{l}.mlp.down_proj.weight"), vec![h, f]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }

    /// Vicuna-v0's shape family (LLaMA-1 with the 32001-token vocabulary): 7B is
    /// `(4096, 32, 32, 11008)`, 13B `(5120, 40, 40, 13824)`.
    pub fn vicuna_v0(hidden: usize, layers: usize, heads: usize, intermediate: usize) -> Self {
        LlamaConfig {
            hidden,
            layers,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads,
            intermediate,
            vocab: 32001,
            rope_theta: 10000.0,
            rms_eps: 1e-6,
            tied: false,
            max_pos: 2048,
            bos: Some(1),
            eos: vec![2],
        }
    }

    /// GPU limits this model needs with a context of `ctx` tokens (f32 KV cache: the largest).
    pub fn requirements(&self, ctx: usize, prefill: usize) -> Requirements {
        // one cache tensor per layer holds keys and values side by side
        let kv_bytes = (ctx * 2 * self.kv_heads * self.head_dim * 4) as u64;
        let act = (prefill * self.intermediate.max(self.hidden * 3) * 4) as u64;
        let logits = (prefill.max(1) * self.vocab * 4) as u64;
        let mut r = Requirements::kernels();
        r.what = format!(
            "LLaMA {}x{} with a {ctx}-token context",
            self.layers, self.hidden
        );
        r.max_storage_buffer_binding_size = kv_bytes
            .max(act)
            .max(logits)
            .max(r.max_storage_buffer_binding_size);
        r.max_buffer_size = r.max_storage_buffer_binding_size;
        r
    }
}

/// Where the weights come from: names are HF's; GGUF names are mapped and Q/K un-permuted.
pub enum LlamaFiles {
    Hf {
        dir: PathBuf,
        source: Box<dyn TensorSource>,
    },
    Gguf(GgufFile),
}

impl LlamaFiles {
    /// Opens a GGUF file or an HF model directory (safetensors, sharded safetensors).
    pub fn open(path: &Path) -> Result<(LlamaConfig, LlamaFiles)> {
        let p = path.display().to_string();
        if path.is_dir() {
            let cfg = LlamaConfig::from_hf_json(&path.join("config.json"))?;
            let source: Box<dyn TensorSource> = if path
                .join("model.safetensors.index.json")
                .exists()
            {
                let shards = index_shards(&path.join("model.safetensors.index.json"))?;
                let mut v: Vec<Box<dyn TensorSource>> = Vec::new();
                for s in shards {
                    v.push(Box::new(SafetensorsFile::open(&s)?));
                }
                Box::new(Sharded::new(p.clone(), v)?)
            } else if path.join("model.safetensors").exists() {
                Box::new(SafetensorsFile::open(&path.join("model.safetensors"))?)
            } else if path.join("pytorch_model.bin.index.json").exists() {
                let shards = index_shards(&path.join("pytorch_model.bin.index.json"))?;
                let mut v: Vec<Box<dyn TensorSource>> = Vec::new();
                for s in shards {
                    v.push(Box::new(TorchCheckpoint::open(&s)?));
                }
                Box::new(Sharded::new(p.clone(), v)?)
            } else if path.join("pytorch_model.bin").exists() {
                Box::new(TorchCheckpoint::open(&path.join("pytorch_model.bin"))?)
            } else {
                return Err(Error::format(&p, "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json in this directory"));
            };
            Ok((
                cfg,
                LlamaFiles::Hf {
                    dir: path.to_path_buf(),
                    source,
                },
            ))
        } else {
            let g = GgufFile::open(path)?;
            let cfg = LlamaConfig::from_gguf(&g)?;
            Ok((cfg, LlamaFiles::Gguf(g)))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            LlamaFiles::Hf { dir, .. } => dir.display().to_string(),
            LlamaFiles::Gguf(g) => g.path.display().to_string(),
        }
    }

    fn gguf_name(name: &str) -> Option<String> {
        let direct = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = direct.iter().find(|(h, _)| *h == name) {
            return Some(g.to_string());
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (i, tail) = rest.split_once('.')?;
        let g = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{i}.{g}"))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            LlamaFiles::Hf { source, .. } => source.shape(name),
            LlamaFiles::Gguf(g) => Self::gguf_name(name)
                .and_then(|n| g.tensor(&n))
                .map(|t| t.shape.clone()),
        }
    }

    /// Reads one tensor (HF name) as f32, HF layout.
    pub fn read(&self, cfg: &LlamaConfig, name: &str) -> Result<Vec<f32>> {
        match self {
            LlamaFiles::Hf { source, .. } => source.read_f32(name),
            LlamaFiles::Gguf(g) => {
                let gn = Self::gguf_name(name)
                    .ok_or_else(|| Error::tensor(name, "a LLaMA tensor name", "an unknown name"))?;
                let t = g.tensor(&gn).ok_or_else(|| {
                    Error::tensor(&gn, format!("present in {}", g.path.display()), "missing")
                })?;
                let w = g.read_f32(t)?;
                Ok(match qk_heads(cfg, name) {
                    Some(h) => gguf::unpermute_qk(&w, t.shape[0], h),
                    None => w,
                })
            }
        }
    }

    /// The model's tokenizer: from the GGUF metadata, or `tokenizer.json` / `tokenizer.model`
    /// in the HF directory. A tokenizer with more tokens than the embedding has rows is refused.
    pub fn tokenizer(&self, cfg: &LlamaConfig) -> Result<Tokenizer> {
        let tok = match self {
            LlamaFiles::Gguf(g) => Tokenizer::from_gguf(g)?,
            LlamaFiles::Hf { dir, .. } => {
                if dir.join("tokenizer.json").exists() {
                    Tokenizer::from_json_file(&dir.join("tokenizer.json"))?
                } else if dir.join("tokenizer.model").exists() {
                    Tokenizer::from_sentencepiece(&dir.join("tokenizer.model"))?
                } else {
                    return Err(Error::format(
                        dir.display(),
                        "no tokenizer.json or tokenizer.model in the model directory",
                    ));
                }
            }
        };
        if tok.vocab_size() > cfg.vocab {
            return Err(Error::format(
                self.describe(),
                format!("the tokenizer has {} tokens but the model's embedding has only {} rows: tokenizer and weights do not belong together", tok.vocab_size(), cfg.vocab),
            ));
        }
        Ok(tok)
    }

    /// The tensor (HF name, HF row order) as `q4m` blocks converted without requantising, when
    /// the file stores it as GGUF Q4_1 or Q4_K; `None` otherwise.
    pub fn read_q4m(&self, cfg: &LlamaConfig, name: &str) -> Result<Option<Encoded>> {
        let LlamaFiles::Gguf(g) = self else {
            return Ok(None);
        };
        let Some(t) = Self::gguf_name(name).and_then(|n| g.tensor(&n)) else {
            return Ok(None);
        };
        if !matches!(t.ty, GgmlType::Q4_1 | GgmlType::Q4K) {
            return Ok(None);
        }
        let mut raw = g.read_raw(t)?;
        if let Some(h) = qk_heads(cfg, name) {
            raw = gguf::unpermute_qk(&raw, t.shape[0], h);
        }
        Ok(gguf::to_q4m(t.ty, &raw, t.numel()))
    }

    /// Checks that every tensor the config implies exists with the right shape.
    pub fn validate(&self, cfg: &LlamaConfig) -> Result<()> {
        for (name, shape) in cfg.expected_tensors() {
            let shown = match self {
                LlamaFiles::Gguf(_) => Self::gguf_name(&name).unwrap_or(name.clone()),
                _ => name.clone(),
            };
            match self.shape(&name) {
                None => {
                    return Err(Error::tensor(
                        shown,
                        format!("present with shape {shape:?} in {}", self.describe()),
                        "missing",
                    ))
                }
                Some(s) if s != shape => {
                    return Err(Error::tensor(
                        shown,
                        format!("shape {shape:?} (from the config) in {}", self.describe()),
                        format!("{s:?}"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Heads of a Q or K projection (whose GGUF rows are permuted), `None` for other tensors.
fn qk_heads(cfg: &LlamaConfig, name: &str) -> Option<usize> {
    if name.ends_with("q_proj.weight") {
        Some(cfg.heads)
    } else if name.ends_with("k_proj.weight") {
        Some(cfg.kv_heads)
    } else {
        None
    }
}

/// The checkpoint seen as a [`TensorSource`] with HF names (GGUF names mapped, Q/K rows
/// un-permuted, Q4_1 / Q4_K blocks offered as `q4m`).
pub struct LlamaSource<'a> {
    cfg: &'a LlamaConfig,
    files: &'a LlamaFiles,
}

impl LlamaFiles {
    pub fn source<'a>(&'a self, cfg: &'a LlamaConfig) -> LlamaSource<'a> {
        LlamaSource { cfg, files: self }
    }
}

impl TensorSource for LlamaSource<'_> {
    fn describe(&self) -> String {
        self.files.describe()
    }
    fn names(&self) -> Vec<String> {
        self.cfg
            .expected_tensors()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| self.files.shape(n).is_some())
            .collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.files.shape(name)
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.files.read(self.cfg, name)
    }
    fn read_q4m(&self, name: &str) -> Result<Option<Encoded>> {
        self.files.read_q4m(self.cfg, name)
    }
}

/// GPU formats of the weights: `--quant` sets the linear layers; the embedding table and
/// lm_head follow the rule in [`QuantPolicy::for_linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantPolicy {
    pub linear: DType,
    pub embed: DType,
    pub lm_head: DType,
}

impl QuantPolicy {
    /// The KV cache's dtype: f32 for an all-f32 model (exact, as the goldens need), f16
    /// otherwise (half the memory and bandwidth; what llama.cpp and WebLLM use).
    pub fn kv_dtype(&self) -> DType {
        if self.linear == DType::F32 {
            DType::F32
        } else {
            DType::F16
        }
    }

    /// Linear layers in `q`; the embedding gather table in f16 (f32 when `q` is f32): a gather
    /// reads one row per token, so its size costs memory, not speed; lm_head in q8 when the
    /// layers are q4 (the logits are the most quantisation-sensitive matmul), else like them.
    pub fn for_linear(q: DType) -> Self {
        match q {
            DType::F32 => QuantPolicy {
                linear: q,
                embed: DType::F32,
                lm_head: DType::F32,
            },
            DType::F16 => QuantPolicy {
                linear: q,
                embed: DType::F16,
                lm_head: DType::F16,
            },
            DType::Q8 => QuantPolicy {
                linear: q,
                embed: DType::F16,
                lm_head: DType::Q8,
            },
            DType::Q4 | DType::Q4M => QuantPolicy {
                linear: q,
                embed: DType::F16,
                lm_head: DType::Q8,
            },
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wqkv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// Head-major ([`kv_cache_shape`]): each KV head's keys, then its values, by position.
    kv_cache: Tensor,
}

/// Per-row-count activation buffers, created on first use and reused.
struct Scratch {
    x: Tensor,
    h: Tensor,
    qkv: Tensor,
    attn: Tensor,
    g: Tensor,
    last: Tensor,
    /// The normalised last row, where the final norm is not fused into the LM head.
    last_h: Tensor,
    logits_last: Tensor,
    logits_all: Option<Tensor>,
    /// Split-K attention partial results (decode, at most 4 rows).
    partials: Option<Tensor>,
    /// GPU top-k: the repetition-penalty mask (a bit per id) and two candidate buffers.
    topk_mask: Ids,
    topk_ping: Ids,
    topk_pong: Ids,
    /// Input token ids (t of them), rewritten every forward.
    ids: Ids,
    token: Ids,
    /// A token sampled on the GPU ahead of its readback, or `u32::MAX` for the host's turn.
    picked: Ids,
}

enum Output {
    Logits(Vec<f32>),
    Argmax(u32),
    Candidates(Vec<Candidate>),
    Ahead(InFlight),
}

/// Where a forward's input rows come from.
enum Src<'a> {
    Given(Input<'a>),
    /// One token: the id the previous one-token forward's argmax or sampler left on the GPU.
    Chained,
}

/// A token picked on the GPU (greedy or sampled) whose forward has been submitted and whose id
/// is not read back yet: its readback slot, the submission to wait for, and the slot's mapping.
struct InFlight {
    slot: usize,
    index: wgpu::SubmissionIndex,
    mapped: Mapping,
}

/// Tokens in flight at once in [`Llama::decode_greedy`] and [`Llama::decode_sampled`]: the one
/// being read back and the next one, already submitted.
const AHEAD: usize = 2;

/// What the last row's logits should become.
#[derive(Clone, Copy)]
enum Pick<'a> {
    Logits,
    /// The greedy token among ids `< allowed`.
    Argmax(usize),
    /// The same for one token, left where the next one-token forward reads its input
    /// ([`Src::Chained`]) and copied into readback slot `.1`; returned without waiting.
    ArgmaxAhead(usize, usize),
    /// The best [`TOPK_KEEP`] ids `< allowed`, ranked after the repetition penalty on `ids`.
    TopK {
        allowed: usize,
        penalized: &'a [u32],
        penalty: f32,
    },
    /// One token sampled on the GPU among those candidates (the penalty's set is already on
    /// the GPU, and gains the pick), left where the next one-token forward reads its input and
    /// copied into readback slot `slot`; returned without waiting.
    SampleAhead {
        allowed: usize,
        penalty: f32,
        params: SampleParams,
        slot: usize,
    },
}

impl Pick<'_> {
    /// The kind of recorded plan this pick needs (part of a plan's key with the rows and
    /// whether every row's logits are kept): the two greedy picks record the same dispatches.
    fn plan_kind(&self) -> u8 {
        match self {
            Pick::Logits => 0,
            Pick::Argmax(_) | Pick::ArgmaxAhead(..) => 1,
            Pick::TopK { .. } => 2,
            Pick::SampleAhead { .. } => 3,
        }
    }
}

/// How [`Llama::decode_sampled`] samples: the settings (as `chat::sample` reads them) and the
/// draws, one per token, uniform in [0, 1), taken in order. A token the candidates cannot
/// decide is sampled on the host from its full logits with the same draw (`chat::sample_with`).
pub struct Sampler<'a> {
    pub sampling: &'a Sampling,
    pub draw: &'a mut dyn FnMut() -> f64,
}

/// [`Llama::decode_sampled`]'s sampler with the penalty's ids so far and the draws taken.
struct SampleState<'a> {
    sampler: Sampler<'a>,
    penalized: Vec<u32>,
    draws: Vec<f64>,
}

impl SampleState<'_> {
    /// Draw `i` of this decode (drawn in order, each once); greedy draws nothing (0, unused).
    fn draw(&mut self, i: usize) -> f64 {
        if self.sampler.sampling.greedy {
            return 0.0;
        }
        while self.draws.len() <= i {
            let u = (self.sampler.draw)();
            self.draws.push(u);
        }
        self.draws[i]
    }
}

/// One of the GPU top-k's candidates: a token id and its logit before any penalty.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
}

impl Candidate {
    /// The candidates of the top-k kernel's output words (three each: ranking key bits, id,
    /// logit bits), padding (id `u32::MAX`) dropped.
    pub fn from_words(words: &[u32]) -> Vec<Candidate> {
        words
            .chunks(3)
            .filter(|w| w.len() == 3 && w[1] != u32::MAX)
            .map(|w| Candidate {
                id: w[1],
                logit: f32::from_bits(w[2]),
            })
            .collect()
    }
}

/// Submits a one-token forward whose pick stays on the GPU, with the pick's word (the first of
/// `picked`) copied into `staging`, readback slot `slot`, in the same command buffer; returns
/// the recording and the token in flight.
async fn submit_ahead(
    mut rec: Recorder<'_>,
    picked: &wgpu::Buffer,
    staging: &wgpu::Buffer,
    slot: usize,
) -> Result<(Plan, InFlight)> {
    rec.copy_after(picked, staging, 4);
    let (plan, index) = rec.submit_indexed().await?;
    let mapped = map_for_read(staging);
    Ok((
        plan,
        InFlight {
            slot,
            index,
            mapped,
        },
    ))
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub policy: QuantPolicy,
    /// Context capacity of the KV cache.
    pub ctx: usize,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RopeTable,
    scratch: HashMap<(usize, bool), Scratch>,
    /// The last recording per (rows, all logits, argmax), replayed by the next pass of the same
    /// shape: a decode step creates no bind group and no buffer.
    plans: HashMap<(usize, bool, u8), Plan>,
    /// Rows of the latest forward pass (whose scratch holds the last logits).
    last_rows: usize,
    /// Tokens currently in the KV cache.
    pub pos: usize,
    /// Whether the block GEMV's lanes have been tuned for this model's small matrices.
    tuned: bool,
    /// [`AHEAD`] 4-byte readback buffers for tokens in flight, used in turn.
    readback: Vec<wgpu::Buffer>,
    next_slot: usize,
    /// Tokens submitted past the end of a greedy decode, whose slots are still mapping.
    abandoned: Vec<InFlight>,
}

impl Llama {
    /// The GPU tensors and how each comes from the HF-named checkpoint tensors: Q, K and V
    /// fused into one matrix per layer; lm_head from the embedding table when tied.
    pub fn specs(cfg: &LlamaConfig, policy: QuantPolicy) -> Vec<TensorSpec> {
        let (h, q, kv, f, v) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
            cfg.vocab,
        );
        let mut s = Vec::new();
        // bound as uniforms where the norms are fused into the GEMVs after them
        let norm = |name: String| TensorSpec::copied(name, &[h], DType::F32).bound_as_uniform();
        let lin = |name: String, rows: usize, cols: usize| {
            TensorSpec::copied(name, &[rows, cols], policy.linear)
        };
        s.push(TensorSpec::copied(
            "model.embed_tokens.weight",
            &[v, h],
            policy.embed,
        ));
        for i in 0..cfg.layers {
            let l = format!("model.layers.{i}");
            s.push(norm(format!("{l}.input_layernorm.weight")));
            s.push(TensorSpec::new(
                format!("{l}.self_attn.qkv_proj.weight"),
                &[q + 2 * kv, h],
                policy.linear,
                Recipe::Concat(vec![
                    Piece::tensor(format!("{l}.self_attn.q_proj.weight"), &[q, h]),
                    Piece::tensor(format!("{l}.self_attn.k_proj.weight"), &[kv, h]),
                    Piece::tensor(format!("{l}.self_attn.v_proj.weight"), &[kv, h]),
                ]),
            ));
            s.push(lin(format!("{l}.self_attn.o_proj.weight"), h, q));
            s.push(norm(format!("{l}.post_attention_layernorm.weight")));
            s.push(lin(format!("{l}.mlp.gate_proj.weight"), f, h));
            s.push(lin(format!("{l}.mlp.up_proj.weight"), f, h));
            s.push(lin(format!("{l}.mlp.down_proj.weight"), h, f));
        }
        s.push(norm("model.norm.weight".into()));
        s.push(TensorSpec::new(
            "lm_head.weight",
            &[v, h],
            policy.lm_head,
            Recipe::copy(
                if cfg.tied {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                },
                &[v, h],
            ),
        ));
        s
    }

    /// Builds the decoder from uploaded tensors (see [`Llama::specs`]) with a KV cache of
    /// `ctx` positions.
    pub fn build(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        policy: QuantPolicy,
        t: &mut TensorMap,
        ctx: usize,
    ) -> Result<Self> {
        let ctx = ctx.min(cfg.max_pos).max(1);
        gpu.require(&cfg.requirements(ctx, 1))?;
        let (h, q, kv, f) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.intermediate,
        );
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let l = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: t.take(&format!("{l}.input_layernorm.weight"), &[h])?,
                wqkv: t.take(&format!("{l}.self_attn.qkv_proj.weight"), &[q + 2 * kv, h])?,
                wo: t.take(&format!("{l}.self_attn.o_proj.weight"), &[h, q])?,
                ffn_norm: t.take(&format!("{l}.post_attention_layernorm.weight"), &[h])?,
                gate: t.take(&format!("{l}.mlp.gate_proj.weight"), &[f, h])?,
                up: t.take(&format!("{l}.mlp.up_proj.weight"), &[f, h])?,
                down: t.take(&format!("{l}.mlp.down_proj.weight"), &[h, f])?,
                kv_cache: Tensor::empty(
                    gpu,
                    &format!("{l}.kv_cache"),
                    &kv_cache_shape(cfg.kv_heads, ctx, cfg.head_dim),
                    policy.kv_dtype(),
                )?,
            });
        }
        Ok(Llama {
            cfg: cfg.clone(),
            policy,
            ctx,
            embed: t.take("model.embed_tokens.weight", &[cfg.vocab, h])?,
            layers,
            norm: t.take("model.norm.weight", &[h])?,
            lm_head: t.take("lm_head.weight", &[cfg.vocab, h])?,
            rope: RopeTable::new(gpu, cfg.head_dim, ctx, cfg.rope_theta)?,
            scratch: HashMap::new(),
            plans: HashMap::new(),
            last_rows: 1,
            pos: 0,
            tuned: false,
            readback: (0..AHEAD)
                .map(|_| {
                    gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("token readback"),
                        size: 4,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                })
                .collect(),
            next_slot: 0,
            abandoned: Vec::new(),
        })
    }

    /// Validates every tensor, then uploads them one at a time (host memory ≈ one tensor).
    /// With 4-bit layers, GGUF Q4_1 / Q4_K sources are converted block by block to q4m instead
    /// of being requantised from their dequantised values.
    pub fn load(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        files: &LlamaFiles,
        policy: QuantPolicy,
        ctx: usize,
    ) -> Result<Self> {
        files.validate(cfg)?;
        gpu.require(&cfg.requirements(ctx.min(cfg.max_pos).max(1), 1))?;
        let specs = Self::specs(cfg, policy);
        let src = files.source(cfg);
        Self::build(
            gpu,
            cfg,
            policy,
            &mut TensorMap::upload(gpu, &specs, &src)?,
            ctx,
        )
    }

    pub fn embed_into(&self, rec: &mut Recorder, ids: &Ids, out: &Tensor) -> Result<()> {
        rec.embedding(ids, &self.embed, out)
    }

    /// GPU bytes of a model: (weights, KV cache, decode scratch) with a `ctx`-token cache.
    pub fn memory(cfg: &LlamaConfig, policy: QuantPolicy, ctx: usize) -> (u64, u64, u64) {
        let weights = Self::specs(cfg, policy)
            .iter()
            .map(TensorSpec::gpu_bytes)
            .sum();
        let kv = policy
            .kv_dtype()
            .bytes(2 * cfg.layers * ctx * cfg.kv_heads * cfg.head_dim) as u64;
        let (q, kvw) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let rows = 4 * (3 * cfg.hidden + q + 2 * kvw + q + cfg.intermediate + 2 * cfg.vocab);
        let scratch = (rows + attention_partials(1, cfg.heads, ctx, cfg.head_dim)) as u64 * 4;
        (weights, kv, scratch)
    }

    /// The matrices a decode step reads in full, as loaded (every layer's and the LM head; the
    /// embedding table is only gathered from).
    pub fn decode_matrices(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self
            .layers
            .iter()
            .flat_map(|l| [&l.wqkv, &l.wo, &l.gate, &l.up, &l.down])
            .collect();
        v.push(&self.lm_head);
        v
    }

    /// Forgets the conversation (the KV cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    fn scratch(&mut self, gpu: &Gpu, t: usize, all_logits: bool) -> Result<()> {
        if self.scratch.contains_key(&(t, all_logits)) {
            return Ok(());
        }
        let c = &self.cfg;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let s = Scratch {
            x: Tensor::zeros(gpu, "x", &[t, c.hidden])?,
            h: Tensor::zeros(gpu, "h", &[t, c.hidden])?,
            qkv: Tensor::zeros(gpu, "qkv", &[t, q + 2 * kv])?,
            attn: Tensor::zeros(gpu, "attn", &[t, q])?,
            g: Tensor::zeros(gpu, "gate", &[t, c.intermediate])?,
            last: Tensor::zeros(gpu, "last", &[1, c.hidden])?,
            last_h: Tensor::zeros(gpu, "last_h", &[1, c.hidden])?,
            logits_last: Tensor::zeros(gpu, "logits", &[1, c.vocab])?,
            logits_all: if all_logits {
                Some(Tensor::zeros(gpu, "logits_all", &[t, c.vocab])?)
            } else {
                None
            },
            partials: if t <= GEMV_MAX_ROWS {
                let n = attention_partials(t, c.heads, self.ctx, c.head_dim);
                Some(Tensor::zeros(gpu, "attention_partials", &[n])?)
            } else {
                None
            },
            topk_mask: Ids::new(gpu, &vec![0; c.vocab.div_ceil(32)]),
            topk_ping: Ids::new(gpu, &vec![0; topk_words(c.vocab)]),
            topk_pong: Ids::new(gpu, &vec![0; topk_words(c.vocab)]),
            ids: Ids::new(gpu, &vec![0; t]),
            token: Ids::new(gpu, &[0]),
            picked: Ids::new(gpu, &[0]),
        };
        // keep at most a few prefill sizes around
        if self.scratch.len() > 4 {
            self.scratch.retain(|k, _| k.0 == 1);
            self.plans.retain(|k, _| k.0 == 1);
        }
        self.scratch.insert((t, all_logits), s);
        Ok(())
    }

    /// Runs `ids` (or, when `embeds` is given, those `[t, hidden]` input rows instead of token
    /// embeddings) at positions `pos..pos+t`, appends them to the KV cache and returns the
    /// logits of the last row (or of every row with `all_logits`), f32.
    pub async fn forward(
        &mut self,
        gpu: &Gpu,
        input: Input<'_>,
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        match self
            .run(gpu, Src::Given(input), all_logits, Pick::Logits)
            .await?
        {
            Output::Logits(l) => Ok(l),
            _ => Err(Error::Gpu(
                "internal: another output for a logits request".into(),
            )),
        }
    }

    /// Like [`Llama::forward`] for the last row, but picks the greedy token (argmax over ids
    /// `< allowed`) on the GPU and reads back only its 4 bytes.
    pub async fn forward_argmax(
        &mut self,
        gpu: &Gpu,
        input: Input<'_>,
        allowed: usize,
    ) -> Result<u32> {
        let pick = Pick::Argmax(allowed.clamp(1, self.cfg.vocab));
        match self.run(gpu, Src::Given(input), false, pick).await? {
            Output::Argmax(id) => Ok(id),
            _ => Err(Error::Gpu(
                "internal: another output for an argmax request".into(),
            )),
        }
    }

    /// Like [`Llama::forward`] for the last row, but returns only the best [`TOPK_KEEP`] ids
    /// below `allowed` as ranked after HF's repetition penalty on `penalized` (768 bytes read
    /// back instead of the logits), for sampling with top-k. Padding is dropped when the
    /// vocabulary is smaller than that. The full logits stay readable with
    /// [`Llama::last_logits`].
    pub async fn forward_topk(
        &mut self,
        gpu: &Gpu,
        input: Input<'_>,
        allowed: usize,
        penalized: &[u32],
        penalty: f32,
    ) -> Result<Vec<Candidate>> {
        let pick = Pick::TopK {
            allowed: allowed.clamp(1, self.cfg.vocab),
            penalized,
            penalty,
        };
        match self.run(gpu, Src::Given(input), false, pick).await? {
            Output::Candidates(c) => Ok(c),
            _ => Err(Error::Gpu(
                "internal: another output for a top-k request".into(),
            )),
        }
    }

    /// Greedy decoding from `first`, a token already chosen and not yet run: runs it, picks the
    /// next token on the GPU (argmax over ids `< allowed`), runs that, and so on, calling
    /// `on(id)` with each token picked until it returns false or `max` tokens have been
    /// picked; each is in the KV cache once `on` has seen the next (the last one is not run).
    ///
    /// With `ahead` (what chat does), each token's forward is submitted before the token
    /// before it is read back: its input is the id the previous argmax left on the GPU, so
    /// the GPU does not wait out the host's round trip (the readback, and in the browser the
    /// promises around it) between tokens. A forward submitted past the end is discarded: the
    /// position goes back one, and the next token overwrites its KV row. Without, each token is
    /// read back before the next is submitted (the same tokens, the bench's comparison).
    pub async fn decode_greedy(
        &mut self,
        gpu: &Gpu,
        first: u32,
        allowed: usize,
        max: usize,
        ahead: bool,
        on: impl FnMut(u32) -> bool,
    ) -> Result<()> {
        self.decode_ahead(gpu, first, allowed, max, ahead, None, on)
            .await
    }

    /// Sampled decoding the way [`Llama::decode_greedy`] decodes greedily: each token is
    /// sampled on the GPU among its top-k candidates (`shaders/sample.wgsl`, with the
    /// repetition penalty's set kept on the GPU, starting from `penalized`) and fed to the next
    /// forward before it is read back. A token the candidates cannot decide (see
    /// `chat::sample_candidates`) comes back as the host's turn: the forwards submitted after
    /// it are undone, its forward runs again for the full logits, the host samples them with
    /// the same draw, and decoding goes on from there. The tokens are those of sampling each
    /// on the host among the candidates, draw by draw (up to rounding: the GPU works in f32).
    /// Greedy settings (with a repetition penalty) take the penalty's argmax the same way.
    #[allow(clippy::too_many_arguments)]
    pub async fn decode_sampled(
        &mut self,
        gpu: &Gpu,
        first: u32,
        allowed: usize,
        max: usize,
        ahead: bool,
        penalized: &[u32],
        sampler: Sampler<'_>,
        on: impl FnMut(u32) -> bool,
    ) -> Result<()> {
        // (the sampling kernel's recording checks the sampler's values)
        let state = SampleState {
            sampler,
            penalized: penalized.to_vec(),
            draws: Vec::new(),
        };
        self.decode_ahead(gpu, first, allowed, max, ahead, Some(state), on)
            .await
    }

    /// Writes the repetition penalty's set (the ids of `penalized` below `allowed`) where the
    /// one-token forward's top-k reads it.
    fn write_penalty_set(&mut self, gpu: &Gpu, penalized: &[u32], allowed: usize) -> Result<()> {
        self.scratch(gpu, 1, false)?;
        let s = &self.scratch[&(1, false)];
        write_penalty_mask(gpu, &s.topk_mask, self.cfg.vocab, penalized, allowed);
        Ok(())
    }

    /// The loop of [`Llama::decode_greedy`] (`sampling` none) and [`Llama::decode_sampled`].
    #[allow(clippy::too_many_arguments)]
    async fn decode_ahead(
        &mut self,
        gpu: &Gpu,
        first: u32,
        allowed: usize,
        max: usize,
        ahead: bool,
        mut sampling: Option<SampleState<'_>>,
        mut on: impl FnMut(u32) -> bool,
    ) -> Result<()> {
        if max == 0 {
            return Ok(());
        }
        self.check_ids(&[first])?;
        // each token picked but the last is run: max forwards, first's included
        self.check_room(max)?;
        self.settle(gpu).await?;
        let allowed = allowed.clamp(1, self.cfg.vocab);
        if let Some(st) = &sampling {
            self.write_penalty_set(gpu, &st.penalized, allowed)?;
        }
        let depth = if ahead { AHEAD } else { 1 };
        let mut flying: VecDeque<InFlight> = VecDeque::with_capacity(AHEAD);
        let mut picked = 0;
        // the input of the next forward when the host gives it (else the GPU's last pick), and
        // of the forward read back next
        let mut given = Some(first);
        let mut last = first;
        let result = async {
            loop {
                while flying.len() < depth && picked + flying.len() < max {
                    let id = given.take();
                    let src = match &id {
                        Some(id) => Src::Given(Input::Ids(std::slice::from_ref(id))),
                        None => Src::Chained,
                    };
                    let slot = self.next_slot;
                    self.next_slot = (slot + 1) % AHEAD;
                    let pick = match &mut sampling {
                        None => Pick::ArgmaxAhead(allowed, slot),
                        Some(st) => {
                            let u = st.draw(picked + flying.len()) as f32;
                            let sm = st.sampler.sampling;
                            // greedy (with a penalty; without one this is `decode_greedy`) is
                            // top-k 1 with a draw of 0: the tokens kept are those tied at the best
                            // value, and a draw of 0 takes the lowest id of them, as `argmax` does
                            let params = if sm.greedy {
                                SampleParams {
                                    temperature: 1.0,
                                    top_k: 1,
                                    top_p: 1.0,
                                    u: 0.0,
                                }
                            } else {
                                SampleParams {
                                    temperature: sm.temperature,
                                    top_k: sm.top_k,
                                    top_p: sm.top_p,
                                    u,
                                }
                            };
                            Pick::SampleAhead {
                                allowed,
                                penalty: sm.repetition_penalty,
                                params,
                                slot,
                            }
                        }
                    };
                    match self.run(gpu, src, false, pick).await? {
                        Output::Ahead(f) => flying.push_back(f),
                        _ => {
                            return Err(Error::Gpu(
                                "internal: another output for a token ahead".into(),
                            ))
                        }
                    }
                }
                let Some(f) = flying.pop_front() else {
                    return Ok(());
                };
                let mut id = self.read_back(gpu, f).await?;
                if let (u32::MAX, Some(st)) = (id, &mut sampling) {
                    // the host's turn: the forwards after this one ran on a placeholder, and
                    // this one's logits are gone; undo them all and run this one again
                    self.pos -= flying.len() + 1;
                    self.abandoned.extend(flying.drain(..));
                    self.settle(gpu).await?;
                    let mut logits = self
                        .forward(gpu, Input::Ids(std::slice::from_ref(&last)), false)
                        .await?;
                    let u = st.draw(picked);
                    id = sample_with(&mut logits, &st.penalized, allowed, st.sampler.sampling, u);
                    // the undone picks set their bits: the set again as accepted
                    st.penalized.push(id);
                    self.write_penalty_set(gpu, &st.penalized, allowed)?;
                    given = Some(id);
                } else if let Some(st) = &mut sampling {
                    st.penalized.push(id);
                }
                last = id;
                picked += 1;
                if !on(id) || picked == max {
                    return Ok(());
                }
            }
        }
        .await;
        // forwards past the end: undone (their readbacks finish later, see `settle`)
        self.pos -= flying.len();
        self.abandoned.extend(flying);
        result
    }

    /// An error unless `t` more tokens fit in the context.
    fn check_room(&self, t: usize) -> Result<()> {
        if self.pos + t > self.ctx {
            return Err(Error::tensor(
                "input",
                format!(
                    "at most {} tokens in the context ({} already used)",
                    self.ctx, self.pos
                ),
                self.pos + t,
            ));
        }
        Ok(())
    }

    /// An error naming the first id outside the vocabulary.
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&i| i as usize >= self.cfg.vocab) {
            Some(bad) => Err(Error::tensor(
                "input ids",
                format!("ids below the vocabulary size {}", self.cfg.vocab),
                bad,
            )),
            None => Ok(()),
        }
    }

    /// Waits for a token's submission and reads its id from the readback slot.
    async fn read_back(&self, gpu: &Gpu, f: InFlight) -> Result<u32> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = gpu.device.poll(wgpu::PollType::Wait {
                submission_index: Some(f.index),
                timeout: None,
            });
        }
        #[cfg(target_arch = "wasm32")]
        let _ = f.index;
        Ok(read_mapped(gpu, &self.readback[f.slot], f.mapped, 1).await?[0])
    }

    /// Finishes the readbacks of tokens a decode submitted past its end, so that their
    /// slots can be used again (long done by the time a next decode starts).
    async fn settle(&mut self, gpu: &Gpu) -> Result<()> {
        for f in std::mem::take(&mut self.abandoned) {
            self.read_back(gpu, f).await?;
        }
        Ok(())
    }

    /// The last row's logits of the latest single-row-output forward (the top-k fallback).
    pub async fn last_logits(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let s = self
            .scratch
            .get(&(self.last_rows, false))
            .ok_or_else(|| Error::Gpu("no forward pass has run yet".into()))?;
        s.logits_last.read_f32(gpu).await
    }

    /// Tunes what this model's shapes need, once (cached): the block GEMV's lanes for a small
    /// model's matrices, and the prefill GEMMs' forms where the device tunes them per shape. The
    /// first forward does it when nothing has; `chat::generate_from` does it before its clock
    /// starts, so that a first answer's timings are the answer's.
    pub async fn prepare(&mut self, gpu: &Gpu) -> Result<()> {
        if self.tuned {
            return Ok(());
        }
        let mats = self.decode_matrices();
        // lanes per shape for small models' matrices (once; cached)
        let shapes: Vec<_> = mats.iter().map(|t| (t.rows(), t.cols(), t.dtype)).collect();
        crate::gpu::tune::tune_shapes(gpu, &shapes).await?;
        // and the prefill GEMMs' forms, where the device tunes them per shape: the layer
        // matrices (prefill runs the LM head on its last row only)
        let layers = mats.iter().filter(|t| !std::ptr::eq(**t, &self.lm_head));
        let gemms: Vec<_> = crate::gpu::tune::GEMM_PREFILL_ROWS
            .iter()
            .filter(|&&m| m <= self.ctx)
            .flat_map(|&m| {
                layers
                    .clone()
                    .map(move |t| (m, t.rows(), t.cols(), t.dtype))
            })
            .collect();
        crate::gpu::tune::tune_gemm_shapes(gpu, &gemms).await?;
        self.tuned = true;
        Ok(())
    }

    /// The workgroup count of each dispatch one greedy decode step records (one token,
    /// argmax), once one has run: its plan is kept for the next.
    pub fn step_workgroups(&self) -> Option<Vec<u32>> {
        let greedy = Pick::Argmax(self.cfg.vocab).plan_kind();
        self.plans.get(&(1, false, greedy)).map(|p| p.workgroups())
    }

    async fn run(
        &mut self,
        gpu: &Gpu,
        src: Src<'_>,
        all_logits: bool,
        pick: Pick<'_>,
    ) -> Result<Output> {
        self.prepare(gpu).await?;
        let t = match &src {
            Src::Given(Input::Ids(ids)) => ids.len(),
            Src::Given(Input::Embeds(e)) => e.rows(),
            Src::Chained => 1,
        };
        if t == 0 {
            return Err(Error::tensor("input", "at least one token", 0));
        }
        self.check_room(t)?;
        if let Src::Given(Input::Ids(ids)) = &src {
            self.check_ids(ids)?;
        }
        self.scratch(gpu, t, all_logits)?;
        let c = &self.cfg;
        let s = &self.scratch[&(t, all_logits)];
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let pos = self.pos;
        let plan_key = (t, all_logits, pick.plan_kind());
        let mut rec = match self.plans.remove(&plan_key) {
            Some(plan) => Recorder::replaying(gpu, plan),
            None => Recorder::new(gpu),
        };
        match &src {
            Src::Given(Input::Ids(ids)) => {
                gpu.queue
                    .write_buffer(&s.ids.buffer, 0, bytemuck::cast_slice(ids));
                rec.embedding(&s.ids, &self.embed, &s.x)?;
            }
            // the id the previous one-token argmax wrote there (queue order: it ran before)
            Src::Chained => rec.embedding(&s.ids, &self.embed, &s.x)?,
            Src::Given(Input::Embeds(e)) => {
                e.expect(Some(DType::F32), &[t, c.hidden])?;
                rec.copy_rows(e, 0, c.hidden, &s.x, 0, c.hidden, t, c.hidden)?;
            }
        }
        let qkv_stride = q + 2 * kv;
        for l in &self.layers {
            // q rotated in place; k rotated and v copied into this layer's cache rows (for one
            // token in the projection's own store, the norm fused in where tuning says so)
            rec.rms_norm_qkv_rope(
                MatmulPath::Auto,
                &s.x,
                &l.attn_norm,
                c.rms_eps,
                &s.h,
                &l.wqkv,
                &s.qkv,
                RopeKv {
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    table: &self.rope,
                    pos0: pos,
                    mode: RopeMode::Half,
                    cache: &l.kv_cache,
                },
            )?;
            let (keys, values) = kv_cache_views(&l.kv_cache)?;
            rec.attention_with(
                HeadView::rows(&s.qkv, 0, qkv_stride),
                keys,
                values,
                HeadView::whole(&s.attn),
                AttnShape {
                    t,
                    s: pos + t,
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    head_dim: c.head_dim,
                    causal: true,
                    scale: 1.0 / (c.head_dim as f32).sqrt(),
                },
                // split-K only pays off with more than one chunk of keys; below that the
                // combine pass would be one more dispatch per layer for nothing
                s.partials.as_ref().filter(|_| pos + t > ATTN_SPLIT),
            )?;
            rec.matmul(&s.attn, &l.wo, None, &s.x, true)?;
            rec.rms_norm_glu(
                MatmulPath::Auto,
                &s.x,
                &l.ffn_norm,
                c.rms_eps,
                &s.h,
                &l.gate,
                &l.up,
                &s.g,
            )?;
            rec.matmul(&s.g, &l.down, None, &s.x, true)?;
        }
        let out = if let Some(all) = &s.logits_all {
            rec.rms_norm(&s.x, &self.norm, c.rms_eps, &s.h)?;
            rec.matmul(&s.h, &self.lm_head, None, all, false)?;
            all
        } else {
            // the last row alone (copied out of x when there are several), its norm fused into
            // the LM head where it can be
            let last = if t == 1 {
                &s.x
            } else {
                let h = c.hidden;
                rec.copy_rows(&s.x, (t - 1) * h, h, &s.last, 0, h, 1, h)?;
                &s.last
            };
            rec.rms_norm_matmul(
                MatmulPath::Auto,
                last,
                &self.norm,
                c.rms_eps,
                &s.last_h,
                &self.lm_head,
                &s.logits_last,
            )?;
            &s.logits_last
        };
        self.last_rows = t;
        // one token's pick (greedy or sampled) goes where the next one-token forward reads its
        // input, so a chained forward can follow it without the host (the same plan either way)
        let token = if t == 1 { &s.ids } else { &s.token };
        match pick {
            Pick::Argmax(n) => {
                rec.argmax(out, n, token)?;
                let plan = rec.submit_keep().await?;
                self.plans.insert(plan_key, plan);
                let id = read_words(gpu, &token.buffer, 0, 1).await?[0];
                self.pos += t;
                return Ok(Output::Argmax(id));
            }
            Pick::ArgmaxAhead(n, slot) => {
                if t != 1 {
                    return Err(Error::Gpu(
                        "internal: a greedy token ahead of its readback is one row".into(),
                    ));
                }
                rec.argmax(out, n, token)?;
                let (plan, f) =
                    submit_ahead(rec, &token.buffer, &self.readback[slot], slot).await?;
                self.plans.insert(plan_key, plan);
                self.pos += t;
                return Ok(Output::Ahead(f));
            }
            Pick::TopK {
                allowed, penalty, ..
            }
            | Pick::SampleAhead {
                allowed, penalty, ..
            } => {
                let ahead = match pick {
                    Pick::SampleAhead { params, slot, .. } => Some((params, slot)),
                    _ => None,
                };
                if let Pick::TopK { penalized, .. } = pick {
                    write_penalty_mask(gpu, &s.topk_mask, self.cfg.vocab, penalized, allowed);
                }
                // (ahead, the penalty's set is on the GPU already: `decode_sampled` wrote it)
                let best = rec.topk(
                    out,
                    allowed,
                    &s.topk_mask,
                    penalty,
                    &s.topk_ping,
                    &s.topk_pong,
                )?;
                if let Some((params, slot)) = ahead {
                    if t != 1 {
                        return Err(Error::Gpu(
                            "internal: a sampled token ahead of its readback is one row".into(),
                        ));
                    }
                    rec.sample(best, &params, &s.topk_mask, token, &s.picked)?;
                    let picked = &s.picked.buffer;
                    let (plan, f) = submit_ahead(rec, picked, &self.readback[slot], slot).await?;
                    self.plans.insert(plan_key, plan);
                    self.pos += t;
                    return Ok(Output::Ahead(f));
                }
                let plan = rec.submit_keep().await?;
                self.plans.insert(plan_key, plan);
                let words = read_words(gpu, &best.buffer, 0, 3 * TOPK_KEEP).await?;
                self.pos += t;
                return Ok(Output::Candidates(Candidate::from_words(&words)));
            }
            Pick::Logits => {}
        }
        let plan = rec.submit_keep().await?;
        self.plans.insert(plan_key, plan);
        let logits = out.read_f32(gpu).await?;
        self.pos += t;
        Ok(Output::Logits(logits))
    }
}

/// Writes HF's repetition-penalty set as the top-k kernel reads it into `mask`: one bit per id
/// of the vocabulary, set for the ids of `penalized` below `allowed`.
fn write_penalty_mask(gpu: &Gpu, mask: &Ids, vocab: usize, penalized: &[u32], allowed: usize) {
    let mut bits = vec![0u32; vocab.div_ceil(32)];
    for &id in penalized.iter().filter(|&&id| (id as usize) < allowed) {
        bits[id as usize / 32] |= 1 << (id % 32);
    }
    gpu.queue
        .write_buffer(&mask.buffer, 0, bytemuck::cast_slice(&bits));
}

impl Llama {
    /// Teacher-forced top-1 prediction after every prefix of `ids` (position i predicts token
    /// i + 1), computed in chunks of `chunk` rows from a reset cache.
    pub async fn top1_predictions(
        &mut self,
        gpu: &Gpu,
        ids: &[u32],
        chunk: usize,
    ) -> Result<Vec<u32>> {
        self.reset();
        let mut out = Vec::with_capacity(ids.len());
        for c in ids.chunks(chunk.max(1)) {
            let logits = self.forward(gpu, Input::Ids(c), true).await?;
            for row in logits.chunks(self.cfg.vocab) {
                out.push(crate::chat::argmax(row));
            }
        }
        Ok(out)
    }
}

/// What a forward pass consumes.
pub enum Input<'a> {
    Ids(&'a [u32]),
    /// Precomputed input rows `[t, hidden]` (MiniGPT-4 splices image embeddings this way).
    Embeds(&'a Tensor),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vicuna-7B (LLaMA-7B shapes, vocab 32001) in 4-bit with a 2048-token cache must fit a
    /// 6 GB GPU (issue 8): ≈ 3.9 GB of weights, 1 GiB of f16 KV cache.
    #[test]
    fn vicuna_7b_q4_with_a_2k_cache_fits_in_6_gb() {
        let cfg = LlamaConfig::vicuna_v0(4096, 32, 32, 11008);
        let (w, kv, scratch) = Llama::memory(&cfg, QuantPolicy::for_linear(DType::Q4), 2048);
        assert_eq!(kv, 1 << 30);
        let total = w + kv + scratch;
        assert!(w > 3_700_000_000 && w < 4_200_000_000, "{w}");
        assert!(total < 6_000_000_000, "{w} + {kv} + {scratch} = {total}");
        // the same model with an f32 cache would not fit: the f16 cache is what makes it
        let f32_kv = 2 * kv;
        assert!(w + f32_kv + scratch > 6_000_000_000);
    }
}
