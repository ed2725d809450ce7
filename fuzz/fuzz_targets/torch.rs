#![no_main]
//! A torch.save checkpoint: zip directory (zip64 too), byteorder record, the pickle VM and its
//! allow-list, the storage and view checks; then every tensor's bytes.
use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use minigpt4::loader::torch::TorchCheckpoint;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(ck) = TorchCheckpoint::from_reader(&mut Cursor::new(data), len, Path::new("fuzz.pt"))
    else {
        return;
    };
    for t in ck.tensors() {
        let b = ck
            .read_bytes_from(&mut Cursor::new(data), len, &t.name)
            .expect("a checked tensor lies inside its record");
        assert_eq!(b.len(), t.numel() * t.dtype.size_in_bytes());
    }
});
