#![no_main]
//! A model package's `config.json` and `model.safetensors.index.json` (the input is the two,
//! separated by a NUL byte), parsed and checked against each other.
use libfuzzer_sys::fuzz_target;
use minigpt4::package::Checked;

fuzz_target!(|data: &[u8]| {
    let (config, index) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    if let Ok(c) = Checked::parse("fuzz", config, index) {
        let _ = c.entries();
        let _ = c.config.to_json();
    }
});
