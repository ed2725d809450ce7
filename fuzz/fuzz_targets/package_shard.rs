#![no_main]
//! A shard of a model package streamed as the browser and the native loader stream it (the
//! GPU-free part of `PackageLoader`): header length, header checked against the package
//! (tests/fixtures/minigpt4/vicuna0_tiny_pkg), data attributed to entries. The first input byte
//! sets the size of the chunks the rest is fed in.
use libfuzzer_sys::fuzz_target;
use minigpt4::package::{Checked, ShardStream};

const CONFIG: &[u8] = include_bytes!("../../tests/fixtures/minigpt4/vicuna0_tiny_pkg/config.json");
const INDEX: &[u8] =
    include_bytes!("../../tests/fixtures/minigpt4/vicuna0_tiny_pkg/model.safetensors.index.json");

thread_local! {
    static PKG: Checked = Checked::parse("pkg", CONFIG, INDEX).expect("the fixture package is valid");
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, shard)) = data.split_first() else {
        return;
    };
    let chunk = 1 + (chunk as usize) * 67;
    PKG.with(|pkg| {
        let expected = pkg.entries();
        let mut s = ShardStream::new("pkg", "model-00001-of-00001.safetensors");
        for part in shard.chunks(chunk) {
            match s.feed(part, &expected, &pkg.index) {
                Ok(pieces) => {
                    for p in pieces {
                        assert!(p.range.end <= part.len());
                        let e = &s.entries()[p.entry];
                        assert!((p.range.len() as u64) <= e.end - e.start);
                    }
                }
                Err(_) => return,
            }
        }
        let _ = s.finish();
    });
});
