#![no_main]
//! Our JPEG decoder on its own (the image target reaches it too, but spends time on PNG/WebP
//! and the resize).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((w, h, rgb)) = minigpt4::jpeg::decode(data, "fuzz.jpg") {
        assert_eq!(rgb.len(), w as usize * h as usize * 3);
    }
});
