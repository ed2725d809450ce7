//! Image preprocessing against Pillow: fixtures and references from
//! tests/golden/make_image_goldens.py (tests/fixtures/images/manifest.json).
//!
//! Decoding + convert('RGB') must equal PIL exactly, JPEG included (our decoder, src/jpeg.rs,
//! reproduces libjpeg-turbo); the extra JPEG fixtures of tests/golden/make_jpeg_fixtures.py
//! (jpeg_*.jpg: other sampling layouts, restart intervals, YCCK, ...) are checked too.
//! Resizing PIL's own decoded pixels must equal PIL's resize bit for bit.

use std::path::{Path, PathBuf};

use minigpt4::image::{
    decode_rgb, normalize, preprocess, resize_bicubic, RgbImage, CLIP_MEAN, CLIP_STD,
    MAX_DECODE_BYTES, MAX_PIXELS, MAX_SIDE,
};
use serde_json::Value;

/// Largest per-channel difference between our decoded JPEG pixels (src/jpeg.rs) and
/// libjpeg-turbo's under Pillow 13: 0 on every fixture (4:2:0, 4:4:4, progressive, greyscale,
/// CMYK). The `image` crate's zune-jpeg, used before, was off by up to 4 (4:2:0 chroma), 2
/// (4:4:4) and 1 (greyscale, CMYK), from its IDCT and chroma upsampling rounding.
const JPEG_DECODE_TOL: u8 = 0;
/// Largest per-channel difference between our decoded lossy WebP pixels (image-webp) and
/// libwebp 1.6's: measured 0.
const WEBP_LOSSY_DECODE_TOL: u8 = 0;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("manifest.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["images"].as_array().unwrap().clone()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A lossless RGB8 PNG reference, read with the `image` crate directly.
fn reference(name: &str) -> RgbImage {
    let img = ::image::load_from_memory_with_format(&read(name), ::image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let img = match img {
        ::image::DynamicImage::ImageRgb8(b) => b,
        other => panic!("{name}: reference is {:?}, expected RGB8", other.color()),
    };
    RgbImage::new(img.width() as usize, img.height() as usize, img.into_raw()).unwrap()
}

/// (max per-channel difference, number of differing channel values)
fn diff(a: &RgbImage, b: &RgbImage, what: &str) -> (u8, usize) {
    assert_eq!((a.width, a.height), (b.width, b.height), "{what}: size");
    let mut max = 0;
    let mut n = 0;
    for (&x, &y) in a.data.iter().zip(&b.data) {
        let d = x.abs_diff(y);
        max = max.max(d);
        n += (d != 0) as usize;
    }
    (max, n)
}

fn decode_tolerance(entry: &Value) -> u8 {
    let file = entry["file"].as_str().unwrap();
    if file.ends_with(".jpg") {
        JPEG_DECODE_TOL
    } else if file.ends_with(".webp") && file.contains("lossy") {
        WEBP_LOSSY_DECODE_TOL
    } else {
        0
    }
}

#[test]
fn decode_matches_pil_convert_rgb() {
    let mut report = Vec::new();
    for e in manifest() {
        let file = e["file"].as_str().unwrap();
        let ours = decode_rgb(&read(file), file).unwrap_or_else(|err| panic!("{err}"));
        let pil = reference(e["rgb"].as_str().unwrap());
        let (max, n) = diff(&ours, &pil, file);
        report.push(format!(
            "{file:28} {:6} {}x{}: max {max}, {n} of {} values differ",
            e["mode"].as_str().unwrap(),
            pil.width,
            pil.height,
            pil.data.len()
        ));
        assert!(
            max <= decode_tolerance(&e),
            "{file}: decoded pixels differ from PIL by up to {max} ({n} values)"
        );
    }
    eprintln!("decode vs PIL convert('RGB'):\n  {}", report.join("\n  "));
}

/// tests/golden/make_jpeg_fixtures.py's files: every one must decode to Pillow's pixels
/// exactly.
#[test]
fn extra_jpeg_fixtures_match_pil_exactly() {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("jpeg_") && n.ends_with(".jpg"))
        .collect();
    names.sort();
    // make_image_goldens.py empties the folder: make_jpeg_fixtures.py must run after it.
    assert!(
        names.len() >= 23,
        "only {} jpeg_*.jpg fixtures: run tests/golden/make_jpeg_fixtures.py",
        names.len()
    );
    let mut report = Vec::new();
    for file in &names {
        let ours = decode_rgb(&read(file), file).unwrap_or_else(|err| panic!("{err}"));
        let pil = reference(&file.replace(".jpg", ".rgb.png"));
        let (max, n) = diff(&ours, &pil, file);
        report.push(format!(
            "{file:44} {}x{}: max {max}, {n} values differ",
            pil.width, pil.height
        ));
        assert_eq!((max, n), (0, 0), "{file}: decoded pixels differ from PIL");
    }
    eprintln!("extra JPEGs vs PIL:\n  {}", report.join("\n  "));
}

#[test]
fn resize_matches_pil_bit_for_bit() {
    let mut checked = 0;
    for e in manifest() {
        let file = e["file"].as_str().unwrap();
        let pil_rgb = reference(e["rgb"].as_str().unwrap());
        for (s, r) in e["resized"].as_object().unwrap() {
            let s: usize = s.parse().unwrap();
            let ours = resize_bicubic(&pil_rgb, s, s);
            let (max, n) = diff(&ours, &reference(r.as_str().unwrap()), file);
            assert_eq!(
                (max, n),
                (0, 0),
                "{file} resized to {s}: max diff {max}, {n} values"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} resize references");
}

#[test]
fn preprocess_end_to_end_matches_pil() {
    let mut report = Vec::new();
    for e in manifest() {
        let file = e["file"].as_str().unwrap();
        let bytes = read(file);
        let img = decode_rgb(&bytes, file).unwrap();
        for (s, r) in e["resized"].as_object().unwrap() {
            let s: usize = s.parse().unwrap();
            let ours = resize_bicubic(&img, s, s);
            let (max, n) = diff(&ours, &reference(r.as_str().unwrap()), file);
            report.push(format!("{file:28} -> {s}: max {max}, {n} values differ"));
            // Resizing averages decoder noise, so it never grows beyond the decode tolerance.
            assert!(max <= decode_tolerance(&e), "{file} -> {s}: max diff {max}");
            let t = preprocess(&bytes, file, s).unwrap();
            assert_eq!(
                t,
                normalize(&ours),
                "{file}: preprocess = normalize(resize(decode))"
            );
        }
    }
    eprintln!("decode + resize vs PIL:\n  {}", report.join("\n  "));
}

#[test]
fn normalised_tensor_matches_torchvision() {
    let mut checked = 0;
    for e in manifest() {
        let file = e["file"].as_str().unwrap();
        for (s, t) in e["tensor"].as_object().unwrap() {
            let s: usize = s.parse().unwrap();
            let tname = t.as_str().unwrap();
            let side: Value =
                serde_json::from_slice(&read(&tname.replace(".bin", ".json"))).unwrap();
            assert_eq!(side["shape"], serde_json::json!([3, s, s]));
            let want: Vec<f32> = read(tname)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            // Normalisation of PIL's resized pixels: same f32 operations, so exact.
            let pil_resized = reference(e["resized"][s.to_string()].as_str().unwrap());
            let ours = normalize(&pil_resized);
            assert_eq!(ours.len(), want.len());
            let max = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 1e-6, "{tname}: normalize differs by {max}");
            // Whole pipeline from the encoded file: within one 8-bit step per channel.
            let full = preprocess(&read(file), file, s).unwrap();
            let plane = s * s;
            let tol = decode_tolerance(&e) as f32;
            for (i, (a, b)) in full.iter().zip(&want).enumerate() {
                let c = i / plane;
                let lim = tol.max(1.0) / 255.0 / CLIP_STD[c] + 1e-6;
                assert!((a - b).abs() <= lim, "{tname}[{i}]: {a} vs {b}");
            }
            eprintln!("{tname}: normalize max |diff| {max:e}");
            checked += 1;
        }
    }
    assert!(checked >= 1);
    // Spot values: 0 and 255 map to -mean/std and (1-mean)/std.
    let t = normalize(&RgbImage::new(2, 1, vec![0, 0, 0, 255, 255, 255]).unwrap());
    for c in 0..3 {
        assert_eq!(t[c * 2], (0.0 - CLIP_MEAN[c]) / CLIP_STD[c]);
        assert_eq!(t[c * 2 + 1], (1.0 - CLIP_MEAN[c]) / CLIP_STD[c]);
    }
}

fn expect_err(bytes: &[u8], what: &str, needles: &[&str]) -> String {
    let msg = match decode_rgb(bytes, what) {
        Ok(img) => panic!(
            "{what}: decoded a {}x{} image, expected an error",
            img.width, img.height
        ),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(what),
        "{what}: message does not name the file: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "{what}: message lacks {n:?}: {msg}");
    }
    assert!(preprocess(bytes, what, 224).is_err());
    msg
}

#[test]
fn truncated_files_are_errors() {
    // PIL (libjpeg) needs the JPEG end-of-image marker; WebP's RIFF size must match; a PNG is
    // truncated once image data is missing (PIL tolerates a cut IEND; we accept a cut IEND CRC but not a
    // missing IEND chunk).
    for file in [
        "chelsea_q90.jpg",
        "astronaut_prog.jpg",
        "coffee_cmyk.jpg",
        "chelsea.png",
        "palette.png",
        "rocket_lossy.webp",
        "rocket_lossless.webp",
    ] {
        let bytes = read(file);
        let png = file.ends_with(".png");
        let cuts: &[usize] = if png { &[40] } else { &[1, 2, 10] };
        for &cut in cuts.iter().chain(&[bytes.len() / 2, bytes.len() - 40]) {
            let what = format!("{file}[..len-{cut}]");
            let m = expect_err(&bytes[..bytes.len() - cut], &what, &[]);
            if cut == 2 || cut == 40 || cut == bytes.len() / 2 {
                eprintln!("{m}");
            }
        }
        if png {
            let whole = decode_rgb(&bytes, file).unwrap();
            // A PNG whose IEND CRC is cut short still decodes, to the same pixels.
            let img = decode_rgb(&bytes[..bytes.len() - 1], file).unwrap();
            assert_eq!(img, whole, "{file} without its last byte (PIL accepts it)");
        }
    }
}

#[test]
fn garbage_and_unsupported_are_errors() {
    let mut x: u32 = 12345;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 24) as u8
        })
        .collect();
    eprintln!(
        "{}",
        expect_err(&random, "random.bin", &["not a JPEG, PNG or WebP"])
    );
    expect_err(&[], "empty.jpg", &["not a JPEG, PNG or WebP"]);
    expect_err(
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        "anim.gif",
        &["not supported"],
    );
    // Right signatures, garbage after.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&random[..100]);
    expect_err(&png, "bad.png", &[]);
    let mut jpg = vec![0xFF, 0xD8, 0xFF];
    jpg.extend_from_slice(&random[..100]);
    expect_err(&jpg, "bad.jpg", &[]);
}

#[test]
fn decompression_bombs_are_refused_before_allocating() {
    let limit = format!("{MAX_SIDE}x{MAX_SIDE}");
    for (file, dims) in [
        ("bomb_60000x60000.png", "60000x60000"),
        ("bomb_16385x1.png", "16385x1"),
        ("bomb_65000x65000.jpg", "65000x65000"),
    ] {
        let m = expect_err(&read(file), file, &[dims, &limit]);
        eprintln!("{m}");
    }
    const { assert!(MAX_DECODE_BYTES <= 1 << 30) };
}

/// A PNG of `w`×`h` 8-bit grey pixels whose header is valid (checksummed) and whose data is
/// one empty IDAT: enough for a decoder to read the dimensions.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

#[test]
fn images_over_the_pixel_limit_are_refused() {
    // 16384x16384: each side within MAX_SIDE, the grey buffer within MAX_DECODE_BYTES, but
    // 268 million pixels, over Pillow's own bomb limit.
    let side = MAX_SIDE;
    assert!(side as u64 * side as u64 > MAX_PIXELS);
    let dims = format!("{side}x{side}");
    let limit = format!("{MAX_PIXELS}-pixel limit");
    expect_err(&png_header_only(side, side), "big.png", &[&dims, &limit]);
    // the same dimensions written into a real JPEG's frame header
    let mut jpg = read("jpeg_pil_420_3x5.jpg");
    let sof = jpg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline SOF0");
    jpg[sof + 5..sof + 7].copy_from_slice(&(side as u16).to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&(side as u16).to_be_bytes());
    expect_err(&jpg, "big.jpg", &[&dims, &limit]);
    // just under the limit on one axis is fine for the header check (the file then fails as
    // truncated data, not as a bomb)
    let ok = MAX_PIXELS as u32 / side;
    let m = match decode_rgb(&png_header_only(side, ok), "under.png") {
        Ok(_) => panic!("an empty IDAT cannot decode"),
        Err(e) => e.to_string(),
    };
    assert!(!m.contains("pixel limit"), "{m}");
}

#[test]
fn resize_edge_sizes() {
    // 1x1 → constant; shrinking to 1x1 and growing a 2-pixel row both stay in range.
    let one = RgbImage::new(1, 1, vec![10, 200, 255]).unwrap();
    let r = resize_bicubic(&one, 224, 224);
    assert!(r.data.chunks_exact(3).all(|p| p == [10, 200, 255]));
    let img = decode_rgb(&read("size_3000x17.png"), "size_3000x17.png").unwrap();
    assert_eq!(resize_bicubic(&img, 1, 1).data.len(), 3);
    assert_eq!(resize_bicubic(&img, 0, 5).data.len(), 0);
    // Only one axis changes: one pass.
    let r = resize_bicubic(&img, 3000, 224);
    assert_eq!((r.width, r.height), (3000, 224));
}
