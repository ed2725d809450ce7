//! PyTorch checkpoint reader against fixtures written by real torch
//! (`tests/golden/make_torch_fixtures.py`).

use std::path::PathBuf;

use minigpt4::loader::torch::{TorchCheckpoint, TorchDType};
use minigpt4::Error;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name)
}

struct Expected {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    strides: Vec<usize>,
    storage_offset: usize,
    bits: Option<Vec<u32>>,
    ints: Option<Vec<i64>>,
}

fn expected(name: &str) -> Vec<Expected> {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).expect("fixture json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    let usizes = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("uint") as usize)
            .collect()
    };
    v["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| Expected {
            name: t["name"].as_str().expect("name").to_string(),
            dtype: t["dtype"].as_str().expect("dtype").to_string(),
            shape: usizes(&t["shape"]),
            strides: usizes(&t["strides"]),
            storage_offset: t["storage_offset"].as_u64().expect("offset") as usize,
            bits: t.get("bits").map(|b| {
                b.as_array()
                    .expect("bits")
                    .iter()
                    .map(|x| x.as_u64().expect("u32") as u32)
                    .collect()
            }),
            ints: t.get("ints").map(|b| {
                b.as_array()
                    .expect("ints")
                    .iter()
                    .map(|x| x.as_i64().expect("i64"))
                    .collect()
            }),
        })
        .collect()
}

/// Every tensor of the fixture: metadata and values equal torch's, bit for bit.
fn check_fixture(pt: &str, json: &str) -> TorchCheckpoint {
    let ck = TorchCheckpoint::open(&fixture(pt)).unwrap_or_else(|e| panic!("open {pt}: {e}"));
    let exp = expected(json);
    let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
    let exp_names: Vec<&str> = exp.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, exp_names, "{pt}: tensor names in file order");
    for e in &exp {
        let info = ck.get(&e.name).expect("listed tensor");
        assert_eq!(info.dtype.name(), e.dtype, "{pt}/{}: dtype", e.name);
        assert_eq!(info.shape, e.shape, "{pt}/{}: shape", e.name);
        assert_eq!(info.strides, e.strides, "{pt}/{}: strides", e.name);
        assert_eq!(
            info.storage_offset, e.storage_offset,
            "{pt}/{}: offset",
            e.name
        );
        if let Some(bits) = &e.bits {
            let got = ck
                .read_f32(&e.name)
                .unwrap_or_else(|err| panic!("{pt}/{}: {err}", e.name));
            let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert_eq!(&got, bits, "{pt}/{}: values", e.name);
        }
        if let Some(ints) = &e.ints {
            assert!(matches!(ck.read_f32(&e.name), Err(Error::Tensor { .. })));
            let bytes = ck.read_bytes(&e.name).expect("read_bytes");
            assert_eq!(info.dtype, TorchDType::I64);
            let got: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&got, ints, "{pt}/{}: int values", e.name);
        }
    }
    ck
}

#[test]
fn flat_state_dict_reads_exactly() {
    let ck = check_fixture("flat.pt", "flat");
    assert_eq!(ck.archive_name(), "flat");
    assert_eq!(ck.get("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(ck.read_f32("scalar").unwrap(), vec![3.25]);
    assert_eq!(ck.get("conv.weight").unwrap().shape, vec![4, 3, 2, 2]);
    assert_eq!(ck.get("mat_f16").unwrap().dtype, TorchDType::F16);
    assert_eq!(ck.get("f64").unwrap().dtype, TorchDType::F64);
    assert_eq!(ck.read_f32("empty").unwrap(), Vec::<f32>::new());
    assert!(ck.get("nope").is_none());
    let err = ck.read_f32("nope").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn wrapper_lists_only_model_entries() {
    let ck = check_fixture("wrapper.pt", "wrapper");
    assert!(!ck.tensors().is_empty());
    for t in ck.tensors() {
        assert_eq!(t.dtype, TorchDType::F16, "{}", t.name);
        assert!(
            !["optimizer", "config", "epoch", "scaler", "state"].contains(&t.name.as_str()),
            "{}",
            t.name
        );
    }
}

#[test]
fn shared_storage_views() {
    let ck = check_fixture("shared.pt", "shared");
    let keys: Vec<&str> = ck
        .tensors()
        .iter()
        .map(|t| t.storage_key.as_str())
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "one storage: {keys:?}");
    let c = ck.get("c").unwrap();
    assert!(!c.is_contiguous());
    assert_eq!(c.strides, vec![1, 6]);
    assert_eq!(ck.get("b").unwrap().storage_offset, 12);
    // The transpose equals the transpose of `a`.
    let a = ck.read_f32("a").unwrap();
    let ct = ck.read_f32("c").unwrap();
    for i in 0..8 {
        for j in 0..6 {
            assert_eq!(a[i * 6 + j].to_bits(), ct[j * 8 + i].to_bits());
        }
    }
}

#[test]
fn renamed_archive_python_zip_layout() {
    let ck = check_fixture("renamed.pt", "shared");
    assert_eq!(ck.archive_name(), "renamed_ckpt");
}

#[test]
fn bf16_reads_exactly() {
    let ck = check_fixture("bf16.pt", "bf16");
    assert_eq!(ck.get("w").unwrap().dtype, TorchDType::BF16);
}

#[test]
fn malicious_global_is_rejected() {
    let err = TorchCheckpoint::open(&fixture("malicious.pt")).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("os.system"), "{msg}");
    assert!(msg.contains("not allowed"), "{msg}");
}

#[test]
fn legacy_format_is_rejected_clearly() {
    let msg = TorchCheckpoint::open(&fixture("legacy.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("legacy (non-zip) PyTorch format is not supported; re-save with torch>=1.6"),
        "{msg}"
    );
}

#[test]
fn storage_larger_than_record_is_rejected_naming_tensor() {
    let msg = TorchCheckpoint::open(&fixture("oversized.pt"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tensor `a`"), "{msg}");
    assert!(msg.contains("oversized/data/"), "{msg}");
}

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("minigpt4-torch-{}-{tag}", std::process::id()))
}

#[test]
fn truncated_files_error_never_panic() {
    for name in ["flat.pt", "wrapper.pt", "shared.pt"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let path = temp_path(&format!("trunc-{name}"));
        let mut cuts: Vec<usize> = vec![0, 1, 3, 4, 10, 30, 64, 100, 500, 1000];
        cuts.extend((1..40).map(|i| bytes.len() * i / 40));
        cuts.extend([bytes.len() - 22, bytes.len() - 21, bytes.len() - 1]);
        for cut in cuts {
            if cut >= bytes.len() {
                continue;
            }
            std::fs::write(&path, &bytes[..cut]).unwrap();
            match TorchCheckpoint::open(&path) {
                Err(e) => assert!(!e.to_string().is_empty()),
                Ok(ck) => panic!(
                    "{name} truncated at {cut} opened with {} tensors",
                    ck.tensors().len()
                ),
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn file_shrinking_after_open_is_an_error_on_read() {
    let bytes = std::fs::read(fixture("shared.pt")).unwrap();
    let path = temp_path("shrink");
    std::fs::write(&path, &bytes).unwrap();
    let ck = TorchCheckpoint::open(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    assert!(ck.read_f32("a").is_err());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn corrupted_bytes_error_or_read_never_panic() {
    // Deterministic xorshift; flip bytes anywhere (directory, headers, pickle, data).
    let bytes = std::fs::read(fixture("wrapper.pt")).unwrap();
    let path = temp_path("corrupt");
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..(1 + rnd() % 4) {
            let i = (rnd() % b.len() as u64) as usize;
            b[i] = rnd() as u8;
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(ck) = TorchCheckpoint::open(&path) {
            for t in ck.tensors() {
                let _ = ck.read_f32(&t.name);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn other_formats_say_what_they_look_like() {
    let path = temp_path("kinds");
    let mut st = Vec::new();
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    st.extend_from_slice(&(header.len() as u64).to_le_bytes());
    st.extend_from_slice(header);
    st.extend_from_slice(&[0, 0, 0, 0]);
    for (bytes, needle) in [
        (st, "safetensors"),
        (b"GGUF\x03\x00\x00\x00rest".to_vec(), "GGUF"),
        (b"hello world, not a checkpoint".to_vec(), "PK"),
        (Vec::new(), "empty"),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let msg = TorchCheckpoint::open(&path).unwrap_err().to_string();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    let _ = std::fs::remove_file(&path);
    let missing = TorchCheckpoint::open(&temp_path("does-not-exist")).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
}
