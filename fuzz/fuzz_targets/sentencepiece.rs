#![no_main]
//! A SentencePiece `tokenizer.model` (protobuf) converted to a `tokenizers` tokenizer, which
//! then encodes and decodes a little text.
use libfuzzer_sys::fuzz_target;
use minigpt4::tokenizer::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(tok) = Tokenizer::from_sentencepiece_bytes("fuzz.model", data) else {
        return;
    };
    if let Ok(ids) = tok.encode("Hello <s> wörld\n 🦀", true) {
        let _ = tok.decode(&ids, false);
    }
    let _ = tok.to_json();
});
