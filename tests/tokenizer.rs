//! Tokenizer tests against reference ids made by tests/golden/make_tokenizer_goldens.py:
//! the LLaMA SentencePiece model (transformers 4.30 slow LlamaTokenizer behaviour, as MiniGPT-4
//! uses it) and the SmolLM2 GGUF tokenizer (as transformers loads it from the GGUF).
//!
//! Model files come from `bash tests/fetch-models.sh` (into .models/); the tests fail, never
//! skip, when they are missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minigpt4::loader::gguf::{GgufFile, Value};
use minigpt4::tokenizer::Tokenizer;
use serde_json::Value as Json;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_file(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let p = repo().join(".models").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `bash tests/fetch-models.sh` (or set {env})",
        p.display()
    );
    p
}

fn llama_model() -> PathBuf {
    model_file("LLAMA_TOKENIZER_MODEL", "llama-tokenizer.model")
}

fn smollm2_gguf() -> PathBuf {
    model_file("SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn fixture(name: &str) -> Json {
    let p = repo().join("tests/fixtures/tokenizer").join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

struct Case {
    name: String,
    text: String,
    add_bos: Option<bool>,
    ids: Vec<u32>,
    decoded: String,
}

fn cases(doc: &Json) -> Vec<Case> {
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            text: c["text"].as_str().unwrap().to_string(),
            add_bos: c.get("add_bos").and_then(Json::as_bool),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            decoded: c["decoded"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minigpt4-tok-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every case's ids (with the case's BOS setting) and decode(ids, skip_special=true).
#[track_caller]
fn check_cases(t: &Tokenizer, cases: &[Case], default_bos: bool) {
    let mut bad = Vec::new();
    for c in cases {
        let got = t.encode(&c.text, c.add_bos.unwrap_or(default_bos)).unwrap();
        if got != c.ids {
            bad.push(format!("{}: ids {got:?}, reference {:?}", c.name, c.ids));
        }
        let dec = t.decode(&c.ids, true).unwrap();
        if dec != c.decoded {
            bad.push(format!(
                "{}: decoded {dec:?}, reference {:?}",
                c.name, c.decoded
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn llama_sentencepiece_matches_reference_ids() {
    let doc = fixture("llama_ids.json");
    let t = Tokenizer::from_sentencepiece(&llama_model()).unwrap();
    assert_eq!(t.vocab_size(), 32000);
    assert_eq!(
        (t.bos(), t.eos(), t.add_bos_default()),
        (Some(1), Some(2), true)
    );
    assert_eq!(t.id_to_piece(29871).as_deref(), Some("▁"));
    assert_eq!(t.id_to_piece(13).as_deref(), Some("<0x0A>"));
    let cases = cases(&doc);
    assert!(cases.len() >= 36);
    check_cases(&t, &cases, true);
}

/// The MiniGPT-4 prompts of spec §6.3, spliced at <ImageHere> with BOS only on segment 0.
#[test]
fn llama_minigpt4_prompt_segments() {
    let t = Tokenizer::from_sentencepiece(&llama_model()).unwrap();
    let seg = |s: &str, bos: bool| t.encode(s, bos).unwrap();
    assert_eq!(
        seg("<s>[INST] <Img>", true),
        [1, 1, 518, 25580, 29962, 529, 25518, 29958]
    );
    assert_eq!(
        seg("</Img> Describe this image in detail.###Assistant: ", false),
        [
            1533, 25518, 29958, 20355, 915, 445, 1967, 297, 9493, 29889, 2277, 29937, 7900, 22137,
            29901, 29871
        ]
    );
    // stop sequences of §7.4
    assert_eq!(seg("###", false), [835]);
}

#[test]
fn llama_to_json_round_trip_gives_identical_ids() {
    let doc = fixture("llama_ids.json");
    let cases = cases(&doc);
    let t = Tokenizer::from_sentencepiece(&llama_model()).unwrap();
    let json = t.to_json().unwrap();

    // with tokenizer_config.json beside it
    let dir = tmp_dir("json-config");
    std::fs::write(dir.join("tokenizer.json"), &json).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), t.to_config_json()).unwrap();
    let u = Tokenizer::from_json_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        (u.bos(), u.eos(), u.add_bos_default()),
        (Some(1), Some(2), true)
    );
    assert_eq!(u.vocab_size(), 32000);
    check_cases(&u, &cases, true);

    // tokenizer.json alone: BOS and add_bos come from its post-processor template
    let dir = tmp_dir("json-alone");
    std::fs::write(dir.join("tokenizer.json"), &json).unwrap();
    let v = Tokenizer::from_json_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        (v.bos(), v.eos(), v.add_bos_default()),
        (Some(1), Some(2), true)
    );
    check_cases(&v, &cases, true);

    // a config that turns BOS off, with AddedToken-style entries
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
    )
    .unwrap();
    let w = Tokenizer::from_json_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        (w.bos(), w.eos(), w.add_bos_default()),
        (Some(1), Some(2), false)
    );
}

#[test]
fn smollm2_gguf_matches_hf_reference() {
    let doc = fixture("smollm2_ids.json");
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.vocab_size() as u64, doc["vocab_size"].as_u64().unwrap());
    assert_eq!(t.bos().map(u64::from), doc["bos"].as_u64());
    assert_eq!(t.eos().map(u64::from), doc["eos"].as_u64());
    let add_bos = doc["add_bos_default"].as_bool().unwrap();
    assert_eq!(t.add_bos_default(), add_bos);
    check_cases(&t, &cases(&doc), add_bos);

    // and the same after a tokenizer.json round trip
    let dir = tmp_dir("smol-json");
    std::fs::write(dir.join("tokenizer.json"), t.to_json().unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), t.to_config_json()).unwrap();
    let u = Tokenizer::from_json_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        (u.bos(), u.eos(), u.add_bos_default()),
        (t.bos(), t.eos(), add_bos)
    );
    check_cases(&u, &cases(&doc), add_bos);
}

#[test]
fn smollm2_chat_template_prompt() {
    let doc = fixture("smollm2_ids.json");
    let prompt = doc["chat_template_prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n")
    );
    let want = cases(&doc).into_iter().find(|c| c.text == prompt).unwrap();
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    let ids = t.encode(prompt, t.add_bos_default()).unwrap();
    assert_eq!(ids, want.ids);
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(t.id_to_piece(2).as_deref(), Some("<|im_end|>"));
}

/// Feeds ids one at a time; every piece must be complete text and the pieces must add up to
/// the full decode.
#[track_caller]
fn check_streaming(t: &Tokenizer, text: &str, bos: bool) {
    let ids = t.encode(text, bos).unwrap();
    let mut out = String::new();
    let mut emitted = 0;
    for n in 1..=ids.len() {
        let (piece, e) = t.decode_incremental(&ids[..n], emitted).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "{text:?}: step {n} emitted {piece:?}"
        );
        assert_eq!(e, emitted + piece.len());
        emitted = e;
        out.push_str(&piece);
    }
    assert_eq!(out, t.decode(&ids, true).unwrap(), "{text:?}");
    // nothing new when called again
    assert_eq!(
        t.decode_incremental(&ids, emitted).unwrap(),
        (String::new(), emitted)
    );
}

#[test]
fn decode_incremental_never_splits_characters() {
    let llama = Tokenizer::from_sentencepiece(&llama_model()).unwrap();
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let smol = Tokenizer::from_gguf(&g).unwrap();
    let texts = [
        "emoji: 🙂🚀 done",
        "🙂🚀",
        "CJK: 你好世界",
        "accents: café naïve Zürich",
        "mixed 🙂 text 你 and 🚀",
        "<s>[INST] hi 🙂 [/INST]",
    ];
    // the LLaMA vocab has no piece for these emoji: each is 4 byte-fallback tokens
    let e = llama.encode("🙂", false).unwrap();
    assert_eq!(e.len(), 5, "{e:?}");
    for text in texts {
        check_streaming(&llama, text, true);
        check_streaming(&smol, text, false);
    }
    // emitted past the end or inside a character is the caller's mistake: an error, no panic
    let ids = llama.encode("é", false).unwrap();
    assert_eq!(llama.decode(&ids, true).unwrap(), "é");
    assert!(llama.decode_incremental(&ids, 1).is_err());
    assert_eq!(
        llama.decode_incremental(&ids, 99).unwrap(),
        (String::new(), 99)
    );
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let t = Tokenizer::from_sentencepiece(&llama_model()).unwrap();
    let e = t.decode(&[1, 32000], true).unwrap_err().to_string();
    assert!(e.contains("32000"), "{e}");
}

#[test]
fn bad_sentencepiece_files_are_errors() {
    let real = std::fs::read(llama_model()).unwrap();
    let dir = tmp_dir("bad-spm");
    let mut inputs: Vec<(&str, Vec<u8>)> = vec![
        ("empty.model", Vec::new()),
        (
            "garbage.model",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("text.model", b"this is not a protobuf file\n".to_vec()),
        ("json.model", br#"{"model": {"type": "BPE"}}"#.to_vec()),
    ];
    for cut in [1, 10, 1000, real.len() / 2, real.len() - 7] {
        inputs.push(("truncated.model", real[..cut].to_vec()));
    }
    for (name, data) in inputs {
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        let e = Tokenizer::from_sentencepiece(&p)
            .expect_err(&format!("{name} ({} bytes) must be rejected", data.len()))
            .to_string();
        assert!(e.contains(name), "error does not name the file: {e}");
        assert!(e.len() > name.len() + 20, "error too terse: {e}");
    }
    let e = Tokenizer::from_sentencepiece(&dir.join("missing.model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.model"), "{e}");
}

#[test]
fn bad_tokenizer_json_is_an_error() {
    let dir = tmp_dir("bad-json");
    for (name, data) in [
        ("not-json.json", "this is not JSON {"),
        ("array.json", "[1, 2, 3]"),
        ("bad-model.json", r#"{"model": {"type": "Nope"}}"#),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let e = Tokenizer::from_json_file(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("expected"), "{e}");
    }
    let e = Tokenizer::from_json_file(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

fn gguf(md: Vec<(&str, Value)>) -> GgufFile {
    GgufFile {
        path: "meta-only.gguf".into(),
        version: 3,
        metadata: md
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
        tensors: Vec::new(),
    }
}

fn strs(v: &[&str]) -> Value {
    Value::Arr(v.iter().map(|s| Value::Str(s.to_string())).collect())
}

/// Metadata, and the strings its error must mention.
type BadCase<'a> = (Vec<(&'a str, Value)>, &'a [&'a str]);

#[test]
fn bad_gguf_tokenizer_metadata_is_an_error() {
    let s = |v: &str| Value::Str(v.to_string());
    let tokens = strs(&["a", "b", "ab"]);
    let cases: Vec<BadCase> = vec![
        (vec![], &["tokenizer.ggml.model"]),
        (
            vec![("tokenizer.ggml.model", s("gpt2"))],
            &["missing", "tokenizer.ggml.tokens"],
        ),
        (
            vec![("tokenizer.ggml.model", s("llama"))],
            &["missing", "tokenizer.ggml.tokens"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", tokens.clone()),
            ],
            &["missing", "tokenizer.ggml.merges"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("llama")),
                ("tokenizer.ggml.tokens", tokens.clone()),
            ],
            &["missing", "tokenizer.ggml.scores"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("bert")),
                ("tokenizer.ggml.tokens", tokens.clone()),
            ],
            &["\"bert\"", "not supported"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", Value::U32(3)),
            ],
            &["tokenizer.ggml.tokens", "expected an array"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.merges", strs(&["a c"])),
            ],
            &["tokenizer.ggml.merges[0]", "\"c\""],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.merges", strs(&["ab"])),
            ],
            &["tokenizer.ggml.merges[0]", "left right"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.merges", strs(&["a b"])),
                ("tokenizer.ggml.token_type", Value::Arr(vec![Value::I32(1)])),
            ],
            &["token_type", "expected 3"],
        ),
        (
            vec![
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", tokens.clone()),
                ("tokenizer.ggml.merges", strs(&["a b"])),
                ("tokenizer.ggml.bos_token_id", Value::U32(7)),
            ],
            &["bos_token_id", "below 3"],
        ),
    ];
    for (md, needles) in cases {
        let e = Tokenizer::from_gguf(&gguf(md)).unwrap_err().to_string();
        assert!(
            e.contains("meta-only.gguf"),
            "error does not name the file: {e}"
        );
        for n in needles {
            assert!(e.contains(n), "{e:?} should mention {n:?}");
        }
    }
    // and a minimal valid one works
    let t = Tokenizer::from_gguf(&gguf(vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.merges", strs(&["a b"])),
    ]))
    .unwrap();
    assert_eq!(t.encode("ab", false).unwrap(), [2]);
    assert!(t.encode("ab", true).is_err(), "no BOS token to add");
}

/// The SmolLM2 reference ids shared with the model tests (tests/fixtures/smollm2, made by
/// tests/golden/make_smollm2_goldens.py): ids with and without special tokens, pieces, and
/// decode with special tokens kept.
#[test]
fn smollm2_gguf_matches_shared_fixture() {
    let p = repo().join("tests/fixtures/smollm2/tokenizer_ids.json");
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let g = GgufFile::open(&smollm2_gguf()).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.add_bos_default(), doc["add_bos_token"].as_bool().unwrap());
    assert_eq!(t.bos().map(u64::from), doc["bos_token_id"].as_u64());
    assert_eq!(t.eos().map(u64::from), doc["eos_token_id"].as_u64());
    for (id, name) in doc["added_tokens"].as_object().unwrap() {
        assert_eq!(t.id_to_piece(id.parse().unwrap()).as_deref(), name.as_str());
    }
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for s in doc["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let with = ids(&s["ids_add_special_tokens"]);
        let without = ids(&s["ids_no_special_tokens"]);
        assert_eq!(
            t.encode(text, t.add_bos_default()).unwrap(),
            with,
            "{text:?}"
        );
        assert_eq!(t.encode(text, false).unwrap(), without, "{text:?}");
        let pieces: Vec<String> = without.iter().map(|&i| t.id_to_piece(i).unwrap()).collect();
        let want: Vec<&str> = s["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(pieces, want, "{text:?}");
        assert_eq!(
            t.decode(&with, false).unwrap(),
            s["decode_add_special_tokens"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            t.decode(&without, false).unwrap(),
            s["decode_no_special_tokens"].as_str().unwrap(),
            "{text:?}"
        );
    }
}
