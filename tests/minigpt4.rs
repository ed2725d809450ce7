//! MiniGPT-4 end to end against the reference computation (tests/golden/make_minigpt4_goldens.py):
//! tiny random Vicuna-v0-style (Q-Former) and Llama-2-style (4-token concatenation) models with
//! the real LLaMA tokenizer — the prompt built from the template, its segment ids, the image
//! embeddings, the spliced input, the logits at every prompt position and a 16-token greedy
//! continuation.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_close, gpu, json_ids, qformer_config, vit_config};
use minigpt4::chat::{generate_from, Conversation, Finish, ModelVariant, Prompt, Sampling, Stop};
use minigpt4::loader::safetensors::SafetensorsFile;
use minigpt4::loader::TensorSource;
use minigpt4::model::llama::Input;
use minigpt4::model::llama::{LlamaFiles, QuantPolicy};
use minigpt4::model::minigpt4::{answer_keep, Formats, MiniGpt4, MiniGpt4Config, MAX_LENGTH};
use minigpt4::model::vit::VitConfig;
use minigpt4::quant::DType;

const F32_FORMATS: Formats = Formats {
    vision: DType::F32,
    llm: QuantPolicy {
        linear: DType::F32,
        embed: DType::F32,
        lm_head: DType::F32,
    },
};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/minigpt4")
        .join(name)
}

/// Loads a tiny case in f32: the model, its golden tensors and its config.
fn load_case(
    gpu: &minigpt4::gpu::Gpu,
    name: &str,
    variant: ModelVariant,
) -> (MiniGpt4, SafetensorsFile, serde_json::Value) {
    let d = dir(name);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let vision = SafetensorsFile::open(&d.join("vision.safetensors")).unwrap();
    let qc = c
        .get("qformer")
        .filter(|q| q.is_object())
        .map(qformer_config);
    let (llm, files) = LlamaFiles::open(&d.join("llm")).unwrap();
    let cfg = MiniGpt4Config {
        variant,
        vision: vit_config(&c),
        qformer: qc,
        llm,
    };
    let m = MiniGpt4::load(gpu, &cfg, F32_FORMATS, &vision, &files, 256).unwrap();
    (
        m,
        SafetensorsFile::open(&d.join("golden.safetensors")).unwrap(),
        c,
    )
}

fn check_case(name: &str, variant: ModelVariant) {
    let gpu = gpu();
    let (mut m, golden, c) = load_case(&gpu, name, variant);
    let d = dir(name);
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).unwrap()).unwrap();
    let vision = SafetensorsFile::open(&d.join("vision.safetensors")).unwrap();

    // the prompt from the template, and its segments
    let mut conv = Conversation::new(variant);
    conv.add_image();
    conv.ask(c["question"].as_str().unwrap());
    assert_eq!(conv.prompt(), g["prompt"].as_str().unwrap());
    let segments = m.segment_ids(&conv.prompt()).unwrap();
    assert_eq!(segments.len(), 2);
    for (i, seg) in segments.iter().enumerate() {
        let want: Vec<u32> = golden
            .read_ints(&format!("prompt_segment_ids_{i}"))
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(seg, &want, "segment {i}");
    }

    // image embeddings and the spliced input
    let pixels = golden.read_f32("pixel_values").unwrap();
    let image = pollster::block_on(m.encode_image(&gpu, &pixels)).unwrap();
    assert_close(
        "image embeddings",
        &pollster::block_on(image.read_f32(&gpu)).unwrap(),
        &golden.read_f32("image_embeds").unwrap(),
        1e-4,
        1e-4,
    );
    let spliced = pollster::block_on(m.splice(&gpu, &segments, &[&image], usize::MAX)).unwrap();
    assert_close(
        "spliced embeddings",
        &pollster::block_on(spliced.read_f32(&gpu)).unwrap(),
        &golden.read_f32("spliced_embeds").unwrap(),
        1e-4,
        1e-4,
    );

    // logits at every prompt position (on the golden's column subset), and the last in full
    m.llm.reset();
    let all = pollster::block_on(m.llm.forward(&gpu, Input::Embeds(&spliced), true)).unwrap();
    let v = m.llm.cfg.vocab;
    let rows = spliced.rows();
    assert_eq!(all.len(), rows * v);
    let cols: Vec<usize> = golden
        .read_ints("logits_cols")
        .unwrap()
        .into_iter()
        .map(|c| c as usize)
        .collect();
    let sub: Vec<f32> = (0..rows)
        .flat_map(|r| cols.iter().map(move |&c| (r, c)))
        .map(|(r, c)| all[r * v + c])
        .collect();
    assert_close(
        "logits at every position",
        &sub,
        &golden.read_f32("logits_every_position").unwrap(),
        1e-4,
        1e-4,
    );
    m.llm.reset();
    let logits = pollster::block_on(m.llm.forward(&gpu, Input::Embeds(&spliced), false)).unwrap();
    assert_close(
        "last logits",
        &logits,
        &golden.read_f32("logits_last").unwrap(),
        1e-4,
        1e-4,
    );

    // greedy continuation; token 32000 (Vicuna-v0's row without a tokenizer piece) is never chosen
    m.llm.reset();
    let want = json_ids(&g["greedy_ids_masked"]);
    let stop = Stop {
        max_new_tokens: want.len(),
        eos: vec![],
        sequences: vec![],
    };
    let allowed = m.tok.vocab_size();
    let (got, _, _) = pollster::block_on(generate_from(
        &gpu,
        &mut m.llm,
        Prompt::Embeds(&spliced),
        &Sampling::greedy(),
        &stop,
        allowed,
        |_| true,
    ))
    .unwrap();
    assert_eq!(got, want);
    assert!(vision.shape("llama_proj.weight").is_some());
}

#[test]
fn vicuna0_tiny_end_to_end() {
    check_case("vicuna0_tiny", ModelVariant::Vicuna0);
}

#[test]
fn llama2_tiny_end_to_end() {
    check_case("llama2_tiny", ModelVariant::Llama2);
}

#[test]
fn a_projection_for_another_variant_is_diagnosed() {
    // a Q-Former checkpoint's projection ([H, 64]) loaded as the Llama-2 variant, which wants
    // [H, 4 × ViT width]: spec §4's classic mistake, named rather than crashing
    let gpu = gpu();
    let d = dir("vicuna0_tiny");
    let vision = SafetensorsFile::open(&d.join("vision.safetensors")).unwrap();
    let mut vc = VitConfig::eva_vit_g(56);
    vc.width = 176;
    vc.layers = 3;
    vc.heads = 2;
    vc.mlp = 256;
    let (llm, files) = LlamaFiles::open(&d.join("llm")).unwrap();
    let cfg = MiniGpt4Config {
        variant: ModelVariant::Llama2,
        vision: vc,
        qformer: None,
        llm,
    };
    let err = match MiniGpt4::load(&gpu, &cfg, F32_FORMATS, &vision, &files, 64) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("llama_proj.weight")
            && err.contains("[32, 704]")
            && err.contains("[32, 64]")
            && err.contains("Vicuna-v0 checkpoint"),
        "{err}"
    );
}

fn load_vicuna0(gpu: &minigpt4::gpu::Gpu) -> (MiniGpt4, SafetensorsFile) {
    let (m, golden, _) = load_case(gpu, "vicuna0_tiny", ModelVariant::Vicuna0);
    (m, golden)
}

/// The golden image encoded, and a Vicuna-v0 conversation about it with its first question
/// asked.
fn first_question(
    gpu: &minigpt4::gpu::Gpu,
    m: &MiniGpt4,
    golden: &SafetensorsFile,
) -> (minigpt4::gpu::Tensor, Conversation) {
    let pixels = golden.read_f32("pixel_values").unwrap();
    let image = pollster::block_on(m.encode_image(gpu, &pixels)).unwrap();
    let mut conv = Conversation::new(ModelVariant::Vicuna0);
    conv.add_image();
    conv.ask("Describe this image in detail.");
    (image, conv)
}

/// The reference keeps only the last `max_length − max_new_tokens` prompt positions
/// (`answer_prepare`): the truncated splice is exactly the tail of the full one.
#[test]
fn context_truncation_keeps_the_last_positions() {
    let gpu = gpu();
    let (m, golden) = load_vicuna0(&gpu);
    let mut conv = Conversation::new(ModelVariant::Vicuna0);
    conv.add_image();
    conv.ask("Describe this image in detail.");
    let segments = m.segment_ids(&conv.prompt()).unwrap();
    let image = pollster::block_on(m.encode_image(&gpu, &golden.read_f32("pixel_values").unwrap()))
        .unwrap();
    let full = pollster::block_on(
        pollster::block_on(m.splice(&gpu, &segments, &[&image], usize::MAX))
            .unwrap()
            .read_f32(&gpu),
    )
    .unwrap();
    let h = m.llm.cfg.hidden;
    for keep in [66, 50, 24, 10, 1] {
        let cut = pollster::block_on(
            pollster::block_on(m.splice(&gpu, &segments, &[&image], keep))
                .unwrap()
                .read_f32(&gpu),
        )
        .unwrap();
        assert_eq!(cut.len(), keep * h, "keep {keep}");
        assert_eq!(&cut[..], &full[(66 - keep) * h..], "keep {keep}");
    }
}

/// Where the answer alone would fill the context (the demo's 300 new tokens of a tiny model
/// with 256 positions), the reference has no rule; the prompt keeps up to half the context and
/// the answer stops when the context is full. Below that, the reference's rule stands.
#[test]
fn an_answer_longer_than_the_context_stops_when_the_context_is_full() {
    assert_eq!(answer_keep(2000, 300), 1700);
    assert_eq!(answer_keep(256, 255), 1);
    assert_eq!(answer_keep(256, 256), 128);
    assert_eq!(answer_keep(255, 300), 128);
    let gpu = gpu();
    let (mut m, golden) = load_vicuna0(&gpu);
    let budget = MAX_LENGTH.min(m.llm.ctx);
    assert_eq!(budget, 256);
    let (image, conv) = first_question(&gpu, &m, &golden);
    let a = pollster::block_on(m.answer(&gpu, &conv, &image, &Sampling::greedy(), 300, |_| true))
        .unwrap();
    // the 66-position prompt fits in half the context, whole
    let prompt: usize = a.prompt_token_ids.iter().map(|s| s.len()).sum::<usize>() + a.image_tokens;
    assert_eq!(prompt, 66);
    assert!(
        a.token_ids.len() <= budget - prompt,
        "{}",
        a.token_ids.len()
    );
    if a.finish == Finish::MaxTokens {
        assert_eq!(a.token_ids.len(), budget - prompt);
    }
}

/// A second turn carries the first (trimmed) answer in the prompt, still one image.
#[test]
fn multi_turn_conversation_reuses_the_image() {
    let gpu = gpu();
    let (mut m, golden) = load_vicuna0(&gpu);
    let (image, mut conv) = first_question(&gpu, &m, &golden);
    let a1 = pollster::block_on(m.answer(&gpu, &conv, &image, &Sampling::greedy(), 6, |_| true))
        .unwrap();
    assert!(a1.token_ids.len() <= 6 && a1.image_tokens == 8);
    conv.add_answer(&a1.text);
    conv.ask("And the colours?");
    let prompt = conv.prompt();
    assert!(
        prompt.ends_with(&format!(
            "###Assistant: {}###Human: And the colours?###Assistant: ",
            a1.text
        )),
        "{prompt}"
    );
    let a2 = pollster::block_on(m.answer(&gpu, &conv, &image, &Sampling::greedy(), 6, |_| true))
        .unwrap();
    assert_eq!(a2.prompt_token_ids.len(), 2);
    assert_eq!(a2.prompt_token_ids[0], a1.prompt_token_ids[0]);
    assert!(a2.prompt_token_ids[1].len() > a1.prompt_token_ids[1].len());
    // cancelling from the callback ends the answer at once
    let mut seen = 0;
    let a3 = pollster::block_on(m.answer(&gpu, &conv, &image, &Sampling::greedy(), 6, |_| {
        seen += 1;
        seen < 2
    }))
    .unwrap();
    assert_eq!(a3.token_ids.len(), 2);
    assert_eq!(a3.finish, minigpt4::chat::Finish::Cancelled);
}

/// Where the device tunes GEMM forms per shape (a fast GPU; forced here), the first image
/// tunes exactly the image half's GEMM shapes (learned from a recording not submitted) and the
/// first answer the LLM's prefill shapes; the embeddings and the greedy answer stay those of
/// the adapter-wide form.
#[test]
fn gemm_forms_tuned_per_shape_cover_the_models_own_gemms() {
    let plain = gpu();
    let by_shape = common::gpu_with(minigpt4::gpu::GpuOptions::default());
    by_shape.set_gemm_by_shape(true);
    let run = |gpu: &minigpt4::gpu::Gpu| {
        let (mut m, golden) = load_vicuna0(gpu);
        let (image, conv) = first_question(gpu, &m, &golden);
        let embeds = pollster::block_on(image.read_f32(gpu)).unwrap();
        let a = pollster::block_on(m.answer(gpu, &conv, &image, &Sampling::greedy(), 4, |_| true))
            .unwrap();
        (m, embeds, a.token_ids)
    };
    let (_, want_embeds, want_ids) = run(&plain);
    let (m, embeds, ids) = run(&by_shape);
    assert!(!plain.gemm_by_shape());
    let (v, q) = (&m.vit.cfg, &m.qformer.as_ref().unwrap().cfg);
    let t = v.tokens();
    let (g2, pp) = (v.grid() * v.grid(), 3 * v.patch * v.patch);
    for (rows, n, k) in [
        (g2, v.width, pp),
        (t, 3 * v.width, v.width),
        (t, v.width, v.width),
        (t, v.mlp, v.width),
        (t, v.width, v.mlp),
        (q.queries, q.intermediate, q.hidden),
        (q.queries, q.hidden, q.intermediate),
        (t, 2 * q.hidden, q.encoder_width),
    ] {
        assert!(
            by_shape.has_gemm_form_at(rows, n, k, DType::F32),
            "{rows}x{n}x{k} not tuned"
        );
    }
    for w in m.llm.decode_matrices() {
        for rows in minigpt4::gpu::tune::GEMM_PREFILL_ROWS {
            let has = by_shape.has_gemm_form_at(rows, w.rows(), w.cols(), w.dtype);
            // every layer matrix; not the output head, which prefill runs on its last row
            assert_eq!(has, w.rows() != m.llm.cfg.vocab, "{rows}x{:?}", w.shape);
        }
    }
    assert_close(
        "image embeddings, forms per shape",
        &embeds,
        &want_embeds,
        1e-5,
        1e-4,
    );
    assert_eq!(ids, want_ids);
}
