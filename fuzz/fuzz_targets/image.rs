#![no_main]
//! Any image (JPEG, PNG, WebP) through the whole preprocessing: decode to RGB as PIL does,
//! bicubic resize to 224×224, normalise.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = minigpt4::image::preprocess(data, "fuzz", 224) {
        assert_eq!(v.len(), 3 * 224 * 224);
    }
});
