//! Image preprocessing, bit-exact with MiniGPT-4's eval transform (spec §1):
//! `Image.open(path).convert('RGB')` → `torchvision Resize((S, S), BICUBIC)` (which on a PIL
//! image is `PIL.Image.resize((S, S), Image.BICUBIC)`) → `ToTensor` (/255) → `Normalize` with
//! the OpenAI CLIP mean/std → f32 CHW `[3, S, S]`.
//!
//! * [`decode_rgb`] decodes JPEG, PNG and WebP and converts every pixel layout to RGB8 the way
//!   PIL's `convert('RGB')` does: alpha is dropped (not composited), grey is replicated, palettes
//!   are looked up, CMYK uses PIL's `nk - c·nk/255` rule, 16-bit RGB/RGBA/LA PNGs keep the high
//!   byte (PIL unpacks them with `RGB;16B` etc.) and 16-bit grey PNGs (PIL mode `I;16`) are
//!   *clipped* at 255, not scaled — PIL's quirk, reproduced. JPEGs go through our own decoder
//!   ([`crate::jpeg`]), which reproduces libjpeg-turbo (islow IDCT, fancy upsampling, its
//!   fixed-point colour conversion) bit for bit. EXIF orientation is ignored, as PIL's
//!   `Image.open` ignores it. Truncated files are errors (PIL: "image file is truncated"), and so
//!   are headers declaring images over [`MAX_SIDE`] pixels a side, [`MAX_PIXELS`] pixels (Pillow's
//!   own bomb limit) or [`MAX_DECODE_BYTES`] of pixels (decompression bombs); the limits are
//!   checked before anything is allocated.
//! * [`resize_bicubic`] is Pillow's `ImagingResample` with the bicubic filter: Keys cubic with
//!   a = −0.5, support 2 widened by the scale factor when downscaling (antialiasing), weights
//!   computed in f64, normalised to sum 1, rounded to 22-bit fixed point, a horizontal pass into
//!   an 8-bit intermediate then a vertical pass (or the other way round, as Pillow 13 chooses:
//!   see [`resize_bicubic`]), each accumulating in i32 from ½ and clipping `acc >> 22` to
//!   0..=255; a pass whose size does not change is skipped. The result equals PIL's bit for bit.
//! * [`normalize`] is ToTensor + Normalize in f32, the operations torchvision performs.

use std::io::Cursor;

use ::image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};

/// OpenAI CLIP normalisation mean (BLIP-2 / MiniGPT-4 `BlipImageBaseProcessor` defaults).
/// (Digits as in the Python source; they round to the same f32 values torch uses.)
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP normalisation standard deviation.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Largest accepted width or height of an input image.
pub const MAX_SIDE: u32 = 16384;
/// Most pixels an input image may have: Pillow's own decompression-bomb limit (it raises
/// `DecompressionBombError` above twice `Image.MAX_IMAGE_PIXELS` = 89,478,485), so every image
/// MiniGPT-4's reference would open is accepted, and nothing it refuses.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;
/// Largest accepted decoded pixel buffer, in bytes (in the decoder's own layout, e.g. 8 bytes a
/// pixel for 16-bit RGBA).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps RGB8 pixels; `data` must hold `width * height * 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let need = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| Error::tensor("rgb image", "a size that fits in memory", "overflow"))?;
        if data.len() != need {
            return Err(Error::tensor(
                "rgb image",
                format!("{need} bytes for {width}x{height} RGB8"),
                format!("{} bytes", data.len()),
            ));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Decodes a JPEG, PNG or WebP file and converts it to RGB8 exactly as PIL's
/// `Image.open(..).convert('RGB')` does. `what` names the file in errors.
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::format(what, format!("cannot read image: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
        Some(other) => {
            return Err(Error::format(
                what,
                format!(
                    "{} images are not supported (JPEG, PNG and WebP are)",
                    other.extensions_str().first().unwrap_or(&"this kind of")
                ),
            ))
        }
        None => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(Error::format(
                what,
                format!(
                    "not a JPEG, PNG or WebP image ({} bytes starting {})",
                    bytes.len(),
                    if head.is_empty() {
                        "with nothing".to_string()
                    } else {
                        head.join(" ")
                    }
                ),
            ));
        }
    };
    let name = match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        _ => "WebP",
    };
    if format == ImageFormat::Jpeg {
        jpeg_check_complete(bytes).map_err(|d| Error::format(what, format!("JPEG {d}")))?;
        // Our decoder, bit-exact with libjpeg-turbo under Pillow; it checks the declared size
        // against MAX_SIDE and MAX_DECODE_BYTES before allocating.
        let (w, h, data) = crate::jpeg::decode(bytes, what)?;
        return RgbImage::new(w as usize, h as usize, data);
    }
    if format == ImageFormat::WebP && bytes.len() >= 12 {
        // libwebp (PIL) refuses a file shorter than its RIFF header says; image-webp may not.
        let riff = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as u64 + 8;
        if (bytes.len() as u64) < riff {
            return Err(Error::format(
                what,
                format!(
                    "WebP file is truncated: its RIFF header declares {riff} bytes, the file \
                     has {}",
                    bytes.len()
                ),
            ));
        }
    }
    let decode_err = |e: ImageError| Error::format(what, format!("cannot decode {name}: {e}"));

    // Read the header with no limits (headers are small and already in memory), check the
    // declared size ourselves so the error can name the numbers, then decode under limits.
    let mut reader = reader;
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(Error::format(
            what,
            format!(
                "{name} header declares a {w}x{h} image, over the {MAX_SIDE}x{MAX_SIDE} pixel \
                 limit (refusing to decode: corrupt file or decompression bomb)"
            ),
        ));
    }
    if w == 0 || h == 0 {
        return Err(Error::format(
            what,
            format!("{name} header declares an empty {w}x{h} image"),
        ));
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(Error::format(
            what,
            format!(
                "{name} header declares a {w}x{h} image ({} pixels), over the {MAX_PIXELS}-pixel \
                 limit (refusing to decode: corrupt file or decompression bomb)",
                w as u64 * h as u64
            ),
        ));
    }
    let total = decoder.total_bytes();
    if total > MAX_DECODE_BYTES {
        return Err(Error::format(
            what,
            format!(
                "{name} image is {w}x{h} {:?}: decoding needs {total} bytes, over the \
                 {MAX_DECODE_BYTES}-byte limit",
                decoder.color_type()
            ),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    decoder.set_limits(limits).map_err(decode_err)?;
    let img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;

    // PNG colour type 0 at 16 bits is PIL mode I;16, whose conversion to RGB clips.
    let gray16_clips =
        format == ImageFormat::Png && bytes.len() > 25 && bytes[24] == 16 && bytes[25] == 0;
    to_rgb_like_pil(img, gray16_clips).map_err(|d| Error::format(what, d))
}

/// PIL's `convert('RGB')` for every layout the decoders produce.
fn to_rgb_like_pil(img: DynamicImage, gray16_clips: bool) -> Result<RgbImage, String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let gray16 = |v: u16| -> u8 {
        if gray16_clips {
            v.min(255) as u8
        } else {
            (v >> 8) as u8
        }
    };
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(b) => b.iter().flat_map(|&v| [gray16(v); 3]).collect(),
        DynamicImage::ImageLumaA16(b) => {
            b.chunks_exact(2).flat_map(|p| [gray16(p[0]); 3]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => {
            return Err(format!(
                "unsupported pixel layout {:?} (8- or 16-bit grey, grey+alpha, RGB, RGBA, \
                 palette and CMYK are supported)",
                other.color()
            ))
        }
    };
    debug_assert_eq!(data.len(), w * h * 3);
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Walks a JPEG's marker structure and fails unless it reaches the end-of-image marker, which
/// is what libjpeg under PIL needs (a file cut anywhere, even just before EOI, is "truncated").
fn jpeg_check_complete(b: &[u8]) -> std::result::Result<(), String> {
    let truncated = |at: usize| {
        Err(format!(
            "file is truncated: {} bytes, no end-of-image marker (ran out at byte {at})",
            b.len()
        ))
    };
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("file does not start with the SOI marker".into());
    }
    let mut i = 2;
    loop {
        // Find the next marker (libjpeg skips stray bytes before a marker with a warning).
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = b.get(i) else {
            return truncated(i);
        };
        i += 1;
        match code {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(len) = b.get(i..i + 2) else {
                    return truncated(i);
                };
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                i += len;
                if i > b.len() {
                    return truncated(b.len());
                }
                if code == 0xDA {
                    // Entropy-coded data: runs to the next marker that is not a stuffed 0xFF00
                    // or a restart marker.
                    loop {
                        while i < b.len() && b[i] != 0xFF {
                            i += 1;
                        }
                        let mut j = i;
                        while j < b.len() && b[j] == 0xFF {
                            j += 1;
                        }
                        match b.get(j) {
                            None => return truncated(b.len()),
                            Some(0x00 | 0xD0..=0xD7) => i = j + 1,
                            Some(_) => break,
                        }
                    }
                }
            }
        }
    }
}

/// Pillow's bicubic kernel (Keys, a = −0.5), evaluated exactly as Pillow does in f64.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point fraction bits of the resampling weights (Pillow: 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// Per-output-pixel source window and 22-bit fixed-point weights for one axis.
struct Weights {
    /// `(first source index, count)` for each output index.
    bounds: Vec<(usize, usize)>,
    /// `stride` weights per output index, the first `count` of which are used.
    k: Vec<i32>,
    stride: usize,
}

fn weights(in_size: usize, out_size: usize) -> Weights {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let stride = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * stride];
    let mut w = vec![0f64; stride];
    for (xx, kk) in k.chunks_exact_mut(stride).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // `as` truncates toward zero, like C's (int) cast.
        let lo = ((center - support + 0.5) as i64).max(0);
        let hi = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (hi - lo).max(0) as usize;
        let mut sum = 0.0;
        for (x, wx) in w[..n].iter_mut().enumerate() {
            *wx = bicubic(((x as i64 + lo) as f64 - center + 0.5) * inv);
            sum += *wx;
        }
        for (wx, kx) in w[..n].iter().zip(kk.iter_mut()) {
            let v = if sum != 0.0 { wx / sum } else { *wx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            *kx = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((lo as usize, n));
    }
    Weights { bounds, k, stride }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass: every row of `src` (`iw` pixels wide) resampled to `ow` pixels.
fn pass_h(src: &[u8], iw: usize, ow: usize) -> Vec<u8> {
    let wt = weights(iw, ow);
    let rows = src.len() / (iw * 3);
    let mut out = vec![0u8; rows * ow * 3];
    for (irow, orow) in src.chunks_exact(iw * 3).zip(out.chunks_exact_mut(ow * 3)) {
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let (lo, n) = wt.bounds[xx];
            let k = &wt.k[xx * wt.stride..xx * wt.stride + n];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &kv) in irow[lo * 3..(lo + n) * 3].chunks_exact(3).zip(k) {
                r += p[0] as i32 * kv;
                g += p[1] as i32 * kv;
                b += p[2] as i32 * kv;
            }
            o.copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
        }
    }
    out
}

/// Vertical pass: `src` holds rows `first..` of a `w`-pixel-wide image; output row `yy` reads
/// source rows `wt.bounds[yy]`.
fn pass_v(src: &[u8], w: usize, wt: &Weights, first: usize) -> Vec<u8> {
    let row = w * 3;
    let mut out = vec![0u8; wt.bounds.len() * row];
    let mut acc = vec![0i32; row];
    for (yy, orow) in out.chunks_exact_mut(row).enumerate() {
        let (lo, n) = wt.bounds[yy];
        let k = &wt.k[yy * wt.stride..yy * wt.stride + n];
        acc.fill(HALF);
        for (i, &kv) in k.iter().enumerate() {
            let y = lo + i - first;
            for (a, &p) in acc.iter_mut().zip(&src[y * row..(y + 1) * row]) {
                *a += p as i32 * kv;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resizes to `width`×`height` with PIL's `Image.resize(.., Image.BICUBIC)`, bit-exact with
/// Pillow 13 (the version the test references were made with). Aspect ratio is not kept. A
/// zero target size gives an empty image.
///
/// Pass order when both axes change: Pillow 13 runs the vertical pass first when the height
/// shrinks and it shrinks by more than twice what the width shrinks by (`h − H > 2·(w − W)`,
/// growth counting as negative shrink), else the horizontal pass first. This rule was measured
/// on Pillow 13.0.0 (several hundred random size pairs, no exception), not read from its source.
/// Older Pillow releases (those MiniGPT-4 was released with) always ran horizontal first; for
/// the resizes where the rules disagree (mostly tall images) the two orders differ by a few
/// levels on some pixels.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (iw, ih) = (img.width, img.height);
    assert_eq!(img.data.len(), iw * ih * 3, "RgbImage data length");
    let data = if width == 0 || height == 0 || iw == 0 || ih == 0 {
        vec![0; width * height * 3]
    } else {
        match (width != iw, height != ih) {
            (false, false) => img.data.clone(),
            (true, false) => pass_h(&img.data, iw, width),
            (false, true) => pass_v(&img.data, iw, &weights(ih, height), 0),
            (true, true) => {
                let shrink_w = iw as i64 - width as i64;
                let shrink_h = ih as i64 - height as i64;
                let vt = weights(ih, height);
                if shrink_h > 0 && shrink_h > 2 * shrink_w {
                    pass_h(&pass_v(&img.data, iw, &vt, 0), iw, width)
                } else {
                    // Horizontal pass over only the rows the vertical pass reads.
                    let first = vt.bounds[0].0;
                    let (lo, n) = vt.bounds[height - 1];
                    let tmp = pass_h(&img.data[first * iw * 3..(lo + n) * iw * 3], iw, width);
                    pass_v(&tmp, width, &vt, first)
                }
            }
        }
    };
    RgbImage {
        width,
        height,
        data,
    }
}

/// torchvision `ToTensor` + `Normalize(CLIP_MEAN, CLIP_STD)`: RGB8 HWC → f32 CHW
/// `[3, height, width]`, computed in f32 as `(v / 255 - mean) / std`.
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// MiniGPT-4's whole eval transform on an encoded image: decode + convert('RGB'), bicubic
/// resize to `size`×`size` (224 for MiniGPT-4, 448 for MiniGPT-v2), normalise. Returns f32 CHW
/// `[3, size, size]`.
pub fn preprocess(bytes: &[u8], what: &str, size: usize) -> Result<Vec<f32>> {
    let img = decode_rgb(bytes, what)?;
    Ok(normalize(&resize_bicubic(&img, size, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [
            (1, 224),
            (7, 224),
            (400, 224),
            (3000, 224),
            (224, 448),
            (2, 2),
        ] {
            let w = weights(i, o);
            for (xx, &(_, n)) in w.bounds.iter().enumerate() {
                let s: i64 = w.k[xx * w.stride..xx * w.stride + n]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    #[test]
    fn same_size_is_a_copy_and_constant_stays_constant() {
        let img = RgbImage::new(5, 4, (0..60).map(|v| v as u8 * 4).collect()).unwrap();
        assert_eq!(resize_bicubic(&img, 5, 4), img);
        let flat = RgbImage::new(9, 13, vec![77; 9 * 13 * 3]).unwrap();
        let r = resize_bicubic(&flat, 224, 224);
        assert!(r.data.iter().all(|&v| v == 77));
        let r = resize_bicubic(&flat, 3, 2);
        assert!(r.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn jpeg_marker_walk() {
        assert!(jpeg_check_complete(&[0xFF, 0xD8, 0xFF, 0xD9]).is_ok());
        assert!(jpeg_check_complete(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xD9]).is_ok());
        assert!(jpeg_check_complete(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 9, 1, 2]).is_err());
        // scan data with a stuffed byte and a restart marker, then EOI
        let scan = [
            0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 1, 0xFF, 0, 2, 0xFF, 0xD0, 3, 0xFF, 0xD9,
        ];
        assert!(jpeg_check_complete(&scan).is_ok());
        assert!(jpeg_check_complete(&scan[..13]).is_err());
    }
}
