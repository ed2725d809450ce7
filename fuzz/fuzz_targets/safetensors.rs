#![no_main]
//! A safetensors file: header length, JSON header (dtype, shape, offsets, overlaps), then every
//! tensor's bytes.
use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use minigpt4::loader::safetensors::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_reader(
        Cursor::new(data),
        data.len() as u64,
        Path::new("fuzz.safetensors"),
    ) else {
        return;
    };
    for t in f.tensors.values() {
        let b = f
            .read_bytes_from(Cursor::new(data), t)
            .expect("a checked tensor lies inside the file");
        assert_eq!(b.len() as u64, t.end - t.start);
    }
});
