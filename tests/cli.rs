//! The `minigpt4` binary as a user runs it.

use std::process::Command;

fn minigpt4(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .args(args)
        .env_remove("MINIGPT4_ADAPTER")
        .output()
        .expect("run minigpt4");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    assert!(
        !ok && err.contains("/nonexistent/model.gguf") && !err.contains("panicked"),
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
