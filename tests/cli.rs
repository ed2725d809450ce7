//! The `minigpt4` binary as a user runs it.

use std::process::Command;

fn minigpt4(args: &[&str]) -> (bool, String, String) {
    minigpt4_env(args, &[])
}

/// [`minigpt4`] with these environment variables set (an empty value removes one).
fn minigpt4_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minigpt4"));
    cmd.args(args).env_remove("MINIGPT4_ADAPTER");
    for (k, v) in env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let out = cmd.output().expect("run minigpt4");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The README's main-job command, as written there (the first `sh` block after "The main
/// job"), runs as it says: `cargo run --release --` is this test's build of the binary.
#[test]
fn the_readme_main_job_command_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let from = readme.find("The main job").expect("a main-job section");
    let block = readme[from..]
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block after it");
    let command = block.replace("\\\n", " ");
    let words: Vec<&str> = command.split_whitespace().collect();
    let prefix = ["cargo", "run", "--release", "--"];
    assert_eq!(words[..4], prefix, "{command}");
    // the words as the shell would give them: quotes removed from a quoted argument
    let mut args: Vec<String> = Vec::new();
    let mut open: Option<String> = None;
    for w in &words[4..] {
        match open.take() {
            Some(mut a) => {
                a.push(' ');
                a.push_str(w.trim_end_matches('"'));
                if w.ends_with('"') {
                    args.push(a);
                } else {
                    open = Some(a);
                }
            }
            None if w.starts_with('"') && !(w.len() > 1 && w.ends_with('"')) => {
                open = Some(w.trim_start_matches('"').to_string());
            }
            None => args.push(w.trim_matches('"').to_string()),
        }
    }
    assert!(open.is_none(), "an unclosed quote in {command}");
    assert_eq!(args[0], "chat", "{command}");
    let out = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("MINIGPT4_ADAPTER")
        .output()
        .expect("run minigpt4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{args:?}: no answer"
    );
}

#[test]
fn info_lists_adapters_and_marks_the_chosen_one() {
    let (ok, out, err) = minigpt4(&["info"]);
    assert!(ok, "{err}");
    assert!(out.contains("[0] "), "{out}");
    assert_eq!(out.matches("<- would be used").count(), 1, "{out}");
    for field in [
        "shader-f16:",
        "subgroups:",
        "max storage binding",
        "invocations/workgroup",
    ] {
        assert!(out.contains(field), "missing {field}: {out}");
    }
}

#[test]
fn info_json_is_machine_readable() {
    let (ok, out, err) = minigpt4(&["info", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let adapters = v["adapters"].as_array().expect("adapters");
    assert!(!adapters.is_empty());
    let chosen = v["chosen"].as_u64().expect("chosen") as usize;
    assert_eq!(adapters[chosen]["chosen"], true);
    assert!(
        adapters[chosen]["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(adapters[chosen]["shader_f16"].is_boolean());
}

#[test]
fn adapter_selection_errors_are_clear_and_never_panics() {
    let (ok, _, err) = minigpt4(&["info", "--adapter", "99"]);
    assert!(!ok);
    assert!(
        err.contains("adapter index 99") && !err.contains("panicked"),
        "{err}"
    );

    let (ok, _, err) = minigpt4(&["info", "--adapter", "no-such-gpu-name"]);
    assert!(!ok);
    assert!(
        err.contains("no-such-gpu-name") && err.contains("available:"),
        "{err}"
    );

    let (ok, _, err) = minigpt4(&["info", "--backend", "cuda"]);
    assert!(!ok);
    assert!(err.contains("cuda") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_backend_without_adapters_is_an_error_not_a_panic() {
    // No Metal (or DX12) on Linux: the listing is empty and the error says what to install.
    let backend = if cfg!(target_os = "macos") {
        "dx12"
    } else {
        "metal"
    };
    let (ok, _, err) = minigpt4(&["info", "--backend", backend]);
    assert!(!ok);
    assert!(
        err.contains("no GPU adapter found") && err.contains(backend),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn smollm2() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/fetch-models.sh`",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn generate_json_reproduces_the_transformers_greedy_tokens() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/smollm2/greedy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let p = &fx["prompts"][0];
    let prompt = p["prompt"].as_str().unwrap();
    let want: Vec<u64> = p["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .take(12)
        .map(|v| v.as_u64().unwrap())
        .collect();
    let model = smollm2();
    let (ok, out, err) = minigpt4(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--greedy",
        "--quant",
        "f32",
        "--max-new-tokens",
        "12",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["prompt_token_ids"], p["prompt_ids"]);
    let got: Vec<u64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    assert!(
        v["text"].as_str().unwrap().starts_with(" Paris"),
        "{}",
        v["text"]
    );
}

/// Sampled generation, and greedy with a repetition penalty, give the same tokens whether the
/// GPU picks them among its candidates or the host samples the read-back logits
/// (`MINIGPT4_GPU_SAMPLING`; the default is the GPU); a bad value is named.
#[test]
fn sampling_on_the_gpu_or_from_the_logits_gives_the_same_tokens() {
    let model = smollm2();
    let ids = |extra: &[&str], gpu_sampling: &str| -> Vec<u64> {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "24",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) =
            minigpt4_env(&args, &[("MINIGPT4_GPU_SAMPLING", gpu_sampling.as_ref())]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        v["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    for extra in [
        &[
            "--seed",
            "3",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--repetition-penalty",
            "1.1",
        ][..],
        &["--greedy", "--repetition-penalty", "1.3"][..],
    ] {
        let gpu = ids(extra, "1");
        assert_eq!(gpu.len(), 24, "{extra:?}");
        assert_eq!(gpu, ids(extra, "0"), "{extra:?}");
    }
    let (ok, _, err) = minigpt4_env(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
        &[("MINIGPT4_GPU_SAMPLING", "yes".as_ref())],
    );
    assert!(
        !ok && err.contains("MINIGPT4_GPU_SAMPLING") && err.contains("'yes'"),
        "{err}"
    );
}

#[test]
fn generate_text_streams_and_bad_requests_are_clear_errors() {
    let model = smollm2();
    let (ok, out, err) = minigpt4(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    let (ok, _, err) = minigpt4(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "Hello",
        "--ctx",
        "16",
        "--max-new-tokens",
        "100",
    ]);
    assert!(
        !ok && err.contains("exceeds the context of 16 tokens") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = minigpt4(&[
        "generate", "--model", &model, "--prompt", "Hello", "--top-p", "0",
    ]);
    assert!(!ok && err.contains("top-p"), "{err}");
    let (ok, _, err) = minigpt4(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "Hello",
    ]);
    // the file and the OS's reason, each said once (the reason once appeared twice)
    assert!(
        !ok && err.contains("/nonexistent/model.gguf")
            && err.matches("(os error").count() == 1
            && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = minigpt4(&[
        "generate", "--model", &model, "--prompt", "Hello", "--quant", "q3",
    ]);
    assert!(!ok && err.contains("q3"), "{err}");
}

fn fixture_path(p: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

/// `convert` then `chat` with the tiny Vicuna-v0 model: the prompt segments are the
/// reference's, the image gives 8 query embeddings, and the JSON object has the documented
/// fields.
#[test]
fn convert_then_chat_json_on_a_tiny_vicuna0_model() {
    let d = "tests/fixtures/minigpt4/vicuna0_tiny";
    let pkg = std::env::temp_dir().join(format!("minigpt4-cli-pkg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pkg);
    let (ok, _, err) = minigpt4(&[
        "convert",
        "--variant",
        "vicuna0",
        "--vit",
        &fixture_path(&format!("{d}/vision.safetensors")),
        "--llm",
        &fixture_path(&format!("{d}/llm")),
        "--vision-config",
        &fixture_path(&format!("{d}/vision_config.json")),
        "--llm-quant",
        "f32",
        "--vision-quant",
        "f32",
        "--out",
        &pkg.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("wrote"), "{err}");
    let (ok, out, err) = minigpt4(&[
        "chat",
        "--model",
        &pkg.display().to_string(),
        "--image",
        &fixture_path("tests/fixtures/images/chelsea.png"),
        "--prompt",
        "Describe this image in detail.",
        "--greedy",
        "--max-new-tokens",
        "8",
        "--format",
        "json",
    ]);
    let _ = std::fs::remove_dir_all(&pkg);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(j["variant"], "vicuna0");
    assert_eq!(j["image_tokens"], 8);
    let segs = j["prompt_token_ids"].as_array().unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[0].as_array().unwrap().len(), 42);
    assert_eq!(segs[1].as_array().unwrap().len(), 16);
    let ids = j["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 8);
    assert!(
        ids.iter().all(|i| i.as_u64().unwrap() < 32000),
        "row 32000 must never be sampled"
    );
    assert!(j["text"].is_string());
    // where the time went, as llama.cpp's server reports it: every prompt row (both text
    // segments and the image's 8) and every generated token
    let t = &j["timings"];
    assert_eq!(t["prompt_n"], 42 + 16 + 8, "{t}");
    assert_eq!(t["predicted_n"], ids.len(), "{t}");
    assert!(t["prompt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{t}");
    assert!(
        t["prompt_per_second"].as_f64().is_some_and(|r| r > 0.0),
        "{t}"
    );
    if ids.len() > 1 {
        assert!(
            t["predicted_per_second"].as_f64().is_some_and(|r| r > 0.0),
            "{t}"
        );
    }
}

/// The README's smoke command: the committed tiny package, demo sampling, text output.
#[test]
fn chat_runs_on_the_smoke_package() {
    let (ok, out, err) = minigpt4(&[
        "chat",
        "--model",
        &fixture_path("tests/fixtures/minigpt4/vicuna0_tiny_pkg"),
        "--image",
        &fixture_path("tests/fixtures/images/chelsea_q90.jpg"),
        "--prompt",
        "What is in this picture?",
        "--max-new-tokens",
        "12",
    ]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty(), "no answer: {err}");

    let (ok, _, err) = minigpt4(&[
        "chat",
        "--model",
        "/nonexistent/pkg",
        "--image",
        "x.png",
        "--prompt",
        "hi",
    ]);
    assert!(
        !ok && err.contains("/nonexistent/pkg") && err.contains("not a model package"),
        "{err}"
    );
    let (ok, _, err) = minigpt4(&[
        "convert",
        "--variant",
        "vicuna0-7b",
        "--vit",
        "/nonexistent/eva_vit_g.pth",
        "--llm",
        "/nonexistent",
        "--out",
        "/tmp/never",
    ]);
    assert!(
        !ok && err.contains("/nonexistent/eva_vit_g.pth") && !err.contains("panicked"),
        "{err}"
    );
}

/// Ctrl-C (SIGINT) during an answer stops that answer; the chat goes on and `/quit` ends it.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_answer_not_the_program() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .args([
            "chat",
            "--model",
            &fixture_path("tests/fixtures/minigpt4/vicuna0_tiny_pkg"),
            "--image",
            &fixture_path("tests/fixtures/images/chelsea.png"),
            "--max-new-tokens",
            "250",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin
        .write_all(b"Describe this image in detail.\n")
        .unwrap();
    stdin.flush().unwrap();
    // wait for the answer to start streaming, then interrupt it
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    stdin.write_all(b"/quit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(err.contains("[stopped]"), "{err}");
}

/// Peak memory of a `convert` run, from its "peak memory N MiB" report.
fn convert_peak_mib(llm: &std::path::Path, out: &std::path::Path) -> u64 {
    let d = "tests/fixtures/minigpt4/vicuna0_tiny";
    let (ok, _, err) = minigpt4(&[
        "convert",
        "--variant",
        "vicuna0",
        "--vit",
        &fixture_path(&format!("{d}/vision.safetensors")),
        "--llm",
        &llm.display().to_string(),
        "--vision-config",
        &fixture_path(&format!("{d}/vision_config.json")),
        "--llm-quant",
        "f32",
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(out);
    err.split("peak memory ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory report: {err}"))
}

/// Conversion streams: with a 128 MiB tensor (a tied embedding of 1M rows × 32, stored f32,
/// written twice as f32: embedding and lm_head), peak memory grows by at most twice that
/// tensor over converting the tiny model.
#[cfg(target_os = "linux")]
#[test]
fn convert_memory_is_bounded_by_twice_the_largest_tensor() {
    use std::io::Write;
    let tmp = std::env::temp_dir().join(format!("minigpt4-rss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let llm = tmp.join("llm");
    std::fs::create_dir_all(&llm).unwrap();
    let (vocab, h, f) = (1_048_576usize, 32usize, 64usize);
    std::fs::write(
        llm.join("config.json"),
        serde_json::json!({
            "model_type": "llama", "hidden_size": h, "intermediate_size": f,
            "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 2,
            "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
        })
        .to_string(),
    )
    .unwrap();
    std::fs::copy(
        fixture_path("tests/fixtures/minigpt4/vicuna0_tiny/llm/tokenizer.model"),
        llm.join("tokenizer.model"),
    )
    .unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    let l = "model.layers.0";
    for (n, s) in [
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![h, h]),
        ("self_attn.k_proj.weight", vec![h, h]),
        ("self_attn.v_proj.weight", vec![h, h]),
        ("self_attn.o_proj.weight", vec![h, h]),
        ("mlp.gate_proj.weight", vec![f, h]),
        ("mlp.up_proj.weight", vec![f, h]),
        ("mlp.down_proj.weight", vec![h, f]),
    ] {
        tensors.push((format!("{l}.{n}"), s));
    }
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (n, s) in &tensors {
        let bytes = s.iter().product::<usize>() * 4;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let hb = serde_json::to_vec(&header).unwrap();
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(llm.join("model.safetensors")).unwrap());
    w.write_all(&(hb.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&hb).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 & 0x3f).collect();
    let mut left = at;
    while left > 0 {
        let n = left.min(chunk.len());
        w.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    drop(w);

    let base = convert_peak_mib(
        &std::path::PathBuf::from(fixture_path("tests/fixtures/minigpt4/vicuna0_tiny/llm")),
        &tmp.join("small"),
    );
    let big = convert_peak_mib(&llm, &tmp.join("big"));
    let largest = (vocab * h * 4) as u64 >> 20;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("peak {big} MiB with a {largest} MiB tensor, {base} MiB for the tiny model");
    assert!(
        big <= base + 2 * largest + 16,
        "peak {big} MiB converting a {largest} MiB tensor; {base} MiB for the tiny model"
    );
}

/// `minigpt4 bench --tiny --runs 1 --synthetic vicuna0-7b` with `extra` arguments.
fn tiny_bench(extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "bench",
        "--tiny",
        "--runs",
        "1",
        "--synthetic",
        "vicuna0-7b",
    ];
    args.extend_from_slice(extra);
    minigpt4(&args)
}

/// `bench --tiny` runs every part and reports positive numbers (not a timed test: the values
/// are not compared with anything).
#[test]
fn bench_tiny_reports_every_part() {
    let (ok, out, err) = tiny_bench(&[
        "--llm",
        &fixture_path("tests/fixtures/llama/mha_untied_hd64"),
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let pos = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    assert!(pos(&r["copy"]["gb_per_s"]), "{r}");
    // q4, q4m, q8, f16 at two tiny shapes
    let gemv = r["gemv"].as_array().unwrap();
    assert_eq!(gemv.len(), 8);
    // decode attention at a context below the split-K threshold and one above it, each with
    // its rate and its share of the copy bandwidth
    let attn = r["attention"].as_array().unwrap();
    let splits: Vec<bool> = attn.iter().map(|e| e["split_k"] == true).collect();
    assert_eq!(splits, [false, true], "{attn:?}");
    for e in attn {
        for k in ["gb_per_s", "percent_of_copy", "us_per_layer", "kv_bytes"] {
            assert!(pos(&e[k]), "{k}: {e}");
        }
    }
    // attention over many rows: a causal prefill over an f16 cache and a ViT-like head of 88
    // over f32 keys, each with its time and rate
    let rows = r["attention_rows"].as_array().unwrap();
    let cases: Vec<(&str, bool, &str)> = rows
        .iter()
        .map(|e| {
            (
                e["case"].as_str().unwrap(),
                e["causal"] == true,
                e["kv_dtype"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cases,
        [("tiny prefill", true, "f16"), ("tiny vit", false, "f32")],
        "{rows:?}"
    );
    for e in rows {
        for k in ["ms_per_call", "gflop_per_s"] {
            assert!(pos(&e[k]), "{k}: {e}");
        }
    }
    // a token's pick on the GPU over a vocabulary under the top-k's single pass and one over
    let sampling = r["sampling"].as_array().unwrap();
    let vocabs: Vec<u64> = sampling
        .iter()
        .map(|e| e["vocab"].as_u64().unwrap())
        .collect();
    assert_eq!(vocabs, [300, 3000], "{sampling:?}");
    for e in sampling {
        for k in ["topk_us", "topk_sample_us"] {
            assert!(pos(&e[k]), "{k}: {e}");
        }
    }
    // every lane count of the block GEMV measured, with x as a storage buffer and as a
    // uniform, 1 lane in workgroups of 16 (and the subgroup form where offered), one of them
    // chosen
    let trials = r["gemv_lanes"]["trials"].as_array().unwrap();
    let lanes: Vec<u32> = trials
        .iter()
        .map(|t| t["lanes"].as_u64().unwrap() as u32)
        .collect();
    for l in minigpt4::gpu::GEMV_LANES {
        assert!(lanes.contains(&l), "{lanes:?}");
        assert!(
            lanes.contains(&(l | minigpt4::gpu::GEMV_UNIFORM_X)),
            "{lanes:?}"
        );
    }
    assert!(
        lanes.contains(&(1 | minigpt4::gpu::GEMV_WG16 | minigpt4::gpu::GEMV_UNIFORM_X)),
        "{lanes:?}"
    );
    assert!(
        lanes.iter().all(|&l| minigpt4::gpu::is_gemv_lanes(l)),
        "{lanes:?}"
    );
    assert!(trials.iter().all(|t| pos(&t["gb_per_s"])));
    // the fused RMSNorm timed both ways, one of them chosen
    let f = &r["gemv_lanes"]["fuse_norm"];
    assert!(pos(&f["fused_s"]) && pos(&f["separate_s"]), "{f}");
    assert!(f["chosen"].is_boolean(), "{f}");
    assert!(lanes.iter().any(|&l| r["gemv_lanes"]["chosen"] == l));
    // decode on a real (tiny) LLaMA next to its GEMV prediction, every format rated
    let l = &r["llm_decode"];
    assert_eq!(l["unrated_dtypes"], serde_json::json!([]), "{l}");
    for k in [
        "weight_bytes_per_token",
        "predicted_tok_per_s",
        "percent_of_prediction",
        "decode_tok_per_s_ctx_short",
        "decode_tok_per_s_ctx_short_ahead",
        "decode_tok_per_s_ctx_short_waiting",
        "decode_tok_per_s_ctx_short_sampled",
        "decode_tok_per_s_ctx_short_sampled_ahead",
        "decode_tok_per_s_ctx_short_sampled_waiting",
        "decode_tok_per_s_ctx_short_sampled_host",
        "decode_tok_per_s_ctx_long",
        "prefill_tok_per_s",
        "dispatches_per_token",
        "dispatch_floor_s",
        "predicted_tok_per_s_with_dispatches",
        "percent_of_prediction_with_dispatches",
    ] {
        assert!(pos(&l[k]), "{k}: {l}");
    }
    // what a dispatch costs, at both workgroup counts; the step's dispatches priced at it
    // lower the prediction
    let cost = &r["dispatch"];
    assert!(
        pos(&cost["us_1_groups"]) && pos(&cost["us_16_groups"]),
        "{cost}"
    );
    let f = |k: &str| l[k].as_f64().unwrap();
    assert!(
        f("predicted_tok_per_s_with_dispatches") < f("predicted_tok_per_s"),
        "{l}"
    );
    assert!(l["dispatches_per_token"].is_u64(), "{l}");
    // the headline figures are chat's way on this device: submitting ahead but on a CPU device
    let (ok, info, err) = minigpt4(&["info", "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).expect("JSON");
    let chosen = &info["adapters"][info["chosen"].as_u64().unwrap() as usize];
    let ahead = chosen["device_type"] != "Cpu";
    assert_eq!(l["submits_ahead"], ahead, "{chosen}");
    let way = if ahead { "ahead" } else { "waiting" };
    let k = "decode_tok_per_s_ctx_short";
    assert_eq!(l[k], l[format!("{k}_{way}")], "{k}: {l}");
    // sampled: on the GPU (`Gpu::samples_on_gpu`), ahead or not as greedy tokens are
    assert_eq!(l["samples_on_gpu"], true, "{chosen}");
    let k = "decode_tok_per_s_ctx_short_sampled";
    assert_eq!(l[k], l[format!("{k}_{way}")], "{k}: {l}");
    assert_eq!(r["end_to_end"]["submits_ahead"], ahead);
    // kernels timed on the GPU's own clock where the adapter has timestamp queries
    let clock = if chosen["timestamps"] == true {
        "gpu timestamps"
    } else {
        "wall"
    };
    assert_eq!(r["kernel_clock"], clock, "{chosen}");
    // the 6 GB check of the issue: Vicuna-7B q4 with a 2k cache
    assert_eq!(r["llm_memory"][0]["model"], "vicuna0-7b");
    assert!(r["llm_memory"][0]["total"].as_f64().unwrap() < 6e9);
    // the targets the run has figures for, in order; a tiny run's shapes are not judged, the
    // memory (computed from the tensor lists) is
    let t = r["targets"].as_array().unwrap();
    let judged: Vec<&serde_json::Value> = t.iter().map(|e| &e["met"]).collect();
    assert_eq!(
        judged,
        [
            &serde_json::Value::Null,
            &serde_json::Value::Null,
            &serde_json::json!(true)
        ],
        "{t:?}"
    );
    assert!(t.iter().all(|e| pos(&e["measured"])), "{t:?}");
    assert_eq!(t[1]["measured"], l["percent_of_prediction"], "{t:?}");
    // each GEMV against copy runs timed next to its own: the median ratio within its spread
    assert!(gemv.iter().all(|g| pos(&g["gb_per_s"])
        && pos(&g["copy_gb_per_s"])
        && pos(&g["percent_of_copy"])
        && pos(&g["percent_of_copy_min"])
        && g["percent_of_copy_min"].as_f64() <= g["percent_of_copy"].as_f64()
        && g["percent_of_copy"].as_f64() <= g["percent_of_copy_max"].as_f64()));
    // each GEMV run walks through copies of its matrix holding at least the tiny mode's 1 MiB
    // together (so that the weights come from memory, not a cache, at the real sizes)
    for g in gemv {
        let copies = g["copies"].as_u64().unwrap_or(0);
        let bytes = g["weight_bytes"].as_u64().unwrap_or(0);
        assert!(copies > 1 && copies * bytes >= 1 << 20, "{g}");
    }
    let g = &r["gemm"];
    // forms per case: the chosen one trimmed to the shape (the tiny ViT's 17 rows in 32-row
    // tiles, unless the tuning chose the untiled form, as SwiftShader's does)
    let form = |g: &serde_json::Value| {
        g["form"]
            .as_u64()
            .and_then(|f| minigpt4::gpu::is_gemm_form(f as u32).then_some(f))
    };
    let cases = g["cases"].as_array().unwrap();
    assert!(cases
        .iter()
        .all(|g| pos(&g["gflop_per_s"]) && form(g).is_some()));
    let vit = cases.iter().find(|g| g["case"] == "vit").unwrap();
    assert!(form(vit).is_some_and(|f| {
        let f = f as u32;
        f == minigpt4::gpu::GEMM_ROWS || f & minigpt4::gpu::GEMM_SHORT != 0
    }));
    // every GEMM form, at the tuning's shape and at a prefill shape, and the one chosen
    let forms = &g["forms"];
    for t in std::iter::once(&forms["tune_shape"]).chain(forms["at_shapes"].as_array().unwrap()) {
        let trials = t["trials"].as_array().unwrap();
        assert!(trials.len() >= 4, "{t}");
        assert!(trials.iter().all(|t| pos(&t["gflop_per_s"])), "{t}");
    }
    assert!(forms["tune_shape"]["trials"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["form"] == forms["chosen"]));
    // forms per shape where the tuning measured the large shape too (a fast device)
    assert_eq!(
        forms["by_shape"].as_bool(),
        Some(forms["tune_shape_large"].is_object()),
        "{forms}"
    );
    let e = &r["end_to_end"];
    for k in [
        "image_encode_ms",
        "prefill_tok_per_s",
        "decode_tok_per_s_ctx_short",
        "decode_tok_per_s_ctx_long",
        "time_to_first_token_s",
    ] {
        assert!(pos(&e[k]), "{k}: {e}");
    }
    assert!(pos(&e["gpu_memory_bytes"]["total"]));
    let (ok, _, err) = minigpt4(&["bench", "--tiny", "--synthetic", "vicuna0-70b"]);
    assert!(!ok && err.contains("vicuna0-70b"), "{err}");
}

/// `MINIGPT4_GEMM_SHAPES=1` tunes the GEMM per shape on any device: bench says so, runs each
/// case in its own form (measured there) and stores the forms; `0` turns off even small
/// weights' per-shape forms, which are on by default; a value other than 0 or 1 is refused by
/// name, before any GEMM is measured.
#[test]
fn bench_gemm_forms_per_shape_on_request() {
    let home = std::env::temp_dir().join(format!("minigpt4-gemm-shapes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let bench = |shapes: &str| {
        let args = [
            "bench", "--tiny", "--runs", "1", "--parts", "gemm", "--json",
        ];
        let env = [
            ("MINIGPT4_GEMM_SHAPES", shapes.as_ref()),
            ("MINIGPT4_HOME", home.as_os_str()),
            ("MINIGPT4_GEMM", "".as_ref()),
        ];
        minigpt4_env(&args, &env)
    };
    let (ok, out, err) = bench("1");
    assert!(ok, "{err}");
    // the one-time measurement is announced on stderr
    assert!(
        err.contains("minigpt4: measuring the GEMM's forms at "),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(r["gemm"]["forms"]["by_shape"], true, "{r}");
    let cases = r["gemm"]["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let stored = std::fs::read_to_string(home.join("tune.json")).unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let (_, entry) = stored.as_object().unwrap().iter().next().unwrap();
    for c in cases {
        let f = c["form"].as_u64().unwrap();
        assert!(minigpt4::gpu::is_gemm_form(f as u32), "{c}");
        // the case's form is its shape's stored form, trimmed to the shape
        let name = format!(
            "{}x{}x{} {}",
            c["m"],
            c["n"],
            c["k"],
            c["dtype"].as_str().unwrap()
        );
        let tuned = entry["gemm_shapes"][&name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {entry}"));
        let dt = minigpt4::quant::DType::parse(c["dtype"].as_str().unwrap()).unwrap();
        let (m, n) = (
            c["m"].as_u64().unwrap() as usize,
            c["n"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            minigpt4::gpu::gemm_form_for(tuned as u32, m, n, dt) as u64,
            f,
            "{name}"
        );
    }
    // small weights' shapes are tuned per shape on any device unless told not to
    for (shapes, small) in [("0", false), ("", true)] {
        let (ok, out, err) = bench(shapes);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let forms = &r["gemm"]["forms"];
        assert_eq!(forms["small_shapes"], small, "{shapes}: {forms}");
        if shapes == "0" {
            assert_eq!(forms["by_shape"], false, "{forms}");
        }
    }
    let (ok, _, err) = bench("yes");
    assert!(
        !ok && err.contains("MINIGPT4_GEMM_SHAPES") && err.contains("expected 0 or 1"),
        "{err}"
    );
    assert!(
        !err.contains("GEMM forms"),
        "measured before refusing: {err}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// `minigpt4 bench ARGS` with `MINIGPT4_PROFILE=1`, which must succeed: its stderr.
fn bench_profiled(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .arg("bench")
        .args(args)
        .env("MINIGPT4_PROFILE", "1")
        .env_remove("MINIGPT4_ADAPTER")
        .output()
        .expect("run minigpt4");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// The profile lines per `per` ("token", "image") of `err`, each with its milliseconds and
/// dispatches per `per`, both checked to be sane, and its workgroup count at the end.
fn profile_rows<'a>(err: &'a str, per: &str) -> Vec<(&'a str, f64, f64)> {
    let unit = format!(" ms/{per} ");
    let rows: Vec<(&str, f64, f64)> = err
        .lines()
        .filter(|l| l.starts_with("profile:") && l.contains(&unit))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let ms: f64 = words[1].parse().expect(l);
            let count: f64 = words[3].parse().expect(l);
            assert!(ms >= 0.0 && ms.is_finite() && count > 0.0, "{l}");
            assert!(l.ends_with(" groups)"), "{l}");
            (l, ms, count)
        })
        .collect();
    assert!(!rows.is_empty(), "no profile per {per}: {err}");
    rows
}

/// `MINIGPT4_PROFILE=1` tells where a LLaMA's timed decode steps went: every kernel a step
/// runs, with its time and dispatches per token and its workgroup count.
#[test]
fn bench_profile_names_every_decode_kernel() {
    let model = fixture_path("tests/fixtures/llama/mha_untied_hd64");
    let err = bench_profiled(&["--tiny", "--runs", "1", "--parts", "e2e", "--llm", &model]);
    let rows = profile_rows(&err, "token");
    for kernel in [
        "embedding::embedding",
        "gemv::gemv",
        "attention::attention",
        "argmax::argmax",
    ] {
        assert!(rows.iter().any(|r| r.0.contains(kernel)), "{kernel}: {err}");
    }
    // one token's rotary step and cache write happen in the QKV projection's store
    assert!(
        rows.iter()
            .any(|r| r.0.contains("gemv::gemv") && r.0.contains("ROPE")),
        "{err}"
    );
    assert!(!rows.iter().any(|r| r.0.contains("rope::")), "{err}");
    // every mode's steps, each line tagged with its mode: the greedy ones end in the argmax,
    // the sampled ones on the GPU in the top-k, the host's in neither (it reads the logits)
    let tagged = |mode: &str| -> Vec<(&str, f64, f64)> {
        let tag = format!("[{mode}] ");
        rows.iter()
            .filter(|r| r.0.contains(&tag))
            .copied()
            .collect()
    };
    for mode in ["greedy", "greedy_waiting"] {
        assert!(
            tagged(mode).iter().any(|r| r.0.contains("argmax::argmax")),
            "{mode}: {err}"
        );
    }
    for mode in ["sampled", "sampled_waiting"] {
        assert!(
            tagged(mode).iter().any(|r| r.0.contains("topk::topk")),
            "{mode}: {err}"
        );
    }
    assert!(
        tagged("sampled_host")
            .iter()
            .any(|r| r.0.contains("gemv::gemv")),
        "{err}"
    );
    assert!(
        !tagged("sampled_host")
            .iter()
            .any(|r| r.0.contains("topk::") || r.0.contains("argmax::")),
        "{err}"
    );
    let dispatches: f64 = tagged("greedy").iter().map(|r| r.2).sum();
    // one embedding, one argmax, and per layer at least attention and four GEMVs
    assert!(dispatches >= 2.0 + 5.0, "{err}");
}

/// With `MINIGPT4_PROFILE=1`, `bench --parts decode` tells each decode mode's kernels apart
/// (in its JSON and on stderr): greedy steps end in the argmax, sampled ones in the top-k and
/// the sampling kernel, and none of the argmax.
#[test]
fn bench_decode_profiles_each_mode() {
    let out = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .args(["bench", "--tiny", "--runs", "1", "--layers", "1"])
        .args(["--synthetic", "vicuna0-7b", "--parts", "decode", "--json"])
        .env("MINIGPT4_PROFILE", "1")
        .env_remove("MINIGPT4_ADAPTER")
        .output()
        .expect("run minigpt4");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let profile = &r["decode"]["profile"];
    let kernels = |mode: &str| -> Vec<String> {
        let list = profile[mode].as_array().expect(mode);
        for k in list {
            let (ms, n) = (k["ms"].as_f64(), k["dispatches"].as_f64());
            assert!(
                ms.is_some_and(|x| x >= 0.0 && x.is_finite()) && n.is_some_and(|x| x > 0.0),
                "{mode}: {k}"
            );
        }
        list.iter()
            .map(|k| k["kernel"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let has = |list: &[String], name: &str| list.iter().any(|k| k.starts_with(name));
    for mode in ["greedy", "greedy_waiting"] {
        let k = kernels(mode);
        assert!(
            has(&k, "argmax::argmax") && has(&k, "gemv::gemv"),
            "{mode}: {k:?}"
        );
        assert!(!has(&k, "topk::") && !has(&k, "sample::"), "{mode}: {k:?}");
    }
    for mode in ["sampled", "sampled_waiting"] {
        let k = kernels(mode);
        assert!(
            has(&k, "topk::topk") && has(&k, "sample::sample"),
            "{mode}: {k:?}"
        );
        assert!(!has(&k, "argmax::"), "{mode}: {k:?}");
    }
    // and on stderr, each line with its mode
    assert!(
        err.lines()
            .any(|l| l.starts_with("profile:") && l.contains("[sampled] topk::topk")),
        "{err}"
    );
}

/// With `MINIGPT4_PROFILE=1` the end-to-end part also tells where the image encode went, per
/// image: the ViT's and Q-Former's GEMMs and tiled attention among its kernels.
#[test]
fn bench_profile_names_the_image_encode_kernels() {
    let err = bench_profiled(&[
        "--tiny",
        "--runs",
        "1",
        "--layers",
        "1",
        "--synthetic",
        "vicuna0-7b",
        "--parts",
        "e2e",
    ]);
    let rows = profile_rows(&err, "image");
    for kernel in ["matmul::gemm", "attention::attention_tiled"] {
        assert!(rows.iter().any(|r| r.0.contains(kernel)), "{kernel}: {err}");
    }
}

/// `bench --parts decode` (the code the page's `benchDecode` runs) reports a rate and only
/// the parts asked for; an unknown part is named.
#[test]
fn bench_decode_part_alone() {
    let (ok, out, err) = tiny_bench(&["--layers", "1", "--parts", "decode", "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let d = &r["decode"];
    for key in [
        "decode_tok_per_s",
        "decode_tok_per_s_waiting",
        "decode_tok_per_s_sampled",
        "decode_tok_per_s_sampled_waiting",
    ] {
        assert!(
            d[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()),
            "{key}: {d}"
        );
    }
    assert_eq!(d["layers"], 1, "{d}");
    assert_eq!(d["quant"], "q4", "{d}");
    // without MINIGPT4_PROFILE each mode's kernel list is there and empty
    for mode in ["greedy", "greedy_waiting", "sampled", "sampled_waiting"] {
        assert_eq!(d["profile"][mode], serde_json::json!([]), "{mode}: {d}");
    }
    assert!(
        r.get("gemv").is_none() && r.get("end_to_end").is_none(),
        "{r}"
    );
    let (ok, _, err) = minigpt4(&["bench", "--tiny", "--parts", "decode,speed"]);
    assert!(
        !ok && err.contains("speed") && err.contains("decode"),
        "{err}"
    );
}

/// `bench --model PKG` measures a package end to end as chat runs it: the image encode, a
/// first turn's prefill with the image's rows spliced in, decode within the package's context,
/// time to first token and GPU memory. `--synthetic vit-g` is the image encode alone. Bad
/// names and paths are errors before any part runs.
#[test]
fn bench_end_to_end_on_a_package_and_on_the_image_encoder_alone() {
    let pkg = fixture_path("tests/fixtures/minigpt4/vicuna0_tiny_pkg");
    let base = ["bench", "--tiny", "--runs", "1", "--parts", "e2e"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        minigpt4(&args)
    };
    let pos = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    let (ok, out, err) = with(&["--model", &pkg, "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let e = &r["package"];
    for k in [
        "image_encode_ms",
        "prefill_tok_per_s",
        "decode_tok_per_s_ctx_short",
        "decode_tok_per_s_ctx_short_sampled",
        "decode_tok_per_s_ctx_long",
        "time_to_first_token_s",
    ] {
        assert!(pos(&e[k]), "{k}: {e}");
    }
    assert_eq!(e["variant"], "vicuna0", "{e}");
    // sampled as chat samples: on the GPU
    assert_eq!(e["samples_on_gpu"], true, "{e}");
    // the tiny package: 2 LLM layers, 3 ViT layers; its 8 image rows and the template's text
    assert_eq!(
        (e["llm_layers"].as_u64(), e["vit_layers"].as_u64()),
        (Some(2), Some(3))
    );
    assert!(e["prefill_tokens"].as_u64().unwrap() > 40, "{e}");
    assert_eq!(
        (e["ctx_short"].as_u64(), e["ctx_long"].as_u64()),
        (Some(16), Some(48))
    );
    let mem = &e["gpu_memory_bytes"];
    assert!(pos(&mem["weights"]) && pos(&mem["kv_cache"]), "{mem}");
    assert_eq!(
        mem["total"].as_u64(),
        Some(mem["weights"].as_u64().unwrap() + mem["kv_cache"].as_u64().unwrap())
    );
    let (ok, out, err) = with(&["--model", &pkg]);
    assert!(ok, "{err}");
    assert!(
        out.contains("end to end on") && out.contains("time to first token"),
        "{out}"
    );

    let (ok, out, err) = with(&["--synthetic", "vit-g", "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let e = &r["end_to_end"];
    assert!(
        pos(&e["image_encode_ms"]) && pos(&e["gpu_memory_bytes"]["total"]),
        "{e}"
    );
    assert!(
        e.get("decode_tok_per_s_ctx_short").is_none() && e["llm_layers"].is_null(),
        "{e}"
    );
    let (ok, out, err) = with(&["--synthetic", "vit-g"]);
    assert!(ok, "{err}");
    assert!(out.contains("image encode (vit-g"), "{out}");

    // decode on a LLaMA without the gemv part: no GEMV rates, so no prediction (not 0)
    let llm = fixture_path("tests/fixtures/llama/mha_untied_hd64");
    let (ok, out, err) = with(&["--llm", &llm, "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let l = &r["llm_decode"];
    assert!(
        l["predicted_tok_per_s"].is_null() && l["percent_of_prediction"].is_null(),
        "{l}"
    );
    assert!(!l["unrated_dtypes"].as_array().unwrap().is_empty(), "{l}");
    assert!(pos(&l["decode_tok_per_s_ctx_short"]), "{l}");
    let (ok, out, err) = with(&["--llm", &llm]);
    assert!(ok, "{err}");
    assert!(
        out.contains("no prediction: this run has no GEMV rate for q"),
        "{out}"
    );
    // MINIGPT4_AHEAD decides whether decode submits ahead, on any device; a bad value is named
    let mut args = base.to_vec();
    args.extend_from_slice(&["--llm", &llm, "--json"]);
    for v in ["0", "1"] {
        let (ok, out, err) = minigpt4_env(&args, &[("MINIGPT4_AHEAD", v.as_ref())]);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(r["llm_decode"]["submits_ahead"], v == "1", "{v}");
    }
    let (ok, _, err) = minigpt4_env(&args, &[("MINIGPT4_AHEAD", "yes".as_ref())]);
    assert!(
        !ok && err.contains("MINIGPT4_AHEAD") && err.contains("'yes'"),
        "{err}"
    );

    // errors name what is wrong, before the copy kernel is measured
    for (args, want) in [
        (vec!["--synthetic", "vit-x"], "vit-x"),
        (vec!["--synthetic", "vit-g", "--parts", "decode"], "decode"),
        (vec!["--model", "/nonexistent/pkg"], "/nonexistent/pkg"),
    ] {
        let (ok, _, err) = with(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("bench: copy") && !err.contains("bench: block GEMV"),
            "{err}"
        );
    }
}

/// An unknown `MINIGPT4_LOG` level is named in a warning, and the command still runs.
#[test]
fn an_unknown_log_level_is_a_warning() {
    let (ok, out, err) = minigpt4_env(&["info", "--json"], &[("MINIGPT4_LOG", "loud".as_ref())]);
    assert!(ok, "{err}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&out).is_ok(),
        "{out}"
    );
    assert!(
        err.contains("MINIGPT4_LOG") && err.contains("found 'loud'"),
        "{err}"
    );
}
