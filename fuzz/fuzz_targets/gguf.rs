#![no_main]
//! GGUF header, metadata and tensor table; then every tensor's bytes dequantised (and
//! converted to q4m where the type allows), the LLaMA config and the tokenizer the metadata
//! describe.
use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use minigpt4::loader::gguf::{dequantize, to_q4m, GgufFile};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_reader(Cursor::new(data), data.len() as u64, Path::new("fuzz.gguf"))
    else {
        return;
    };
    for t in &g.tensors {
        if let Ok(raw) = g.read_raw_from(Cursor::new(data), t) {
            let v = dequantize(t.ty, &raw, t.numel());
            assert!(v.len() <= t.numel());
            let _ = to_q4m(t.ty, &raw, t.numel());
        }
    }
    let _ = minigpt4::model::llama::LlamaConfig::from_gguf(&g);
    if let Ok(tok) = minigpt4::tokenizer::Tokenizer::from_gguf(&g) {
        if let Ok(ids) = tok.encode("Hello <s> wörld", true) {
            let _ = tok.decode(&ids, true);
        }
    }
});
