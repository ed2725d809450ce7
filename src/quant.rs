//! CPU-side encoding and decoding of the weight formats the kernels read.
//!
//! # Tensor formats (the GPU layout)
//!
//! A weight matrix is stored `[N, K]` (PyTorch `nn.Linear` layout: one output row per `n`, the
//! reduction dimension `K` contiguous). Every format is a flat array of `u32` words, so WGSL
//! reads it as `array<u32>` (or `array<f32>`) on any adapter. Rows may be split across several
//! buffers (see [`crate::gpu::tensor`]); each part is laid out as below, starting at its first row.
//!
//! | dtype | data array | scales array | bits/weight |
//! |-------|------------|--------------|-------------|
//! | `f32` | `N*K` f32 | — | 32 |
//! | `f16` | `N*K` IEEE halves, two per `u32`, element `i` in the low half of word `i/2` when `i` is even | — | 16 |
//! | `q8`  | `N*K` signed bytes, four per `u32`, element `k` of a row in byte `k%4` (little end first) of word `n*K/4 + k/4` | `N*K/32` f16 scales, two per `u32` | 8.5 |
//! | `q4`  | `N*K` 4-bit codes, eight per `u32`, element `k` in bits `4*(k%8)..` of word `n*K/8 + k/8` | `N*K/32` f16 scales, two per `u32` | 4.5 |
//! | `q4m` | as `q4` | `N*K/32` words, each an f16 scale `d` (low half) and an f16 minimum `m` (high half) | 5 |
//!
//! Quantised formats use blocks of 32 consecutive weights along `K` (so `K % 32 == 0`), one f16
//! scale `d` per block, symmetric: `q8`: `w = q · d`, `q ∈ [-127, 127]`; `q4`: `w = (q − 8) · d`,
//! `q ∈ [0, 15]`. The q4 scale is chosen as GGUF's Q4_0 does (the largest-magnitude weight maps
//! to code 0, i.e. `d = w_max / −8`), so GGUF Q4_0 converts to this layout without loss.
//! `q4m` is asymmetric, `w = q · d + m`, `q ∈ [0, 15]`: GGUF Q4_1 (and Q4_K, up to the f16
//! rounding of its sub-block scales) convert to it without requantising.

use half::f16;

use crate::error::{Error, Result};

/// Weights per quantisation block.
pub const QBLOCK: usize = 32;

/// The element formats a tensor can have on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Q8,
    Q4,
    Q4M,
}

impl DType {
    pub const ALL: [DType; 5] = [DType::F32, DType::F16, DType::Q8, DType::Q4, DType::Q4M];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8 => "q8",
            DType::Q4 => "q4",
            DType::Q4M => "q4m",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "q8" => Ok(DType::Q8),
            "q4" => Ok(DType::Q4),
            "q4m" => Ok(DType::Q4M),
            _ => Err(Error::InvalidOption {
                name: "dtype".into(),
                msg: format!("expected one of f32, f16, q8, q4, q4m, found '{s}'"),
            }),
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Q4 | DType::Q4M)
    }

    /// Number of `u32` words of the data array for `n` elements.
    pub fn data_words(self, n: usize) -> usize {
        match self {
            DType::F32 => n,
            DType::F16 => n.div_ceil(2),
            DType::Q8 => n.div_ceil(4),
            DType::Q4 | DType::Q4M => n.div_ceil(8),
        }
    }

    /// Number of `u32` words of the scales array for `n` elements (0 for f32/f16).
    pub fn scale_words(self, n: usize) -> usize {
        match self {
            DType::Q8 | DType::Q4 => n.div_ceil(QBLOCK).div_ceil(2),
            DType::Q4M => n.div_ceil(QBLOCK),
            DType::F32 | DType::F16 => 0,
        }
    }

    /// Bytes on the GPU for `n` elements (data + scales).
    pub fn bytes(self, n: usize) -> usize {
        4 * (self.data_words(n) + self.scale_words(n))
    }

    /// Checks that a `[rows, cols]` matrix can be stored in this format.
    pub fn check_cols(self, name: &str, cols: usize) -> Result<()> {
        if self.is_quantized() && !cols.is_multiple_of(QBLOCK) {
            return Err(Error::tensor(
                name,
                format!("a last dimension divisible by {QBLOCK} for {}", self.name()),
                cols,
            ));
        }
        Ok(())
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DType::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor's contents encoded in the GPU layout, ready for `write_buffer`.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub dtype: DType,
    pub data: Vec<u32>,
    /// Empty for f32 / f16.
    pub scales: Vec<u32>,
}

fn pack_halves(vals: impl ExactSizeIterator<Item = f16>) -> Vec<u32> {
    let mut out = vec![0u32; vals.len().div_ceil(2)];
    for (i, h) in vals.enumerate() {
        out[i / 2] |= (h.to_bits() as u32) << (16 * (i % 2));
    }
    out
}

fn half_at(words: &[u32], i: usize) -> f32 {
    f16::from_bits((words[i / 2] >> (16 * (i % 2))) as u16).to_f32()
}

/// Encodes `x` (row-major, `cols` per row) into `dtype`.
pub fn encode(dtype: DType, x: &[f32], cols: usize) -> Result<Encoded> {
    dtype.check_cols("encode", cols)?;
    let (data, scales) = match dtype {
        DType::F32 => (x.iter().map(|v| v.to_bits()).collect(), vec![]),
        DType::F16 => (pack_halves(x.iter().map(|&v| f16::from_f32(v))), vec![]),
        DType::Q8 => {
            let mut data = vec![0u32; x.len() / 4];
            let mut scales = Vec::with_capacity(x.len() / QBLOCK);
            for (b, block) in x.chunks(QBLOCK).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let df = d.to_f32();
                let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
                for (j, &v) in block.iter().enumerate() {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    let k = b * QBLOCK + j;
                    data[k / 4] |= (q as u8 as u32) << (8 * (k % 4));
                }
                scales.push(d);
            }
            (data, pack_halves(scales.into_iter()))
        }
        DType::Q4 => {
            let mut data = vec![0u32; x.len() / 8];
            let mut scales = Vec::with_capacity(x.len() / QBLOCK);
            for (b, block) in x.chunks(QBLOCK).enumerate() {
                // the weight of largest magnitude, with its sign, maps to code 0 (= -8)
                let wmax = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = f16::from_f32(wmax / -8.0);
                let df = d.to_f32();
                let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
                for (j, &v) in block.iter().enumerate() {
                    let q = ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u32;
                    let k = b * QBLOCK + j;
                    data[k / 8] |= q << (4 * (k % 8));
                }
                scales.push(d);
            }
            (data, pack_halves(scales.into_iter()))
        }
        DType::Q4M => {
            let mut data = vec![0u32; x.len() / 8];
            let mut scales = Vec::with_capacity(x.len() / QBLOCK);
            for (b, block) in x.chunks(QBLOCK).enumerate() {
                let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = f16::from_f32((hi - lo) / 15.0);
                let m = f16::from_f32(lo);
                let (df, mf) = (d.to_f32(), m.to_f32());
                let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
                for (j, &v) in block.iter().enumerate() {
                    let q = ((v - mf) * inv).round().clamp(0.0, 15.0) as u32;
                    let k = b * QBLOCK + j;
                    data[k / 8] |= q << (4 * (k % 8));
                }
                scales.push(d.to_bits() as u32 | (m.to_bits() as u32) << 16);
            }
            (data, scales)
        }
    };
    Ok(Encoded {
        dtype,
        data,
        scales,
    })
}

impl Encoded {
    /// Element `i` (row-major index) decoded to f32, exactly as the kernels decode it.
    pub fn get(&self, i: usize) -> f32 {
        match self.dtype {
            DType::F32 => f32::from_bits(self.data[i]),
            DType::F16 => half_at(&self.data, i),
            DType::Q8 => {
                let q = (self.data[i / 4] >> (8 * (i % 4))) as u8 as i8;
                q as f32 * half_at(&self.scales, i / QBLOCK)
            }
            DType::Q4 => {
                let q = (self.data[i / 8] >> (4 * (i % 8))) & 15;
                (q as f32 - 8.0) * half_at(&self.scales, i / QBLOCK)
            }
            DType::Q4M => {
                let q = (self.data[i / 8] >> (4 * (i % 8))) & 15;
                let b = i / QBLOCK;
                q as f32 * half_at(&self.scales, 2 * b) + half_at(&self.scales, 2 * b + 1)
            }
        }
    }

    /// Decodes `n` elements.
    pub fn decode(&self, n: usize) -> Vec<f32> {
        (0..n).map(|i| self.get(i)).collect()
    }
}

/// Rounds every value through `dtype` (encode then decode): what the GPU will see.
pub fn round_trip(dtype: DType, x: &[f32], cols: usize) -> Result<Vec<f32>> {
    Ok(encode(dtype, x, cols)?.decode(x.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn sizes_match_the_documented_bits_per_weight() {
        let n = 4096 * 32;
        assert_eq!(DType::Q4.bytes(n) * 8, n * 9 / 2);
        assert_eq!(DType::Q8.bytes(n) * 8, n * 17 / 2);
        assert_eq!(DType::F16.bytes(n), n * 2);
    }

    #[test]
    fn round_trip_errors_are_bounded_by_the_block_scale() {
        let x = ramp(64 * 3);
        for dt in DType::ALL {
            let y = round_trip(dt, &x, 64).unwrap();
            for b in 0..x.len() / 32 {
                let amax = x[b * 32..b * 32 + 32]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                let tol = match dt {
                    DType::F32 => 0.0,
                    DType::F16 => amax * 1e-3,
                    DType::Q8 => amax / 127.0 * 0.5 + amax * 1e-3,
                    // Q4_0-style: the side opposite the largest magnitude clips at +7·d
                    DType::Q4 => amax / 8.0 + amax * 1e-3,
                    DType::Q4M => 2.0 * amax / 15.0 * 0.5 + amax * 1e-3,
                };
                for i in b * 32..b * 32 + 32 {
                    assert!((x[i] - y[i]).abs() <= tol, "{dt} {i}: {} vs {}", x[i], y[i]);
                }
            }
        }
    }

    #[test]
    fn q4_uses_the_full_code_range_and_zero_blocks_stay_zero() {
        let mut x = vec![0f32; 64];
        x[3] = -2.0;
        x[40] = 1.5;
        let e = encode(DType::Q4, &x, 64).unwrap();
        assert_eq!(e.get(3), -2.0);
        assert_eq!(e.get(0), 0.0);
        assert_eq!(e.get(33), 0.0);
        assert!((e.get(40) - 1.5).abs() < 1e-3);
    }

    #[test]
    fn quantized_formats_reject_unaligned_rows() {
        let err = encode(DType::Q4, &[0.0; 20], 20).unwrap_err().to_string();
        assert!(err.contains("divisible by 32"), "{err}");
    }
}
