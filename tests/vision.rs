//! The vision half against transformers' BLIP-2 (tests/golden/make_vision_goldens.py): tiny
//! random EVA ViT (head dim 88) → ln_vision (eps 1e-5) → Q-Former (cross-attention on even
//! layers) → llama_proj, and the no-Q-Former path (drop CLS, concatenate 4 tokens, project).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, gpu, json_usize, qformer_config, vit_config};
use minigpt4::gpu::{Gpu, Recorder, Tensor};
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::loader::TensorSource;
use minigpt4::model::qformer::{QFormer, QFormerConfig};
use minigpt4::model::vit::{Vit, VitConfig};
use minigpt4::quant::DType;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vision")
        .join(name)
}

fn config(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("config.json")).unwrap()).unwrap()
}

fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    pollster::block_on(t.read_f32(gpu)).unwrap()
}

fn upload(gpu: &Gpu, src: &SafetensorsFile, name: &str, shape: &[usize]) -> Tensor {
    Tensor::upload(gpu, name, shape, DType::F32, &src.read_f32(name).unwrap()).unwrap()
}

#[test]
fn vit_ln_vision_qformer_and_projection_match_blip2() {
    check_qformer_tiny(DType::F32);
}

/// f16 weights (the default for the vision path): relative L2 error of every stage ≤ 1e-2.
#[test]
fn f16_weights_stay_within_one_percent() {
    check_qformer_tiny(DType::F16);
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn check(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    if dtype == DType::F32 {
        assert_close(what, got, want, 1e-4, 1e-4);
    } else {
        let e = rel_l2(got, want);
        eprintln!("{what} ({dtype} weights): relative L2 error {e:.2e}");
        assert!(e <= 1e-2, "{what} ({dtype} weights): relative error {e}");
    }
}

fn check_qformer_tiny(dtype: DType) {
    let gpu = gpu();
    let c = config("qformer_tiny");
    let vc = vit_config(&c);
    let qc = qformer_config(&c["qformer"]);
    let llm = json_usize(&c["llm_hidden"]);
    let weights =
        SafetensorsFile::open(&dir("qformer_tiny").join("weights_minigpt4.safetensors")).unwrap();
    let golden = SafetensorsFile::open(&dir("qformer_tiny").join("golden.safetensors")).unwrap();
    let vit = Vit::load(&gpu, &vc, &weights, dtype).unwrap();
    let qf = QFormer::load(&gpu, &qc, &weights, dtype).unwrap();
    let proj_w = upload(&gpu, &weights, "llama_proj.weight", &[llm, qc.hidden]);
    let proj_b = upload(&gpu, &weights, "llama_proj.bias", &[llm]);
    let s = vc.image_size;
    let pixels = upload(&gpu, &golden, "pixel_values", &[3, s, s]);
    let t = vc.tokens();
    let taps: Vec<Tensor> = (0..vc.layers)
        .map(|i| Tensor::zeros(&gpu, &format!("tap{i}"), &[t, vc.width]).unwrap())
        .collect();
    let mut rec = Recorder::new(&gpu);
    let img = vit.record(&gpu, &mut rec, &pixels, Some(&taps)).unwrap();
    let qtaps: Vec<Tensor> = (0..qc.layers)
        .map(|i| Tensor::zeros(&gpu, &format!("qtap{i}"), &[qc.queries, qc.hidden]).unwrap())
        .collect();
    let qout = qf.record(&gpu, &mut rec, &img, Some(&qtaps)).unwrap();
    let proj = Tensor::zeros(&gpu, "proj", &[qc.queries, llm]).unwrap();
    rec.matmul(&qout, &proj_w, Some(&proj_b), &proj, false)
        .unwrap();
    pollster::block_on(rec.submit()).unwrap();
    for (i, tap) in taps.iter().enumerate() {
        check(
            &format!("vit block {i}"),
            dtype,
            &read(&gpu, tap),
            &golden.read_f32(&format!("vit_block_{i}")).unwrap(),
        );
    }
    check(
        "ln_vision",
        dtype,
        &read(&gpu, &img),
        &golden.read_f32("ln_vision").unwrap(),
    );
    check(
        "qformer",
        dtype,
        &read(&gpu, &qout),
        &golden.read_f32("qformer_out").unwrap(),
    );
    check(
        "llama_proj",
        dtype,
        &read(&gpu, &proj),
        &golden.read_f32("proj_out").unwrap(),
    );
}

#[test]
fn no_qformer_path_concatenates_four_tokens_and_projects() {
    let gpu = gpu();
    let c = config("noqformer_tiny");
    let vc = vit_config(&c);
    let llm = json_usize(&c["llm_hidden"]);
    let weights =
        SafetensorsFile::open(&dir("noqformer_tiny").join("weights_minigpt4.safetensors")).unwrap();
    assert!(
        weights.shape("ln_vision.weight").is_none(),
        "fixture must lack ln_vision (identity affine)"
    );
    let golden = SafetensorsFile::open(&dir("noqformer_tiny").join("golden.safetensors")).unwrap();
    let vit = Vit::load(&gpu, &vc, &weights, DType::F32).unwrap();
    let (w, t) = (vc.width, vc.tokens());
    let groups = (t - 1) / 4;
    let proj_w = upload(&gpu, &weights, "llama_proj.weight", &[llm, 4 * w]);
    let proj_b = upload(&gpu, &weights, "llama_proj.bias", &[llm]);
    let pixels = upload(
        &gpu,
        &golden,
        "pixel_values",
        &[3, vc.image_size, vc.image_size],
    );
    let mut rec = Recorder::new(&gpu);
    let img = vit.record(&gpu, &mut rec, &pixels, None).unwrap();
    // drop CLS; rows 4j..4j+3 side by side = the same bytes seen as [groups, 4w]
    let cat = Tensor::zeros(&gpu, "cat4", &[groups, 4 * w]).unwrap();
    rec.copy_rows(&img, w, 4 * w, &cat, 0, 4 * w, groups, 4 * w)
        .unwrap();
    let proj = Tensor::zeros(&gpu, "proj", &[groups, llm]).unwrap();
    rec.matmul(&cat, &proj_w, Some(&proj_b), &proj, false)
        .unwrap();
    pollster::block_on(rec.submit()).unwrap();
    assert_close(
        "ln_vision",
        &read(&gpu, &img),
        &golden.read_f32("ln_vision").unwrap(),
        1e-4,
        1e-4,
    );
    assert_close(
        "llama_proj",
        &read(&gpu, &proj),
        &golden.read_f32("proj_out").unwrap(),
        1e-4,
        1e-4,
    );
}

#[test]
fn position_table_interpolation_matches_pytorch_bicubic() {
    let g = SafetensorsFile::open(&dir("posembed_interp").join("golden.safetensors")).unwrap();
    let input = g.read_f32("pos_embed_in").unwrap();
    let want = g.read_f32("pos_embed_out").unwrap();
    let width = g.shape("pos_embed_in").unwrap()[2];
    let got = minigpt4::model::vit::interpolate_pos_embed(&input, width, 16, 32).unwrap();
    assert_close("pos_embed 16->32", &got, &want, 1e-5, 1e-5);
    let e = minigpt4::model::vit::interpolate_pos_embed(&input[1..], width, 16, 32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pos_embed"), "{e}");
}

/// Random weights at the real EVA ViT-g / BLIP-2 Q-Former shapes, generated tensor by tensor.
struct Synthetic {
    shapes: Vec<(String, Vec<usize>)>,
}

impl TensorSource for Synthetic {
    fn describe(&self) -> String {
        "synthetic".into()
    }
    fn names(&self) -> Vec<String> {
        self.shapes.iter().map(|s| s.0.clone()).collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes
            .iter()
            .find(|s| s.0 == name)
            .map(|s| s.1.clone())
    }
    fn read_f32(&self, name: &str) -> minigpt4::Result<Vec<f32>> {
        let shape = self.shape(name).unwrap();
        let n: usize = shape.iter().product();
        let mut r = common::Rng::new(name.len() as u64 * 7919 + n as u64);
        let norm_weight = name.contains("norm") && name.ends_with("weight")
            || name.contains("LayerNorm.weight")
            || name.starts_with("ln_vision.weight");
        Ok((0..n)
            .map(|_| {
                if norm_weight {
                    1.0 + 0.05 * r.f()
                } else {
                    0.03 * r.f()
                }
            })
            .collect())
    }
}

fn real_shapes(v: &VitConfig, q: &QFormerConfig) -> Vec<(String, Vec<usize>)> {
    let (w, m, p, t) = (v.width, v.mlp, v.patch, v.tokens());
    let mut s: Vec<(String, Vec<usize>)> = vec![
        ("visual_encoder.cls_token".into(), vec![1, 1, w]),
        ("visual_encoder.pos_embed".into(), vec![1, t, w]),
        (
            "visual_encoder.patch_embed.proj.weight".into(),
            vec![w, 3, p, p],
        ),
        ("visual_encoder.patch_embed.proj.bias".into(), vec![w]),
        ("ln_vision.weight".into(), vec![w]),
        ("ln_vision.bias".into(), vec![w]),
        ("query_tokens".into(), vec![1, q.queries, q.hidden]),
        (
            "Qformer.bert.embeddings.LayerNorm.weight".into(),
            vec![q.hidden],
        ),
        (
            "Qformer.bert.embeddings.LayerNorm.bias".into(),
            vec![q.hidden],
        ),
    ];
    for i in 0..v.layers {
        let b = format!("visual_encoder.blocks.{i}.");
        for (n, sh) in [
            ("norm1.weight", vec![w]),
            ("norm1.bias", vec![w]),
            ("attn.qkv.weight", vec![3 * w, w]),
            ("attn.q_bias", vec![w]),
            ("attn.v_bias", vec![w]),
            ("attn.proj.weight", vec![w, w]),
            ("attn.proj.bias", vec![w]),
            ("norm2.weight", vec![w]),
            ("norm2.bias", vec![w]),
            ("mlp.fc1.weight", vec![m, w]),
            ("mlp.fc1.bias", vec![m]),
            ("mlp.fc2.weight", vec![w, m]),
            ("mlp.fc2.bias", vec![w]),
        ] {
            s.push((format!("{b}{n}"), sh));
        }
    }
    let (d, e, f) = (q.hidden, q.encoder_width, q.intermediate);
    for i in 0..q.layers {
        let l = format!("Qformer.bert.encoder.layer.{i}.");
        let mut add = |n: &str, sh: Vec<usize>| s.push((format!("{l}{n}"), sh));
        for x in ["query", "key", "value"] {
            add(&format!("attention.self.{x}.weight"), vec![d, d]);
            add(&format!("attention.self.{x}.bias"), vec![d]);
        }
        add("attention.output.dense.weight", vec![d, d]);
        add("attention.output.dense.bias", vec![d]);
        add("attention.output.LayerNorm.weight", vec![d]);
        add("attention.output.LayerNorm.bias", vec![d]);
        if i % q.cross_every == 0 {
            add("crossattention.self.query.weight", vec![d, d]);
            add("crossattention.self.query.bias", vec![d]);
            add("crossattention.self.key.weight", vec![d, e]);
            add("crossattention.self.key.bias", vec![d]);
            add("crossattention.self.value.weight", vec![d, e]);
            add("crossattention.self.value.bias", vec![d]);
            add("crossattention.output.dense.weight", vec![d, d]);
            add("crossattention.output.dense.bias", vec![d]);
            add("crossattention.output.LayerNorm.weight", vec![d]);
            add("crossattention.output.LayerNorm.bias", vec![d]);
        }
        add("intermediate_query.dense.weight", vec![f, d]);
        add("intermediate_query.dense.bias", vec![f]);
        add("output_query.dense.weight", vec![d, f]);
        add("output_query.dense.bias", vec![d]);
        add("output_query.LayerNorm.weight", vec![d]);
        add("output_query.LayerNorm.bias", vec![d]);
    }
    s
}

/// The real ViT-g (224 px: 257 tokens × 1408, 16 heads of 88, MLP 6144) and Q-Former (32
/// queries, 768, 12 layers) run one image on this adapter within its limits (a shape and
/// limits check with random weights, not a speed test).
#[test]
fn real_vit_g_and_qformer_shapes_run_within_the_adapter_limits() {
    let gpu = gpu();
    let mut vc = VitConfig::eva_vit_g(224);
    // 3 blocks by default: every block has the same shapes, and all 39 take about 12 minutes
    // on lavapipe; MINIGPT4_VIT_LAYERS=39 runs the whole encoder.
    vc.layers = std::env::var("MINIGPT4_VIT_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let qc = QFormerConfig::blip2();
    let src = Synthetic {
        shapes: real_shapes(&vc, &qc),
    };
    let vit = Vit::load(&gpu, &vc, &src, DType::F16).unwrap();
    let qf = QFormer::load(&gpu, &qc, &src, DType::F16).unwrap();
    let mut r = common::Rng::new(5);
    let pixels = Tensor::upload(
        &gpu,
        "pixels",
        &[3, 224, 224],
        DType::F32,
        &r.vec(3 * 224 * 224, 2.0),
    )
    .unwrap();
    let mut rec = Recorder::new(&gpu);
    let img = vit.record(&gpu, &mut rec, &pixels, None).unwrap();
    let out = qf.record(&gpu, &mut rec, &img, None).unwrap();
    pollster::block_on(rec.submit()).unwrap();
    assert_eq!(img.shape, vec![257, 1408]);
    assert_eq!(out.shape, vec![32, 768]);
    let v = read(&gpu, &out);
    assert!(
        v.iter().all(|x| x.is_finite()),
        "non-finite Q-Former output"
    );
    // post-LN output: every query row has mean ~ bias mean and unit-ish spread
    let spread: f32 = v[..768].iter().map(|x| x * x).sum::<f32>() / 768.0;
    assert!(spread > 0.1 && spread < 10.0, "{spread}");
}

/// A 224-px-style table (4×4 grid) loaded for twice the image size is resized on load, and
/// the encoder then runs on the larger image (MiniGPT-v2's 448-px path, spec §2.1).
#[test]
fn a_smaller_position_table_is_interpolated_for_a_larger_image() {
    let gpu = gpu();
    let c = config("qformer_tiny");
    let mut vc = vit_config(&c);
    vc.image_size *= 2;
    let weights =
        SafetensorsFile::open(&dir("qformer_tiny").join("weights_minigpt4.safetensors")).unwrap();
    let vit = Vit::load(&gpu, &vc, &weights, DType::F32).unwrap();
    let s = vc.image_size;
    let mut r = common::Rng::new(3);
    let pixels = Tensor::upload(
        &gpu,
        "pixels",
        &[3, s, s],
        DType::F32,
        &r.vec(3 * s * s, 1.0),
    )
    .unwrap();
    let mut rec = Recorder::new(&gpu);
    let img = vit.record(&gpu, &mut rec, &pixels, None).unwrap();
    pollster::block_on(rec.submit()).unwrap();
    assert_eq!(img.shape, vec![1 + 8 * 8, vc.width]);
    assert!(read(&gpu, &img).iter().all(|x| x.is_finite()));
}
