//! The model package: conversion from the original files, loading (validated up front, streamed
//! into GPU buffers), equality with loading the original files directly, and bad packages.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, gpu, gpu_with, json_ids, tmp};
use minigpt4::chat::{Conversation, ModelVariant, Sampling};
use minigpt4::convert::{convert, ConvertArgs};
use minigpt4::gpu::{Gpu, GpuOptions};
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::loader::TensorSource;
use minigpt4::model::llama::{LlamaFiles, QuantPolicy};
use minigpt4::model::minigpt4::{vision_sources, Formats, MiniGpt4, MiniGpt4Config};
use minigpt4::package::{self, PackageLoader};
use minigpt4::quant::DType;

fn tiny() -> PathBuf {
    fixture("minigpt4/vicuna0_tiny")
}

fn args(out: &Path, llm: DType, vision: DType) -> ConvertArgs {
    ConvertArgs {
        variant: "vicuna0".into(),
        vision: vec![tiny().join("vision.safetensors")],
        llm: tiny().join("llm"),
        vision_config: Some(tiny().join("vision_config.json")),
        out: out.into(),
        llm_quant: llm,
        vision_quant: vision,
    }
}

fn convert_tiny(name: &str, llm: DType, vision: DType) -> PathBuf {
    let out = tmp(name);
    convert(&args(&out, llm, vision), |_, _, _| {}).unwrap()
}

fn pixels() -> Vec<f32> {
    SafetensorsFile::open(&tiny().join("golden.safetensors"))
        .unwrap()
        .read_f32("pixel_values")
        .unwrap()
}

/// Image embeddings and a greedy answer of `n` tokens.
fn run(gpu: &Gpu, m: &mut MiniGpt4, n: usize) -> (Vec<f32>, Vec<u32>) {
    let image = pollster::block_on(m.encode_image(gpu, &pixels())).unwrap();
    let emb = pollster::block_on(image.read_f32(gpu)).unwrap();
    let mut conv = Conversation::new(ModelVariant::Vicuna0);
    conv.add_image();
    conv.ask("Describe this image in detail.");
    let greedy = Sampling {
        greedy: true,
        ..ModelVariant::Vicuna0.demo_sampling()
    };
    let greedy = Sampling {
        repetition_penalty: 1.0,
        ..greedy
    };
    let a = pollster::block_on(m.answer(gpu, &conv, &image, &greedy, n, |_| true)).unwrap();
    (emb, a.token_ids)
}

/// The tiny model loaded from its original files in `formats`.
fn direct(gpu: &Gpu, formats: Formats) -> MiniGpt4 {
    let d = tiny();
    let (llm, files) = LlamaFiles::open(&d.join("llm")).unwrap();
    let (vision, qformer) = minigpt4::convert::vision_configs(
        ModelVariant::Vicuna0,
        Some(&d.join("vision_config.json")),
    )
    .unwrap();
    let cfg = MiniGpt4Config {
        variant: ModelVariant::Vicuna0,
        vision,
        qformer,
        llm,
    };
    let src = vision_sources(&[d.join("vision.safetensors").as_path()]).unwrap();
    MiniGpt4::load(gpu, &cfg, formats, src.as_ref(), &files, 256).unwrap()
}

#[test]
fn f32_package_reproduces_the_reference_greedy_answer() {
    let gpu = gpu();
    let pkg = convert_tiny("f32", DType::F32, DType::F32);
    let mut m = package::load(&gpu, &pkg, 256).unwrap();
    assert_eq!(m.label, "vicuna0");
    let (emb, ids) = run(&gpu, &mut m, 16);
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("golden.json")).unwrap())
            .unwrap();
    let golden = SafetensorsFile::open(&tiny().join("golden.safetensors")).unwrap();
    common::assert_close(
        "image embeddings",
        &emb,
        &golden.read_f32("image_embeds").unwrap(),
        1e-4,
        1e-4,
    );
    // the reference's greedy run with row 32000 masked, which our sampler never picks
    let want = json_ids(&g["greedy_ids_masked"]);
    assert!(
        ids.len() == 16 && want.starts_with(&ids),
        "{ids:?} vs {want:?}"
    );
    let _ = std::fs::remove_dir_all(pkg);
}

#[test]
fn quantized_package_equals_loading_the_original_files() {
    let gpu = gpu();
    let pkg = convert_tiny("q4", DType::Q4, DType::F16);
    let mut a = package::load(&gpu, &pkg, 256).unwrap();
    let mut b = direct(
        &gpu,
        Formats {
            vision: DType::F16,
            llm: QuantPolicy::for_linear(DType::Q4),
        },
    );
    let (ea, ia) = run(&gpu, &mut a, 12);
    let (eb, ib) = run(&gpu, &mut b, 12);
    assert_eq!(ea, eb, "image embeddings must be bit-identical");
    assert_eq!(ia, ib);
    let _ = std::fs::remove_dir_all(pkg);
}

#[test]
fn tensors_split_across_buffers_stream_into_the_right_parts() {
    // a 128 KiB binding limit (just above the logits' size) splits the embedding table,
    // lm_head (q8, 2-byte scale rows) and the larger vision matrices into parts; the answer
    // must not change
    let pkg = convert_tiny("split", DType::Q8, DType::F16);
    let whole = gpu();
    let split = gpu_with(GpuOptions {
        max_binding: Some(131072),
        ..GpuOptions::default()
    });
    let probe = minigpt4::gpu::Tensor::empty(&split, "probe", &[32001, 32], DType::Q8).unwrap();
    assert!(probe.parts.len() > 4, "{} parts", probe.parts.len());
    let mut a = package::load(&whole, &pkg, 256).unwrap();
    let mut b = package::load(&split, &pkg, 256).unwrap();
    let (ea, ia) = run(&whole, &mut a, 8);
    let (eb, ib) = run(&split, &mut b, 8);
    common::assert_close("image embeddings", &eb, &ea, 1e-5, 1e-5);
    assert_eq!(ia, ib);
    let _ = std::fs::remove_dir_all(pkg);
}

/// The smoke package in tests/fixtures is exactly what `convert` makes today.
#[test]
fn the_committed_smoke_package_is_current() {
    let fresh = convert_tiny("smoke", DType::Q4, DType::F16);
    let committed = fixture("minigpt4/vicuna0_tiny_pkg");
    let mut names: Vec<String> = std::fs::read_dir(&fresh)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    for n in names {
        assert!(
            std::fs::read(fresh.join(&n)).unwrap() == std::fs::read(committed.join(&n)).unwrap(),
            "{n} differs from a fresh conversion: regenerate with the command in tests/fixtures/minigpt4/README.md"
        );
    }
    let _ = std::fs::remove_dir_all(fresh);
}

fn err_of<T>(r: minigpt4::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A copy of the smoke package to break.
fn copy_smoke(name: &str) -> PathBuf {
    let d = tmp(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(fixture("minigpt4/vicuna0_tiny_pkg")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn bad_packages_are_refused_before_any_upload_with_the_reason() {
    let gpu = gpu();
    // not a package
    let e = err_of(package::load(&gpu, &tiny(), 64));
    assert!(e.contains("format"), "{e}");
    let e = err_of(package::load(&gpu, &tmp("nothing"), 64));
    assert!(e.contains("not a model package"), "{e}");

    // another format version
    let d = copy_smoke("version");
    edit_json(&d.join("config.json"), |v| v["format_version"] = 99.into());
    let e = err_of(package::load(&gpu, &d, 64));
    assert!(e.contains("format_version") && e.contains("99"), "{e}");
    let _ = std::fs::remove_dir_all(&d);

    // a tensor missing from the manifest
    let d = copy_smoke("missing");
    edit_json(&d.join("model.safetensors.index.json"), |v| {
        v["tensors"]
            .as_object_mut()
            .unwrap()
            .remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = err_of(package::load(&gpu, &d, 64));
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);

    // a manifest shape that the config does not imply
    let d = copy_smoke("shape");
    edit_json(&d.join("model.safetensors.index.json"), |v| {
        v["tensors"]["llama_proj.weight"]["shape"] = serde_json::json!([32, 32]);
    });
    let e = err_of(package::load(&gpu, &d, 64));
    assert!(
        e.contains("llama_proj.weight") && e.contains("[32, 64]") && e.contains("[32, 32]"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);

    // a config whose dimensions do not match the stored tensors
    let d = copy_smoke("dims");
    edit_json(&d.join("config.json"), |v| {
        v["llm"]["intermediate"] = 96.into()
    });
    let e = err_of(package::load(&gpu, &d, 64));
    assert!(e.contains("mlp.gate_proj.weight"), "{e}");
    let _ = std::fs::remove_dir_all(&d);

    // a truncated shard
    let d = copy_smoke("truncated");
    let shard = d.join("model-00001-of-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(package::load(&gpu, &d, 64));
    assert!(e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_streaming_loader_checks_every_byte_arrived() {
    let gpu = gpu();
    let d = fixture("minigpt4/vicuna0_tiny_pkg");
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    let new = || {
        PackageLoader::new(
            &gpu,
            "pkg",
            &read("config.json"),
            &read("model.safetensors.index.json"),
            &read("tokenizer.json"),
            64,
        )
        .unwrap()
    };
    let shard = read("model-00001-of-00001.safetensors");
    // fed in odd-sized pieces, it loads
    let mut l = new();
    assert_eq!(l.shards(), ["model-00001-of-00001.safetensors"]);
    l.begin_shard("model-00001-of-00001.safetensors").unwrap();
    for c in shard.chunks(4093) {
        l.feed(c).unwrap();
    }
    l.end_shard().unwrap();
    assert_eq!(l.written, l.total);
    let mut m = l.finish().unwrap();
    let mut b = package::load(&gpu, &d, 64).unwrap();
    assert_eq!(run(&gpu, &mut m, 4), run(&gpu, &mut b, 4));
    // a stream cut short
    let mut l = new();
    l.begin_shard("model-00001-of-00001.safetensors").unwrap();
    l.feed(&shard[..shard.len() / 2]).unwrap();
    let e = err_of(l.end_shard());
    assert!(e.contains("truncated"), "{e}");
    // one flipped byte deep in the tensor data: the index's SHA-256 catches it
    let mut bad = shard.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x40;
    let mut l = new();
    l.begin_shard("model-00001-of-00001.safetensors").unwrap();
    l.feed(&bad).unwrap();
    let e = err_of(l.end_shard());
    assert!(
        e.contains("model-00001-of-00001.safetensors") && e.contains("SHA-256"),
        "{e}"
    );
    // trailing bytes after the last tensor
    let mut long = shard.clone();
    long.extend_from_slice(&[0; 16]);
    let mut l = new();
    l.begin_shard("model-00001-of-00001.safetensors").unwrap();
    let e = err_of(l.feed(&long).and_then(|_| l.end_shard()));
    assert!(e.contains("16 bytes after the last tensor"), "{e}");
    // a loader over an edited index, fed the whole shard
    let fed_with_index = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut ix: serde_json::Value =
            serde_json::from_slice(&read("model.safetensors.index.json")).unwrap();
        edit(&mut ix);
        let mut l = PackageLoader::new(
            &gpu,
            "pkg",
            &read("config.json"),
            &serde_json::to_vec(&ix).unwrap(),
            &read("tokenizer.json"),
            64,
        )
        .unwrap();
        l.begin_shard("model-00001-of-00001.safetensors").unwrap();
        l.feed(&shard).unwrap();
        l
    };
    // an index whose recorded size disagrees with a self-consistent shard
    let mut l = fed_with_index(&|ix| {
        ix["shards"]["model-00001-of-00001.safetensors"]["size"] = (shard.len() + 8).into()
    });
    let e = err_of(l.end_shard());
    assert!(
        e.contains(&format!(
            "{} bytes, the index says {}",
            shard.len(),
            shard.len() + 8
        )),
        "{e}"
    );
    // an index from before shard digests existed still loads (the header checks remain)
    let mut l = fed_with_index(&|ix| {
        ix.as_object_mut().unwrap().remove("shards");
    });
    l.end_shard().unwrap();
    l.finish().unwrap();
    // a shard never fed
    let e = err_of(new().finish());
    assert!(e.contains("was not loaded"), "{e}");
    // a shard that is not in the index
    let e = err_of(new().begin_shard("model-00002-of-00002.safetensors"));
    assert!(e.contains("not a shard"), "{e}");
}

#[test]
fn an_interrupted_conversion_leaves_no_package() {
    let out = tmp("interrupted");
    {
        let mut w = package::PackageWriter::create(&out).unwrap();
        let enc = minigpt4::quant::encode(DType::F32, &[1.0; 64], 64).unwrap();
        w.add("x", &[64], &enc).unwrap();
        let mut partial = out.as_os_str().to_owned();
        partial.push(".partial");
        assert!(Path::new(&partial).is_dir());
        // dropped without finish(), as on an error or a panic
    }
    assert!(!out.exists());
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    assert!(!Path::new(&partial).exists());

    // an error in the middle (a source tensor that cannot be read) leaves nothing either
    let bad = tmp("bad-src");
    std::fs::create_dir_all(&bad).unwrap();
    let vision = std::fs::read(tiny().join("vision.safetensors")).unwrap();
    // cut the file inside the last tensor's data: the header check passes only for tensors
    // before it, so conversion fails with a clear message and no package
    std::fs::write(bad.join("vision.safetensors"), &vision[..vision.len() - 10]).unwrap();
    let mut a = args(&out, DType::Q4, DType::F16);
    a.vision = vec![bad.join("vision.safetensors")];
    let e = err_of(convert(&a, |_, _, _| {}));
    assert!(e.contains("truncated"), "{e}");
    assert!(!out.exists());
    assert!(!Path::new(&partial).exists());
    let _ = std::fs::remove_dir_all(bad);

    // an existing output is never overwritten
    let existing = tmp("existing");
    std::fs::create_dir_all(&existing).unwrap();
    let e = err_of(convert(
        &args(&existing, DType::Q4, DType::F16),
        |_, _, _| {},
    ));
    assert!(e.contains("already exists"), "{e}");
    let _ = std::fs::remove_dir_all(existing);
}

#[test]
fn conversion_names_the_classic_mixups() {
    // a 13B label with a small LLM
    let out = tmp("mixup");
    let mut a = args(&out, DType::Q4, DType::F16);
    a.variant = "vicuna0-13b".into();
    let e = err_of(convert(&a, |_, _, _| {}));
    assert!(e.contains("5120") && e.contains("32 wide"), "{e}");
    // a Q-Former checkpoint converted as the Llama-2 variant
    let mut a = args(&out, DType::Q4, DType::F16);
    a.variant = "llama2".into();
    let e = err_of(convert(&a, |_, _, _| {}));
    assert!(e.contains("llama_proj.weight"), "{e}");
    assert!(!out.exists());
}

/// The tiny model in the formats users download (tests/golden/make_original_checkpoints.py:
/// a flat fp16 `eva_vit_g.pth`, a `{'model': ...}` BLIP-2 checkpoint with t5_proj and the
/// position_ids buffer, a MiniGPT-4 checkpoint with optimizer state, an HF directory of `.bin`
/// shards) converts to exactly the package made from the safetensors copy of the same values,
/// which reproduces the reference (see `f32_package_reproduces_the_reference_greedy_answer`).
#[test]
fn original_pytorch_checkpoints_convert_to_the_same_package() {
    let orig = fixture("minigpt4/vicuna0_tiny_orig");
    for (llm, vision) in [(DType::F32, DType::F32), (DType::Q4, DType::F16)] {
        let a = convert_tiny("from-st", llm, vision);
        let out = tmp("from-pth");
        let mut args = args(&out, llm, vision);
        args.vision = vec![
            orig.join("eva_vit_g.pth"),
            orig.join("blip2_pretrained_flant5xxl.pth"),
            orig.join("pretrained_minigpt4.pth"),
        ];
        args.llm = orig.join("vicuna");
        let b = convert(&args, |_, _, _| {}).unwrap();
        for n in [
            "config.json",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ] {
            assert!(
                std::fs::read(a.join(n)).unwrap() == std::fs::read(b.join(n)).unwrap(),
                "{n} differs ({llm} / {vision})"
            );
        }
        let _ = std::fs::remove_dir_all(a);
        let _ = std::fs::remove_dir_all(b);
    }
}

/// Writes f32 tensors as a safetensors file.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (n, s, v) in tensors {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [at, at + 4 * v.len()]}),
        );
        at += 4 * v.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for (_, _, v) in tensors {
        for x in v {
            bytes.extend(x.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// MiniGPT-v2: the LoRA adapters of q_proj and v_proj (peft 0.2 names in layer 0, peft ≥ 0.3
/// `.default` names in layer 1) are merged as W + (alpha/r)·B·A into the fused QKV matrix; the
/// 224-px position table is resized to the 448-px grid; a checkpoint without adapters is refused.
#[test]
fn minigptv2_merges_the_lora_adapters() {
    let d = fixture("minigpt4/llama2_tiny");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let mut vit = common::vit_config(&c);
    let work = tmp("v2");
    std::fs::create_dir_all(&work).unwrap();
    // the fixture's table is for 112 px (8×8); run it at 224 px (16×16) as v2 runs 224 → 448
    vit.image_size = 224;
    std::fs::write(
        work.join("vision_config.json"),
        serde_json::json!({ "vit": vit }).to_string(),
    )
    .unwrap();
    let (h, q, kv, r) = (32usize, 32usize, 32usize, 4usize);
    let mut rng = common::Rng::new(7);
    let mut lora = Vec::new();
    for (i, suffix) in [(0, ""), (1, ".default")] {
        for (m, n) in [("q_proj", q), ("v_proj", kv)] {
            let p = format!("llama_model.base_model.model.model.layers.{i}.self_attn.{m}");
            lora.push((
                format!("{p}.lora_A{suffix}.weight"),
                vec![r, h],
                rng.vec(r * h, 0.5),
            ));
            lora.push((
                format!("{p}.lora_B{suffix}.weight"),
                vec![n, r],
                rng.vec(n * r, 0.5),
            ));
        }
    }
    write_safetensors(&work.join("lora.safetensors"), &lora);
    let mut a = ConvertArgs {
        variant: "minigptv2".into(),
        vision: vec![d.join("vision.safetensors"), work.join("lora.safetensors")],
        llm: d.join("llm"),
        vision_config: Some(work.join("vision_config.json")),
        out: work.join("pkg"),
        llm_quant: DType::F32,
        vision_quant: DType::F32,
    };
    let pkg = convert(&a, |_, _, _| {}).unwrap();
    let st = minigpt4::loader::safetensors::Sharded::new(
        "pkg".into(),
        vec![Box::new(
            SafetensorsFile::open(&pkg.join("model-00001-of-00001.safetensors")).unwrap(),
        )],
    )
    .unwrap();
    let llm = SafetensorsFile::open(&d.join("llm/model.safetensors")).unwrap();
    let get = |src: &dyn TensorSource, n: &str| src.read_f32(n).unwrap();
    let find = |n: &str| lora.iter().find(|(x, _, _)| x == n).unwrap().2.clone();
    for (i, suffix) in [(0, ""), (1, ".default")] {
        let fused = get(&st, &format!("model.layers.{i}.self_attn.qkv_proj.weight"));
        let mut want = Vec::new();
        for (m, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            let mut w = get(&llm, &format!("model.layers.{i}.self_attn.{m}.weight"));
            if m != "k_proj" {
                let p = format!("llama_model.base_model.model.model.layers.{i}.self_attn.{m}");
                let la = find(&format!("{p}.lora_A{suffix}.weight"));
                let lb = find(&format!("{p}.lora_B{suffix}.weight"));
                for row in 0..n {
                    for col in 0..h {
                        let ba: f32 = (0..r).map(|j| lb[row * r + j] * la[j * h + col]).sum();
                        w[row * h + col] += 16.0 / r as f32 * ba;
                    }
                }
            }
            want.extend(w);
        }
        common::assert_close(&format!("layer {i} merged QKV"), &fused, &want, 1e-5, 1e-5);
    }
    // the position table at the new grid: 1 + 16² rows
    assert_eq!(
        st.shape("visual_encoder.pos_embed").unwrap(),
        vec![1 + 16 * 16, vit.width]
    );
    // without the adapters: refused, naming the missing tensor
    a.vision = vec![d.join("vision.safetensors")];
    a.out = work.join("pkg2");
    let e = err_of(convert(&a, |_, _, _| {}));
    assert!(e.contains("lora_A") && e.contains("LoRA"), "{e}");
    let _ = std::fs::remove_dir_all(work);
}
