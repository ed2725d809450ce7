//! GGUF (v2/v3) reader: header, metadata, tensor table, and dequantisation of the tensor types
//! llama.cpp models use (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
//!
//! Only the header is read at open; tensor data is read one tensor at a time. Every count and
//! length in the header is checked against the file size before anything is allocated.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// Largest number of dimensions a GGUF tensor may have.
const MAX_DIMS: usize = 4;
/// Most metadata values (array elements included) a file may hold: a 256k-token vocabulary
/// with scores, types and merges is about a million. Each costs ~32 bytes of host memory
/// whatever its size in the file, so this bounds what a header can make us allocate.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Most tensors a file may hold (a 405B LLaMA has about 1,100).
pub const MAX_TENSORS: u64 = 1 << 20;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Arr(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Arr(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types we can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
        }
    }
}

fn type_name_of_id(id: u32) -> String {
    let known = [
        (6, "Q5_0"),
        (7, "Q5_1"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (13, "Q5_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
    ];
    known
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, n)| format!("{n} (type {id})"))
        .unwrap_or_else(|| format!("type {id}"))
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    pub ty: GgmlType,
    /// PyTorch order: the last dimension is the contiguous one (GGUF's `ne[0]`).
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
}

struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
    path: String,
    /// Metadata values read so far (see [`MAX_METADATA_VALUES`]).
    elements: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(Error::format(
                &self.path,
                format!("{what} of {n} bytes at offset {} runs past the end of the file ({} bytes): truncated or corrupt", self.pos, self.len),
            ));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += n;
        Ok(b)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b)
            .map_err(|_| Error::format(&self.path, format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        self.elements += 1;
        if self.elements > MAX_METADATA_VALUES {
            return Err(Error::format(
                &self.path,
                format!("metadata `{key}`: expected at most {MAX_METADATA_VALUES} metadata values in all, found more"),
            ));
        }
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(key)?[0]),
            1 => Value::I8(self.arr::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => Value::Bool(self.arr::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        &self.path,
                        format!("metadata `{key}`: arrays nested deeper than 2"),
                    ));
                }
                let ety = self.u32(key)?;
                let count = self.u64(key)?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    _ => 1,
                };
                if count.saturating_mul(min) > self.len.saturating_sub(self.pos) {
                    return Err(Error::format(
                        &self.path,
                        format!("metadata `{key}`: array of {count} elements cannot fit in the {} bytes left", self.len - self.pos),
                    ));
                }
                if count > MAX_METADATA_VALUES {
                    return Err(Error::format(
                        &self.path,
                        format!("metadata `{key}`: expected an array of at most {MAX_METADATA_VALUES} elements, found {count}"),
                    ));
                }
                // grows as elements are actually read: the count alone reserves little
                let mut v = Vec::with_capacity(count.min(1 << 12) as usize);
                for _ in 0..count {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                Value::Arr(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => {
                return Err(Error::format(
                    &self.path,
                    format!("metadata `{key}`: unknown value type {ty} (expected 0..=12)"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let f = File::open(path).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        Self::from_reader(BufReader::with_capacity(1 << 20, f), len, path)
    }

    /// Parses the header, metadata and tensor table from `r`, which holds the `len` bytes of
    /// the file `path` (named in errors, and reopened by [`GgufFile::read_raw`]).
    pub fn from_reader(r: impl Read, len: u64, path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let mut r = Reader {
            r,
            pos: 0,
            len,
            path: p.clone(),
            elements: 0,
        };
        let magic = r
            .bytes(4, "GGUF magic")
            .map_err(|_| Error::format(&p, "not a GGUF file: shorter than its 4-byte magic"))?;
        if magic != MAGIC {
            return Err(Error::format(
                &p,
                format!(
                    "not a GGUF file: magic {:?}, expected \"GGUF\"",
                    String::from_utf8_lossy(&magic)
                ),
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                &p,
                format!("GGUF version {version} is not supported (expected 2 or 3)"),
            ));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // each KV needs at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8 + 4 + 8 + 4 + 8
        if n_kv.saturating_mul(13) > len || n_tensors.saturating_mul(32) > len {
            return Err(Error::format(&p, format!("header claims {n_kv} metadata entries and {n_tensors} tensors, more than a {len}-byte file can hold: truncated or corrupt")));
        }
        if n_tensors > MAX_TENSORS || n_kv > MAX_METADATA_VALUES {
            return Err(Error::format(&p, format!("header claims {n_kv} metadata entries and {n_tensors} tensors, expected at most {MAX_METADATA_VALUES} and {MAX_TENSORS}")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            if metadata.contains_key(&key) {
                return Err(Error::format(
                    &p,
                    format!("metadata key `{key}` appears twice (expected each key once)"),
                ));
            }
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors.min(1 << 12) as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            if !names.insert(name.clone()) {
                return Err(Error::format(
                    &p,
                    format!("tensor `{name}` appears twice in the tensor table (expected each name once)"),
                ));
            }
            let nd = r.u32(&name)? as usize;
            if nd == 0 || nd > MAX_DIMS {
                return Err(Error::format(
                    &p,
                    format!("tensor `{name}`: {nd} dimensions (expected 1..={MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64(&name)?);
            }
            let ty_id = r.u32(&name)?;
            let offset = r.u64(&name)?;
            raw.push((name, dims, ty_id, offset));
        }
        let align = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| {
                    Error::format(&p, format!("general.alignment {v:?} is not a power of two"))
                })?,
            None => 32,
        };
        let data_start = r.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_id, offset) in raw {
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                Error::format(&p, format!("tensor `{name}`: unsupported ggml type {} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)", type_name_of_id(ty_id)))
            })?;
            let mut numel: u64 = 1;
            for &d in &dims {
                numel = numel
                    .checked_mul(d)
                    .filter(|n| *n <= 1 << 40)
                    .ok_or_else(|| {
                        Error::format(&p, format!("tensor `{name}`: dimensions {dims:?} overflow"))
                    })?;
            }
            let (be, bb) = ty.block();
            if dims[0] % be as u64 != 0 {
                return Err(Error::format(&p, format!("tensor `{name}`: row length {} is not a multiple of the {} block size {be}", dims[0], ty.name())));
            }
            let n_bytes = numel / be as u64 * bb as u64;
            if usize::try_from(n_bytes).is_err()
                || usize::try_from(numel).is_err()
                || dims.iter().any(|&d| usize::try_from(d).is_err())
            {
                return Err(Error::format(&p, format!("tensor `{name}`: dimensions {dims:?} ({n_bytes} bytes) do not fit in this platform's address space")));
            }
            if offset % align != 0 {
                return Err(Error::format(
                    &p,
                    format!("tensor `{name}`: data offset {offset} is not a multiple of the file's alignment {align}"),
                ));
            }
            let abs = data_start
                .checked_add(offset)
                .ok_or_else(|| Error::format(&p, format!("tensor `{name}`: offset overflows")))?;
            if abs.checked_add(n_bytes).is_none_or(|end| end > len) {
                return Err(Error::format(
                    &p,
                    format!("tensor `{name}`: data [{abs}, {}) lies outside the {len}-byte file: truncated or corrupt", abs.saturating_add(n_bytes)),
                ));
            }
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            tensors.push(GgufTensor {
                name,
                ty,
                shape,
                offset: abs,
                n_bytes,
            });
        }
        let mut sorted: Vec<&GgufTensor> = tensors.iter().collect();
        sorted.sort_by_key(|t| t.offset);
        for w in sorted.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(Error::format(
                    &p,
                    format!(
                        "tensors `{}` and `{}` overlap in the file",
                        w[0].name, w[1].name
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads a tensor's raw bytes.
    pub fn read_raw(&self, t: &GgufTensor) -> Result<Vec<u8>> {
        let p = self.path.display().to_string();
        let mut f = File::open(&self.path).map_err(|e| Error::io(&p, e))?;
        self.read_raw_from(&mut f, t)
    }

    /// [`GgufFile::read_raw`] from an already open reader of the same file.
    pub fn read_raw_from(&self, mut f: impl Read + Seek, t: &GgufTensor) -> Result<Vec<u8>> {
        let p = self.path.display().to_string();
        f.seek(SeekFrom::Start(t.offset))
            .map_err(|e| Error::io(&p, e))?;
        let n = usize::try_from(t.n_bytes).map_err(|_| {
            Error::format(
                &p,
                format!(
                    "tensor `{}`: expected a size that fits in memory, found {} bytes",
                    t.name, t.n_bytes
                ),
            )
        })?;
        let mut b = vec![0u8; n];
        f.read_exact(&mut b).map_err(|e| {
            Error::format(
                &p,
                format!(
                    "tensor `{}`: {e} (file shorter than its header says?)",
                    t.name
                ),
            )
        })?;
        Ok(b)
    }

    /// Reads and dequantises a tensor to f32 (row-major, PyTorch shape order).
    pub fn read_f32(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        Ok(dequantize(t.ty, &self.read_raw(t)?, t.numel()))
    }
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantises `n` elements of type `ty` from `b` (which must hold exactly their blocks).
pub fn dequantize(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let (be, bb) = ty.block();
    for blk in b.chunks_exact(bb).take(n / be) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]])),
            GgmlType::F16 => out.push(h(blk, 0)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([blk[0], blk[1]]).to_f32()),
            GgmlType::Q4_0 => {
                let d = h(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0xF) as f32 - 8.0) * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (h(blk, 0), h(blk, 2));
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q8_0 => {
                let d = h(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4K => {
                let (d, dmin) = (h(blk, 0), h(blk, 2));
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * k, scales);
                    let (s2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * s2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - mm1));
                    out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - mm2));
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = h(blk, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    out
}

/// Converts Q4_1 or Q4_K blocks to the `q4m` layout (4-bit codes with an f16 scale and f16
/// minimum per 32 weights) without requantising: Q4_1 is copied exactly; Q4_K's sub-block
/// scale and minimum (`d·sc`, `−dmin·m`) are rounded to f16 once. `None` for other types.
pub fn to_q4m(ty: GgmlType, b: &[u8], n: usize) -> Option<crate::quant::Encoded> {
    let mut data = vec![0u32; n / 8];
    let mut scales = Vec::with_capacity(n / 32);
    let mut put = |k: usize, q: u8| data[k / 8] |= (q as u32 & 15) << (4 * (k % 8));
    match ty {
        GgmlType::Q4_1 => {
            for (bi, blk) in b.chunks_exact(20).take(n / 32).enumerate() {
                let d = u16::from_le_bytes([blk[0], blk[1]]) as u32;
                let m = u16::from_le_bytes([blk[2], blk[3]]) as u32;
                scales.push(d | m << 16);
                for (j, &q) in blk[4..20].iter().enumerate() {
                    put(bi * 32 + j, q & 15);
                    put(bi * 32 + j + 16, q >> 4);
                }
            }
        }
        GgmlType::Q4K => {
            for (bi, blk) in b.chunks_exact(144).take(n / 256).enumerate() {
                let (d, dmin) = (h(blk, 0), h(blk, 2));
                let sc = &blk[4..16];
                for (k, q) in blk[16..144].chunks_exact(32).enumerate() {
                    for (sub, shift) in [(2 * k, 0u8), (2 * k + 1, 4u8)] {
                        let (s, m) = scale_min_k4(sub, sc);
                        let dd = f16::from_f32(d * s as f32).to_bits() as u32;
                        let mm = f16::from_f32(-dmin * m as f32).to_bits() as u32;
                        scales.push(dd | mm << 16);
                        for (l, &v) in q.iter().enumerate() {
                            put(bi * 256 + sub * 32 + l, v >> shift);
                        }
                    }
                }
            }
        }
        _ => return None,
    }
    Some(crate::quant::Encoded {
        dtype: crate::quant::DType::Q4M,
        data,
        scales,
    })
}

/// Undoes the row permutation llama.cpp's converter applies to Q and K projections (it
/// interleaves the two rotary halves of every head): row `h·d + 2i + j` of the GGUF tensor is
/// row `h·d + j·d/2 + i` of the HF (rotate-half) weight. Rows are whole rows of `w` (`rows`
/// of them), whatever the element: f32 values or raw quantised blocks.
pub fn unpermute_qk<T: Copy + Default>(w: &[T], rows: usize, heads: usize) -> Vec<T> {
    let rl = w.len() / rows.max(1);
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = (h * hd + 2 * i + j, h * hd + j * half + i);
                out[dst * rl..(dst + 1) * rl].copy_from_slice(&w[src * rl..(src + 1) * rl]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_and_q8_0_blocks_decode() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 0x9F; // low nibble 15 -> 7*0.5, high nibble 9 -> 1*0.5 (element 16)
        let v = dequantize(GgmlType::Q4_0, &b, 32);
        assert_eq!(v[0], 3.5);
        assert_eq!(v[16], 0.5);
        assert_eq!(v[1], -4.0);
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xFF; // -1
        b[33] = 5;
        let v = dequantize(GgmlType::Q8_0, &b, 32);
        assert_eq!((v[0], v[31], v[1]), (-2.0, 10.0, 0.0));
    }

    #[test]
    fn q4_1_converts_to_q4m_exactly() {
        let mut b = vec![0u8; 40];
        for (blk, (d, m)) in [(0.25f32, -1.5f32), (0.125, 0.5)].iter().enumerate() {
            b[blk * 20..blk * 20 + 2].copy_from_slice(&f16::from_f32(*d).to_le_bytes());
            b[blk * 20 + 2..blk * 20 + 4].copy_from_slice(&f16::from_f32(*m).to_le_bytes());
            for j in 0..16 {
                b[blk * 20 + 4 + j] = (j as u8) | ((15 - j as u8) << 4);
            }
        }
        let want = dequantize(GgmlType::Q4_1, &b, 64);
        let e = to_q4m(GgmlType::Q4_1, &b, 64).unwrap();
        assert_eq!(e.decode(64), want);
    }

    #[test]
    fn q4_k_converts_to_q4m_up_to_f16_rounding() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.003).to_le_bytes());
        for (i, v) in b[4..144].iter_mut().enumerate() {
            *v = (i * 37 % 251) as u8;
        }
        let want = dequantize(GgmlType::Q4K, &b, 256);
        let got = to_q4m(GgmlType::Q4K, &b, 256).unwrap().decode(256);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 2e-3 * w.abs().max(0.1), "{g} vs {w}");
        }
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (2, 8, 3);
        let rows = heads * hd;
        let orig: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut perm = vec![0f32; orig.len()];
        for h in 0..heads {
            for a in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + a * hd / 2 + i;
                    let dst = h * hd + i * 2 + a;
                    perm[dst * cols..][..cols].copy_from_slice(&orig[src * cols..][..cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&perm, rows, heads), orig);
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    /// Every supported block type against gguf-py's `dequantize` on random blocks
    /// (tests/golden/make_gguf_block_goldens.py); Q4_1 and Q4_K also through q4m.
    #[test]
    fn block_types_match_gguf_py() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf/blocks.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, ty) in [
            ("Q4_0", GgmlType::Q4_0),
            ("Q4_1", GgmlType::Q4_1),
            ("Q8_0", GgmlType::Q8_0),
            ("Q4_K", GgmlType::Q4K),
            ("Q6_K", GgmlType::Q6K),
        ] {
            let c = &doc["cases"][name];
            let raw: Vec<u8> = c["raw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let n = c["n"].as_u64().unwrap() as usize;
            let want: Vec<f32> = c["values_f32_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| f32::from_bits(v.as_u64().unwrap() as u32))
                .collect();
            let got = dequantize(ty, &raw, n);
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name}[{i}]: {g} vs {w}"
                );
            }
            if let Some(e) = to_q4m(ty, &raw, n) {
                let tol = if ty == GgmlType::Q4_1 { 0.0 } else { 2e-3 };
                for (i, (g, w)) in e.decode(n).iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= tol * w.abs().max(0.05),
                        "{name} as q4m [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
