//! Text ↔ token ids for the language models: a thin layer over the `tokenizers` crate that can
//! be built from a HF `tokenizer.json`, a SentencePiece `tokenizer.model` (LLaMA / Vicuna) or the
//! `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! SentencePiece BPE models are converted the way HF's `LlamaConverter` does (vocab from the
//! pieces, merges derived from the vocab in piece-score order, byte fallback), with the *legacy*
//! SentencePiece normaliser (prepend `▁`, spaces → `▁`) and `<unk>`/`<s>`/`</s>` as special added
//! tokens. Because added tokens are split off the raw text before normalisation, every chunk of
//! text (the whole input, and each chunk after a special token) gets the dummy `▁` prefix: that
//! is what transformers 4.30's slow `LlamaTokenizer` (MiniGPT-4's reference) does, e.g.
//! `"<s>[INST]"` → `[1, 518 (▁[), 25580, 29962]`.
//!
//! BOS is never added by the `tokenizers` post-processor: [`Tokenizer::encode`] prepends it
//! itself when asked to, so the same code path serves every source.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// SentencePiece piece types (`ModelProto.SentencePiece.Type`); llama.cpp uses the same numbers
/// in `tokenizer.ggml.token_type`.
const T_NORMAL: i64 = 1;
const T_UNKNOWN: i64 = 2;
const T_CONTROL: i64 = 3;
const T_USER_DEFINED: i64 = 4;
const T_BYTE: i64 = 6;
/// Longest SentencePiece-style piece accepted (LLaMA's are at most 16 characters).
pub const MAX_PIECE_BYTES: usize = 1024;

/// The GPT-2 pre-tokenisation regex (used by `ByteLevel` with `use_regex`), spelled out for the
/// GGUF `pre` types that need an explicit `Split`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer plus the few settings the prompt builder needs (BOS/EOS ids, whether BOS is added
/// by default).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Where it came from, for error messages.
    source: String,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a HF `tokenizer.json`. A `tokenizer_config.json` next to it, when present, supplies
    /// `add_bos_token`, `bos_token` and `eos_token`; otherwise BOS (and whether it is added) is
    /// read from a `TemplateProcessing` post-processor that starts with a special token, and
    /// BOS/EOS fall back to the usual names (`<s>`/`</s>`, `<|endoftext|>`, ...).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(&shown, e))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            let cshown = config_path.display().to_string();
            let b = std::fs::read(&config_path).map_err(|e| Error::io(&cshown, e))?;
            Some((cshown, b))
        } else {
            None
        };
        Self::from_json_bytes(
            &shown,
            &bytes,
            config.as_ref().map(|(n, b)| (n.as_str(), b.as_slice())),
        )
    }

    /// [`Tokenizer::from_json_file`] from bytes: `tokenizer.json` (named `shown` in errors) and
    /// optionally `tokenizer_config.json` (name, bytes).
    pub fn from_json_bytes(
        shown: &str,
        bytes: &[u8],
        config: Option<(&str, &[u8])>,
    ) -> Result<Self> {
        let shown = shown.to_string();
        let text = std::str::from_utf8(bytes).map_err(|e| {
            Error::format(
                &shown,
                format!("expected a UTF-8 tokenizer.json, found invalid UTF-8 ({e})"),
            )
        })?;
        let doc: Json = serde_json::from_str(text).map_err(|e| {
            Error::format(
                &shown,
                format!("expected a tokenizer.json (JSON), found malformed JSON: {e}"),
            )
        })?;
        if !doc.is_object() || doc.get("model").is_none() {
            return Err(Error::format(
                &shown,
                "expected a tokenizer.json object with a \"model\" field, found none",
            ));
        }
        check_decoder(&shown, doc.get("decoder"))?;
        check_post_processor(&shown, doc.get("post_processor"))?;
        let inner = tokenizers::Tokenizer::from_str(text).map_err(|e| {
            Error::format(
                &shown,
                format!("expected a tokenizer.json the `tokenizers` crate accepts: {e}"),
            )
        })?;

        let (tpl_add_bos, tpl_bos) = template_bos(&inner);
        let mut add_bos = tpl_add_bos;
        let mut bos = tpl_bos;
        let mut eos = None;
        if let Some((cshown, cbytes)) = config {
            let config: Json = serde_json::from_slice(cbytes).map_err(|e| {
                Error::format(
                    cshown,
                    format!("expected tokenizer_config.json to be JSON: {e}"),
                )
            })?;
            if let Some(b) = config.get("add_bos_token").and_then(Json::as_bool) {
                add_bos = b;
            }
            for (key, slot) in [("bos_token", &mut bos), ("eos_token", &mut eos)] {
                if let Some(name) = config.get(key).and_then(token_content) {
                    match inner.token_to_id(name) {
                        Some(id) => *slot = Some(id),
                        None => {
                            return Err(Error::format(
                                cshown,
                                format!("{key} {name:?} is not in the vocabulary of {shown}"),
                            ))
                        }
                    }
                }
            }
        }
        let guess = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = bos.or_else(|| guess(&["<s>", "<|begin_of_text|>", "<bos>"]));
        let eos = eos.or_else(|| {
            guess(&[
                "</s>",
                "<|endoftext|>",
                "<|im_end|>",
                "<|end_of_text|>",
                "<eos>",
            ])
        });
        if add_bos && bos.is_none() {
            return Err(Error::format(
                &shown,
                "add_bos_token is true but no BOS token was found (expected bos_token in \
                 tokenizer_config.json or a BOS in the post-processor template)",
            ));
        }
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos,
            source: shown,
        })
    }

    /// Converts a SentencePiece `tokenizer.model` (protobuf `ModelProto`; BPE models such as
    /// LLaMA's) into an equivalent `tokenizers` tokenizer. BOS is added by default.
    pub fn from_sentencepiece(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(&shown, e))?;
        Self::from_sentencepiece_bytes(&shown, &bytes)
    }

    /// [`Tokenizer::from_sentencepiece`] from the file's bytes (`shown` names it in errors).
    pub fn from_sentencepiece_bytes(shown: &str, bytes: &[u8]) -> Result<Self> {
        let shown = shown.to_string();
        let m = SpModel::parse(bytes).map_err(|d| Error::format(&shown, d))?;
        if m.model_type != 2 {
            let name = match m.model_type {
                1 => "UNIGRAM".to_string(),
                3 => "WORD".to_string(),
                4 => "CHAR".to_string(),
                t => format!("type {t}"),
            };
            return Err(Error::format(
                &shown,
                format!(
                    "SentencePiece model type {name} is not supported (expected BPE, as in LLaMA)"
                ),
            ));
        }
        if !m.precompiled_charsmap_empty {
            return Err(Error::format(
                &shown,
                format!(
                    "normalizer {:?} with a precompiled charsmap is not supported (expected the \
                     identity normalizer, as in LLaMA)",
                    m.normalizer_name
                ),
            ));
        }
        let n = m.pieces.len();
        let id = |v: i32, what: &str| -> Result<Option<u32>> {
            if v < 0 {
                Ok(None)
            } else if (v as usize) < n {
                Ok(Some(v as u32))
            } else {
                Err(Error::format(
                    &shown,
                    format!("trainer_spec.{what} = {v} is out of range (expected < {n} pieces)"),
                ))
            }
        };
        let unk = id(m.unk_id, "unk_id")?;
        let bos = id(m.bos_id, "bos_id")?;
        let eos = id(m.eos_id, "eos_id")?;
        let spm = SpmParts {
            pieces: m.pieces.iter().map(|p| p.piece.as_str()).collect(),
            scores: m.pieces.iter().map(|p| p.score).collect(),
            types: m.pieces.iter().map(|p| p.kind).collect(),
            unk,
            bos,
            byte_fallback: m.byte_fallback,
            add_dummy_prefix: m.add_dummy_prefix,
            remove_extra_whitespaces: m.remove_extra_whitespaces,
            add_bos: bos.is_some(),
        };
        let doc = spm.to_json(&shown)?;
        Self::from_doc(doc, bos, eos, bos.is_some(), shown)
    }

    /// Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata: `model` "llama"
    /// (SentencePiece-like: tokens, scores, token_type) or "gpt2" (byte-level BPE: tokens,
    /// merges, token_type, pre).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let shown = g.path.display().to_string();
        let err = |d: String| Error::format(&shown, d);
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let model = g
            .get(&key("model"))
            .ok_or_else(|| {
                err("missing tokenizer.ggml.model (expected \"llama\" or \"gpt2\")".into())
            })?
            .as_str()
            .ok_or_else(|| err("tokenizer.ggml.model: expected a string".into()))?;
        let tokens_v = g.get(&key("tokens")).ok_or_else(|| {
            err("missing tokenizer.ggml.tokens (expected an array of token strings)".into())
        })?;
        let tokens: Vec<&str> = tokens_v
            .as_array()
            .ok_or_else(|| err("tokenizer.ggml.tokens: expected an array of strings".into()))?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    err(format!(
                        "tokenizer.ggml.tokens[{i}]: expected a string, found {v:?}"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        if n == 0 {
            return Err(err(
                "tokenizer.ggml.tokens is empty (expected at least one token)".into(),
            ));
        }
        let types: Vec<i64> = match g.get(&key("token_type")) {
            None => vec![T_NORMAL; n],
            Some(v) => {
                let a = v.as_array().ok_or_else(|| {
                    err("tokenizer.ggml.token_type: expected an array of integers".into())
                })?;
                if a.len() != n {
                    return Err(err(format!(
                        "tokenizer.ggml.token_type has {} entries, expected {n} (one per token)",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64().ok_or_else(|| {
                            err(format!(
                                "tokenizer.ggml.token_type[{i}]: expected an integer, found {v:?}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                    _ => Err(err(format!(
                        "tokenizer.ggml.{k} = {v:?}: expected a token id below {n}"
                    ))),
                },
            }
        };
        let flag = |k: &str, default: bool| -> Result<bool> {
            match g.get(&key(k)) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    err(format!("tokenizer.ggml.{k}: expected a bool, found {v:?}"))
                }),
            }
        };
        let bos = id_key("bos_token_id")?;
        let eos = id_key("eos_token_id")?;
        let unk = id_key("unknown_token_id")?;
        match model {
            "llama" => {
                let scores_v = g.get(&key("scores")).ok_or_else(|| {
                    err("missing tokenizer.ggml.scores (expected one float per token for a \"llama\" tokenizer)".into())
                })?;
                let a = scores_v.as_array().ok_or_else(|| {
                    err("tokenizer.ggml.scores: expected an array of floats".into())
                })?;
                if a.len() != n {
                    return Err(err(format!(
                        "tokenizer.ggml.scores has {} entries, expected {n} (one per token)",
                        a.len()
                    )));
                }
                let scores: Vec<f32> = a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64().map(|x| x as f32).ok_or_else(|| {
                            err(format!(
                                "tokenizer.ggml.scores[{i}]: expected a float, found {v:?}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                let unk =
                    unk.or_else(|| types.iter().position(|&t| t == T_UNKNOWN).map(|i| i as u32));
                let add_bos = flag("add_bos_token", true)? && bos.is_some();
                let spm = SpmParts {
                    pieces: tokens,
                    scores,
                    types,
                    unk,
                    bos,
                    byte_fallback: true,
                    add_dummy_prefix: flag("add_space_prefix", true)?,
                    remove_extra_whitespaces: false,
                    add_bos,
                };
                let doc = spm.to_json(&shown)?;
                Self::from_doc(doc, bos, eos, add_bos, shown)
            }
            "gpt2" => {
                let merges_v = g.get(&key("merges")).ok_or_else(|| {
                    err("missing tokenizer.ggml.merges (expected an array of \"left right\" strings for a \"gpt2\" tokenizer)".into())
                })?;
                let merges: Vec<(&str, &str)> = merges_v
                    .as_array()
                    .ok_or_else(|| err("tokenizer.ggml.merges: expected an array of strings".into()))?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_str().and_then(|s| s.split_once(' ')).ok_or_else(|| {
                            err(format!(
                                "tokenizer.ggml.merges[{i}]: expected a string \"left right\", found {v:?}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                let pre = match g.get(&key("pre")) {
                    None => "default",
                    Some(v) => v.as_str().ok_or_else(|| {
                        err(format!(
                            "tokenizer.ggml.pre: expected a string, found {v:?}"
                        ))
                    })?,
                };
                let add_bos = flag("add_bos_token", false)? && bos.is_some();
                let add_prefix_space = flag("add_space_prefix", false)?;
                let doc = gpt2_json(
                    &tokens,
                    &types,
                    &merges,
                    pre,
                    add_prefix_space,
                    bos,
                    add_bos,
                )
                .map_err(err)?;
                Self::from_doc(doc, bos, eos, add_bos, shown)
            }
            other => Err(err(format!(
                "tokenizer.ggml.model = {other:?} is not supported (expected \"llama\" or \"gpt2\")"
            ))),
        }
    }

    fn from_doc(
        doc: Json,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        source: String,
    ) -> Result<Self> {
        let text = doc.to_string();
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| Error::format(&source, format!("could not build the tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            add_bos,
            source,
        })
    }

    /// The tokenizer as a HF `tokenizer.json` (compact). Loading it with
    /// [`Tokenizer::from_json_file`] gives a tokenizer with the same ids; when BOS is added by
    /// default the JSON carries a `TemplateProcessing` post-processor saying so.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| {
            Error::format(
                &self.source,
                format!("could not serialise the tokenizer: {e}"),
            )
        })
    }

    /// A minimal `tokenizer_config.json` (add_bos_token, add_eos_token, bos_token, eos_token) to
    /// save next to [`Tokenizer::to_json`]'s output.
    pub fn to_config_json(&self) -> String {
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let v = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
        });
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
    }

    /// Token ids for `text`, with BOS in front when `add_bos`. Special tokens written in the text
    /// (`<s>`, `</s>`, `<|im_start|>`, ...) are recognised and map to their ids. No EOS is added.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::format(&self.source, format!("encoding failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            let bos = self.bos.ok_or_else(|| Error::InvalidOption {
                name: "add_bos".into(),
                msg: format!("the tokenizer from {} has no BOS token", self.source),
            })?;
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text for `ids`; with `skip_special` special tokens (BOS, EOS, `<unk>`, ...) are left out.
    /// Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(Error::InvalidOption {
                name: "token id".into(),
                msg: format!(
                    "{bad} is out of range for the tokenizer from {} ({n} tokens)",
                    self.source
                ),
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::format(&self.source, format!("decoding failed: {e}")))
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model's tokenizer adds BOS by default (`add_bos_token`).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary string of one id (`▁the`, `<0x0A>`, `<s>`, `Ġthe`, ...).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary string, if it has one.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    /// Streaming detokenisation. `ids` are all tokens generated so far, `emitted` how many bytes
    /// of text were already handed out (0 at the start, then the returned count). Returns the
    /// new text and the new byte count. Special tokens are skipped. Text that ends in an
    /// incomplete character (a UTF-8 sequence split over byte tokens that are not all there yet)
    /// is held back until the rest arrives, so every returned piece is complete text and the
    /// pieces concatenate to `decode(ids, true)` once the sequence is complete.
    ///
    /// A replacement character for bytes that never form valid UTF-8 is emitted as soon as
    /// four more tokens have followed them; at the very end of generation, take
    /// `decode(ids, true)[emitted..]` to flush such a tail.
    pub fn decode_incremental(&self, ids: &[u32], emitted: usize) -> Result<(String, usize)> {
        // An incomplete character spans at most 3 bytes, so at most 3 trailing tokens.
        let mut text = String::new();
        for hold in 0..=ids.len().min(3) {
            text = self.decode(&ids[..ids.len() - hold], true)?;
            if !text.ends_with('\u{FFFD}') {
                break;
            }
            if hold == ids.len().min(3) {
                // Genuinely invalid bytes (or a real U+FFFD): emit everything.
                text = self.decode(ids, true)?;
            }
        }
        if text.len() <= emitted {
            return Ok((String::new(), emitted));
        }
        match text.get(emitted..) {
            Some(new) => Ok((new.to_string(), text.len())),
            None => Err(Error::InvalidOption {
                name: "emitted".into(),
                msg: format!(
                    "{emitted} is not a character boundary of the decoded text ({} bytes); \
                     pass the count returned by the previous call",
                    text.len()
                ),
            }),
        }
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` (AddedToken form) → `"<s>"`.
fn token_content(v: &Json) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Json::as_str))
}

/// Refuses decoders the `tokenizers` crate accepts but then panics on: a `Strip` that cuts
/// from the end (`stop` > 0) indexes past the start of an empty or all-`content` piece
/// (tokenizers 0.22 `decoders/strip.rs`; found by the tokenizer_json fuzz target). No
/// released model strips from the end; SentencePiece models strip one leading space.
fn check_decoder(shown: &str, decoder: Option<&Json>) -> Result<()> {
    let Some(d) = decoder else { return Ok(()) };
    match d.get("type").and_then(Json::as_str) {
        Some("Sequence") => {
            for inner in d
                .get("decoders")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                check_decoder(shown, Some(inner))?;
            }
        }
        Some("Strip") => {
            let stop = d.get("stop").and_then(Json::as_u64).unwrap_or(0);
            if stop > 0 {
                return Err(Error::format(
                    shown,
                    format!(
                        "decoder \"Strip\": expected \"stop\": 0 (only leading characters \
                         can be stripped), found \"stop\": {stop}"
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Refuses `TemplateProcessing` post-processors (alone or in a `Sequence`) that tokenizers
/// 0.22 accepts but panics on when encoding: a single-sequence template that uses the second
/// sequence (`$B`; on every encode, ours included), or a template piece naming a special token
/// the processor does not define (when special tokens are added, which [`Tokenizer::encode`]
/// leaves to itself; refused all the same, as the crate's own builder refuses it). The crate
/// picks a post-processor by its fields, not its `type` (an untagged enum), so every object
/// with templates is checked whatever its `type` says.
fn check_post_processor(shown: &str, pp: Option<&Json>) -> Result<()> {
    let Some(pp) = pp else { return Ok(()) };
    for inner in pp
        .get("processors")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        check_post_processor(shown, Some(inner))?;
    }
    let special = pp.get("special_tokens");
    for template in ["single", "pair"] {
        let pieces = pp.get(template).and_then(Json::as_array);
        for piece in pieces.into_iter().flatten() {
            let seq = piece.get("Sequence").and_then(|q| q.get("id"));
            if template == "single" && seq.is_some_and(|id| id != "A") {
                return Err(Error::format(
                    shown,
                    format!(
                        "post_processor \"TemplateProcessing\": expected a single template of \
                         sequence A and special tokens, found sequence {}",
                        seq.map(Json::to_string).unwrap_or_default()
                    ),
                ));
            }
            let token = piece
                .get("SpecialToken")
                .and_then(|t| t.get("id"))
                .and_then(Json::as_str);
            if let Some(name) = token {
                if special.and_then(|m| m.get(name)).is_none() {
                    return Err(Error::format(
                        shown,
                        format!(
                            "post_processor \"TemplateProcessing\": the {template} template's \
                             special token {name:?} is not in its special_tokens"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// (adds BOS?, BOS id) as the tokenizer's own post-processor decides: a one-token sequence
/// is run through it with special tokens added, and a special token it puts in front is the
/// BOS. Asking the crate rather than reading the JSON follows what it does whatever the file
/// says: it picks a post-processor by its fields, so one whose `type` is misspelt still adds
/// its BOS, and a `Sequence` applies each of its processors in turn.
fn template_bos(inner: &tokenizers::Tokenizer) -> (bool, Option<u32>) {
    let one =
        tokenizers::Encoding::from_tokens(vec![tokenizers::Token::new(0, "a".into(), (0, 1))], 0);
    let Ok(out) = inner.post_process(one, None, true) else {
        return (false, None);
    };
    match (out.get_ids(), out.get_special_tokens_mask()) {
        ([bos, _, ..], [1, ..]) => (true, Some(*bos)),
        _ => (false, None),
    }
}

/// `TemplateProcessing` adding `bos` in front of each sequence.
fn bos_template(bos_name: &str, bos: u32) -> Json {
    let special = json!({"SpecialToken": {"id": bos_name, "type_id": 0}});
    let special1 = json!({"SpecialToken": {"id": bos_name, "type_id": 1}});
    json!({
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special1,
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_name: {"id": bos_name, "ids": [bos], "tokens": [bos_name]}},
    })
}

fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special,
    })
}

/// Vocab object from a token list; duplicates keep their first id (the `tokenizers` vocab is a
/// map, so a later duplicate could not be represented anyway).
fn vocab_json(tokens: &[&str]) -> Map<String, Json> {
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if !vocab.contains_key(*t) {
            vocab.insert((*t).to_string(), json!(i));
        } else {
            log::warn!("duplicate token {t:?} at id {i}; keeping its first id");
        }
    }
    vocab
}

/// What a SentencePiece-style BPE tokenizer is made of (from a `.model` or GGUF "llama").
struct SpmParts<'a> {
    pieces: Vec<&'a str>,
    scores: Vec<f32>,
    types: Vec<i64>,
    unk: Option<u32>,
    bos: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    add_bos: bool,
}

impl SpmParts<'_> {
    /// Merges as HF's `SentencePieceExtractor.extract(vocab_scores)`: for each piece in
    /// descending score order (stable), every split into two in-vocabulary pieces, ordered by
    /// (left id, right id). Scores must not be NaN ([`SpmParts::to_json`] checks), or the
    /// order is not total.
    fn merges(&self) -> Vec<(u32, u32)> {
        let mut index: HashMap<&str, u32> = HashMap::with_capacity(self.pieces.len());
        for (i, p) in self.pieces.iter().enumerate() {
            index.entry(*p).or_insert(i as u32);
        }
        let mut order: Vec<usize> = (0..self.pieces.len()).collect();
        order.sort_by(|&a, &b| {
            self.scores[b]
                .partial_cmp(&self.scores[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut merges = Vec::new();
        let mut local = Vec::new();
        for i in order {
            let piece = self.pieces[i];
            local.clear();
            for (at, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(at);
                if let (Some(&a), Some(&b)) = (index.get(l), index.get(r)) {
                    local.push((a, b));
                }
            }
            local.sort_unstable();
            merges.extend_from_slice(&local);
        }
        merges
    }

    fn to_json(&self, source: &str) -> Result<Json> {
        let n = self.pieces.len();
        // Deriving the merges looks up every split of every piece: quadratic in a piece's
        // length, so a long piece is refused rather than hashed for minutes.
        if let Some((i, p)) = self
            .pieces
            .iter()
            .enumerate()
            .find(|(_, p)| p.len() > MAX_PIECE_BYTES)
        {
            return Err(Error::format(
                source,
                format!(
                    "piece {i} is {} bytes long, expected at most {MAX_PIECE_BYTES} (SentencePiece's trainer caps pieces at 512 characters)",
                    p.len()
                ),
            ));
        }
        // The merges are ordered by score: a NaN would make that order inconsistent (and the
        // sort panic), so it is refused. Other values, infinities included, order totally.
        if let Some(i) = self.scores.iter().position(|s| s.is_nan()) {
            return Err(Error::format(
                source,
                format!(
                    "piece {i} ({:?}) has score NaN, expected a number",
                    self.pieces[i]
                ),
            ));
        }
        let vocab = vocab_json(&self.pieces);
        let merges: Vec<Json> = self
            .merges()
            .into_iter()
            .map(|(a, b)| json!([self.pieces[a as usize], self.pieces[b as usize]]))
            .collect();
        let mut added = Vec::new();
        for (i, (&p, &t)) in self.pieces.iter().zip(&self.types).enumerate() {
            match t {
                T_UNKNOWN | T_CONTROL => added.push(added_token(i, p, true)),
                T_USER_DEFINED => added.push(added_token(i, p, false)),
                _ => {}
            }
        }
        if self.byte_fallback {
            let bytes = self.types.iter().filter(|&&t| t == T_BYTE).count();
            if bytes != 256 {
                log::warn!("{source}: byte fallback with {bytes} byte pieces (expected 256)");
            }
        }
        let mut normalizers = Vec::new();
        if self.remove_extra_whitespaces {
            normalizers.push(json!({"type": "Strip", "strip_left": true, "strip_right": true}));
            normalizers
                .push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
        }
        if self.add_dummy_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_dummy_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let unk = match self.unk {
            Some(u) => json!(self.pieces[u as usize]),
            None => Json::Null,
        };
        let post = match (self.add_bos, self.bos) {
            (true, Some(b)) => bos_template(self.pieces[b as usize], b),
            _ => Json::Null,
        };
        if n == 0 {
            return Err(Error::format(source, "no pieces (expected a vocabulary)"));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": self.byte_fallback, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        }))
    }
}

/// tokenizer.json for a GGUF "gpt2" (byte-level BPE) tokenizer.
fn gpt2_json(
    tokens: &[&str],
    types: &[i64],
    merges: &[(&str, &str)],
    pre: &str,
    add_prefix_space: bool,
    bos: Option<u32>,
    add_bos: bool,
) -> std::result::Result<Json, String> {
    let vocab = vocab_json(tokens);
    for (i, (a, b)) in merges.iter().enumerate() {
        for t in [a, b] {
            if !vocab.contains_key(*t) {
                return Err(format!(
                    "tokenizer.ggml.merges[{i}] = \"{a} {b}\": {t:?} is not a token (expected both halves in tokenizer.ggml.tokens)"
                ));
            }
        }
        if !vocab.contains_key(&format!("{a}{b}")) {
            return Err(format!(
                "tokenizer.ggml.merges[{i}] = \"{a} {b}\": the merged token {:?} is not in tokenizer.ggml.tokens",
                format!("{a}{b}")
            ));
        }
    }
    let merges: Vec<Json> = merges.iter().map(|(a, b)| json!([a, b])).collect();
    let added: Vec<Json> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(i, (&t, &ty))| match ty {
            T_CONTROL | T_UNKNOWN => Some(added_token(i, t, true)),
            T_USER_DEFINED => Some(added_token(i, t, false)),
            _ => None,
        })
        .collect();
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let mut ignore_merges = false;
    // llama.cpp's `pre` names (llama-vocab.cpp). Families it splits like GPT-2 but with each
    // digit on its own get `Digits` in front, as their original tokenizer.json has.
    let pre_tokenizer = match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "llama-bpe" | "llama3" | "llama-v3" => {
            ignore_merges = true;
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]})
        }
        other => {
            log::warn!(
                "tokenizer.ggml.pre = {other:?} is not known here; using GPT-2 byte-level \
                 pre-tokenisation (as transformers does for GGUF tokenizers)"
            );
            byte_level(true)
        }
    };
    let post = match (add_bos, bos) {
        (true, Some(b)) => bos_template(tokens[b as usize], b),
        _ => Json::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    }))
}

// ------------------------------------------------------------------------------------------
// SentencePiece ModelProto (protobuf) reader: only the fields needed here; everything else is
// skipped by wire type. Every length is checked against the buffer.

struct SpPiece {
    piece: String,
    score: f32,
    kind: i64,
}

struct SpModel {
    pieces: Vec<SpPiece>,
    model_type: u64,
    byte_fallback: bool,
    unk_id: i32,
    bos_id: i32,
    eos_id: i32,
    normalizer_name: String,
    precompiled_charsmap_empty: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
}

enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Pb<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Which message is being read, for errors.
    what: &'static str,
}

impl<'a> Pb<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Pb { buf, pos: 0, what }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!(
                    "{}: truncated varint at byte {} (expected more data, found end of {} bytes)",
                    self.what,
                    self.pos,
                    self.buf.len()
                ));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(format!(
                    "{}: varint overflow at byte {}",
                    self.what,
                    self.pos - 1
                ));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!(
            "{}: varint longer than 10 bytes at byte {}",
            self.what, self.pos
        ))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "{}: field of {n} bytes at byte {} runs past the end ({} bytes): truncated or not a SentencePiece model",
                self.what,
                self.pos,
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next (field number, value), or None at the end.
    fn field(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let (num, wt) = (key >> 3, key & 7);
        if num == 0 {
            return Err(format!(
                "{}: field number 0 at byte {at} (not a protobuf message)",
                self.what
            ));
        }
        let w = match wt {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| format!("{}: length {len} too large", self.what))?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4]))),
            t => {
                return Err(format!(
                    "{}: field {num} at byte {at} has wire type {t} (expected 0, 1, 2 or 5): not a SentencePiece model",
                    self.what
                ))
            }
        };
        Ok(Some((num, w)))
    }
}

fn want_varint(w: &Wire, what: &str) -> std::result::Result<u64, String> {
    match w {
        Wire::Varint(v) => Ok(*v),
        _ => Err(format!(
            "{what}: expected a varint field, found another wire type"
        )),
    }
}

fn want_bytes<'a>(w: &Wire<'a>, what: &str) -> std::result::Result<&'a [u8], String> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(format!(
            "{what}: expected a length-delimited field, found another wire type"
        )),
    }
}

impl SpModel {
    fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        if buf.is_empty() {
            return Err("empty file (expected a SentencePiece ModelProto)".into());
        }
        let mut m = SpModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            normalizer_name: String::new(),
            precompiled_charsmap_empty: true,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
        };
        let mut have_trainer = false;
        let mut top = Pb::new(buf, "ModelProto");
        while let Some((num, w)) = top.field()? {
            match num {
                1 => m.pieces.push(Self::piece(
                    want_bytes(&w, "ModelProto.pieces")?,
                    m.pieces.len(),
                )?),
                2 => {
                    have_trainer = true;
                    let mut t = Pb::new(want_bytes(&w, "ModelProto.trainer_spec")?, "trainer_spec");
                    while let Some((num, w)) = t.field()? {
                        match num {
                            3 => m.model_type = want_varint(&w, "trainer_spec.model_type")?,
                            35 => {
                                m.byte_fallback =
                                    want_varint(&w, "trainer_spec.byte_fallback")? != 0
                            }
                            // int32: negative values are sign-extended to 64 bits
                            40 => m.unk_id = want_varint(&w, "trainer_spec.unk_id")? as i64 as i32,
                            41 => m.bos_id = want_varint(&w, "trainer_spec.bos_id")? as i64 as i32,
                            42 => m.eos_id = want_varint(&w, "trainer_spec.eos_id")? as i64 as i32,
                            _ => {}
                        }
                    }
                }
                3 => {
                    let mut n = Pb::new(
                        want_bytes(&w, "ModelProto.normalizer_spec")?,
                        "normalizer_spec",
                    );
                    while let Some((num, w)) = n.field()? {
                        match num {
                            1 => {
                                m.normalizer_name =
                                    String::from_utf8_lossy(want_bytes(&w, "normalizer_spec.name")?)
                                        .into_owned()
                            }
                            2 => {
                                m.precompiled_charsmap_empty =
                                    want_bytes(&w, "normalizer_spec.precompiled_charsmap")?
                                        .is_empty()
                            }
                            3 => {
                                m.add_dummy_prefix =
                                    want_varint(&w, "normalizer_spec.add_dummy_prefix")? != 0
                            }
                            4 => {
                                m.remove_extra_whitespaces =
                                    want_varint(&w, "normalizer_spec.remove_extra_whitespaces")?
                                        != 0
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces (expected a SentencePiece ModelProto with a vocabulary)".into());
        }
        if !have_trainer {
            return Err(format!(
                "no trainer_spec after {} pieces (expected one): the file is truncated or not a SentencePiece model",
                m.pieces.len()
            ));
        }
        Ok(m)
    }

    fn piece(buf: &[u8], index: usize) -> std::result::Result<SpPiece, String> {
        let mut p = SpPiece {
            piece: String::new(),
            score: 0.0,
            kind: T_NORMAL,
        };
        let mut have_piece = false;
        let mut r = Pb::new(buf, "SentencePiece");
        while let Some((num, w)) = r.field().map_err(|e| format!("piece {index}: {e}"))? {
            match (num, &w) {
                (1, Wire::Bytes(b)) => {
                    p.piece = std::str::from_utf8(b)
                        .map_err(|_| {
                            format!("piece {index}: expected a UTF-8 string, found invalid UTF-8")
                        })?
                        .to_string();
                    have_piece = true;
                }
                (2, Wire::Fixed32(f)) => p.score = f32::from_bits(*f),
                (3, Wire::Varint(v)) => p.kind = *v as i64,
                (1..=3, _) => {
                    return Err(format!(
                        "piece {index}: field {num} has an unexpected wire type"
                    ))
                }
                _ => {}
            }
        }
        if !have_piece {
            return Err(format!("piece {index}: no piece string (expected field 1)"));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// protobuf helpers for hand-made models
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn bytes_field(num: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    fn varint_field(num: u64, v: u64, out: &mut Vec<u8>) {
        varint(num << 3, out);
        varint(v, out);
    }
    fn piece(s: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        bytes_field(1, s.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        varint_field(3, kind, &mut p);
        p
    }

    /// A tiny BPE model: <unk> <s> </s>, 256 bytes, and a few merges.
    fn tiny_model(model_type: u64) -> Vec<u8> {
        let mut m = Vec::new();
        let mut pieces = vec![
            piece("<unk>", 0.0, 2),
            piece("<s>", 0.0, 3),
            piece("</s>", 0.0, 3),
        ];
        for b in 0..256 {
            pieces.push(piece(&format!("<0x{b:02X}>"), 0.0, 6));
        }
        for (i, s) in ["▁h", "▁hi", "▁", "h", "i"].iter().enumerate() {
            pieces.push(piece(s, -(i as f32), 1));
        }
        for p in &pieces {
            bytes_field(1, p, &mut m);
        }
        let mut t = Vec::new();
        varint_field(3, model_type, &mut t);
        varint_field(35, 1, &mut t);
        varint_field(40, 0, &mut t);
        varint_field(41, 1, &mut t);
        varint_field(42, 2, &mut t);
        varint_field(43, u64::MAX, &mut t); // pad_id = -1, skipped
        bytes_field(2, &t, &mut m);
        let mut n = Vec::new();
        bytes_field(1, b"identity", &mut n);
        varint_field(3, 1, &mut n);
        varint_field(4, 0, &mut n);
        bytes_field(3, &n, &mut m);
        m
    }

    fn write_tmp(name: &str, data: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("minigpt4-tok-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn tiny_sentencepiece_model() {
        let p = write_tmp("tiny.model", &tiny_model(2));
        let t = Tokenizer::from_sentencepiece(&p).unwrap();
        assert_eq!(t.vocab_size(), 264);
        assert_eq!(
            (t.bos(), t.eos(), t.add_bos_default()),
            (Some(1), Some(2), true)
        );
        let hi = t.piece_to_id("▁hi").unwrap();
        assert_eq!(t.encode("hi", true).unwrap(), vec![1, hi]);
        // "é" is not in the vocab: byte fallback
        assert_eq!(
            t.encode("é", false).unwrap(),
            vec![t.piece_to_id("▁").unwrap(), 3 + 0xC3, 3 + 0xA9]
        );
        assert_eq!(
            t.decode(&t.encode("hi é</s>", true).unwrap(), true)
                .unwrap(),
            "hi é"
        );
    }

    #[test]
    fn strip_decoders_that_cut_the_end_are_refused() {
        // Found by the tokenizer_json fuzz target: tokenizers 0.22 panics decoding a piece
        // that is empty or only `content` when a Strip decoder has stop > 0.
        let t = Tokenizer::from_sentencepiece_bytes("tiny.model", &tiny_model(2)).unwrap();
        // the tiny model's tokenizer.json with one more decoder: Strip " " (start 1, stop)
        let with_strip = |stop: u64| {
            let mut doc: Json = serde_json::from_str(&t.to_json().unwrap()).unwrap();
            let strip = json!({"type": "Strip", "content": " ", "start": 1, "stop": stop});
            doc["decoder"]["decoders"]
                .as_array_mut()
                .unwrap()
                .push(strip);
            doc.to_string()
        };
        let text = with_strip(1);
        let e = Tokenizer::from_json_bytes("strip.json", text.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("strip.json") && e.contains("Strip") && e.contains("\"stop\": 1"),
            "{e}"
        );
        // the crate does panic on it: the check is what stands between a file and a crash
        let inner = tokenizers::Tokenizer::from_str(&text).unwrap();
        let sp = t.piece_to_id("▁").unwrap();
        let panicked = std::panic::catch_unwind(|| inner.decode(&[sp], false)).is_err();
        assert!(
            panicked,
            "tokenizers no longer panics on Strip stop > 0; drop the check"
        );
        // stop: 0 (what SentencePiece conversions write) still loads and decodes
        let ok = Tokenizer::from_json_bytes("ok.json", with_strip(0).as_bytes(), None).unwrap();
        assert_eq!(ok.decode(&[sp], false).unwrap(), "");
    }

    #[test]
    fn templates_the_crate_would_panic_on_are_refused() {
        // Found by the tokenizer_json fuzz target: tokenizers 0.22 panics encoding with a
        // TemplateProcessing whose single template uses sequence B (index out of bounds, even
        // without special tokens, as Tokenizer::encode calls it), or whose template names a
        // special token it does not define (a map lookup, when special tokens are added).
        let t = Tokenizer::from_sentencepiece_bytes("tiny.model", &tiny_model(2)).unwrap();
        // the template alone (0), inside a Sequence (1), or with its `type` misspelt (2: the
        // crate still takes it for a TemplateProcessing, by its fields)
        let with = |single: Json, form: u32| {
            let mut doc: Json = serde_json::from_str(&t.to_json().unwrap()).unwrap();
            let mut pp = doc["post_processor"].clone();
            assert_eq!(pp["type"], "TemplateProcessing", "{pp}");
            pp["single"] = single;
            if form == 2 {
                let m = pp.as_object_mut().unwrap();
                let ty = m.remove("type").unwrap();
                m.insert("typE".into(), ty);
            }
            doc["post_processor"] = if form == 1 {
                json!({"type": "Sequence", "processors": [pp]})
            } else {
                pp
            };
            doc.to_string()
        };
        let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
        let unknown = json!({"SpecialToken": {"id": "<nope>", "type_id": 0}});
        for form in [0, 1, 2] {
            for (single, says) in [
                (json!([bos.clone(), seq("B")]), "sequence \"B\""),
                (json!([unknown.clone(), seq("A")]), "\"<nope>\""),
            ] {
                let text = with(single, form);
                let e = Tokenizer::from_json_bytes("tpl.json", text.as_bytes(), None)
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains("tpl.json") && e.contains("TemplateProcessing") && e.contains(says),
                    "{e}"
                );
                // the crate does panic on it: the check is what stands between a file and a
                // crash
                let inner = tokenizers::Tokenizer::from_str(&text).unwrap();
                let panicked = std::panic::catch_unwind(|| inner.encode("hi", true)).is_err();
                assert!(
                    panicked,
                    "tokenizers no longer panics on {text}; drop the check"
                );
            }
        }
        // the template a conversion writes still loads and encodes with its BOS
        let ok = with(json!([bos, seq("A")]), 1);
        let ok = Tokenizer::from_json_bytes("ok.json", ok.as_bytes(), None).unwrap();
        assert_eq!(ok.encode("hi", true).unwrap()[0], ok.bos.unwrap());
    }

    #[test]
    fn unigram_and_broken_models_are_errors() {
        let p = write_tmp("uni.model", &tiny_model(1));
        let e = Tokenizer::from_sentencepiece(&p).unwrap_err().to_string();
        assert!(e.contains("UNIGRAM") && e.contains("not supported"), "{e}");
        let full = tiny_model(2);
        for cut in [1, 2, 7, 100, full.len() / 2, full.len() - 3] {
            let p = write_tmp("cut.model", &full[..cut]);
            let e = Tokenizer::from_sentencepiece(&p).unwrap_err().to_string();
            assert!(e.contains("cut.model"), "{e}");
        }
        // wire type 7 in the first key
        let p = write_tmp("bad.model", &[0x0f, 0, 0]);
        let e = Tokenizer::from_sentencepiece(&p).unwrap_err().to_string();
        assert!(e.contains("wire type"), "{e}");
    }

    #[test]
    fn overlong_pieces_are_refused_before_deriving_merges() {
        // Deriving merges hashes both halves of every split of every piece: one piece of
        // 1 MB would take ~10^12 byte-hashes. A piece over MAX_PIECE_BYTES is an error.
        let mut m = tiny_model(2);
        let long = "a".repeat(MAX_PIECE_BYTES + 1);
        bytes_field(1, &piece(&long, -9.0, 1), &mut m);
        let e = Tokenizer::from_sentencepiece_bytes("long.model", &m)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("long.model")
                && e.contains("piece 264")
                && e.contains(&format!("{} bytes long", MAX_PIECE_BYTES + 1)),
            "{e}"
        );
        // at the limit it is accepted
        let mut m = tiny_model(2);
        bytes_field(1, &piece(&"a".repeat(MAX_PIECE_BYTES), -9.0, 1), &mut m);
        assert_eq!(
            Tokenizer::from_sentencepiece_bytes("ok.model", &m)
                .unwrap()
                .vocab_size(),
            265
        );
    }

    #[test]
    fn nan_scores_are_refused() {
        // (the order of the merges is by score: NaN has none; see also bad_input.rs's
        // gguf_tokenizer_with_nan_scores_is_an_error_not_a_panic, found by the fuzzer)
        let mut m = tiny_model(2);
        bytes_field(1, &piece("x", f32::NAN, 1), &mut m);
        let e = Tokenizer::from_sentencepiece_bytes("nan.model", &m)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nan.model") && e.contains("piece 264 (\"x\") has score NaN"),
            "{e}"
        );
        // infinities are ordered: accepted
        let mut m = tiny_model(2);
        bytes_field(1, &piece("x", f32::NEG_INFINITY, 1), &mut m);
        assert!(Tokenizer::from_sentencepiece_bytes("inf.model", &m).is_ok());
    }

    #[test]
    fn merges_follow_piece_scores() {
        let parts = SpmParts {
            pieces: vec!["a", "b", "ab", "abb", "bb"],
            scores: vec![0.0, 0.0, -1.0, -3.0, -2.0],
            types: vec![1; 5],
            unk: None,
            bos: None,
            byte_fallback: false,
            add_dummy_prefix: false,
            remove_extra_whitespaces: false,
            add_bos: false,
        };
        // ab (-1), bb (-2), abb (-3: a+bb, ab+b sorted by ids)
        assert_eq!(parts.merges(), vec![(0, 1), (1, 1), (0, 4), (2, 1)]);
    }

    /// The LLaMA tokenizer.model, for tests that need the real vocabulary.
    pub(crate) fn llama_model_path() -> std::path::PathBuf {
        if let Some(p) = std::env::var_os("LLAMA_TOKENIZER_MODEL") {
            return p.into();
        }
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/llama-tokenizer.model");
        assert!(
            p.is_file(),
            "{} is missing: run `bash tests/fetch-models.sh` (or set LLAMA_TOKENIZER_MODEL)",
            p.display()
        );
        p
    }

    /// GGUF "llama" tokenizer metadata made from the LLaMA tokenizer.model (as llama.cpp's
    /// convert script writes it) gives the same ids as the .model itself.
    #[test]
    fn gguf_llama_metadata_matches_sentencepiece() {
        use crate::loader::gguf::Value;
        let path = llama_model_path();
        let m = SpModel::parse(&std::fs::read(&path).unwrap()).unwrap();
        let mut md = std::collections::BTreeMap::new();
        let s = |v: &str| Value::Str(v.to_string());
        md.insert("tokenizer.ggml.model".to_string(), s("llama"));
        md.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Arr(m.pieces.iter().map(|p| s(&p.piece)).collect()),
        );
        md.insert(
            "tokenizer.ggml.scores".to_string(),
            Value::Arr(m.pieces.iter().map(|p| Value::F32(p.score)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".to_string(),
            Value::Arr(m.pieces.iter().map(|p| Value::I32(p.kind as i32)).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2));
        md.insert("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0));
        let g = GgufFile {
            path: "in-memory.gguf".into(),
            version: 3,
            metadata: md,
            tensors: Vec::new(),
        };
        let a = Tokenizer::from_gguf(&g).unwrap();
        let b = Tokenizer::from_sentencepiece(&path).unwrap();
        assert_eq!(
            (a.bos(), a.eos(), a.add_bos_default()),
            (Some(1), Some(2), true)
        );
        assert_eq!(a.vocab_size(), 32000);
        for text in [
            "<s>[INST] hi [/INST]",
            "Hello world  café 你好 🙂\n\tx",
            "###Human: <Img>",
            " ",
        ] {
            assert_eq!(
                a.encode(text, true).unwrap(),
                b.encode(text, true).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn template_bos_is_found_as_the_crate_applies_it() {
        // a conversion's template, alone, inside a Sequence, and with its `type` misspelt
        // (the crate takes it for a TemplateProcessing by its fields and adds the BOS; reading
        // the JSON by its type missed it, and prompts silently lost their BOS)
        let t = Tokenizer::from_sentencepiece_bytes("tiny.model", &tiny_model(2)).unwrap();
        let bos = t.bos.unwrap();
        let doc: Json = serde_json::from_str(&t.to_json().unwrap()).unwrap();
        let tpl = doc["post_processor"].clone();
        assert_eq!(tpl["type"], "TemplateProcessing", "{tpl}");
        let mut misspelt = tpl.clone();
        let m = misspelt.as_object_mut().unwrap();
        let ty = m.remove("type").unwrap();
        m.insert("typE".into(), ty);
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": false, "use_regex": false});
        let seq = json!({"type": "Sequence", "processors": [byte_level, tpl.clone()]});
        // a template that adds only an end token, and none at all
        let mut eos_only = tpl.clone();
        eos_only["single"] = json!([{"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 0}}]);
        for (pp, want) in [
            (tpl, Some(bos)),
            (seq, Some(bos)),
            (misspelt, Some(bos)),
            (eos_only, None),
            (Json::Null, None),
        ] {
            let mut d = doc.clone();
            d["post_processor"] = pp.clone();
            let text = d.to_string();
            let loaded = Tokenizer::from_json_bytes("t.json", text.as_bytes(), None).unwrap();
            assert_eq!(loaded.add_bos_default(), want.is_some(), "{pp}");
            if let Some(b) = want {
                assert_eq!(loaded.bos(), Some(b), "{pp}");
                assert_eq!(loaded.encode("hi", true).unwrap()[0], b, "{pp}");
            }
        }
    }
}
