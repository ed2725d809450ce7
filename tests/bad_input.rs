//! Malformed weight files get an error naming the file and the tensor or field, with what was
//! expected and what was found — never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::gpu;
use minigpt4::loader::gguf::GgufFile;
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::model::llama::{Llama, LlamaFiles, QuantPolicy};
use minigpt4::quant::DType;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("minigpt4-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

fn err_of<T>(r: minigpt4::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A minimal GGUF v3 writer for crafting test files.
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            kv: vec![],
            n_kv: 0,
            tensors: vec![],
        }
    }
    fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        gstr(&mut self.kv, k);
        self.kv.extend_from_slice(&4u32.to_le_bytes());
        self.kv.extend_from_slice(&v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn string(&mut self, k: &str, v: &str) -> &mut Self {
        gstr(&mut self.kv, k);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        gstr(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kv);
        let mut off = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            gstr(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
            off += (data.len() as u64).div_ceil(32) * 32;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
        }
        b
    }
    fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

#[test]
fn gguf_wrong_magic_truncation_and_unknown_types() {
    let d = tmpdir("gguf");
    let p = d.join("x.gguf");
    std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
    let e = err_of(GgufFile::open(&p));
    assert!(e.contains("x.gguf") && e.contains("not a GGUF file"), "{e}");

    let mut w = GgufWriter::new();
    w.string("general.architecture", "llama")
        .u32("llama.block_count", 1);
    w.tensor("blk.0.attn_q.weight", &[32, 2], 6, vec![0; 44]); // Q5_0
    w.write(&p);
    let e = err_of(GgufFile::open(&p));
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("Q5_0") && e.contains("Q4_K"),
        "{e}"
    );

    // truncate the same file (F32 tensor) at every interesting point
    let mut w = GgufWriter::new();
    w.string("general.architecture", "llama")
        .u32("llama.block_count", 1);
    w.tensor("token_embd.weight", &[4, 8], 0, vec![0; 128]);
    let full = w.bytes();
    for cut in [3, 10, 20, 30, 45, 60, 80, full.len() - 1] {
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = err_of(GgufFile::open(&p));
        assert!(
            e.contains("x.gguf")
                && (e.contains("truncated")
                    || e.contains("past the end")
                    || e.contains("not a GGUF")),
            "cut {cut}: {e}"
        );
    }
    std::fs::write(&p, &full).unwrap();
    assert!(GgufFile::open(&p).is_ok());

    // a huge array count must not allocate
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    gstr(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = err_of(GgufFile::open(&p));
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("cannot fit"),
        "{e}"
    );
}

#[test]
fn gguf_missing_tensor_and_wrong_shape_are_named() {
    let d = tmpdir("gguf-model");
    let p = d.join("m.gguf");
    let f32s = |n: usize| vec![0u8; n * 4];
    let mut w = GgufWriter::new();
    w.string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 64)
        .u32("llama.attention.head_count", 2)
        .u32("llama.feed_forward_length", 64);
    w.tensor("token_embd.weight", &[64, 10], 0, f32s(640));
    w.tensor("blk.0.attn_norm.weight", &[64], 0, f32s(64));
    w.tensor("blk.0.attn_q.weight", &[64, 64], 0, f32s(64 * 64));
    w.tensor("blk.0.attn_k.weight", &[64, 32], 0, f32s(64 * 32)); // wrong: should be [64, 64]
    w.write(&p);
    let (cfg, files) = LlamaFiles::open(&p).unwrap();
    let e = err_of(files.validate(&cfg));
    assert!(
        e.contains("blk.0.attn_k.weight") && e.contains("[64, 64]") && e.contains("[32, 64]"),
        "{e}"
    );

    let mut w2 = GgufWriter::new();
    w2.string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 64)
        .u32("llama.attention.head_count", 2)
        .u32("llama.feed_forward_length", 64);
    w2.tensor("token_embd.weight", &[64, 10], 0, f32s(640));
    w2.write(&p);
    let (cfg, files) = LlamaFiles::open(&p).unwrap();
    let e = err_of(files.validate(&cfg));
    assert!(
        e.contains("blk.0.attn_norm.weight") && e.contains("missing"),
        "{e}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn safetensors_truncated_corrupt_and_mismatched() {
    let d = tmpdir("st");
    copy_dir(&fixture("mha_untied_hd64"), &d);
    let st = d.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();

    std::fs::write(&st, &full[..full.len() - 100]).unwrap();
    let e = err_of(LlamaFiles::open(&d));
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    std::fs::write(&st, &full[..4]).unwrap();
    let e = err_of(SafetensorsFile::open(&st));
    assert!(
        e.contains("model.safetensors") && e.contains("8-byte header"),
        "{e}"
    );

    let mut bad = full.clone();
    bad[9] = b'#';
    std::fs::write(&st, &bad).unwrap();
    let e = err_of(SafetensorsFile::open(&st));
    assert!(e.contains("not valid JSON"), "{e}");

    // config says a different hidden size than the tensors have
    std::fs::write(&st, &full).unwrap();
    let cfg_path = d.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"intermediate_size\": 224", "\"intermediate_size\": 256");
    std::fs::write(&cfg_path, cfg).unwrap();
    let (cfg, files) = LlamaFiles::open(&d).unwrap();
    let gpu = gpu();
    let e = err_of(Llama::load(
        &gpu,
        &cfg,
        &files,
        QuantPolicy::for_linear(DType::F32),
        16,
    ));
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[256, 128]")
            && e.contains("[224, 128]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_in_a_safetensors_model_is_named() {
    let d = tmpdir("st-missing");
    copy_dir(&fixture("mha_untied_hd64"), &d);
    let st = d.join("model.safetensors");
    let src = SafetensorsFile::open(&st).unwrap();
    // rewrite the file without one tensor
    let mut kept: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in &src.tensors {
        if name != "model.layers.1.self_attn.v_proj.weight" {
            kept.push((name.clone(), t.shape.clone(), src.read_bytes(t).unwrap()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &st).unwrap();
    let (cfg, files) = LlamaFiles::open(&d).unwrap();
    let e = err_of(files.validate(&cfg));
    assert!(
        e.contains("model.layers.1.self_attn.v_proj.weight")
            && e.contains("missing")
            && e.contains("st-missing"),
        "{e}"
    );
}

#[test]
fn directory_without_weights_and_bad_config() {
    let d = tmpdir("empty");
    let e = err_of(LlamaFiles::open(&d));
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(
        d.join("config.json"),
        "{\"model_type\": \"llama\", \"hidden_size\": \"big\"}",
    )
    .unwrap();
    let e = err_of(LlamaFiles::open(&d));
    assert!(e.contains("hidden_size") && e.contains("big"), "{e}");
    std::fs::write(d.join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
    let e = err_of(LlamaFiles::open(&d));
    assert!(e.contains("model_type") && e.contains("bert"), "{e}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let d = tmpdir("tok-mismatch");
    copy_dir(&fixture("mha_untied_hd64"), &d);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/llama-tokenizer.model");
    assert!(
        model.exists(),
        "{} is missing: run `bash tests/fetch-models.sh`",
        model.display()
    );
    std::fs::copy(&model, d.join("tokenizer.model")).unwrap();
    let (cfg, files) = LlamaFiles::open(&d).unwrap();
    let e = err_of(files.tokenizer(&cfg));
    assert!(
        e.contains("32000 tokens") && e.contains("320 rows") && e.contains("tok-mismatch"),
        "{e}"
    );
}

#[test]
fn generation_config_eos_overrides_config_and_bad_values_are_named() {
    let d = tmpdir("genconfig");
    copy_dir(&fixture("mha_untied_hd64"), &d);
    std::fs::write(
        d.join("generation_config.json"),
        "{\"bos_token_id\": 0, \"eos_token_id\": 1}",
    )
    .unwrap();
    let (cfg, _) = LlamaFiles::open(&d).unwrap();
    assert_eq!(cfg.eos, vec![1]);
    std::fs::write(
        d.join("generation_config.json"),
        "{\"eos_token_id\": [2, 7]}",
    )
    .unwrap();
    assert_eq!(LlamaFiles::open(&d).unwrap().0.eos, vec![2, 7]);
    std::fs::write(
        d.join("generation_config.json"),
        "{\"eos_token_id\": \"two\"}",
    )
    .unwrap();
    let e = err_of(LlamaFiles::open(&d));
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id") && e.contains("two"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------
// Resource bounds and byte-range checks of the weight parsers (fuzzed by fuzz/; see README's
// threat model). Each builds its bytes here and parses them through the bytes entry points.

fn gguf_from(bytes: &[u8], len: u64) -> minigpt4::Result<GgufFile> {
    GgufFile::from_reader(std::io::Cursor::new(bytes), len, Path::new("t.gguf"))
}

/// A GGUF v3 header with no metadata and `tensors` (name, dims, ggml type, relative offset).
fn gguf_table(tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for (name, dims, ty, off) in tensors {
        gstr(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.resize(b.len() + data, 0);
    b
}

#[test]
fn gguf_overlapping_unaligned_and_duplicate_tensors_are_refused() {
    // two F32 tensors of 64 bytes, the second starting inside the first
    let b = gguf_table(&[("a", &[16], 0, 0), ("b", &[16], 0, 32)], 128);
    let e = err_of(gguf_from(&b, b.len() as u64));
    assert!(
        e.contains("t.gguf") && e.contains("`a` and `b` overlap"),
        "{e}"
    );
    // the same, apart: fine
    let b = gguf_table(&[("a", &[16], 0, 0), ("b", &[16], 0, 64)], 128);
    assert_eq!(gguf_from(&b, b.len() as u64).unwrap().tensors.len(), 2);
    // an offset off the 32-byte alignment
    let b = gguf_table(&[("a", &[4], 0, 4)], 64);
    let e = err_of(gguf_from(&b, b.len() as u64));
    assert!(
        e.contains("`a`") && e.contains("offset 4") && e.contains("alignment 32"),
        "{e}"
    );
    // a name twice
    let b = gguf_table(&[("a", &[4], 0, 0), ("a", &[4], 0, 32)], 64);
    let e = err_of(gguf_from(&b, b.len() as u64));
    assert!(e.contains("`a` appears twice"), "{e}");
    // data past the end
    let b = gguf_table(&[("a", &[16], 0, 0)], 63);
    let e = err_of(gguf_from(&b, b.len() as u64));
    assert!(e.contains("`a`") && e.contains("outside the"), "{e}");
}

#[test]
fn gguf_counts_are_bounded_before_allocating() {
    use minigpt4::loader::gguf::{MAX_METADATA_VALUES, MAX_TENSORS};
    // A header claiming more tensors than the maximum, in a file (claimed) large enough to
    // hold them: refused from the count alone.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(MAX_TENSORS + 1).to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    let e = err_of(gguf_from(&b, 1 << 40));
    assert!(
        e.contains(&format!("at most {MAX_METADATA_VALUES} and {MAX_TENSORS}")),
        "{e}"
    );
    // An array longer than the maximum (the file, as claimed, could hold it).
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    gstr(&mut b, "tokenizer.ggml.token_type");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(MAX_METADATA_VALUES + 1).to_le_bytes());
    let e = err_of(gguf_from(&b, 1 << 40));
    assert!(
        e.contains("tokenizer.ggml.token_type")
            && e.contains(&format!("at most {MAX_METADATA_VALUES} elements")),
        "{e}"
    );
    // A key twice.
    let mut w = GgufWriter::new();
    w.u32("llama.block_count", 1).u32("llama.block_count", 2);
    let e = err_of(gguf_from(&w.bytes(), w.bytes().len() as u64));
    assert!(e.contains("`llama.block_count` appears twice"), "{e}");
}

fn safetensors_bytes(header: &str, data: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data, 0);
    b
}

fn safetensors_from(bytes: &[u8]) -> minigpt4::Result<SafetensorsFile> {
    SafetensorsFile::from_reader(
        std::io::Cursor::new(bytes),
        bytes.len() as u64,
        Path::new("t.safetensors"),
    )
}

#[test]
fn safetensors_offsets_near_u64_max_are_an_error() {
    // An empty tensor at offset u64::MAX: `8 + header + offset` overflowed (a panic in debug
    // builds, a wrapped range in release) before the end was checked with checked_add.
    let b = safetensors_bytes(
        r#"{"x":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
        0,
    );
    let e = err_of(safetensors_from(&b));
    assert!(
        e.contains("t.safetensors") && e.contains("`x`") && e.contains("end past the file"),
        "{e}"
    );
    // and with the file length unknown (the streaming package loader)
    let e = err_of(
        minigpt4::loader::safetensors::parse_header(
            "s",
            br#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#,
            100,
            None,
        )
        .map(|_| ()),
    );
    assert!(e.contains("`x`") && e.contains("end past the file"), "{e}");
}

#[test]
fn safetensors_overlapping_and_outside_tensors_are_refused() {
    let b = safetensors_bytes(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        16,
    );
    let e = err_of(safetensors_from(&b));
    assert!(e.contains("`a` and `b` overlap"), "{e}");
    let b = safetensors_bytes(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        15,
    );
    let e = err_of(safetensors_from(&b));
    assert!(e.contains("`a`") && e.contains("truncated"), "{e}");
    let b = safetensors_bytes(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
        16,
    );
    let e = err_of(safetensors_from(&b));
    assert!(e.contains("`a`") && e.contains("needs 16 bytes"), "{e}");
    // a header length past the file
    let mut b = safetensors_bytes("{}", 0);
    b[..8].copy_from_slice(&1000u64.to_le_bytes());
    let e = err_of(safetensors_from(&b));
    assert!(e.contains("header length 1000 exceeds the file"), "{e}");
}

#[test]
fn gguf_tokenizer_with_nan_scores_is_an_error_not_a_panic() {
    // Found by fuzz/ (target gguf): a "llama" tokenizer whose tokenizer.ggml.scores hold NaNs.
    // Ordering the merges by score with partial_cmp(..).unwrap_or(Equal) is no total order
    // then, and the standard library's sort panicked ("user-provided comparison function does
    // not correctly implement a total order").
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/fuzz_nan_scores.gguf");
    let g = GgufFile::open(&p).unwrap();
    let e = err_of(minigpt4::tokenizer::Tokenizer::from_gguf(&g));
    assert!(
        e.contains("fuzz_nan_scores.gguf") && e.contains("has score NaN, expected a number"),
        "{e}"
    );
}
