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
