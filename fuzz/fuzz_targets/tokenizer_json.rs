#![no_main]
//! A package's `tokenizer.json` (and optionally a `tokenizer_config.json` after a NUL byte) as
//! the loader reads it, then a little text through it.
use libfuzzer_sys::fuzz_target;
use minigpt4::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let (json, config) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(("fuzz_config.json", &data[i + 1..]))),
        None => (data, None),
    };
    let Ok(tok) = Tokenizer::from_json_bytes("fuzz.json", json, config) else {
        return;
    };
    if let Ok(ids) = tok.encode("Hello <s> wörld\n 🦀", true) {
        let _ = tok.decode(&ids, false);
        let _ = tok.decode_incremental(&ids, 0);
    }
});
