//! The vision half against transformers' BLIP-2 (tests/golden/make_vision_goldens.py): tiny
//! random EVA ViT (head dim 88) → ln_vision (eps 1e-5) → Q-Former (cross-attention on even
//! layers) → llama_proj, and the no-Q-Former path (drop CLS, concatenate 4 tokens, project).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, gpu};
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

fn u(v: &serde_json::Value) -> usize {
    v.as_u64().unwrap() as usize
}

fn vit_config(c: &serde_json::Value) -> VitConfig {
    let v = &c["vision"];
    VitConfig {
        image_size: u(&v["image_size"]),
        patch: u(&v["patch_size"]),
        width: u(&v["hidden_size"]),
        layers: u(&v["num_hidden_layers"]),
        heads: u(&v["num_attention_heads"]),
        mlp: u(&v["intermediate_size"]),
        eps: v["layer_norm_eps"].as_f64().unwrap() as f32,
        ln_vision_eps: c["ln_vision_eps"].as_f64().unwrap() as f32,
    }
}

fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    pollster::block_on(t.read_f32(gpu)).unwrap()
}

fn upload(gpu: &Gpu, src: &SafetensorsFile, name: &str, shape: &[usize]) -> Tensor {
    Tensor::upload(gpu, name, shape, DType::F32, &src.read_f32(name).unwrap()).unwrap()
}

#[test]
fn vit_ln_vision_qformer_and_projection_match_blip2() {
    let gpu = gpu();
    let c = config("qformer_tiny");
    let vc = vit_config(&c);
    let q = &c["qformer"];
    let qc = QFormerConfig {
        hidden: u(&q["hidden_size"]),
        layers: u(&q["num_hidden_layers"]),
        heads: u(&q["num_attention_heads"]),
        intermediate: u(&q["intermediate_size"]),
        queries: u(&q["num_query_tokens"]),
        encoder_width: u(&q["encoder_hidden_size"]),
        cross_every: u(&q["cross_attention_frequency"]),
        eps: q["layer_norm_eps"].as_f64().unwrap() as f32,
    };
    let llm = u(&c["llm_hidden"]);
    let weights =
        SafetensorsFile::open(&dir("qformer_tiny").join("weights_minigpt4.safetensors")).unwrap();
    let golden = SafetensorsFile::open(&dir("qformer_tiny").join("golden.safetensors")).unwrap();
    let vit = Vit::load(&gpu, &vc, &weights, DType::F32).unwrap();
    let qf = QFormer::load(&gpu, &qc, &weights, DType::F32).unwrap();
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
    let qout = qf.record(&gpu, &mut rec, &img).unwrap();
    let proj = Tensor::zeros(&gpu, "proj", &[qc.queries, llm]).unwrap();
    rec.matmul(&qout, &proj_w, Some(&proj_b), &proj, false)
        .unwrap();
    pollster::block_on(rec.submit()).unwrap();
    for (i, tap) in taps.iter().enumerate() {
        assert_close(
            &format!("vit block {i}"),
            &read(&gpu, tap),
            &golden.read_f32(&format!("vit_block_{i}")).unwrap(),
            1e-4,
            1e-4,
        );
    }
    assert_close(
        "ln_vision",
        &read(&gpu, &img),
        &golden.read_f32("ln_vision").unwrap(),
        1e-4,
        1e-4,
    );
    assert_close(
        "qformer",
        &read(&gpu, &qout),
        &golden.read_f32("qformer_out").unwrap(),
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
fn no_qformer_path_concatenates_four_tokens_and_projects() {
    let gpu = gpu();
    let c = config("noqformer_tiny");
    let vc = vit_config(&c);
    let llm = u(&c["llm_hidden"]);
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
