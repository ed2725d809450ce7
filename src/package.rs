//! The model package: one directory holding everything `minigpt4 chat` and the web page need.
//!
//! ```text
//! PKG/
//!   config.json                          variant, every dimension, the weight formats
//!   model.safetensors.index.json         which shard holds each entry, and every GPU tensor's
//!                                        format and shape (the manifest)
//!   model-00001-of-0000N.safetensors     ≤ 512 MiB each, tensors in the GPU layout
//!   tokenizer.json                       HF tokenizers format
//! ```
//!
//! Each GPU tensor (see [`crate::weights`]) is stored exactly as it is uploaded, so loading is a
//! straight copy into GPU buffers: no conversion, no quantisation, no transposition. Its bytes
//! are one or two safetensors entries, typed so that any safetensors tool shows sensible shapes:
//!
//! | format | entry `NAME` | entry `NAME.scales` |
//! |--------|--------------|---------------------|
//! | f32 | `F32`, the shape | — |
//! | f16 | `F16`, the shape | — |
//! | q8 | `I8`, the shape | `F16` `[..., K/32]` |
//! | q4 | `U8` `[..., K/2]` (two codes per byte, even element in the low nibble) | `F16` `[..., K/32]` |
//! | q4m | `U8` `[..., K/2]` | `F16` `[..., K/32, 2]` (scale, minimum) |
//!
//! The layouts themselves are in [`crate::quant`]. A tensor's entries are always in the same
//! shard. Loading checks `config.json`, the manifest and every shard header against the tensor
//! list the configuration implies (presence, format, shape) before the first byte goes to the
//! GPU; then each shard is streamed through [`PackageLoader`], which the browser uses too.

use std::collections::{BTreeMap, HashMap};

use crate::chat::ModelVariant;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::loader::safetensors::{parse_header, StDType, StTensor};
use crate::model::llama::{LlamaConfig, QuantPolicy};
use crate::model::minigpt4::{Formats, MiniGpt4, MiniGpt4Config};
use crate::model::qformer::QFormerConfig;
use crate::model::vit::VitConfig;
use crate::quant::{DType, QBLOCK};
use crate::tokenizer::Tokenizer;
use crate::weights::{TensorMap, TensorSpec};

pub const FORMAT: &str = "minigpt4-wgpu";
pub const FORMAT_VERSION: u32 = 1;
/// Shards are closed before they would exceed this (a single larger tensor gets its own).
pub const MAX_SHARD_BYTES: u64 = 512 << 20;
pub const CONFIG_FILE: &str = "config.json";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The GPU formats of the weights, as `config.json` records them.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightFormats {
    /// ViT, Q-Former and projection linear layers.
    pub vision: DType,
    /// LLM linear layers (`q4` layers may be stored `q4m`, see [`TensorSpec::accepts`]).
    pub llm_linear: DType,
    pub llm_embed: DType,
    pub lm_head: DType,
}

/// `config.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageConfig {
    pub format: String,
    pub format_version: u32,
    /// `vicuna0-7b`, `vicuna0-13b`, `llama2-7b`, `minigptv2` (or the bare family name).
    pub variant: String,
    pub vision: VitConfig,
    pub qformer: Option<QFormerConfig>,
    pub llm: LlamaConfig,
    pub weights: WeightFormats,
}

impl PackageConfig {
    pub fn new(variant: &str, cfg: &MiniGpt4Config, formats: Formats) -> Self {
        PackageConfig {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            variant: variant.into(),
            vision: cfg.vision.clone(),
            qformer: cfg.qformer.clone(),
            llm: cfg.llm.clone(),
            weights: WeightFormats {
                vision: formats.vision,
                llm_linear: formats.llm.linear,
                llm_embed: formats.llm.embed,
                lm_head: formats.llm.lm_head,
            },
        }
    }

    /// Parses and checks `config.json` (`shown` names it in errors).
    pub fn parse(shown: &str, bytes: &[u8]) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(shown, format!("not valid JSON: {e}")))?;
        match v.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            other => {
                return Err(Error::format(
                    shown,
                    format!("`format`: expected \"{FORMAT}\" (a minigpt4-wgpu model package; make one with `minigpt4 convert`), found {other:?}"),
                ))
            }
        }
        match v.get("format_version").and_then(|f| f.as_u64()) {
            Some(n) if n == FORMAT_VERSION as u64 => {}
            other => return Err(Error::format(
                shown,
                format!("`format_version`: expected {FORMAT_VERSION} (this build's package format), found {other:?}; convert the model again with this version"),
            )),
        }
        let c: PackageConfig = serde_json::from_value(v)
            .map_err(|e| Error::format(shown, format!("invalid package config: {e}")))?;
        c.llm.validate(shown)?;
        c.model()
            .and_then(|m| m.validate())
            .map_err(|e| Error::format(shown, e.to_string()))?;
        Ok(c)
    }

    pub fn model(&self) -> Result<MiniGpt4Config> {
        Ok(MiniGpt4Config {
            variant: ModelVariant::parse(&self.variant)?,
            vision: self.vision.clone(),
            qformer: self.qformer.clone(),
            llm: self.llm.clone(),
        })
    }

    pub fn formats(&self) -> Formats {
        Formats {
            vision: self.weights.vision,
            llm: QuantPolicy {
                linear: self.weights.llm_linear,
                embed: self.weights.llm_embed,
                lm_head: self.weights.lm_head,
            },
        }
    }

    pub fn specs(&self) -> Result<Vec<TensorSpec>> {
        MiniGpt4::specs(&self.model()?, self.formats())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// One stored safetensors entry of a GPU tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: StDType,
    pub shape: Vec<usize>,
    /// For the scales array of a quantised tensor.
    pub scales: bool,
}

impl Entry {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// The entries a GPU tensor of `shape` and `dtype` is stored as (see the module docs).
pub fn entries(name: &str, shape: &[usize], dtype: DType) -> Vec<Entry> {
    let (lead, k) = match shape.split_last() {
        Some((&k, lead)) => (lead.to_vec(), k),
        None => (vec![], 1),
    };
    let with = |last: &[usize]| {
        let mut s = lead.clone();
        s.extend_from_slice(last);
        s
    };
    let data = |dtype, shape| Entry {
        name: name.into(),
        dtype,
        shape,
        scales: false,
    };
    let scales = |shape| Entry {
        name: format!("{name}.scales"),
        dtype: StDType::F16,
        shape,
        scales: true,
    };
    match dtype {
        DType::F32 => vec![data(StDType::F32, shape.to_vec())],
        DType::F16 => vec![data(StDType::F16, shape.to_vec())],
        DType::Q8 => vec![
            data(StDType::I8, shape.to_vec()),
            scales(with(&[k / QBLOCK])),
        ],
        DType::Q4 => vec![
            data(StDType::U8, with(&[k / 2])),
            scales(with(&[k / QBLOCK])),
        ],
        DType::Q4M => vec![
            data(StDType::U8, with(&[k / 2])),
            scales(with(&[k / QBLOCK, 2])),
        ],
    }
}

/// The manifest entry of one GPU tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// `model.safetensors.index.json`: HF's `weight_map` (entry → shard file) plus the manifest.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Index {
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub weight_map: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Stored>,
    /// Each shard's byte size and SHA-256 (lower-case hex), checked as it streams in: a
    /// truncated or corrupted shard (a bad download, a damaged browser cache entry) is an
    /// error, never weights. Packages written before this field existed load without it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shards: BTreeMap<String, ShardInfo>,
}

/// Size and digest of one shard file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub size: u64,
    pub sha256: String,
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Index {
    pub fn parse(shown: &str, bytes: &[u8]) -> Result<Self> {
        let ix: Index = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(shown, format!("not a model-package index: {e}")))?;
        for f in ix.weight_map.values() {
            if f.is_empty() || f.contains(['/', '\\']) || f.contains("..") {
                return Err(Error::format(
                    shown,
                    format!("shard `{f}` is not a plain file name"),
                ));
            }
        }
        Ok(ix)
    }

    /// Shard files in order.
    pub fn shards(&self) -> Vec<String> {
        let mut v: Vec<String> = self.weight_map.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks the manifest against the tensor list the configuration implies: every tensor
    /// present with an accepted format and its shape, every entry mapped to a shard, nothing
    /// extra. Returns the entries per tensor.
    pub fn check(
        &self,
        shown: &str,
        specs: &[TensorSpec],
    ) -> Result<Vec<(TensorSpec, Vec<Entry>)>> {
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let st = self.tensors.get(&s.name).ok_or_else(|| {
                Error::tensor(
                    &s.name,
                    format!("listed in {shown} ({} {:?})", s.dtype, s.shape),
                    "missing",
                )
            })?;
            if !s.accepts(st.dtype) || st.shape != s.shape {
                return Err(Error::tensor(
                    &s.name,
                    format!("{} {:?} (from config.json) in {shown}", s.dtype, s.shape),
                    format!("{} {:?}", st.dtype, st.shape),
                ));
            }
            let mut spec = s.clone();
            spec.dtype = st.dtype;
            let es = entries(&s.name, &s.shape, st.dtype);
            let mut shard = None;
            for e in &es {
                let f = self.weight_map.get(&e.name).ok_or_else(|| {
                    Error::tensor(&e.name, format!("a shard in {shown}'s weight_map"), "none")
                })?;
                if shard.is_some_and(|s| s != f) {
                    return Err(Error::tensor(
                        &e.name,
                        format!("the same shard as `{}` ({})", s.name, shard.unwrap_or("")),
                        f,
                    ));
                }
                shard = Some(f);
            }
            out.push((spec, es));
        }
        let known: std::collections::HashSet<&str> = out
            .iter()
            .flat_map(|(_, es)| es.iter().map(|e| e.name.as_str()))
            .collect();
        if let Some(extra) = self.weight_map.keys().find(|k| !known.contains(k.as_str())) {
            return Err(Error::tensor(
                extra,
                format!("only the tensors config.json implies in {shown}"),
                "an unexpected tensor (package from another configuration?)",
            ));
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|k| !specs.iter().any(|s| &s.name == *k))
        {
            return Err(Error::tensor(
                extra,
                format!("only the tensors config.json implies in {shown}"),
                "an unexpected tensor (package from another configuration?)",
            ));
        }
        Ok(out)
    }
}

/// Checks one shard's header entries against what the manifest expects in that shard.
fn check_shard_header(
    shard: &str,
    found: &BTreeMap<String, StTensor>,
    expected: &HashMap<String, Entry>,
    index: &Index,
) -> Result<()> {
    for (name, e) in expected {
        if index.weight_map.get(name).map(|s| s.as_str()) != Some(shard) {
            continue;
        }
        let t = found
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("present in shard {shard}"), "missing"))?;
        if t.dtype != e.dtype || t.shape != e.shape {
            return Err(Error::tensor(
                name,
                format!("{:?} {:?} in {shard} (per the index)", e.dtype, e.shape),
                format!("{:?} {:?}", t.dtype, t.shape),
            ));
        }
    }
    for name in found.keys() {
        if index.weight_map.get(name).map(|s| s.as_str()) != Some(shard) {
            return Err(Error::tensor(
                name,
                format!("only the index's tensors in {shard}"),
                "a tensor the index does not place there",
            ));
        }
    }
    Ok(())
}

/// Where the bytes of one entry go.
struct Target {
    tensor: Tensor,
    scales: bool,
    len: u64,
    written: u64,
    pending: Vec<u8>,
}

enum Stage {
    Len,
    Header(usize),
    Data,
}

/// The GPU-free part of streaming one shard: its header is gathered and checked against the
/// package as it arrives, then each data byte is attributed to the entry it belongs to.
/// [`PackageLoader`] feeds shards through it; it needs nothing but the checked package.
pub struct ShardStream {
    file: String,
    /// `PKG/FILE`, for errors.
    shown: String,
    stage: Stage,
    buf: Vec<u8>,
    /// Bytes of the shard consumed so far.
    pos: u64,
    /// Entries by start offset.
    entries: Vec<StTensor>,
    next: usize,
    /// SHA-256 of the bytes fed so far.
    hash: sha2::Sha256,
}

/// A run of a shard's data bytes that belongs to one entry: `input[range]` of the bytes just
/// fed are the next bytes of entry `entries()[entry]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub entry: usize,
    pub range: std::ops::Range<usize>,
}

impl ShardStream {
    /// Starts shard `file` of the package named `shown`.
    pub fn new(shown: &str, file: &str) -> Self {
        ShardStream {
            file: file.into(),
            shown: format!("{shown}/{file}"),
            stage: Stage::Len,
            buf: Vec::new(),
            pos: 0,
            entries: Vec::new(),
            next: 0,
            hash: sha2::Sha256::default(),
        }
    }

    /// The shard file name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The header's entries by start offset (empty until the header has arrived).
    pub fn entries(&self) -> &[StTensor] {
        &self.entries
    }

    /// Takes the next bytes of the shard: the header is checked against `expected` (every
    /// stored entry of the package) and `index` as soon as it is complete; data bytes are
    /// returned as pieces of `bytes`, in order.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        expected: &HashMap<String, Entry>,
        index: &Index,
    ) -> Result<Vec<Piece>> {
        sha2::Digest::update(&mut self.hash, bytes);
        let shown = &self.shown;
        let mut pieces = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let rest = &bytes[at..];
            match self.stage {
                Stage::Len => {
                    let take = (8 - self.buf.len()).min(rest.len());
                    self.buf.extend_from_slice(&rest[..take]);
                    at += take;
                    self.pos += take as u64;
                    if self.buf.len() == 8 {
                        let n = u64::from_le_bytes(self.buf[..8].try_into().unwrap_or([0; 8]));
                        if n > 100_000_000 {
                            return Err(Error::format(shown, format!("header length {n} exceeds the 100 MB limit: not a safetensors file")));
                        }
                        self.buf.clear();
                        self.stage = Stage::Header(n as usize);
                    }
                }
                Stage::Header(n) => {
                    let take = (n - self.buf.len()).min(rest.len());
                    self.buf.extend_from_slice(&rest[..take]);
                    at += take;
                    self.pos += take as u64;
                    if self.buf.len() == n {
                        let (found, _) = parse_header(shown, &self.buf, 8 + n as u64, None)?;
                        check_shard_header(&self.file, &found, expected, index)?;
                        let mut es: Vec<StTensor> = found.into_values().collect();
                        es.sort_by_key(|t| t.start);
                        self.entries = es;
                        self.buf = Vec::new();
                        self.stage = Stage::Data;
                    }
                }
                Stage::Data => {
                    // skip to the entry holding `pos` (bytes between entries are padding)
                    while self.next < self.entries.len() && self.entries[self.next].end <= self.pos
                    {
                        self.next += 1;
                    }
                    let Some(e) = self.entries.get(self.next) else {
                        return Err(Error::format(
                            shown,
                            format!("{} bytes after the last tensor", rest.len()),
                        ));
                    };
                    // (distances are u64: clamp before narrowing, or a 32-bit usize could
                    // truncate a distance of 4 GiB to 0 and never advance)
                    if self.pos < e.start {
                        let skip = (e.start - self.pos).min(rest.len() as u64) as usize;
                        at += skip;
                        self.pos += skip as u64;
                        continue;
                    }
                    let take = (e.end - self.pos).min(rest.len() as u64) as usize;
                    pieces.push(Piece {
                        entry: self.next,
                        range: at..at + take,
                    });
                    at += take;
                    self.pos += take as u64;
                }
            }
        }
        Ok(pieces)
    }

    /// Checks that the shard is complete (its header, and every byte it describes).
    pub fn finish(&self) -> Result<()> {
        if !matches!(self.stage, Stage::Data) {
            return Err(Error::format(&self.shown, "truncated inside its header"));
        }
        if let Some(last) = self.entries.last() {
            if self.pos < last.end {
                return Err(Error::format(
                    &self.shown,
                    format!(
                        "truncated: {} bytes, the header describes {}",
                        self.pos, last.end
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the shard's size and SHA-256 against the index's record of it, when the index
    /// has one (packages written before shard digests existed do not).
    pub fn check_digest(self, index: &Index) -> Result<()> {
        let Some(want) = index.shards.get(&self.file) else {
            return Ok(());
        };
        if self.pos != want.size {
            return Err(Error::format(
                &self.shown,
                format!("{} bytes, the index says {}", self.pos, want.size),
            ));
        }
        let got = hex(&sha2::Digest::finalize(self.hash));
        if !got.eq_ignore_ascii_case(&want.sha256) {
            return Err(Error::format(
                &self.shown,
                format!("corrupted: SHA-256 {got}, the index says {}", want.sha256),
            ));
        }
        Ok(())
    }
}

/// Bytes written between submits that release wgpu's staging memory.
const SUBMIT_EVERY: u64 = 64 << 20;
/// Bytes gathered per `write_buffer` call.
const WRITE_CHUNK: usize = 1 << 20;

/// Loads a package from its files' bytes as they arrive, shard by shard, each streamed into the
/// GPU buffers it belongs to (the whole model never sits in host memory). Native loading reads
/// files through it; the browser feeds it from `fetch` streams.
pub struct PackageLoader {
    pub config: PackageConfig,
    pub index: Index,
    shown: String,
    model: Option<MiniGpt4>,
    queue: wgpu::Queue,
    device: wgpu::Device,
    targets: HashMap<String, Target>,
    expected: HashMap<String, Entry>,
    done: Vec<String>,
    cur: Option<ShardStream>,
    since_submit: u64,
    /// Weight bytes written to the GPU so far, and in all.
    pub written: u64,
    pub total: u64,
}

/// A package's `config.json` and index, parsed and checked against each other: every GPU
/// tensor the configuration implies, with its stored entries.
pub struct Checked {
    pub config: PackageConfig,
    pub index: Index,
    pub tensors: Vec<(TensorSpec, Vec<Entry>)>,
}

impl Checked {
    pub fn parse(shown: &str, config_json: &[u8], index_json: &[u8]) -> Result<Self> {
        let config = PackageConfig::parse(&format!("{shown}/{CONFIG_FILE}"), config_json)?;
        Self::with_config(shown, config, index_json)
    }

    /// [`Checked::parse`] with `config.json` already parsed.
    pub fn with_config(shown: &str, config: PackageConfig, index_json: &[u8]) -> Result<Self> {
        let index = Index::parse(&format!("{shown}/{INDEX_FILE}"), index_json)?;
        let tensors = index.check(&format!("{shown}/{INDEX_FILE}"), &config.specs()?)?;
        Ok(Checked {
            config,
            index,
            tensors,
        })
    }

    /// Every stored entry by name.
    pub fn entries(&self) -> HashMap<String, Entry> {
        self.tensors
            .iter()
            .flat_map(|(_, es)| es)
            .map(|e| (e.name.clone(), e.clone()))
            .collect()
    }
}

impl PackageLoader {
    /// Parses and checks config, index and tokenizer, allocates every GPU tensor and builds the
    /// model around them (not usable until [`PackageLoader::finish`]).
    pub fn new(
        gpu: &Gpu,
        shown: &str,
        config_json: &[u8],
        index_json: &[u8],
        tokenizer_json: &[u8],
        ctx: usize,
    ) -> Result<Self> {
        let checked = Checked::parse(shown, config_json, index_json)?;
        Self::from_checked(gpu, shown, checked, tokenizer_json, ctx)
    }

    /// [`PackageLoader::new`] from an already checked config and index.
    pub fn from_checked(
        gpu: &Gpu,
        shown: &str,
        checked: Checked,
        tokenizer_json: &[u8],
        ctx: usize,
    ) -> Result<Self> {
        let Checked {
            config,
            index,
            tensors: checked,
        } = checked;
        let tok =
            Tokenizer::from_json_bytes(&format!("{shown}/{TOKENIZER_FILE}"), tokenizer_json, None)?;
        let model_cfg = config.model()?;
        gpu.require(
            &model_cfg
                .llm
                .requirements(ctx.min(model_cfg.llm.max_pos).max(1), 1),
        )?;
        let mut map = TensorMap::default();
        let mut targets = HashMap::new();
        let mut expected = HashMap::new();
        let mut total = 0;
        for (spec, es) in checked {
            let t = spec.allocate(gpu)?;
            for e in es {
                total += e.bytes();
                targets.insert(
                    e.name.clone(),
                    Target {
                        tensor: t.clone(),
                        scales: e.scales,
                        len: e.bytes(),
                        written: 0,
                        pending: Vec::new(),
                    },
                );
                expected.insert(e.name.clone(), e);
            }
            map.insert(t);
        }
        let mut model = MiniGpt4::build(gpu, &model_cfg, config.formats(), tok, &mut map, ctx)?;
        model.label = config.variant.clone();
        Ok(PackageLoader {
            config,
            index,
            shown: shown.into(),
            model: Some(model),
            queue: gpu.queue.clone(),
            device: gpu.device.clone(),
            targets,
            expected,
            done: Vec::new(),
            cur: None,
            since_submit: 0,
            written: 0,
            total,
        })
    }

    /// Shard files to feed, in order.
    pub fn shards(&self) -> Vec<String> {
        self.index.shards()
    }

    pub fn begin_shard(&mut self, file: &str) -> Result<()> {
        if self.cur.is_some() {
            return Err(Error::format(
                &self.shown,
                "a shard is already being loaded",
            ));
        }
        if !self.shards().iter().any(|s| s == file) || self.done.iter().any(|s| s == file) {
            return Err(Error::format(
                &self.shown,
                format!(
                    "`{file}` is not a shard still to load (shards: {:?})",
                    self.shards()
                ),
            ));
        }
        self.cur = Some(ShardStream::new(&self.shown, file));
        Ok(())
    }

    /// Feeds the next bytes of the current shard.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        let mut cur = self
            .cur
            .take()
            .ok_or_else(|| Error::format(&self.shown, "no shard begun"))?;
        for piece in cur.feed(bytes, &self.expected, &self.index)? {
            let name = cur.entries()[piece.entry].name.clone();
            self.write(&name, &bytes[piece.range])?;
        }
        self.cur = Some(cur);
        Ok(())
    }

    fn write(&mut self, entry: &str, bytes: &[u8]) -> Result<()> {
        let t = self
            .targets
            .get_mut(entry)
            .ok_or_else(|| Error::tensor(entry, "a tensor of this package", "unknown"))?;
        t.pending.extend_from_slice(bytes);
        self.written += bytes.len() as u64;
        let end = t.written + t.pending.len() as u64;
        let complete = end == t.len;
        if t.pending.len() >= WRITE_CHUNK || complete {
            if complete {
                // the GPU arrays are whole words; pad the stored bytes to match
                while !t.pending.len().is_multiple_of(4) {
                    t.pending.push(0);
                }
            }
            let n = t.pending.len() / 4 * 4;
            t.tensor
                .write_stored(&self.queue, t.scales, t.written, &t.pending[..n]);
            t.pending.drain(..n);
            t.written += n as u64;
            self.since_submit += n as u64;
        }
        if self.since_submit >= SUBMIT_EVERY {
            self.queue.submit([]);
            let _ = self.device.poll(wgpu::PollType::Poll);
            self.since_submit = 0;
        }
        Ok(())
    }

    /// Ends the current shard, checking that all of its tensors arrived.
    pub fn end_shard(&mut self) -> Result<()> {
        let cur = self
            .cur
            .take()
            .ok_or_else(|| Error::format(&self.shown, "no shard begun"))?;
        cur.finish()?;
        let file = cur.file().to_string();
        cur.check_digest(&self.index)?;
        self.done.push(file);
        Ok(())
    }

    /// The loaded model, once every shard has been fed.
    pub fn finish(mut self) -> Result<MiniGpt4> {
        if let Some(missing) = self.shards().iter().find(|s| !self.done.contains(s)) {
            return Err(Error::format(
                &self.shown,
                format!("shard {missing} was not loaded"),
            ));
        }
        if let Some((name, t)) = self.targets.iter().find(|(_, t)| t.written < t.len) {
            return Err(Error::tensor(
                name,
                format!("{} bytes", t.len),
                format!("{} bytes loaded", t.written),
            ));
        }
        self.queue.submit([]);
        self.model
            .take()
            .ok_or_else(|| Error::format(&self.shown, "already finished"))
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::fs::File;
    use std::io::{BufWriter, Read, Write};
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::loader::safetensors::SafetensorsFile;
    use crate::quant::Encoded;

    fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| Error::io(path.display(), e))
    }

    /// The checked `config.json` of the package directory `dir`.
    pub fn read_config(dir: &Path) -> Result<PackageConfig> {
        let shown = dir.display().to_string();
        if !dir.join(CONFIG_FILE).is_file() {
            return Err(Error::format(
                &shown,
                format!("not a model package: no {CONFIG_FILE} (make one with `minigpt4 convert`; an unfinished conversion leaves a `.partial` directory)"),
            ));
        }
        PackageConfig::parse(
            &format!("{shown}/{CONFIG_FILE}"),
            &read(&dir.join(CONFIG_FILE))?,
        )
    }

    /// Loads a package directory: config, manifest and every shard header are checked before
    /// the first upload, then the shards are streamed to the GPU in 8 MiB reads.
    pub fn load(gpu: &Gpu, dir: &Path, ctx: usize) -> Result<MiniGpt4> {
        let shown = dir.display().to_string();
        let config = read_config(dir)?;
        let checked = Checked::with_config(&shown, config, &read(&dir.join(INDEX_FILE))?)?;
        // every shard header against the manifest, before any GPU work
        let expected = checked.entries();
        for s in checked.index.shards() {
            let f = SafetensorsFile::open(&dir.join(&s))?;
            check_shard_header(&s, &f.tensors, &expected, &checked.index)?;
        }
        let tokenizer = read(&dir.join(TOKENIZER_FILE))?;
        let mut l = PackageLoader::from_checked(gpu, &shown, checked, &tokenizer, ctx)?;
        let mut buf = vec![0u8; 8 << 20];
        for s in l.shards() {
            let p = dir.join(&s);
            let mut f = File::open(&p).map_err(|e| Error::io(p.display(), e))?;
            l.begin_shard(&s)?;
            loop {
                let n = f.read(&mut buf).map_err(|e| Error::io(p.display(), e))?;
                if n == 0 {
                    break;
                }
                l.feed(&buf[..n])?;
            }
            l.end_shard()?;
        }
        l.finish()
    }

    struct Shard {
        /// Temporary data file, then the assembled shard.
        data: PathBuf,
        out: BufWriter<File>,
        entries: Vec<(Entry, u64, u64)>,
        bytes: u64,
    }

    /// Writes a package into `OUT.partial` and renames it to `OUT` when complete, so that an
    /// interrupted conversion never leaves something that looks like a package.
    pub struct PackageWriter {
        out: PathBuf,
        tmp: PathBuf,
        shards: Vec<PathBuf>,
        cur: Option<Shard>,
        index: Index,
        total: u64,
        finished: bool,
    }

    impl PackageWriter {
        pub fn create(out: &Path) -> Result<Self> {
            let shown = out.display().to_string();
            if out.exists() {
                return Err(Error::format(
                    &shown,
                    "already exists; remove it or choose another output directory",
                ));
            }
            let mut tmp = out.as_os_str().to_owned();
            tmp.push(".partial");
            let tmp = PathBuf::from(tmp);
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
            Ok(PackageWriter {
                out: out.to_path_buf(),
                tmp,
                shards: Vec::new(),
                cur: None,
                index: Index::default(),
                total: 0,
                finished: false,
            })
        }

        /// Adds one GPU tensor (its entries go to the current shard).
        pub fn add(&mut self, name: &str, shape: &[usize], enc: &Encoded) -> Result<()> {
            let es = entries(name, shape, enc.dtype);
            let n: usize = shape.iter().product();
            if enc.data.len() != enc.dtype.data_words(n)
                || enc.scales.len() != enc.dtype.scale_words(n)
            {
                return Err(Error::tensor(
                    name,
                    format!("an encoding of {shape:?}"),
                    "one of another size",
                ));
            }
            let size: u64 = es.iter().map(|e| e.bytes()).sum();
            if self
                .cur
                .as_ref()
                .is_some_and(|c| c.bytes > 0 && c.bytes + size > MAX_SHARD_BYTES)
            {
                self.close_shard()?;
            }
            if self.cur.is_none() {
                let data = self.tmp.join(format!("shard-{}.data", self.shards.len()));
                let f = File::create(&data).map_err(|e| Error::io(data.display(), e))?;
                self.cur = Some(Shard {
                    data,
                    out: BufWriter::with_capacity(1 << 20, f),
                    entries: Vec::new(),
                    bytes: 0,
                });
            }
            let c = self.cur.as_mut().expect("shard open");
            for e in es {
                let words: &[u32] = if e.scales { &enc.scales } else { &enc.data };
                let b = e.bytes();
                let bytes: &[u8] = bytemuck::cast_slice(words);
                c.out
                    .write_all(&bytes[..b as usize])
                    .map_err(|err| Error::io(c.data.display(), err))?;
                c.entries.push((e, c.bytes, c.bytes + b));
                c.bytes += b;
            }
            self.total += size;
            self.index.tensors.insert(
                name.into(),
                Stored {
                    dtype: enc.dtype,
                    shape: shape.to_vec(),
                },
            );
            Ok(())
        }

        /// Header + data into `shard-N.safetensors` in the temporary directory.
        fn close_shard(&mut self) -> Result<()> {
            let Some(c) = self.cur.take() else {
                return Ok(());
            };
            let data_path = c.data.clone();
            c.out
                .into_inner()
                .map_err(|e| Error::io(data_path.display(), e.into_error()))?
                .sync_all()
                .map_err(|e| Error::io(data_path.display(), e))?;
            let mut header = serde_json::Map::new();
            header.insert(
                "__metadata__".into(),
                serde_json::json!({ "format": FORMAT }),
            );
            for (e, a, b) in &c.entries {
                header.insert(
                    e.name.clone(),
                    serde_json::json!({
                        "dtype": format!("{:?}", e.dtype).to_uppercase(),
                        "shape": e.shape,
                        "data_offsets": [a, b],
                    }),
                );
            }
            let mut h = serde_json::to_vec(&header).unwrap_or_default();
            while !(8 + h.len()).is_multiple_of(8) {
                h.push(b' ');
            }
            let path = self
                .tmp
                .join(format!("shard-{}.safetensors", self.shards.len()));
            let shown = path.display().to_string();
            let mut out = BufWriter::with_capacity(
                1 << 20,
                File::create(&path).map_err(|e| Error::io(&shown, e))?,
            );
            out.write_all(&(h.len() as u64).to_le_bytes())
                .and_then(|_| out.write_all(&h))
                .map_err(|e| Error::io(&shown, e))?;
            let mut data = File::open(&data_path).map_err(|e| Error::io(data_path.display(), e))?;
            std::io::copy(&mut data, &mut out).map_err(|e| Error::io(&shown, e))?;
            out.into_inner()
                .map_err(|e| Error::io(&shown, e.into_error()))?
                .sync_all()
                .map_err(|e| Error::io(&shown, e))?;
            std::fs::remove_file(&data_path).map_err(|e| Error::io(data_path.display(), e))?;
            for (e, _, _) in c.entries {
                self.index
                    .weight_map
                    .insert(e.name, format!("#{}", self.shards.len()));
            }
            self.shards.push(path);
            Ok(())
        }

        /// Writes index, tokenizer and config, then renames the directory into place.
        pub fn finish(mut self, config: &PackageConfig, tokenizer: &Tokenizer) -> Result<PathBuf> {
            self.close_shard()?;
            let n = self.shards.len();
            let names: Vec<String> = (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect();
            for (p, name) in self.shards.iter().zip(&names) {
                std::fs::rename(p, self.tmp.join(name)).map_err(|e| Error::io(p.display(), e))?;
            }
            for v in self.index.weight_map.values_mut() {
                let i: usize = v[1..].parse().unwrap_or(0);
                *v = names[i].clone();
            }
            for name in &names {
                let p = self.tmp.join(name);
                let info = file_digest(&p)?;
                self.index.shards.insert(name.clone(), info);
            }
            self.index
                .metadata
                .insert("total_size".into(), self.total.into());
            self.index.metadata.insert("format".into(), FORMAT.into());
            let write = |name: &str, text: &str| -> Result<()> {
                let p = self.tmp.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(p.display(), e))
            };
            write(
                INDEX_FILE,
                &serde_json::to_string_pretty(&self.index).unwrap_or_default(),
            )?;
            write(TOKENIZER_FILE, &tokenizer.to_json()?)?;
            // config.json last: its presence marks a complete package
            write(CONFIG_FILE, &config.to_json())?;
            std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(self.out.display(), e))?;
            self.finished = true;
            Ok(self.out.clone())
        }
    }

    /// Size and SHA-256 of a file, read in 1 MiB pieces.
    fn file_digest(p: &Path) -> Result<ShardInfo> {
        use sha2::Digest;
        let mut f = File::open(p).map_err(|e| Error::io(p.display(), e))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p.display(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        Ok(ShardInfo {
            size,
            sha256: hex(&h.finalize()),
        })
    }

    impl Drop for PackageWriter {
        fn drop(&mut self) {
            if !self.finished {
                let _ = std::fs::remove_dir_all(&self.tmp);
            }
        }
    }

    /// Writes every tensor of `specs` produced from `src` (all sources checked first by the
    /// caller). Host memory: about one tensor and its encoding.
    pub fn write(
        out: &Path,
        config: &PackageConfig,
        specs: &[TensorSpec],
        src: &dyn crate::loader::TensorSource,
        tokenizer: &Tokenizer,
        mut progress: impl FnMut(usize, usize, &str),
    ) -> Result<PathBuf> {
        let mut w = PackageWriter::create(out)?;
        for (i, s) in specs.iter().enumerate() {
            progress(i, specs.len(), &s.name);
            let enc = s.produce(src)?;
            w.add(&s.name, &s.shape, &enc)?;
        }
        progress(specs.len(), specs.len(), "");
        w.finish(config, tokenizer)
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use native::{load, read_config, write, PackageWriter};

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/minigpt4/vicuna0_tiny_pkg")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture(CONFIG_FILE)).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn implausible_config_dimensions_are_refused() {
        let index = fixture(INDEX_FILE);
        assert!(Checked::parse("pkg", &fixture(CONFIG_FILE), &index).is_ok());
        type Edit = fn(&mut serde_json::Value);
        // Each of these overflowed a product of dimensions (a panic) or asked for a tensor
        // list of absurd length before the maxima were checked.
        let cases: [(&str, Edit); 6] = [
            ("heads", |v| {
                v["llm"]["heads"] = (1u64 << 62).into();
                v["llm"]["kv_heads"] = (1u64 << 62).into();
            }),
            ("max_pos", |v| v["llm"]["max_pos"] = u64::MAX.into()),
            ("vision layers", |v| {
                v["vision"]["layers"] = 1_000_000_000_000u64.into()
            }),
            ("image_size", |v| {
                v["vision"]["image_size"] = (1u64 << 62).into();
                v["vision"]["patch"] = 1.into();
            }),
            ("Q-Former queries", |v| {
                v["qformer"]["queries"] = (1u64 << 60).into()
            }),
            ("Q-Former layers", |v| {
                v["qformer"]["layers"] = (1u64 << 40).into()
            }),
        ];
        for (what, edit) in cases {
            let e = Checked::parse("pkg", &config_with(edit), &index)
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"))
                .to_string();
            assert!(e.contains("implausible"), "{what}: {e}");
        }
        // zero sizes
        let e = Checked::parse(
            "pkg",
            &config_with(|v| v["vision"]["image_size"] = 0.into()),
            &index,
        )
        .err()
        .expect("image_size 0 accepted")
        .to_string();
        assert!(e.contains("inconsistent"), "{e}");
    }

    #[test]
    fn shard_stream_attributes_every_byte_once_in_any_chunking() {
        let pkg = Checked::parse("pkg", &fixture(CONFIG_FILE), &fixture(INDEX_FILE)).unwrap();
        let expected = pkg.entries();
        let shard_name = pkg.index.shards()[0].clone();
        let shard = fixture(&shard_name);
        for chunk in [1, 7, 4096, shard.len()] {
            let mut s = ShardStream::new("pkg", &shard_name);
            let mut got: HashMap<String, Vec<u8>> = HashMap::new();
            for part in shard.chunks(chunk) {
                for p in s.feed(part, &expected, &pkg.index).unwrap() {
                    let name = s.entries()[p.entry].name.clone();
                    got.entry(name)
                        .or_default()
                        .extend_from_slice(&part[p.range]);
                }
            }
            s.finish().unwrap();
            assert_eq!(got.len(), s.entries().len());
            for e in s.entries() {
                let want = &shard[e.start as usize..e.end as usize];
                assert!(
                    got[&e.name] == want,
                    "chunk {chunk}: entry `{}` differs",
                    e.name
                );
            }
        }
        // truncated in the header, truncated in the data, one byte too many
        let feed_all = |bytes: &[u8]| -> Result<()> {
            let mut s = ShardStream::new("pkg", &shard_name);
            s.feed(bytes, &expected, &pkg.index)?;
            s.finish()
        };
        let e = feed_all(&shard[..100]).unwrap_err().to_string();
        assert!(
            e.contains(&shard_name) && e.contains("inside its header"),
            "{e}"
        );
        let e = feed_all(&shard[..shard.len() - 1]).unwrap_err().to_string();
        assert!(e.contains(&shard_name) && e.contains("truncated"), "{e}");
        let mut more = shard.clone();
        more.push(0);
        let e = feed_all(&more).unwrap_err().to_string();
        assert!(e.contains("1 bytes after the last tensor"), "{e}");
    }
}
