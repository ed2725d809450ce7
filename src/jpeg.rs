//! A JPEG decoder whose RGB output equals Pillow's `Image.open(f).convert('RGB')`, i.e.
//! libjpeg-turbo's default decompression followed by Pillow's mode conversion, bit for bit.
//!
//! Supported: baseline and extended sequential Huffman (SOF0, SOF1) and progressive Huffman
//! (SOF2, spectral selection and successive approximation), restart intervals, 8-bit samples,
//! 1 component (grey), 3 (YCbCr or RGB) and 4 (CMYK or YCCK, as Adobe/Photoshop writes them),
//! sampling factors 1..4 whose ratios are whole numbers, one or several scans. Arithmetic
//! coding, lossless, hierarchical and 12-bit JPEGs are refused with an error that says so.
//!
//! What makes the output identical to libjpeg-turbo's (the defaults Pillow leaves alone):
//!
//! * Coefficients are decoded into 8×8 blocks and dequantised with the quantisation table the
//!   component had when its first scan started. The inverse DCT is the accurate integer one
//!   (`JDCT_ISLOW`): the Loeffler–Ligtenberg–Moschytz factorisation with 13-bit constants, a
//!   column pass keeping 2 extra fraction bits, a row pass, round-half-up descaling and a clamp
//!   to 0..=255 after adding 128.
//! * Chroma is upsampled "fancily": a 2:1 ratio interpolates 3/4 of the nearer sample plus 1/4
//!   of the farther one (with libjpeg's alternating rounding biases), a 2:1 ratio both ways
//!   does this vertically then horizontally in one fixed-point step, and edges repeat the last
//!   real sample of the component. Ratios other than 2, and 2:1 horizontal ratios on components
//!   at most 2 samples wide, replicate samples (libjpeg's plain upsamplers).
//! * YCbCr → RGB uses libjpeg's 16-bit fixed-point factors (1.402, 0.34414, 0.71414, 1.772)
//!   rounded the way its lookup tables are. YCCK → CMYK uses the same factors; CMYK goes
//!   through Pillow's `CMYK;I` unpacking (Adobe's inverted CMYK) and its CMYK → RGB rule.
//! * The colour space of 3- and 4-component files is chosen as libjpeg does: a JFIF marker
//!   means YCbCr, else an Adobe marker's transform flag decides, else component ids 'R','G','B'
//!   mean RGB; 4 components are CMYK unless an Adobe marker says YCCK.
//! * In sequential files, Huffman tables 0 and 1 not defined by the time of the first scan
//!   are the standard ones (ITU T.81 Annex K), which libjpeg-turbo assumes for Motion-JPEG
//!   frames (it does not for progressive files, and neither does this decoder).
//!
//! EXIF orientation is not applied (`Image.open` does not apply it either).
//!
//! Not reproduced: libjpeg's inter-block smoothing of *incomplete* progressive images. When
//! the scans of a progressive file leave any of the first AC coefficients of a component
//! unsent or not refined down to their last bit (a DC-only file, a scan script stopped
//! early), libjpeg estimates them from neighbouring DC values; this decoder leaves them as
//! sent, so such files differ (by up to ~90 levels on a synthetic DC-only file). Encoders
//! write complete scan scripts, for which libjpeg does no smoothing and the output is exact.
//!
//! Robustness: headers declaring images over [`MAX_SIDE`] a side, [`MAX_PIXELS`] pixels or
//! [`MAX_DECODE_BYTES`] of samples are refused before anything is allocated; every length is checked. Where libjpeg
//! warns about corrupt data and carries on (entropy-coded data that runs out before its scan is
//! complete, an invalid Huffman code, a missing or out-of-order restart marker), this decoder
//! returns an error. Work is bounded: every block visit reads data, except inside progressive
//! end-of-band runs, which are skipped in bulk, and a file may have at most [`MAX_SCANS`]
//! scans.

use crate::error::{Error, Result};
use crate::image::{MAX_DECODE_BYTES, MAX_PIXELS, MAX_SIDE};

type Res<T> = std::result::Result<T, String>;

/// Most scans accepted in one file. A progressive file as encoders write it has about ten; a
/// file with hundreds of nearly empty scans, each walking over every block, is an attack.
pub const MAX_SCANS: usize = 500;

/// Decodes a JPEG file to RGB8 exactly as Pillow's `Image.open(..).convert('RGB')` does.
/// Returns `(width, height, pixels)` with `width * height * 3` bytes, rows top to bottom.
/// `shown` names the file in errors.
pub fn decode(bytes: &[u8], shown: &str) -> Result<(u32, u32, Vec<u8>)> {
    decode_jpeg(bytes).map_err(|detail| Error::format(shown, detail))
}

// ---------------------------------------------------------------------------------------------
// Tables

/// `ZIGZAG[k]` is the row-major position (row·8 + column) of the k-th coefficient in the order
/// a JPEG stream stores them: the anti-diagonals of the 8×8 block, walked alternately up-right
/// and down-left, starting at the DC term.
const ZIGZAG: [u8; 64] = zigzag_order();

const fn zigzag_order() -> [u8; 64] {
    let mut out = [0u8; 64];
    let mut k = 0;
    let mut diag = 0;
    while diag < 15 {
        let first_row = if diag > 7 { diag - 7 } else { 0 };
        let last_row = if diag < 7 { diag } else { 7 };
        let mut i = 0;
        while i <= last_row - first_row {
            // Even diagonals run from bottom-left to top-right, odd ones the other way.
            let row = if diag % 2 == 0 {
                last_row - i
            } else {
                first_row + i
            };
            out[k] = (row * 8 + diag - row) as u8;
            k += 1;
            i += 1;
        }
        diag += 1;
    }
    out
}

/// Standard Huffman tables, ITU T.81 Annex K.3 (Tables K.3 to K.6): for each, the number of
/// codes of each length 1..=16, then the symbols in code order.
const STD_DC_LUMA: ([u8; 16], &[u8]) = (
    [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
);
const STD_DC_CHROMA: ([u8; 16], &[u8]) = (
    [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
);
const STD_AC_LUMA: ([u8; 16], &[u8]) = (
    [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125],
    &[
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
        0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
        0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
        0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
        0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
        0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ],
);
const STD_AC_CHROMA: ([u8; 16], &[u8]) = (
    [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119],
    &[
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18,
        0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44,
        0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63,
        0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4,
        0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
        0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ],
);

/// Codes up to this many bits long are decoded with one table lookup.
const FAST_BITS: u32 = 9;

/// A Huffman code table ready for decoding (canonical codes, ITU T.81 Annex C / F.2.2.3).
#[derive(Clone)]
struct Huffman {
    /// Indexed by the next [`FAST_BITS`] bits: `length << 8 | symbol` for codes at most that
    /// long, 0 when the code is longer (or invalid).
    fast: Vec<u16>,
    /// `max_code[len]`: the largest code of that length, −1 when there is none.
    max_code: [i32; 17],
    /// `offset[len]`: added to a code of that length gives its index in `symbols`.
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    /// Builds a table from the per-length code counts and the symbols. `dc`: a DC table, whose
    /// symbols (magnitude categories) must be at most 15.
    fn new(counts: &[u8; 16], symbols: &[u8], dc: bool) -> Res<Huffman> {
        let bad = |why: &str| Err(format!("JPEG has an invalid Huffman table ({why})"));
        let total: usize = counts.iter().map(|&n| n as usize).sum();
        if total > 256 || total != symbols.len() {
            return bad("more than 256 codes");
        }
        if dc && symbols.iter().any(|&s| s > 15) {
            return bad("a DC symbol over 15");
        }
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut fast = vec![0u16; 1 << FAST_BITS];
        let mut code: i32 = 0;
        let mut index: i32 = 0;
        let longest = counts.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
        for len in 1..=longest {
            let n = counts[len - 1] as i32;
            // The codes of this length must fit in `len` bits without using the code of all
            // 1 bits: the next free code after them must stay below 2^len.
            if code + n >= 1 << len {
                return bad("its code lengths overflow");
            }
            offset[len] = index - code;
            for _ in 0..n {
                if len as u32 <= FAST_BITS {
                    let shift = FAST_BITS - len as u32;
                    let first = (code as usize) << shift;
                    let entry = (len as u16) << 8 | symbols[index as usize] as u16;
                    fast[first..first + (1 << shift)].fill(entry);
                }
                code += 1;
                index += 1;
            }
            if n > 0 {
                max_code[len] = code - 1;
            }
            code <<= 1;
        }
        Ok(Huffman {
            fast,
            max_code,
            offset,
            symbols: symbols.to_vec(),
        })
    }

    fn standard((counts, symbols): ([u8; 16], &[u8]), dc: bool) -> Huffman {
        Huffman::new(&counts, symbols, dc).expect("standard Huffman tables are valid")
    }
}

// ---------------------------------------------------------------------------------------------
// Bit reader over entropy-coded data

/// Reads the entropy-coded bits of a scan: undoes byte stuffing (FF 00 → FF) and stops at the
/// first marker. Past it, zero bits are supplied, counted, and reported by [`Bits::overrun`]
/// once any of them has been consumed.
struct Bits<'a> {
    data: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// Unconsumed bits, most significant first.
    acc: u64,
    /// How many bits of `acc` are valid.
    n: u32,
    /// How many of the last bits in `acc` are padding past the end of the data.
    fake: u32,
    /// Where the marker that ended the data starts (its last FF byte), once reached.
    marker: Option<usize>,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits {
            data,
            pos,
            acc: 0,
            n: 0,
            fake: 0,
            marker: None,
        }
    }

    /// The next data byte, or `None` at a marker or at the end of the file.
    fn next_byte(&mut self) -> Option<u8> {
        if self.marker.is_some() {
            return None;
        }
        let &b = self.data.get(self.pos)?;
        if b != 0xFF {
            self.pos += 1;
            return Some(b);
        }
        // FF: fill bytes (more FFs) may precede a stuffed zero or a marker code.
        let mut j = self.pos + 1;
        while self.data.get(j) == Some(&0xFF) {
            j += 1;
        }
        match self.data.get(j) {
            Some(0) => {
                self.pos = j + 1;
                Some(0xFF)
            }
            Some(_) => {
                self.marker = Some(j - 1);
                None
            }
            None => {
                self.pos = j;
                None
            }
        }
    }

    /// Tops the buffer up to more than 56 bits.
    fn refill(&mut self) {
        while self.n <= 56 {
            let b = match self.next_byte() {
                Some(b) => b,
                None => {
                    self.fake += 8;
                    0
                }
            };
            self.acc |= (b as u64) << (56 - self.n);
            self.n += 8;
        }
    }

    #[inline]
    fn consume(&mut self, k: u32) {
        self.acc <<= k;
        self.n -= k;
    }

    /// True once bits past the end of the entropy-coded data have been consumed.
    fn overrun(&self) -> bool {
        self.fake > self.n
    }

    #[inline]
    fn bit(&mut self) -> bool {
        if self.n == 0 {
            self.refill();
        }
        let b = self.acc >> 63 != 0;
        self.consume(1);
        b
    }

    /// `k` (≤ 16) raw bits as an unsigned number.
    #[inline]
    fn bits(&mut self, k: u32) -> u32 {
        if k == 0 {
            return 0;
        }
        if self.n < k {
            self.refill();
        }
        let v = (self.acc >> (64 - k)) as u32;
        self.consume(k);
        v
    }

    /// `k` (≤ 16) bits read as a signed magnitude of category `k` (ITU T.81 F.2.2.1 EXTEND).
    #[inline]
    fn signed(&mut self, k: u32) -> i32 {
        let v = self.bits(k) as i32;
        if k > 0 && v < 1 << (k - 1) {
            v - (1 << k) + 1
        } else {
            v
        }
    }

    #[inline]
    fn decode(&mut self, h: &Huffman) -> Res<u8> {
        if self.n < 16 {
            self.refill();
        }
        let e = h.fast[(self.acc >> (64 - FAST_BITS)) as usize];
        if e != 0 {
            self.consume((e >> 8) as u32);
            return Ok(e as u8);
        }
        let next16 = (self.acc >> 48) as i32;
        for len in FAST_BITS as usize + 1..=16 {
            let code = next16 >> (16 - len);
            if code <= h.max_code[len] {
                self.consume(len as u32);
                return Ok(h.symbols[(code + h.offset[len]) as usize]);
            }
        }
        if self.fake + 16 > self.n {
            return Err(data_ends());
        }
        Err("JPEG entropy-coded data is corrupt (a bit sequence that is no Huffman code)".into())
    }

    /// Where parsing continues after the scan: the marker that ended its data, or the first
    /// byte not read.
    fn resume_at(&self) -> usize {
        self.marker.unwrap_or(self.pos)
    }

    /// Ends a restart interval: drops the buffered bits (the rest of a padded byte), checks
    /// that the next marker is RST`expect` and continues after it.
    fn restart(&mut self, expect: u8) -> Res<()> {
        let at = match self.marker {
            Some(m) => m,
            None => find_marker(self.data, self.pos)?.1 - 2,
        };
        let code = self.data[at + 1];
        if code != 0xD0 + expect {
            return Err(format!(
                "JPEG restart marker RST{expect} is missing (found marker 0xFF{code:02X} at \
                 byte {at})"
            ));
        }
        *self = Bits::new(self.data, at + 2);
        Ok(())
    }
}

fn data_ends() -> String {
    "JPEG entropy-coded data ends before its scan is complete (corrupt or truncated file)".into()
}

fn truncated(len: usize) -> String {
    format!("JPEG file is truncated: {len} bytes, no end-of-image marker")
}

/// Finds the next marker at or after `pos`, skipping stray bytes and FF fill bytes as libjpeg
/// does. Returns the marker code and the position after it.
fn find_marker(data: &[u8], mut pos: usize) -> Res<(u8, usize)> {
    loop {
        while data.get(pos).is_some_and(|&b| b != 0xFF) {
            pos += 1;
        }
        while data.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        match data.get(pos) {
            None => return Err(truncated(data.len())),
            Some(0) => pos += 1, // a stuffed FF 00 outside a scan: stray data
            Some(&code) => return Ok((code, pos + 1)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inverse DCT (accurate integer, libjpeg's JDCT_ISLOW)

/// A constant in the 13-bit fixed point of the IDCT (`round(x · 2^13)`).
const fn fix13(x: f64) -> i64 {
    (x * 8192.0 + 0.5) as i64
}

/// One 8-point inverse DCT, without the final descaling: outputs are scaled by 2^13.
#[inline(always)]
fn idct8(x: [i64; 8]) -> [i64; 8] {
    // Even part: inputs 0, 2, 4, 6.
    let rot = (x[2] + x[6]) * fix13(0.541196100);
    let e2 = rot - x[6] * fix13(1.847759065);
    let e3 = rot + x[2] * fix13(0.765366865);
    let s = (x[0] + x[4]) << 13;
    let d = (x[0] - x[4]) << 13;
    let (a0, a3, a1, a2) = (s + e3, s - e3, d + e2, d - e2);
    // Odd part: inputs 7, 5, 3, 1.
    let (p7, p5, p3, p1) = (x[7], x[5], x[3], x[1]);
    let common = (p7 + p3 + p5 + p1) * fix13(1.175875602);
    let z71 = -(p7 + p1) * fix13(0.899976223);
    let z53 = -(p5 + p3) * fix13(2.562915447);
    let z73 = -(p7 + p3) * fix13(1.961570560) + common;
    let z51 = -(p5 + p1) * fix13(0.390180644) + common;
    let b7 = p7 * fix13(0.298631336) + z71 + z73;
    let b5 = p5 * fix13(2.053119869) + z53 + z51;
    let b3 = p3 * fix13(3.072711026) + z53 + z73;
    let b1 = p1 * fix13(1.501321110) + z71 + z51;
    [
        a0 + b1,
        a1 + b3,
        a2 + b5,
        a3 + b7,
        a3 - b7,
        a2 - b5,
        a1 - b3,
        a0 - b1,
    ]
}

#[inline(always)]
fn descale(x: i64, bits: u32) -> i64 {
    (x + (1 << (bits - 1))) >> bits
}

/// Dequantises and inverse-transforms one block (coefficients and table in row-major order)
/// into 8 rows of 8 samples at `out[0..]`, `stride` bytes apart.
///
/// Columns first, keeping 2 extra fraction bits, then rows; descaling rounds half up. The
/// dequantised coefficients and the intermediate values are held in 16 bits, and the result is
/// clamped, which is what libjpeg-turbo's SIMD code (the code Pillow's wheels run) does; valid
/// files never come near those limits, where its portable C code agrees.
fn idct_block(coef: &[i16], q: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i64; 64];
    for c in 0..8 {
        let x: [i64; 8] =
            std::array::from_fn(|r| (coef[r * 8 + c] as i32 * q[r * 8 + c] as i32) as i16 as i64);
        if x[1..].iter().all(|&v| v == 0) {
            let dc = (x[0] << 2).clamp(-32768, 32767);
            for r in 0..8 {
                ws[r * 8 + c] = dc;
            }
            continue;
        }
        let y = idct8(x);
        for r in 0..8 {
            ws[r * 8 + c] = descale(y[r], 11).clamp(-32768, 32767);
        }
    }
    for r in 0..8 {
        let x: [i64; 8] = ws[r * 8..r * 8 + 8].try_into().unwrap();
        let row = &mut out[r * stride..r * stride + 8];
        if x[1..].iter().all(|&v| v == 0) {
            row.fill((descale(x[0], 5) + 128).clamp(0, 255) as u8);
            continue;
        }
        let y = idct8(x);
        for (o, v) in row.iter_mut().zip(y) {
            *o = (descale(v, 18) + 128).clamp(0, 255) as u8;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame, scans and coefficient decoding

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ColorSpace {
    Gray,
    YCbCr,
    Rgb,
    Cmyk,
    Ycck,
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    /// Quantisation table selector.
    tq: usize,
    /// The table in row-major order, latched when the component's first scan starts.
    q: Option<[u16; 64]>,
    /// Size in samples (before upsampling).
    dw: usize,
    dh: usize,
    /// Size of the sample buffer in blocks (whole MCUs).
    bw: usize,
    bh: usize,
    /// Samples, `bw·8` a row (filled after the last scan, or block by block when the image
    /// is a single sequential scan).
    plane: Vec<u8>,
    /// Coefficients, 64 per block in row-major order, for images with several scans.
    coefs: Vec<i16>,
    /// Progressive images: per block, bit k set when the k-th coefficient in stream (zigzag)
    /// order is nonzero (k ≥ 1), so that refinement can skip the zero ones.
    nonzero: Vec<u64>,
    /// DC predictor.
    pred: i32,
}

/// What a scan contributes to each block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

struct Tables {
    q: [Option<[u16; 64]>; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
}

struct Frame {
    progressive: bool,
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
    comps: Vec<Component>,
    color: ColorSpace,
    scans: usize,
    /// Set by the first scan: it holds every component of a sequential image, whose blocks
    /// are then transformed as they are decoded.
    direct: bool,
}

/// Huffman table `i` of a scan, which must have been defined.
fn table<'t>(tabs: &'t [Option<Huffman>; 4], i: usize, kind: &str) -> Res<&'t Huffman> {
    tabs.get(i)
        .and_then(|x| x.as_ref())
        .ok_or_else(|| format!("JPEG scan uses {kind} Huffman table {i}, which is not defined"))
}

fn be16(b: &[u8]) -> usize {
    u16::from_be_bytes([b[0], b[1]]) as usize
}

fn decode_jpeg(data: &[u8]) -> Res<(u32, u32, Vec<u8>)> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG file (no start-of-image marker)".into());
    }
    let mut t = Tables {
        q: [None; 4],
        dc: Default::default(),
        ac: Default::default(),
        restart_interval: 0,
        jfif: false,
        adobe_transform: None,
    };
    let mut frame: Option<Frame> = None;
    let mut pos = 2;
    loop {
        let (code, at) = find_marker(data, pos)?;
        match code {
            0xD9 => break,
            0xD8 => return Err("JPEG has a second start-of-image marker".into()),
            // Restart markers outside scans and TEM have no payload; libjpeg ignores them.
            0x01 | 0xD0..=0xD7 => {
                pos = at;
                continue;
            }
            _ => {}
        }
        let Some(len) = data.get(at..at + 2).map(be16) else {
            return Err(truncated(data.len()));
        };
        if len < 2 {
            return Err(format!(
                "JPEG marker 0xFF{code:02X} has an invalid length {len}"
            ));
        }
        let Some(seg) = data.get(at + 2..at + len) else {
            return Err(truncated(data.len()));
        };
        pos = at + len;
        match code {
            0xC0..=0xC2 => {
                if frame.is_some() {
                    return Err("JPEG has more than one frame header (SOF marker)".into());
                }
                frame = Some(Frame::parse(seg, code == 0xC2)?);
            }
            0xC3 => return Err("lossless JPEG (SOF3) is not supported".into()),
            0xC5..=0xC7 | 0xDE | 0xDF => {
                return Err(format!(
                    "hierarchical JPEG (marker 0xFF{code:02X}) is not supported"
                ))
            }
            // SOF9..11 and SOF13..15, and DAC (0xCC) between them.
            0xC9..=0xCF => {
                return Err(format!(
                    "arithmetic-coded JPEG (marker 0xFF{code:02X}) is not supported (Huffman \
                     coding only)"
                ))
            }
            0xC4 => t.read_dht(seg)?,
            0xDB => t.read_dqt(seg)?,
            0xDD => {
                if seg.len() != 2 {
                    return Err("JPEG restart interval (DRI) segment has a wrong length".into());
                }
                t.restart_interval = be16(seg);
            }
            0xDA => {
                let f = frame
                    .as_mut()
                    .ok_or("JPEG scan (SOS) comes before the frame header (SOF)")?;
                pos = f.decode_scan(seg, data, pos, &mut t)?;
            }
            0xE0 => t.jfif |= seg.len() >= 14 && seg.starts_with(b"JFIF\0"),
            0xEE => {
                if seg.len() >= 12 && seg.starts_with(b"Adobe") {
                    t.adobe_transform = Some(seg[11]);
                }
            }
            // Other application segments, comments and DNL (ignored by libjpeg too).
            0xE1..=0xEF | 0xFE | 0xDC => {}
            _ => {
                return Err(format!(
                    "JPEG has an unknown or misplaced marker 0xFF{code:02X} at byte {}",
                    at - 2
                ))
            }
        }
    }
    let frame = frame.ok_or("JPEG has no frame header (SOF marker) before its end")?;
    if frame.scans == 0 {
        return Err("JPEG has no image data (no scan before the end-of-image marker)".into());
    }
    frame.finish()
}

impl Tables {
    fn read_dqt(&mut self, mut s: &[u8]) -> Res<()> {
        while !s.is_empty() {
            let (pq, tq) = ((s[0] >> 4) as usize, (s[0] & 15) as usize);
            if pq > 1 || tq > 3 {
                return Err(format!(
                    "JPEG quantisation table segment is invalid (precision {pq}, id {tq})"
                ));
            }
            let size = 64 << pq;
            let body = s
                .get(1..1 + size)
                .ok_or("JPEG quantisation table segment is too short")?;
            let mut q = [0u16; 64];
            for (k, &z) in ZIGZAG.iter().enumerate() {
                q[z as usize] = if pq == 0 {
                    body[k] as u16
                } else {
                    u16::from_be_bytes([body[2 * k], body[2 * k + 1]])
                };
            }
            self.q[tq] = Some(q);
            s = &s[1 + size..];
        }
        Ok(())
    }

    fn read_dht(&mut self, mut s: &[u8]) -> Res<()> {
        while !s.is_empty() {
            let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
            if class > 1 || id > 3 {
                return Err(format!(
                    "JPEG Huffman table segment is invalid (class {class}, id {id})"
                ));
            }
            let counts: [u8; 16] = s
                .get(1..17)
                .ok_or("JPEG Huffman table segment is too short")?
                .try_into()
                .unwrap();
            let n: usize = counts.iter().map(|&c| c as usize).sum();
            let symbols = s
                .get(17..17 + n)
                .ok_or("JPEG Huffman table segment is too short")?;
            let table = Huffman::new(&counts, symbols, class == 0)?;
            if class == 0 {
                self.dc[id] = Some(table);
            } else {
                self.ac[id] = Some(table);
            }
            s = &s[17 + n..];
        }
        Ok(())
    }
}

impl Frame {
    fn parse(s: &[u8], progressive: bool) -> Res<Frame> {
        if s.len() < 6 {
            return Err("JPEG frame header (SOF) is too short".into());
        }
        let (precision, height, width, n) = (s[0], be16(&s[1..]), be16(&s[3..]), s[5] as usize);
        if width > MAX_SIDE as usize || height > MAX_SIDE as usize {
            return Err(format!(
                "JPEG header declares a {width}x{height} image, over the \
                 {MAX_SIDE}x{MAX_SIDE} pixel limit (refusing to decode: corrupt file or \
                 decompression bomb)"
            ));
        }
        if width == 0 || height == 0 {
            return Err(format!(
                "JPEG header declares an empty {width}x{height} image"
            ));
        }
        let pixels = width as u64 * height as u64;
        if pixels > MAX_PIXELS {
            return Err(format!(
                "JPEG header declares a {width}x{height} image ({pixels} pixels), over the \
                 {MAX_PIXELS}-pixel limit (refusing to decode: corrupt file or decompression \
                 bomb)"
            ));
        }
        if precision != 8 {
            return Err(format!(
                "{precision}-bit JPEG is not supported (only 8-bit samples are)"
            ));
        }
        if !matches!(n, 1 | 3 | 4) {
            return Err(format!(
                "JPEG with {n} components is not supported (1: grey, 3: YCbCr or RGB, 4: CMYK \
                 or YCCK)"
            ));
        }
        if s.len() != 6 + 3 * n {
            return Err("JPEG frame header (SOF) has the wrong length".into());
        }
        let total = width as u64 * height as u64 * n as u64;
        if total > MAX_DECODE_BYTES {
            return Err(format!(
                "JPEG image is {width}x{height} with {n} components: decoding needs {total} \
                 bytes, over the {MAX_DECODE_BYTES}-byte limit"
            ));
        }
        let mut comps = Vec::with_capacity(n);
        for c in s[6..].chunks_exact(3) {
            let (h, v, tq) = ((c[1] >> 4) as usize, (c[1] & 15) as usize, c[2] as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(format!(
                    "JPEG component {} has invalid sampling factors {h}x{v}",
                    c[0]
                ));
            }
            if tq > 3 {
                return Err(format!(
                    "JPEG component {} uses quantisation table {tq} (0 to 3 exist)",
                    c[0]
                ));
            }
            comps.push(Component {
                id: c[0],
                h,
                v,
                tq,
                q: None,
                dw: 0,
                dh: 0,
                bw: 0,
                bh: 0,
                plane: Vec::new(),
                coefs: Vec::new(),
                nonzero: Vec::new(),
                pred: 0,
            });
        }
        let hmax = comps.iter().map(|c| c.h).max().unwrap();
        let vmax = comps.iter().map(|c| c.v).max().unwrap();
        let mcux = width.div_ceil(8 * hmax);
        let mcuy = height.div_ceil(8 * vmax);
        for c in &mut comps {
            if hmax % c.h != 0 || vmax % c.v != 0 {
                return Err(format!(
                    "JPEG sampling factors {}x{} of component {} are not a whole fraction of \
                     {hmax}x{vmax} (not supported, nor by libjpeg)",
                    c.h, c.v, c.id
                ));
            }
            c.dw = (width * c.h).div_ceil(hmax);
            c.dh = (height * c.v).div_ceil(vmax);
            c.bw = mcux * c.h;
            c.bh = mcuy * c.v;
        }
        Ok(Frame {
            progressive,
            width,
            height,
            hmax,
            vmax,
            mcux,
            mcuy,
            comps,
            color: ColorSpace::Gray,
            scans: 0,
            direct: false,
        })
    }

    /// libjpeg's choice of the colour space the samples are in.
    fn color_space(&self, t: &Tables) -> ColorSpace {
        let ids: Vec<u8> = self.comps.iter().map(|c| c.id).collect();
        match ids.len() {
            1 => ColorSpace::Gray,
            3 => {
                if t.jfif {
                    ColorSpace::YCbCr
                } else if let Some(transform) = t.adobe_transform {
                    if transform == 0 {
                        ColorSpace::Rgb
                    } else {
                        ColorSpace::YCbCr
                    }
                } else if ids == b"RGB" {
                    ColorSpace::Rgb
                } else {
                    ColorSpace::YCbCr
                }
            }
            _ => match t.adobe_transform {
                Some(0) | None => ColorSpace::Cmyk,
                Some(_) => ColorSpace::Ycck,
            },
        }
    }

    /// Reads a scan header (`s`) and decodes the entropy-coded data that follows it at
    /// `start`. Returns where marker parsing resumes.
    fn decode_scan(&mut self, s: &[u8], data: &[u8], start: usize, t: &mut Tables) -> Res<usize> {
        self.scans += 1;
        if self.scans > MAX_SCANS {
            return Err(format!(
                "JPEG has more than {MAX_SCANS} scans (refusing: corrupt file or an attempt \
                 to make decoding slow)"
            ));
        }
        let ns = *s.first().ok_or("JPEG scan header (SOS) is empty")? as usize;
        if !(1..=4).contains(&ns) || s.len() != 4 + 2 * ns {
            return Err(format!(
                "JPEG scan header (SOS) is invalid ({ns} components in {} bytes)",
                s.len()
            ));
        }
        let mut members: Vec<(usize, usize, usize)> = Vec::with_capacity(ns);
        for m in s[1..1 + 2 * ns].chunks_exact(2) {
            let ci = (0..self.comps.len())
                .find(|&i| self.comps[i].id == m[0] && !members.iter().any(|x| x.0 == i))
                .ok_or_else(|| {
                    format!(
                        "JPEG scan refers to component {}, which is not in the frame",
                        m[0]
                    )
                })?;
            members.push((ci, (m[1] >> 4) as usize, (m[1] & 15) as usize));
        }
        let (ss, se, ah, al) = (
            s[1 + 2 * ns] as usize,
            s[2 + 2 * ns] as usize,
            (s[3 + 2 * ns] >> 4) as u32,
            (s[3 + 2 * ns] & 15) as u32,
        );

        if self.scans == 1 {
            // What libjpeg settles when it starts decompressing: colour space, default
            // Huffman tables (sequential only), buffering.
            self.color = self.color_space(t);
            let defaults = [(STD_DC_LUMA, STD_AC_LUMA), (STD_DC_CHROMA, STD_AC_CHROMA)];
            let defaults = if self.progressive {
                &defaults[..0]
            } else {
                &defaults[..]
            };
            for (i, &(dc, ac)) in defaults.iter().enumerate() {
                if t.dc[i].is_none() {
                    t.dc[i] = Some(Huffman::standard(dc, true));
                }
                if t.ac[i].is_none() {
                    t.ac[i] = Some(Huffman::standard(ac, false));
                }
            }
            self.direct = !self.progressive && ns == self.comps.len();
            for c in &mut self.comps {
                let blocks = c.bw * c.bh;
                if self.direct {
                    c.plane = vec![0; blocks * 64];
                } else {
                    c.coefs = vec![0; blocks * 64];
                }
                if self.progressive {
                    c.nonzero = vec![0; blocks];
                }
            }
        } else if self.direct {
            return Err(
                "JPEG has another scan after a sequential scan that held every component".into(),
            );
        }
        if ns > 1 {
            let blocks: usize = members
                .iter()
                .map(|&(ci, ..)| self.comps[ci].h * self.comps[ci].v)
                .sum();
            if blocks > 10 {
                return Err(format!(
                    "JPEG sampling factors are too large for an interleaved scan ({blocks} blocks \
                     per MCU, at most 10 allowed)"
                ));
            }
        }

        let pass = if !self.progressive {
            Pass::Sequential
        } else {
            // DC scans cover only coefficient 0; AC scans one band of one component; a
            // refinement adds exactly one bit.
            let band_ok = if ss == 0 {
                se == 0
            } else {
                ss <= se && se <= 63 && ns == 1
            };
            let bits_ok = (ah == 0 || al + 1 == ah) && al <= 13;
            if !(band_ok && bits_ok) {
                return Err(format!(
                    "JPEG progressive scan has invalid parameters (Ss={ss} Se={se} Ah={ah} \
                     Al={al}, {ns} components)"
                ));
            }
            match (ss == 0, ah == 0) {
                (true, true) => Pass::DcFirst,
                (true, false) => Pass::DcRefine,
                (false, true) => Pass::AcFirst,
                (false, false) => Pass::AcRefine,
            }
        };

        let mut dcs = Vec::with_capacity(ns);
        let mut acs = Vec::with_capacity(ns);
        for &(ci, td, ta) in &members {
            let c = &mut self.comps[ci];
            if c.q.is_none() {
                c.q = Some(t.q[c.tq].ok_or_else(|| {
                    format!(
                        "JPEG component {} uses quantisation table {}, which is not defined",
                        c.id, c.tq
                    )
                })?);
            }
            c.pred = 0;
            let need_dc = matches!(pass, Pass::Sequential | Pass::DcFirst);
            let need_ac = matches!(pass, Pass::Sequential | Pass::AcFirst | Pass::AcRefine);
            dcs.push(if need_dc {
                Some(table(&t.dc, td, "DC")?)
            } else {
                None
            });
            acs.push(if need_ac {
                Some(table(&t.ac, ta, "AC")?)
            } else {
                None
            });
        }

        let mut bits = Bits::new(data, start);
        let mut eobrun: u32 = 0;
        let (mx, my) = if ns == 1 {
            let c = &self.comps[members[0].0];
            (c.dw.div_ceil(8), c.dh.div_ceil(8))
        } else {
            (self.mcux, self.mcuy)
        };
        let ri = t.restart_interval;
        let mut next_rst = 0u8;
        let mut block = [0i16; 64];
        let total = mx * my;
        let mut m = 0;
        while m < total {
            if ri > 0 && m > 0 && m.is_multiple_of(ri) {
                bits.restart(next_rst)?;
                next_rst = (next_rst + 1) & 7;
                eobrun = 0;
                for &(ci, ..) in &members {
                    self.comps[ci].pred = 0;
                }
            }
            if pass == Pass::AcFirst && eobrun > 0 {
                // Blocks inside an end-of-band run get nothing: skip the run in one step (up
                // to the next restart marker), so a tiny run code cannot cost a block visit
                // each.
                let mut skip = (eobrun as usize).min(total - m);
                if ri > 0 {
                    skip = skip.min(ri - m % ri);
                }
                eobrun -= skip as u32;
                m += skip;
                continue;
            }
            if pass == Pass::AcRefine && eobrun > 0 {
                // The same for refinement, over the blocks of the run that have no nonzero
                // coefficient in the band (and so no correction bits to read).
                let c = &self.comps[members[0].0];
                let band = (!0u64 << ss) & (!0u64 >> (63 - se));
                let end = if ri > 0 {
                    total.min(m - m % ri + ri)
                } else {
                    total
                };
                let start = m;
                let (mut bx, mut by) = (m % mx, m / mx);
                while m < end && eobrun > 0 && c.nonzero[by * c.bw + bx] & band == 0 {
                    eobrun -= 1;
                    m += 1;
                    bx += 1;
                    if bx == mx {
                        (bx, by) = (0, by + 1);
                    }
                }
                if m > start {
                    continue;
                }
            }
            let (mcu_x, mcu_y) = (m % mx, m / mx);
            for (i, &(ci, ..)) in members.iter().enumerate() {
                let c = &mut self.comps[ci];
                let (bh, bv) = if ns == 1 { (1, 1) } else { (c.h, c.v) };
                for v in 0..bv {
                    for h in 0..bh {
                        let (bx, by) = (mcu_x * bh + h, mcu_y * bv + v);
                        let idx = by * c.bw + bx;
                        match pass {
                            Pass::Sequential => {
                                block.fill(0);
                                sequential_block(
                                    &mut bits,
                                    dcs[i].unwrap(),
                                    acs[i].unwrap(),
                                    &mut c.pred,
                                    &mut block,
                                )?;
                                if self.direct {
                                    let stride = c.bw * 8;
                                    let at = by * 8 * stride + bx * 8;
                                    idct_block(
                                        &block,
                                        c.q.as_ref().unwrap(),
                                        &mut c.plane[at..],
                                        stride,
                                    );
                                } else {
                                    c.coefs[idx * 64..idx * 64 + 64].copy_from_slice(&block);
                                }
                            }
                            Pass::DcFirst => {
                                let k = bits.decode(dcs[i].unwrap())? as u32;
                                c.pred = c.pred.wrapping_add(bits.signed(k));
                                c.coefs[idx * 64] = c.pred.wrapping_shl(al) as i16;
                            }
                            Pass::DcRefine => {
                                if bits.bit() {
                                    c.coefs[idx * 64] |= 1 << al;
                                }
                            }
                            Pass::AcFirst => ac_first(
                                &mut bits,
                                acs[i].unwrap(),
                                &mut eobrun,
                                (ss, se, al),
                                &mut c.coefs[idx * 64..idx * 64 + 64],
                                &mut c.nonzero[idx],
                            )?,
                            Pass::AcRefine => ac_refine(
                                &mut bits,
                                acs[i].unwrap(),
                                &mut eobrun,
                                (ss, se, al),
                                &mut c.coefs[idx * 64..idx * 64 + 64],
                                &mut c.nonzero[idx],
                            )?,
                        }
                    }
                }
            }
            if bits.overrun() {
                return Err(data_ends());
            }
            m += 1;
        }
        Ok(bits.resume_at())
    }

    /// Inverse transforms what is still in coefficients, upsamples and converts to RGB.
    fn finish(mut self) -> Res<(u32, u32, Vec<u8>)> {
        for c in &mut self.comps {
            if self.direct {
                continue;
            }
            let stride = c.bw * 8;
            c.plane = vec![128; c.bw * c.bh * 64];
            if let Some(q) = &c.q {
                for by in 0..c.bh {
                    for bx in 0..c.bw {
                        let idx = by * c.bw + bx;
                        idct_block(
                            &c.coefs[idx * 64..idx * 64 + 64],
                            q,
                            &mut c.plane[by * 8 * stride + bx * 8..],
                            stride,
                        );
                    }
                }
            }
            c.coefs = Vec::new();
            c.nonzero = Vec::new();
        }

        let (w, h) = (self.width, self.height);
        let ups: Vec<Upsample> = self
            .comps
            .iter()
            .map(|c| Upsample::choose(self.hmax / c.h, self.vmax / c.v, c.dw))
            .collect();
        let mut rows: Vec<Vec<u8>> = self
            .comps
            .iter()
            .map(|c| vec![0; c.dw * (self.hmax / c.h)])
            .collect();
        let widest = self.comps.iter().map(|c| c.dw).max().unwrap_or(0);
        let mut colsum = vec![0i32; widest];
        let mut out = vec![0u8; w * h * 3];
        let tab = YccTables::new();
        for (y, orow) in out.chunks_exact_mut(w * 3).enumerate() {
            for ((c, up), row) in self.comps.iter().zip(&ups).zip(&mut rows) {
                up.row(c, y, row, &mut colsum);
            }
            convert_row(self.color, &tab, &rows, &mut orow[..w * 3]);
        }
        Ok((w as u32, h as u32, out))
    }
}

/// Baseline/extended sequential: one whole block (T.81 F.2.2).
fn sequential_block(
    bits: &mut Bits,
    dc: &Huffman,
    ac: &Huffman,
    pred: &mut i32,
    block: &mut [i16; 64],
) -> Res<()> {
    let cat = bits.decode(dc)? as u32;
    *pred = pred.wrapping_add(bits.signed(cat));
    block[0] = *pred as i16;
    let mut k = 1;
    while k < 64 {
        let rs = bits.decode(ac)?;
        let (run, size) = ((rs >> 4) as usize, (rs & 15) as u32);
        if size == 0 {
            if run != 15 {
                break; // end of block
            }
            k += 16;
            continue;
        }
        k += run;
        // A run past the block's end is corrupt; libjpeg stores such a value at position 63.
        block[ZIGZAG[k.min(63)] as usize] = bits.signed(size) as i16;
        k += 1;
    }
    Ok(())
}

/// Progressive AC first pass over the band `ss..=se` at point transform `al` (T.81 G.1.2.2).
fn ac_first(
    bits: &mut Bits,
    ac: &Huffman,
    eobrun: &mut u32,
    (ss, se, al): (usize, usize, u32),
    block: &mut [i16],
    nonzero: &mut u64,
) -> Res<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = bits.decode(ac)?;
        let (run, size) = ((rs >> 4) as usize, (rs & 15) as u32);
        if size == 0 {
            if run == 15 {
                k += 16;
                continue;
            }
            // EOBn: this block and the next 2^n − 1 + (n bits) blocks end here.
            *eobrun = (1 << run) + bits.bits(run as u32) - 1;
            break;
        }
        k = (k + run).min(63);
        let v = (bits.signed(size) << al) as i16;
        block[ZIGZAG[k] as usize] = v;
        if v != 0 {
            *nonzero |= 1 << k;
        }
        k += 1;
    }
    Ok(())
}

/// Progressive AC refinement pass (T.81 G.1.2.3): one more bit of every coefficient already
/// nonzero in the band, and new coefficients of magnitude 1 << al.
fn ac_refine(
    bits: &mut Bits,
    ac: &Huffman,
    eobrun: &mut u32,
    (ss, se, al): (usize, usize, u32),
    block: &mut [i16],
    nonzero: &mut u64,
) -> Res<()> {
    let plus = 1i16 << al;
    let minus = -1i16 << al;
    let refine = |bits: &mut Bits, v: &mut i16| {
        if bits.bit() && *v & plus == 0 {
            *v = v.wrapping_add(if *v >= 0 { plus } else { minus });
        }
    };
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = bits.decode(ac)?;
            let (mut zeros, size) = ((rs >> 4) as u32, rs & 15);
            let mut new = 0;
            if size != 0 {
                // Only magnitude 1 is possible here; libjpeg reads the sign bit regardless.
                new = if bits.bit() { plus } else { minus };
            } else if zeros != 15 {
                *eobrun = (1 << zeros) + bits.bits(zeros);
                break;
            }
            // Skip `zeros` zero-history coefficients (refining the nonzero ones passed on the
            // way), then place the new coefficient (or, for ZRL, skip one more zero).
            while k <= se {
                let v = &mut block[ZIGZAG[k] as usize];
                if *v != 0 {
                    refine(bits, v);
                } else {
                    if zeros == 0 {
                        if new != 0 {
                            *v = new;
                            *nonzero |= 1 << k;
                        }
                        k += 1;
                        break;
                    }
                    zeros -= 1;
                }
                k += 1;
            }
        }
    }
    if *eobrun > 0 {
        // In an end-of-band run: only refinement bits for the nonzero coefficients left, in
        // stream order.
        if k <= se {
            let mut left = *nonzero & (!0u64 << k) & (!0u64 >> (63 - se));
            while left != 0 {
                refine(
                    bits,
                    &mut block[ZIGZAG[left.trailing_zeros() as usize] as usize],
                );
                left &= left - 1;
            }
        }
        *eobrun -= 1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Upsampling and colour conversion

/// How one component's rows are brought to full resolution (libjpeg's upsampler choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upsample {
    /// Full resolution already.
    Copy,
    /// Half width: triangular interpolation between horizontal neighbours.
    FancyH2V1,
    /// Half height: triangular interpolation between vertical neighbours.
    FancyH1V2,
    /// Half width and height: triangular interpolation both ways.
    FancyH2V2,
    /// Any other whole ratio, or 2:1 on a component at most 2 samples wide: replication.
    Replicate(usize, usize),
}

impl Upsample {
    fn choose(hr: usize, vr: usize, dw: usize) -> Upsample {
        match (hr, vr) {
            (1, 1) => Upsample::Copy,
            (2, 1) if dw > 2 => Upsample::FancyH2V1,
            (1, 2) => Upsample::FancyH1V2,
            (2, 2) if dw > 2 => Upsample::FancyH2V2,
            _ => Upsample::Replicate(hr, vr),
        }
    }

    /// Output row `y` of component `c` into `out` (`c.dw · ratio` samples, at least the image
    /// width). `colsum` is scratch of at least `c.dw` entries.
    fn row(self, c: &Component, y: usize, out: &mut [u8], colsum: &mut [i32]) {
        let stride = c.bw * 8;
        let (dw, dh) = (c.dw, c.dh);
        let src = |r: usize| &c.plane[r * stride..r * stride + dw];
        // For vertical interpolation: the nearer source row and the farther neighbour
        // (repeating the first and last real rows at the edges).
        let neighbours = |y: usize| {
            let near = y / 2;
            let far = if y.is_multiple_of(2) {
                near.saturating_sub(1)
            } else {
                (near + 1).min(dh - 1)
            };
            (near, far)
        };
        match self {
            Upsample::Copy => out[..dw].copy_from_slice(src(y)),
            Upsample::FancyH2V1 => {
                let s = src(y);
                for i in 0..dw {
                    let here = 3 * s[i] as u32;
                    let left = s[i.saturating_sub(1)] as u32;
                    let right = s[(i + 1).min(dw - 1)] as u32;
                    out[2 * i] = ((here + left + 1) >> 2) as u8;
                    out[2 * i + 1] = ((here + right + 2) >> 2) as u8;
                }
            }
            Upsample::FancyH1V2 => {
                let (near, far) = neighbours(y);
                let bias = if y.is_multiple_of(2) { 1 } else { 2 };
                for ((o, &a), &b) in out.iter_mut().zip(src(near)).zip(src(far)) {
                    *o = ((3 * a as u32 + b as u32 + bias) >> 2) as u8;
                }
            }
            Upsample::FancyH2V2 => {
                let (near, far) = neighbours(y);
                for ((cs, &a), &b) in colsum.iter_mut().zip(src(near)).zip(src(far)) {
                    *cs = 3 * a as i32 + b as i32;
                }
                let cs = &colsum[..dw];
                for i in 0..dw {
                    let here = 3 * cs[i];
                    let left = cs[i.saturating_sub(1)];
                    let right = cs[(i + 1).min(dw - 1)];
                    out[2 * i] = ((here + left + 8) >> 4) as u8;
                    out[2 * i + 1] = ((here + right + 7) >> 4) as u8;
                }
            }
            Upsample::Replicate(hr, vr) => {
                let s = src(y / vr);
                for (o, chunk) in s.iter().zip(out.chunks_exact_mut(hr)) {
                    chunk.fill(*o);
                }
            }
        }
    }
}

/// libjpeg's YCbCr → RGB factors in 16-bit fixed point, tabulated by sample value.
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    /// The green terms, still scaled by 2^16 (summed before the shift); `cb_g` includes ½.
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl YccTables {
    fn new() -> Self {
        const ONE: f64 = 65536.0;
        let fix = |x: f64| (x * ONE + 0.5) as i32;
        let half = 1 << 15;
        let mut t = YccTables {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i32 - 128;
            t.cr_r[i] = (fix(1.40200) * x + half) >> 16;
            t.cb_b[i] = (fix(1.77200) * x + half) >> 16;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + half;
        }
        t
    }

    #[inline]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let y = y as i32;
        let (cb, cr) = (cb as usize, cr as usize);
        [
            (y + self.cr_r[cr]).clamp(0, 255) as u8,
            (y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16)).clamp(0, 255) as u8,
            (y + self.cb_b[cb]).clamp(0, 255) as u8,
        ]
    }
}

/// Pillow's CMYK → RGB on the samples libjpeg hands it: Pillow reads them as `CMYK;I`
/// (inverted, Adobe's convention), then each channel is `nk − c·nk/255` with `nk = 255 − k`
/// and its rounded division by 255.
#[inline]
fn pillow_cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - v as i32);
    let nk = 255 - k;
    let mul_div_255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - mul_div_255(v, nk)).clamp(0, 255) as u8)
}

fn convert_row(color: ColorSpace, tab: &YccTables, rows: &[Vec<u8>], out: &mut [u8]) {
    let px = out.chunks_exact_mut(3);
    match color {
        ColorSpace::Gray => {
            for (o, &v) in px.zip(&rows[0]) {
                o.fill(v);
            }
        }
        ColorSpace::YCbCr => {
            for (i, o) in px.enumerate() {
                o.copy_from_slice(&tab.rgb(rows[0][i], rows[1][i], rows[2][i]));
            }
        }
        ColorSpace::Rgb => {
            for (i, o) in px.enumerate() {
                o.copy_from_slice(&[rows[0][i], rows[1][i], rows[2][i]]);
            }
        }
        ColorSpace::Cmyk => {
            for (i, o) in px.enumerate() {
                let raw = [rows[0][i], rows[1][i], rows[2][i], rows[3][i]];
                o.copy_from_slice(&pillow_cmyk_to_rgb(raw));
            }
        }
        ColorSpace::Ycck => {
            for (i, o) in px.enumerate() {
                // libjpeg: C, M, Y are 255 minus the RGB that Y, Cb, Cr stand for; K is kept.
                let [r, g, b] = tab.rgb(rows[0][i], rows[1][i], rows[2][i]);
                let raw = [255 - r, 255 - g, 255 - b, rows[3][i]];
                o.copy_from_slice(&pillow_cmyk_to_rgb(raw));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAY: &[u8] = include_bytes!("../tests/fixtures/images/chelsea_gray.jpg");
    const PROG: &[u8] = include_bytes!("../tests/fixtures/images/astronaut_prog.jpg");

    fn err(bytes: &[u8]) -> String {
        match decode(bytes, "x.jpg") {
            Ok((w, h, _)) => panic!("decoded a {w}x{h} image, expected an error"),
            Err(e) => e.to_string(),
        }
    }

    /// Offset of the first marker with this code, walking the segments.
    fn marker_at(b: &[u8], code: u8) -> usize {
        let mut i = 2;
        while b[i + 1] != code {
            i += 2 + be16(&b[i + 2..]);
        }
        i
    }

    #[test]
    fn zigzag_is_a_permutation_in_diagonal_order() {
        assert_eq!(&ZIGZAG[..10], &[0, 1, 8, 16, 9, 2, 3, 10, 17, 24]);
        assert_eq!(&ZIGZAG[58..], &[61, 54, 47, 55, 62, 63]);
        let mut seen = [false; 64];
        for &z in &ZIGZAG {
            seen[z as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn idct_of_a_dc_block_is_flat() {
        let mut coef = [0i16; 64];
        let q = [1u16; 64];
        let mut out = [0u8; 64];
        for dc in [-1024i16, -8, -5, -4, 0, 3, 4, 100, 1016] {
            coef[0] = dc;
            idct_block(&coef, &q, &mut out, 8);
            // DC / 8 + 128, rounded half up (libjpeg: dc << 2, then descaled by 5 bits).
            let want = ((dc as i32 * 4 + 16) >> 5) + 128;
            assert!(
                out.iter().all(|&v| v as i32 == want.clamp(0, 255)),
                "dc {dc}"
            );
        }
    }

    #[test]
    fn huffman_tables_are_validated() {
        // Two 1-bit codes would use the all-ones code "1".
        let mut counts = [0u8; 16];
        counts[0] = 2;
        assert!(Huffman::new(&counts, &[0, 1], false).is_err());
        counts[0] = 1;
        assert!(Huffman::new(&counts, &[0], false).is_ok());
        assert!(Huffman::new(&counts, &[16], true).is_err());
        Huffman::standard(STD_AC_LUMA, false);
        Huffman::standard(STD_AC_CHROMA, false);
    }

    #[test]
    fn decodes_the_fixtures() {
        let (w, h, px) = decode(GRAY, "gray").unwrap();
        assert_eq!((w, h, px.len()), (200, 133, 200 * 133 * 3));
        let (w, h, _) = decode(PROG, "prog").unwrap();
        assert_eq!((w, h), (200, 200));
    }

    #[test]
    fn truncated_files_are_errors_that_say_so() {
        for bytes in [GRAY, PROG] {
            for cut in [bytes.len() / 3, bytes.len() - 2, 200, 20, 3] {
                let m = err(&bytes[..cut]);
                assert!(
                    m.contains("x.jpg") && (m.contains("truncated") || m.contains("ends before")),
                    "cut at {cut}: {m}"
                );
            }
            // Entropy-coded data cut short but followed by a proper end-of-image marker.
            let mut short = bytes[..bytes.len() / 2].to_vec();
            short.extend_from_slice(&[0xFF, 0xD9]);
            let m = err(&short);
            assert!(m.contains("ends before its scan is complete"), "{m}");
        }
    }

    #[test]
    fn unsupported_kinds_are_named() {
        let sof = marker_at(GRAY, 0xC0);
        for (code, needle) in [
            (0xC3, "lossless"),
            (0xC9, "arithmetic"),
            (0xCA, "arithmetic"),
            (0xC5, "hierarchical"),
        ] {
            let mut b = GRAY.to_vec();
            b[sof + 1] = code;
            let m = err(&b);
            assert!(m.contains(needle), "0xFF{code:02X}: {m}");
        }
        // A DAC (arithmetic conditioning) segment.
        let mut b = GRAY[..sof].to_vec();
        b.extend_from_slice(&[0xFF, 0xCC, 0, 4, 0, 0]);
        b.extend_from_slice(&GRAY[sof..]);
        assert!(err(&b).contains("arithmetic"));
        // 12-bit samples.
        let mut b = GRAY.to_vec();
        b[sof + 4] = 12;
        assert!(err(&b).contains("12-bit JPEG is not supported"));
    }

    #[test]
    fn bad_structure_is_an_error() {
        // Scan before frame, undefined tables, a wrong restart marker.
        let sof = marker_at(GRAY, 0xC0);
        let sos = marker_at(GRAY, 0xDA);
        let mut b = GRAY[..sof].to_vec();
        b.extend_from_slice(&GRAY[sos..]);
        assert!(err(&b).contains("before the frame header"));
        let dqt = marker_at(GRAY, 0xDB);
        let mut b = GRAY[..dqt].to_vec();
        b.extend_from_slice(&GRAY[dqt + 2 + be16(&GRAY[dqt + 2..])..]);
        assert!(err(&b).contains("quantisation table 0, which is not defined"));
        let mut b = GRAY[..sos].to_vec();
        b.extend_from_slice(&[0xFF, 0xDD, 0, 4, 0, 1]);
        b.extend_from_slice(&GRAY[sos..]);
        assert!(err(&b).contains("restart marker RST0 is missing"));
        assert!(err(&[0xFF, 0xD8, 0xFF, 0xD9]).contains("no frame header"));
        assert!(err(&[0xFF, 0xD8, 0xFF, 0x02, 0, 2, 0xFF, 0xD9]).contains("unknown"));
    }
}
