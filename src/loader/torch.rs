//! Safe, streaming reader for PyTorch checkpoints written by `torch.save` (torch >= 1.6: a zip
//! archive holding a pickle, `<archive>/data.pkl`, plus one record per storage,
//! `<archive>/data/<key>`).
//!
//! * [`TorchCheckpoint::open`] reads only the zip central directory, `<archive>/byteorder` and
//!   `<archive>/data.pkl`; tensor data is read on demand by [`TorchCheckpoint::read_f32`] /
//!   [`TorchCheckpoint::read_bytes`], and only the byte range the tensor view touches.
//! * The pickle is interpreted by a small VM that never executes anything. Globals are resolved
//!   against an allow-list (`collections.OrderedDict`, the `torch._utils._rebuild_tensor_v2` /
//!   `_rebuild_parameter*` / `torch._tensor._rebuild_from_type_v2` rebuild functions and the typed
//!   `torch.*Storage` classes). A short list of *inert* data classes that legitimately occur in
//!   optimizer state or training configs (`_codecs.encode` for `bytes`, `builtins.set`,
//!   `builtins.frozenset`, `builtins.slice`, `builtins.complex`, `argparse.Namespace`,
//!   `torch.device`, `torch.Size`, the `torch.<dtype>` objects and numpy scalar/array
//!   reconstructors) is accepted but never called: "calling" one yields an opaque placeholder,
//!   which is an error only if it ends up where a state-dict tensor is expected. Every other
//!   global (`os.system`, `builtins.eval`, `posix.system`, ...) is rejected with an error naming
//!   it, wherever it appears in the pickle.
//! * All sizes read from the file are bounded: the memo, the stack, the mark stack, tuple nesting,
//!   string lengths (against the remaining pickle bytes), the central directory and the pickle
//!   size; tensor element counts are overflow-checked and every view must fit inside its storage,
//!   whose size must fit inside its zip record.
//!
//! Not supported (each is a clear error): legacy (pre-1.6, non-zip) files, compressed or
//! encrypted zip entries, big-endian checkpoints, pickle protocol-0 text opcodes other than the
//! trivial stack ones, quantized / sparse / nested / subclass tensors, `torch.UntypedStorage` and
//! storages of complex or float8 dtypes. CRC-32 checksums are not verified (that would mean
//! reading whole multi-gigabyte records).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};

/// Largest `data.pkl` we accept (real ones are a few hundred KB, even with optimizer state).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Largest zip central directory we accept.
const MAX_CENTRAL_DIR_BYTES: u64 = 256 << 20;
/// Pickle VM limits.
const MAX_STACK: usize = 1 << 20;
const MAX_MARKS: usize = 1 << 16;
const MAX_MEMO: usize = 1 << 24;
/// Most lists and dicts a pickle may create, and most items they may hold in all: every
/// one-byte opcode can create one, so the pickle size alone would allow tens of GB.
const MAX_CONTAINERS: usize = 1 << 22;
const MAX_ITEMS: usize = 1 << 24;
const MAX_TUPLE_DEPTH: usize = 256;
const MAX_GLOBAL_NAME: usize = 256;
/// Most dimensions a tensor may have.
const MAX_NDIM: usize = 64;

const LEGACY_MSG: &str = "legacy (non-zip) PyTorch format is not supported; re-save with torch>=1.6 (torch.save(..., _use_new_zipfile_serialization=True))";

// ------------------------------------------------------------------------------------------------
// Public types
// ------------------------------------------------------------------------------------------------

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TorchDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    /// The torch name (`float32`, `bfloat16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "float64",
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
        }
    }

    /// Whether [`TorchCheckpoint::read_f32`] can convert this dtype.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            TorchDType::F64 | TorchDType::F32 | TorchDType::F16 | TorchDType::BF16
        )
    }

    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for TorchDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of the state dict: a strided view of a storage record in the zip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensorInfo {
    /// State-dict key.
    pub name: String,
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    /// Strides in elements (torch strides are never negative).
    pub strides: Vec<usize>,
    /// Offset of element `[0, 0, ...]` in the storage, in elements.
    pub storage_offset: usize,
    /// Storage key: the record is `<archive>/data/<storage_key>`. Views of one storage share it.
    pub storage_key: String,
    /// Elements in the storage.
    pub storage_len: usize,
    /// Index of the storage record in the zip directory.
    entry: usize,
}

impl TorchTensorInfo {
    /// Number of elements of the view.
    pub fn numel(&self) -> usize {
        // Overflow was ruled out when the checkpoint was opened (saturating for edited clones).
        self.shape.iter().fold(1usize, |a, &s| a.saturating_mul(s))
    }

    /// Whether the view is row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&s, &st) in self.shape.iter().zip(&self.strides).rev() {
            if s != 1 && st != expected {
                return false;
            }
            expected = expected.saturating_mul(s);
        }
        true
    }

    /// Inclusive range of storage elements the view touches (`None` for an empty tensor).
    fn element_range(&self) -> Option<(usize, usize)> {
        if self.shape.contains(&0) {
            return None;
        }
        let span: usize = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&s, &st)| (s - 1) * st)
            .sum();
        Some((self.storage_offset, self.storage_offset + span))
    }
}

/// An opened `torch.save` checkpoint: its zip directory and tensor table (no tensor data).
#[derive(Debug)]
pub struct TorchCheckpoint {
    path: PathBuf,
    archive: String,
    entries: Vec<ZipEntry>,
    tensors: Vec<TorchTensorInfo>,
    index: HashMap<String, usize>,
}

impl TorchCheckpoint {
    /// Opens the file, reads the zip directory and `*/data.pkl` only (never the tensor data).
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let mut file = File::open(path).map_err(|e| Error::io(&p, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&p, e))?.len();
        Self::from_reader(&mut file, file_len, path)
    }

    /// [`TorchCheckpoint::open`] from `file`, which holds the `file_len` bytes of the file
    /// `path` (named in errors, and reopened to read tensors).
    pub fn from_reader<R: Read + Seek>(file: &mut R, file_len: u64, path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let mut file = file;
        sniff(&mut file, file_len, &p)?;
        let entries = read_zip_directory(&mut file, file_len, &p)?;
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_name.entry(e.name.as_str()).or_insert(i);
        }
        let first = entries.first().ok_or_else(|| {
            Error::format(&p, "expected a torch.save zip archive, found an empty zip")
        })?;
        let archive = match first.name.split_once('/') {
            Some((dir, _)) if !dir.is_empty() => dir.to_string(),
            _ => {
                return Err(Error::format(
                    &p,
                    format!(
                        "expected zip entries under an archive directory (`<archive>/data.pkl`), found first entry `{}`",
                        first.name
                    ),
                ))
            }
        };

        if let Some(&bo) = by_name.get(format!("{archive}/byteorder").as_str()) {
            let e = &entries[bo];
            if e.size > 16 {
                return Err(Error::format(
                    &p,
                    format!(
                        "expected `{}` to hold `little` or `big`, found {} bytes",
                        e.name, e.size
                    ),
                ));
            }
            let bytes = read_entry(&mut file, file_len, e, &p)?;
            let text = String::from_utf8_lossy(&bytes);
            match text.trim() {
                "little" => {}
                "big" => {
                    return Err(Error::format(
                        &p,
                        "expected a little-endian checkpoint, found byteorder `big`; big-endian checkpoints are not supported",
                    ))
                }
                other => {
                    return Err(Error::format(
                        &p,
                        format!("expected `{}` to be `little` or `big`, found `{}`", e.name, other.escape_debug()),
                    ))
                }
            }
        }

        let pkl_name = format!("{archive}/data.pkl");
        let pkl = match by_name.get(pkl_name.as_str()) {
            Some(&i) => &entries[i],
            None => {
                let names: Vec<&str> = entries.iter().take(5).map(|e| e.name.as_str()).collect();
                return Err(Error::format(
                    &p,
                    format!(
                        "expected a `{pkl_name}` entry (torch.save zip archive), found none among {} entries (first: {})",
                        entries.len(),
                        names.join(", ")
                    ),
                ));
            }
        };
        if pkl.size > MAX_PICKLE_BYTES {
            return Err(Error::format(
                &p,
                format!(
                    "expected `{pkl_name}` of at most {MAX_PICKLE_BYTES} bytes, found {} bytes",
                    pkl.size
                ),
            ));
        }
        let pickle = read_entry(&mut file, file_len, pkl, &p)?;
        let raw = parse_state_dict(&pickle)
            .map_err(|d| Error::format(&p, format!("`{pkl_name}`: {d}")))?;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let info = validate_tensor(&name, &t, &archive, &entries, &by_name, &p)?;
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::format(
                    &p,
                    format!("tensor `{name}` appears twice in the state dict"),
                ));
            }
            tensors.push(info);
        }
        drop(by_name);
        // The records the tensors use, and the pickle, must not share bytes in the file (a
        // crafted zip can point two records at the same data, or a record into the pickle).
        let mut used: Vec<usize> = tensors.iter().map(|t| t.entry).collect();
        used.sort_unstable();
        used.dedup();
        let mut ranges = Vec::with_capacity(used.len() + 1);
        let pkl_index = entries
            .iter()
            .position(|e| e.name == pkl_name)
            .unwrap_or_default();
        for i in used.into_iter().chain([pkl_index]) {
            let e = &entries[i];
            let start = entry_data_offset(&mut file, file_len, e, &p)?;
            ranges.push((start, start + e.size, i));
        }
        ranges.sort_unstable();
        ranges.dedup();
        for w in ranges.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(Error::format(
                    &p,
                    format!(
                        "zip records `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap: expected each record's data to be its own",
                        entries[w[0].2].name, w[0].0, w[0].1, entries[w[1].2].name, w[1].0, w[1].1
                    ),
                ));
            }
        }
        Ok(TorchCheckpoint {
            path: path.to_path_buf(),
            archive,
            entries,
            tensors,
            index,
        })
    }

    /// Path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive directory inside the zip (`archive`, or the file stem for older torch).
    pub fn archive_name(&self) -> &str {
        &self.archive
    }

    /// The tensors of the state dict, in file order. If the top-level object is a dict holding a
    /// `model` (or else `state_dict`) dict, these are the tensor entries of that inner dict
    /// (MiniGPT-4's `{'model': sd, 'optimizer': ..., 'config': ..., 'epoch': ...}` wrapper); else
    /// of the top-level dict. Non-tensor entries are skipped; other wrapper entries (optimizer
    /// state, ...) are never read.
    pub fn tensors(&self) -> &[TorchTensorInfo] {
        &self.tensors
    }

    /// Looks a tensor up by state-dict key.
    pub fn get(&self, name: &str) -> Option<&TorchTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn lookup(&self, name: &str) -> Result<&TorchTensorInfo> {
        self.get(name).ok_or_else(|| {
            Error::format(
                self.path.display(),
                format!(
                    "expected a tensor `{name}` in the state dict, found none ({} tensors)",
                    self.tensors.len()
                ),
            )
        })
    }

    /// Reads one tensor's elements, row-major contiguous, as little-endian bytes of its own dtype.
    /// Honours `storage_offset` and strides, reading only the byte range of the storage that the
    /// view touches.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let p = self.path.display().to_string();
        let mut file = File::open(&self.path).map_err(|e| Error::io(&p, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&p, e))?.len();
        self.read_bytes_from(&mut file, file_len, name)
    }

    /// [`TorchCheckpoint::read_bytes`] from an already open reader of the same file (of
    /// `file_len` bytes).
    pub fn read_bytes_from<R: Read + Seek>(
        &self,
        file: &mut R,
        file_len: u64,
        name: &str,
    ) -> Result<Vec<u8>> {
        let info = self.lookup(name)?;
        let p = self.path.display().to_string();
        let es = info.dtype.size_in_bytes();
        let Some((lo, hi)) = info.element_range() else {
            return Ok(Vec::new());
        };
        let mut file = file;
        let entry = &self.entries[info.entry];
        let data = entry_data_offset(&mut file, file_len, entry, &p)?;
        // Validated at open: (hi + 1) * es <= storage bytes <= entry.size.
        let start = (lo as u64) * es as u64;
        let len = ((hi - lo + 1) as u64) * es as u64;
        if start + len > entry.size {
            return Err(Error::format(
                &p,
                format!(
                    "tensor `{name}`: expected bytes {start}..{} inside record `{}`, found it holds {} bytes",
                    start + len,
                    entry.name,
                    entry.size
                ),
            ));
        }
        let raw = read_at(&mut file, file_len, data + start, len, &p)?;
        if info.is_contiguous() {
            return Ok(raw);
        }
        gather(&raw, es, &info.shape, &info.strides).ok_or_else(|| {
            Error::format(
                &p,
                format!("tensor `{name}`: strided view reaches outside the bytes read"),
            )
        })
    }

    /// Reads one tensor as f32 (from f32/f16/bf16/f64 storages; f64 is rounded), honouring
    /// `storage_offset` and strides, reading only the byte range of the storage that the view
    /// touches. Row-major contiguous result.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.lookup(name)?;
        if !info.dtype.is_float() {
            return Err(Error::tensor(
                name,
                "a floating-point tensor (float32, float16, bfloat16 or float64) for read_f32",
                format!("dtype {}", info.dtype),
            ));
        }
        let bytes = self.read_bytes(name)?;
        Ok(bytes_to_f32(&bytes, info.dtype))
    }
}

/// Converts little-endian element bytes of a float dtype to f32 (exact except for f64).
fn bytes_to_f32(bytes: &[u8], dtype: TorchDType) -> Vec<f32> {
    match dtype {
        TorchDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        TorchDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        TorchDType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        TorchDType::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Gathers a strided view (strides relative to the first touched element) into row-major order.
fn gather(raw: &[u8], es: usize, shape: &[usize], strides: &[usize]) -> Option<Vec<u8>> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n.checked_mul(es)?);
    let nd = shape.len();
    if nd == 0 {
        out.extend_from_slice(raw.get(..es)?);
        return Some(out);
    }
    let (inner, inner_stride) = (shape[nd - 1], strides[nd - 1]);
    let mut idx = vec![0usize; nd - 1];
    loop {
        let base: usize = idx.iter().zip(strides).map(|(&i, &s)| i * s).sum();
        for j in 0..inner {
            let o = (base + j * inner_stride) * es;
            out.extend_from_slice(raw.get(o..o + es)?);
        }
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Checks one parsed tensor against the zip directory and turns it into a [`TorchTensorInfo`].
fn validate_tensor(
    name: &str,
    t: &TensorRec,
    archive: &str,
    entries: &[ZipEntry],
    by_name: &HashMap<&str, usize>,
    p: &str,
) -> Result<TorchTensorInfo> {
    let dtype = t.storage.dtype;
    let es = dtype.size_in_bytes();
    let key = &*t.storage.key;
    let record = format!("{archive}/data/{key}");
    let Some(&entry) = by_name.get(record.as_str()) else {
        return Err(Error::format(
            p,
            format!("tensor `{name}`: expected storage record `{record}` in the zip, found none"),
        ));
    };
    let e = &entries[entry];
    let storage_bytes = t.storage.numel.checked_mul(es as u64);
    match storage_bytes {
        Some(b) if b <= e.size && usize::try_from(t.storage.numel).is_ok() => {}
        _ => {
            return Err(Error::format(
                p,
                format!(
                    "tensor `{name}`: storage `{key}` claims {} elements of {dtype} ({} bytes) but its record `{record}` holds only {} bytes",
                    t.storage.numel,
                    storage_bytes.map_or("too many".to_string(), |b| b.to_string()),
                    e.size
                ),
            ))
        }
    }
    let storage_len = t.storage.numel as usize;
    let to_usize = |v: &[i64], what: &str| -> Result<Vec<usize>> {
        v.iter()
            .map(|&x| {
                usize::try_from(x).map_err(|_| {
                    Error::format(
                        p,
                        format!("tensor `{name}`: expected non-negative {what}, found {v:?}"),
                    )
                })
            })
            .collect()
    };
    let shape = to_usize(&t.size, "sizes")?;
    let strides = to_usize(&t.stride, "strides")?;
    if shape.len() != strides.len() {
        return Err(Error::format(
            p,
            format!(
                "tensor `{name}`: expected as many strides as dimensions, found shape {shape:?} and strides {strides:?}"
            ),
        ));
    }
    let storage_offset = usize::try_from(t.offset).map_err(|_| {
        Error::format(
            p,
            format!(
                "tensor `{name}`: expected a non-negative storage offset, found {}",
                t.offset
            ),
        )
    })?;
    let overflow = || {
        Error::format(
            p,
            format!("tensor `{name}`: shape {shape:?} with strides {strides:?} overflows the address space"),
        )
    };
    let mut numel = 1usize;
    for &s in &shape {
        numel = numel.checked_mul(s).ok_or_else(overflow)?;
    }
    numel.checked_mul(es).ok_or_else(overflow)?;
    if numel > 0 {
        let mut last = storage_offset;
        for (&s, &st) in shape.iter().zip(&strides) {
            let span = (s - 1).checked_mul(st).ok_or_else(overflow)?;
            last = last.checked_add(span).ok_or_else(overflow)?;
        }
        if last >= storage_len {
            return Err(Error::format(
                p,
                format!(
                    "tensor `{name}`: view (offset {storage_offset}, shape {shape:?}, strides {strides:?}) reaches element {last} but storage `{key}` holds only {storage_len} elements"
                ),
            ));
        }
    }
    Ok(TorchTensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        strides,
        storage_offset,
        storage_key: key.to_string(),
        storage_len,
        entry,
    })
}

// ------------------------------------------------------------------------------------------------
// File sniffing and zip reading
// ------------------------------------------------------------------------------------------------

fn read_at<R: Read + Seek>(
    file: &mut R,
    file_len: u64,
    offset: u64,
    len: u64,
    p: &str,
) -> Result<Vec<u8>> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => {}
        _ => {
            return Err(Error::format(
                p,
                format!(
                    "expected {len} bytes at offset {offset}, found the file ends at {file_len} (truncated?)"
                ),
            ))
        }
    }
    let len = usize::try_from(len).map_err(|_| {
        Error::format(
            p,
            format!("expected a read that fits in memory, found {len} bytes"),
        )
    })?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(p, e))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).map_err(|e| Error::io(p, e))?;
    Ok(buf)
}

/// Rejects files that are clearly not a torch zip, with a message saying what they look like.
fn sniff<R: Read + Seek>(file: &mut R, file_len: u64, p: &str) -> Result<()> {
    if file_len == 0 {
        return Err(Error::format(
            p,
            "expected a PyTorch zip checkpoint, found an empty file",
        ));
    }
    let head = read_at(file, file_len, 0, file_len.min(16), p)?;
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    if head.starts_with(b"GGUF") {
        return Err(Error::format(
            p,
            "expected a PyTorch zip checkpoint, found a GGUF file (magic `GGUF`); use the GGUF loader",
        ));
    }
    if head[0] == 0x80 {
        return Err(Error::format(p, LEGACY_MSG));
    }
    if head.len() >= 9 {
        let n = u64::from_le_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        if head[8] == b'{' && n >= 2 && n <= file_len - 8 {
            return Err(Error::format(
                p,
                "expected a PyTorch zip checkpoint, found what looks like a safetensors file (8-byte header length then a JSON header); use the safetensors loader",
            ));
        }
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Err(Error::format(
        p,
        format!(
            "expected a PyTorch zip checkpoint (magic `PK\\x03\\x04`), found leading bytes {}",
            hex.join(" ")
        ),
    ))
}

#[derive(Clone, Debug)]
struct ZipEntry {
    name: String,
    method: u16,
    flags: u16,
    comp_size: u64,
    size: u64,
    header_offset: u64,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOC_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;

fn read_zip_directory<R: Read + Seek>(
    file: &mut R,
    file_len: u64,
    p: &str,
) -> Result<Vec<ZipEntry>> {
    let bad = |d: String| Error::format(p, d);
    let tail_len = file_len.min(22 + 65535);
    let tail_start = file_len - tail_len;
    let tail = read_at(file, file_len, tail_start, tail_len, p)?;
    let mut found = None;
    if tail.len() >= 22 {
        for i in (0..=tail.len() - 22).rev() {
            if le32(&tail, i) == Some(EOCD_SIG) {
                let clen = le16(&tail, i + 20).unwrap_or(u16::MAX) as usize;
                if i + 22 + clen <= tail.len() {
                    found = Some(i);
                    break;
                }
            }
        }
    }
    let Some(i) = found else {
        return Err(bad(
            "expected a zip end-of-central-directory record at the end of the file, found none (truncated or not a zip)".into(),
        ));
    };
    let eocd_pos = tail_start + i as u64;
    let e = &tail[i..];
    let field =
        |v: Option<u16>| v.ok_or_else(|| bad("truncated end-of-central-directory record".into()));
    let mut count = field(le16(e, 10))? as u64;
    let mut cd_size = le32(e, 12)
        .map(u64::from)
        .ok_or_else(|| bad("truncated end-of-central-directory record".into()))?;
    let mut cd_offset = le32(e, 16)
        .map(u64::from)
        .ok_or_else(|| bad("truncated end-of-central-directory record".into()))?;
    let saturated = count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF;
    let mut zip64 = false;
    if eocd_pos >= 20 {
        let loc = read_at(file, file_len, eocd_pos - 20, 20, p)?;
        if le32(&loc, 0) == Some(EOCD64_LOC_SIG) {
            let off = le64(&loc, 8).unwrap_or(u64::MAX);
            if off.checked_add(56).is_none_or(|end| end > eocd_pos - 20) {
                return Err(bad(format!(
                    "expected the zip64 end-of-central-directory record before offset {}, found it claimed at {off}",
                    eocd_pos - 20
                )));
            }
            let rec = read_at(file, file_len, off, 56, p)?;
            if le32(&rec, 0) != Some(EOCD64_SIG) {
                return Err(bad(format!(
                    "expected a zip64 end-of-central-directory record at offset {off}, found signature {:#010x}",
                    le32(&rec, 0).unwrap_or(0)
                )));
            }
            count = le64(&rec, 32).unwrap_or(u64::MAX);
            cd_size = le64(&rec, 40).unwrap_or(u64::MAX);
            cd_offset = le64(&rec, 48).unwrap_or(u64::MAX);
            zip64 = true;
        }
    }
    if saturated && !zip64 {
        return Err(bad(
            "expected a zip64 end-of-central-directory locator (the directory fields are saturated), found none".into(),
        ));
    }
    if cd_size > MAX_CENTRAL_DIR_BYTES {
        return Err(bad(format!(
            "expected a zip central directory of at most {MAX_CENTRAL_DIR_BYTES} bytes, found {cd_size}"
        )));
    }
    if cd_offset
        .checked_add(cd_size)
        .is_none_or(|end| end > eocd_pos)
    {
        return Err(bad(format!(
            "expected the zip central directory ({cd_size} bytes at offset {cd_offset}) before the end record at {eocd_pos}, found it overlapping or past it (truncated?)"
        )));
    }
    if count > cd_size / 46 {
        return Err(bad(format!(
            "expected at most {} entries in a {cd_size}-byte central directory, found {count} claimed",
            cd_size / 46
        )));
    }
    let cd = read_at(file, file_len, cd_offset, cd_size, p)?;
    let mut entries = Vec::with_capacity(count.min(4096) as usize);
    let mut pos = 0usize;
    for n in 0..count {
        let trunc = || {
            bad(format!(
                "zip central directory entry {n} at offset {} is truncated",
                cd_offset + pos as u64
            ))
        };
        if le32(&cd, pos) != Some(CDH_SIG) {
            return Err(bad(format!(
                "expected zip central directory entry {n} at offset {}, found signature {:#010x}",
                cd_offset + pos as u64,
                le32(&cd, pos).unwrap_or(0)
            )));
        }
        let flags = le16(&cd, pos + 8).ok_or_else(trunc)?;
        let method = le16(&cd, pos + 10).ok_or_else(trunc)?;
        let mut comp_size = le32(&cd, pos + 20).ok_or_else(trunc)? as u64;
        let mut size = le32(&cd, pos + 24).ok_or_else(trunc)? as u64;
        let nlen = le16(&cd, pos + 28).ok_or_else(trunc)? as usize;
        let xlen = le16(&cd, pos + 30).ok_or_else(trunc)? as usize;
        let clen = le16(&cd, pos + 32).ok_or_else(trunc)? as usize;
        let mut header_offset = le32(&cd, pos + 42).ok_or_else(trunc)? as u64;
        let name_bytes = cd.get(pos + 46..pos + 46 + nlen).ok_or_else(trunc)?;
        let extra = cd
            .get(pos + 46 + nlen..pos + 46 + nlen + xlen)
            .ok_or_else(trunc)?;
        cd.get(pos + 46 + nlen + xlen..pos + 46 + nlen + xlen + clen)
            .ok_or_else(trunc)?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        // Zip64 extended information: the saturated fields, in this order.
        let mut x = 0usize;
        while x + 4 <= extra.len() {
            let id = le16(extra, x).ok_or_else(trunc)?;
            let sz = le16(extra, x + 2).ok_or_else(trunc)? as usize;
            let body = extra.get(x + 4..x + 4 + sz).ok_or_else(trunc)?;
            if id == 0x0001 {
                let mut b = 0usize;
                let mut next = |what: &str| {
                    let v = le64(body, b).ok_or_else(|| {
                        bad(format!("zip entry `{name}`: expected a zip64 {what} in the extra field, found none"))
                    });
                    b += 8;
                    v
                };
                if size == 0xFFFF_FFFF {
                    size = next("size")?;
                }
                if comp_size == 0xFFFF_FFFF {
                    comp_size = next("compressed size")?;
                }
                if header_offset == 0xFFFF_FFFF {
                    header_offset = next("header offset")?;
                }
            }
            x += 4 + sz;
        }
        entries.push(ZipEntry {
            name,
            method,
            flags,
            comp_size,
            size,
            header_offset,
        });
        pos += 46 + nlen + xlen + clen;
    }
    Ok(entries)
}

/// Offset of an entry's data, after checking its local header and that it is stored, unencrypted
/// and inside the file.
fn entry_data_offset<R: Read + Seek>(
    file: &mut R,
    file_len: u64,
    e: &ZipEntry,
    p: &str,
) -> Result<u64> {
    if e.flags & 1 != 0 {
        return Err(Error::format(
            p,
            format!(
                "zip entry `{}`: expected an unencrypted entry, found an encrypted one",
                e.name
            ),
        ));
    }
    if e.method != 0 || e.comp_size != e.size {
        return Err(Error::format(
            p,
            format!(
                "zip entry `{}`: expected a stored (uncompressed) entry as torch.save writes, found compression method {}",
                e.name, e.method
            ),
        ));
    }
    let h = read_at(file, file_len, e.header_offset, 30, p)?;
    if le32(&h, 0) != Some(LFH_SIG) {
        return Err(Error::format(
            p,
            format!(
                "zip entry `{}`: expected a local file header at offset {}, found signature {:#010x}",
                e.name,
                e.header_offset,
                le32(&h, 0).unwrap_or(0)
            ),
        ));
    }
    let n = le16(&h, 26).unwrap_or(0) as u64;
    let x = le16(&h, 28).unwrap_or(0) as u64;
    let data = e.header_offset + 30 + n + x;
    if data.checked_add(e.size).is_none_or(|end| end > file_len) {
        return Err(Error::format(
            p,
            format!(
                "zip entry `{}`: expected {} bytes of data at offset {data}, found the file ends at {file_len} (truncated?)",
                e.name, e.size
            ),
        ));
    }
    Ok(data)
}

fn read_entry<R: Read + Seek>(
    file: &mut R,
    file_len: u64,
    e: &ZipEntry,
    p: &str,
) -> Result<Vec<u8>> {
    let off = entry_data_offset(file, file_len, e, p)?;
    read_at(file, file_len, off, e.size, p)
}

// ------------------------------------------------------------------------------------------------
// Pickle VM
// ------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct StorageRef {
    dtype: TorchDType,
    key: Rc<str>,
    numel: u64,
}

#[derive(Debug)]
struct TensorRec {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug)]
struct Tuple {
    items: Vec<Value>,
    depth: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorClass,
    ParameterClass,
    Storage(TorchDType),
    /// A harmless data class that is accepted but never called (see the module docs).
    Inert(&'static str),
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Tuple(Rc<Tuple>),
    /// Index into the VM's list arena.
    List(usize),
    /// Index into the VM's dict arena.
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRec>),
    /// A value we keep no content of (bytes, sets, big ints, inert objects).
    Opaque(&'static str),
    /// A tensor rebuild call with arguments we do not understand; an error only if it is a
    /// state-dict entry.
    Invalid(Rc<str>),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => {
                let short: String = s.chars().take(40).collect();
                format!("str {short:?}")
            }
            Value::Tuple(t) => format!("a tuple of {} items", t.items.len()),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("global {g:?}"),
            Value::Storage(s) => format!("a {} storage", s.dtype),
            Value::Tensor(_) => "a tensor".into(),
            Value::Opaque(what) => format!("an opaque {what}"),
            Value::Invalid(why) => format!("an invalid tensor ({why})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum DictKey {
    Str(Rc<str>),
    Int(i64),
}

#[derive(Default)]
struct Dict {
    items: Vec<(Value, Value)>,
    index: HashMap<DictKey, usize>,
}

impl Dict {
    fn set(&mut self, k: Value, v: Value) {
        let key = match &k {
            Value::Str(s) => Some(DictKey::Str(s.clone())),
            Value::Int(i) => Some(DictKey::Int(*i)),
            _ => None,
        };
        if let Some(key) = key {
            if let Some(&i) = self.index.get(&key) {
                self.items[i].1 = v;
                return;
            }
            self.index.insert(key, self.items.len());
        }
        self.items.push((k, v));
    }
    fn get_str(&self, k: &str) -> Option<&Value> {
        let key = DictKey::Str(Rc::from(k));
        self.index.get(&key).map(|&i| &self.items[i].1)
    }
}

type VmResult<T> = std::result::Result<T, String>;

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// Resolves a pickle global against the allow-list; anything else is an error naming it.
fn resolve_global(module: &str, name: &str) -> VmResult<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch._tensor", "Tensor") | ("torch", "Tensor") => Global::TensorClass,
        ("torch.nn.parameter", "Parameter") => Global::ParameterClass,
        ("torch", s) if s.ends_with("Storage") => match TorchDType::from_storage_class(s) {
            Some(dtype) => Global::Storage(dtype),
            None => {
                return Err(format!(
                    "storage class `torch.{s}` is not supported (expected one of torch.Float/Half/BFloat16/Double/Long/Int/Short/Char/Byte/BoolStorage)"
                ))
            }
        },
        ("_codecs", "encode") => Global::Inert("bytes"),
        ("builtins", "set") | ("__builtin__", "set") => Global::Inert("set"),
        ("builtins", "frozenset") | ("__builtin__", "frozenset") => Global::Inert("frozenset"),
        ("builtins", "slice") => Global::Inert("slice"),
        ("builtins", "complex") => Global::Inert("complex"),
        ("builtins", "bytearray") => Global::Inert("bytearray"),
        ("argparse", "Namespace") => Global::Inert("argparse.Namespace"),
        ("torch", "device") => Global::Inert("torch.device"),
        ("torch", "Size") => Global::Inert("torch.Size"),
        (
            "torch",
            "float64" | "float32" | "float16" | "bfloat16" | "int64" | "int32" | "int16" | "int8"
            | "uint8" | "bool",
        ) => Global::Inert("torch.dtype"),
        (
            "numpy.core.multiarray" | "numpy._core.multiarray",
            "scalar" | "_reconstruct",
        ) => Global::Inert("numpy object"),
        ("numpy", "dtype" | "ndarray") => Global::Inert("numpy object"),
        _ => {
            return Err(format!(
                "pickle global `{module}.{name}` is not allowed (only collections.OrderedDict, torch tensor/parameter rebuild functions and torch.*Storage classes are); refusing to load it (it was not executed)"
            ))
        }
    };
    Ok(g)
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    lists: Vec<Vec<Value>>,
    dicts: Vec<Dict>,
    /// Items held by `lists` and `dicts` (see [`MAX_ITEMS`]).
    items: usize,
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            lists: Vec::new(),
            dicts: Vec::new(),
            items: 0,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> VmResult<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "{what} at byte {}: expected {n} bytes, found only {left} left in the pickle (truncated or corrupt)",
                self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> VmResult<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> VmResult<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> VmResult<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> VmResult<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self, what: &str) -> VmResult<&'a str> {
        let rest = &self.data[self.pos..];
        let limit = rest.len().min(MAX_GLOBAL_NAME + 1);
        let Some(n) = rest[..limit].iter().position(|&b| b == b'\n') else {
            return Err(format!(
                "{what} at byte {}: expected a newline-terminated name of at most {MAX_GLOBAL_NAME} bytes, found none",
                self.pos
            ));
        };
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| {
            format!(
                "{what} at byte {}: expected an ASCII name, found invalid UTF-8",
                self.pos
            )
        })?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> VmResult<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("pickle stack exceeds {MAX_STACK} entries"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> VmResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("pickle stack underflow".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn top_mut(&mut self) -> VmResult<&mut Value> {
        if self.stack.len() <= self.floor() {
            return Err("pickle stack underflow".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or("expected a MARK on the pickle stack, found none")?;
        if m > self.stack.len() {
            return Err("pickle mark above the stack top".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, idx: u32) -> VmResult<()> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&idx) {
            return Err(format!("pickle memo exceeds {MAX_MEMO} entries"));
        }
        let v = self.top_mut()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> VmResult<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("pickle memo key {idx} read before being written"))?;
        self.push(v)
    }
    fn tuple(&mut self, items: Vec<Value>) -> VmResult<Value> {
        let depth = 1 + items
            .iter()
            .map(|v| match v {
                Value::Tuple(t) => t.depth,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        if depth > MAX_TUPLE_DEPTH {
            return Err(format!(
                "pickle tuples nested deeper than {MAX_TUPLE_DEPTH}"
            ));
        }
        Ok(Value::Tuple(Rc::new(Tuple { items, depth })))
    }
    fn new_dict(&mut self) -> VmResult<Value> {
        self.check_containers()?;
        self.dicts.push(Dict::default());
        Ok(Value::Dict(self.dicts.len() - 1))
    }
    fn new_list(&mut self, items: Vec<Value>) -> VmResult<Value> {
        self.check_containers()?;
        self.add_items(items.len())?;
        self.lists.push(items);
        Ok(Value::List(self.lists.len() - 1))
    }
    fn check_containers(&self) -> VmResult<()> {
        if self.lists.len() + self.dicts.len() >= MAX_CONTAINERS {
            return Err(format!(
                "expected at most {MAX_CONTAINERS} lists and dicts in the pickle, found more"
            ));
        }
        Ok(())
    }
    fn add_items(&mut self, n: usize) -> VmResult<()> {
        self.items = self.items.saturating_add(n);
        if self.items > MAX_ITEMS {
            return Err(format!(
                "expected at most {MAX_ITEMS} list and dict items in the pickle, found more"
            ));
        }
        Ok(())
    }
    fn string(&mut self, n: u64, what: &str) -> VmResult<Value> {
        let at = self.pos;
        let b = self.take(n, what)?;
        let s = std::str::from_utf8(b).map_err(|_| {
            format!("{what} at byte {at}: expected UTF-8 text, found invalid bytes")
        })?;
        Ok(Value::Str(Rc::from(s)))
    }
    fn setitems(&mut self, target: Value, items: Vec<Value>) -> VmResult<()> {
        if items.len() & 1 != 0 {
            return Err(format!(
                "SETITEMS with an odd number of items ({})",
                items.len()
            ));
        }
        match target {
            Value::Dict(id) => {
                self.add_items(items.len() / 2)?;
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    self.dicts[id].set(k, v);
                }
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(format!(
                "expected a dict to set items on, found {}",
                other.describe()
            )),
        }
    }
    fn appends(&mut self, target: Value, items: Vec<Value>) -> VmResult<()> {
        match target {
            Value::List(id) => {
                self.add_items(items.len())?;
                self.lists[id].extend(items);
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(format!(
                "expected a list to append to, found {}",
                other.describe()
            )),
        }
    }

    /// Runs the pickle to STOP and returns the top-level object.
    fn run(&mut self) -> VmResult<Value> {
        loop {
            let at = self.pos;
            let op = self.u8("opcode")?;
            let name = opcode_name(op).unwrap_or("?");
            let ctx = |e: String| format!("{e} (opcode {name} at byte {at})");
            self.step(op, name).map_err(ctx)?;
            if op == b'.' {
                return self.pop().map_err(ctx);
            }
        }
    }

    fn step(&mut self, op: u8, name: &str) -> VmResult<()> {
        match op {
            0x80 => {
                let v = self.u8(name)?;
                if v > 5 {
                    return Err(format!("expected pickle protocol <= 5, found {v}"));
                }
            }
            0x95 => {
                self.u64(name)?;
            }
            b'.' => {}
            b'(' => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(format!("more than {MAX_MARKS} nested MARKs"));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top_mut()?.clone();
                self.push(v)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'J' => {
                let v = self.u32(name)? as i32;
                self.push(Value::Int(v as i64))?;
            }
            b'K' => {
                let v = self.u8(name)?;
                self.push(Value::Int(v as i64))?;
            }
            b'M' => {
                let v = self.u16(name)?;
                self.push(Value::Int(v as i64))?;
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8(name)? as u64
                } else {
                    let n = self.u32(name)? as i32;
                    u64::try_from(n)
                        .map_err(|_| format!("expected a non-negative length, found {n}"))?
                };
                let b = self.take(n, name)?;
                self.push(decode_long(b))?;
            }
            b'G' => {
                let b = self.take(8, name)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.push(Value::Float(f64::from_be_bytes(a)))?;
            }
            b'X' => {
                let n = self.u32(name)? as u64;
                let v = self.string(n, name)?;
                self.push(v)?;
            }
            0x8c => {
                let n = self.u8(name)? as u64;
                let v = self.string(n, name)?;
                self.push(v)?;
            }
            0x8d => {
                let n = self.u64(name)?;
                let v = self.string(n, name)?;
                self.push(v)?;
            }
            b'T' | b'B' => {
                let n = self.u32(name)?;
                let n = if op == b'T' {
                    u64::try_from(n as i32).map_err(|_| {
                        format!("expected a non-negative length, found {}", n as i32)
                    })?
                } else {
                    n as u64
                };
                self.take(n, name)?;
                self.push(Value::Opaque("bytes"))?;
            }
            b'U' | b'C' => {
                let n = self.u8(name)? as u64;
                self.take(n, name)?;
                self.push(Value::Opaque("bytes"))?;
            }
            0x8e | 0x96 => {
                let n = self.u64(name)?;
                self.take(n, name)?;
                self.push(Value::Opaque("bytes"))?;
            }
            b')' => {
                let t = self.tuple(Vec::new())?;
                self.push(t)?;
            }
            b't' => {
                let items = self.pop_mark()?;
                let t = self.tuple(items)?;
                self.push(t)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                let t = self.tuple(items)?;
                self.push(t)?;
            }
            b']' => {
                let l = self.new_list(Vec::new())?;
                self.push(l)?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                let l = self.new_list(items)?;
                self.push(l)?;
            }
            b'a' => {
                let v = self.pop()?;
                let target = self.top_mut()?.clone();
                self.appends(target, vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                let target = self.top_mut()?.clone();
                self.appends(target, items)?;
            }
            b'}' => {
                let d = self.new_dict()?;
                self.push(d)?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = self.new_dict()?;
                self.setitems(d.clone(), items)?;
                self.push(d)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let target = self.top_mut()?.clone();
                self.setitems(target, vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let target = self.top_mut()?.clone();
                self.setitems(target, items)?;
            }
            0x8f => self.push(Value::Opaque("set"))?,
            0x90 => {
                self.pop_mark()?;
                self.top_mut()?;
            }
            0x91 => {
                self.pop_mark()?;
                self.push(Value::Opaque("frozenset"))?;
            }
            b'q' => {
                let i = self.u8(name)? as u32;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.u32(name)?;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large".to_string())?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.u8(name)? as u32;
                self.memo_get(i)?;
            }
            b'j' => {
                let i = self.u32(name)?;
                self.memo_get(i)?;
            }
            b'c' => {
                let module = self.line(name)?;
                let gname = self.line(name)?;
                let g = resolve_global(module, gname)?;
                self.push(Value::Global(g))?;
            }
            0x93 => {
                let gname = self.pop()?;
                let module = self.pop()?;
                match (&module, &gname) {
                    (Value::Str(m), Value::Str(n)) => {
                        let g = resolve_global(m, n)?;
                        self.push(Value::Global(g))?;
                    }
                    _ => {
                        return Err(format!(
                            "expected module and name strings, found {} and {}",
                            module.describe(),
                            gname.describe()
                        ))
                    }
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = persistent_load(&pid)?;
                self.push(s)?;
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = match (&func, &args) {
                    (Value::Global(Global::OrderedDict), Value::Tuple(t)) if t.items.is_empty() => {
                        self.new_dict()?
                    }
                    _ => call(&func, &args)?,
                };
                self.push(v)?;
            }
            0x81 | 0x92 => {
                if op == 0x92 {
                    self.pop()?; // kwargs
                }
                self.pop()?; // args
                let cls = self.pop()?;
                match cls {
                    Value::Global(Global::Inert(what)) => self.push(Value::Opaque(what))?,
                    other => {
                        return Err(format!(
                            "expected an allow-listed inert class to instantiate, found {}",
                            other.describe()
                        ))
                    }
                }
            }
            b'b' => {
                // `obj.__setstate__(state)` / `obj.__dict__.update(state)`: nothing we keep has
                // state we need (an OrderedDict's `_metadata`, a Parameter's Python attributes).
                self.pop()?;
                self.top_mut()?;
            }
            _ => {
                return Err(match opcode_name(op) {
                    Some(n) => format!("unsupported pickle opcode {n} ({op:#04x})"),
                    None => format!("unknown pickle opcode {op:#04x}"),
                })
            }
        }
        Ok(())
    }
}

/// Decodes a little-endian two's-complement LONG1/LONG4 payload.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let fill = if neg { 0xFF } else { 0x00 };
    if b.len() > 8 {
        // Fits only if the extra bytes are sign extension.
        if b[8..].iter().any(|&x| x != fill) || ((b[7] & 0x80 != 0) != neg) {
            return Value::Opaque("big int");
        }
    }
    let mut a = [fill; 8];
    for (i, &x) in b.iter().take(8).enumerate() {
        a[i] = x;
    }
    Value::Int(i64::from_le_bytes(a))
}

/// torch's persistent id for a storage: `('storage', torch.<T>Storage, key, location, numel)`.
fn persistent_load(pid: &Value) -> VmResult<Value> {
    let expected =
        "expected a persistent id ('storage', torch.<Type>Storage, key, location, numel)";
    let Value::Tuple(t) = pid else {
        return Err(format!("{expected}, found {}", pid.describe()));
    };
    match &t.items[..] {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), key, Value::Str(_), Value::Int(numel)]
            if &**tag == "storage" =>
        {
            let key: Rc<str> = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => Rc::from(i.to_string()),
                other => return Err(format!("{expected}, found key {}", other.describe())),
            };
            let numel = u64::try_from(*numel)
                .map_err(|_| format!("{expected}, found a negative numel {numel}"))?;
            Ok(Value::Storage(Rc::new(StorageRef {
                dtype: *dtype,
                key,
                numel,
            })))
        }
        items => {
            let found: Vec<String> = items.iter().take(6).map(Value::describe).collect();
            Err(format!("{expected}, found ({})", found.join(", ")))
        }
    }
}

fn int_tuple(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Tuple(t) if t.items.len() <= MAX_NDIM => t
            .items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn rebuild_tensor_v2(args: &[Value]) -> Value {
    let invalid = |why: String| Value::Invalid(Rc::from(why));
    if !(6..=7).contains(&args.len()) {
        return invalid(format!(
            "torch._utils._rebuild_tensor_v2: expected 6 or 7 arguments, found {}",
            args.len()
        ));
    }
    let Value::Storage(storage) = &args[0] else {
        return invalid(format!(
            "torch._utils._rebuild_tensor_v2: expected a storage as first argument, found {}",
            args[0].describe()
        ));
    };
    let Value::Int(offset) = args[1] else {
        return invalid(format!(
            "torch._utils._rebuild_tensor_v2: expected an int storage offset, found {}",
            args[1].describe()
        ));
    };
    let (Some(size), Some(stride)) = (int_tuple(&args[2]), int_tuple(&args[3])) else {
        return invalid(format!(
            "torch._utils._rebuild_tensor_v2: expected size and stride tuples of at most {MAX_NDIM} ints, found {} and {}",
            args[2].describe(),
            args[3].describe()
        ));
    };
    Value::Tensor(Rc::new(TensorRec {
        storage: storage.clone(),
        offset,
        size,
        stride,
    }))
}

/// `REDUCE`: applies an allow-listed callable (`OrderedDict()` is handled by the VM). Only tensor
/// rebuilds do anything; inert classes yield opaque placeholders; nothing is ever executed.
fn call(func: &Value, args: &Value) -> VmResult<Value> {
    let Value::Tuple(args) = args else {
        return Err(format!(
            "expected an argument tuple for REDUCE, found {}",
            args.describe()
        ));
    };
    let args = &args.items[..];
    let Value::Global(g) = func else {
        return Err(format!(
            "expected an allow-listed callable for REDUCE, found {}",
            func.describe()
        ));
    };
    Ok(match g {
        Global::OrderedDict => {
            return Err(format!(
                "expected collections.OrderedDict() without arguments, found {} arguments",
                args.len()
            ))
        }
        Global::RebuildTensorV2 => rebuild_tensor_v2(args),
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(v @ (Value::Tensor(_) | Value::Invalid(_))) => v.clone(),
            other => Value::Invalid(Rc::from(format!(
                "torch._utils._rebuild_parameter: expected a tensor, found {}",
                other.map_or("nothing".into(), Value::describe)
            ))),
        },
        Global::RebuildFromTypeV2 => match args {
            [Value::Global(
                inner @ (Global::RebuildTensorV2
                | Global::RebuildParameter
                | Global::RebuildParameterWithState),
            ), Value::Global(Global::TensorClass | Global::ParameterClass), inner_args, _state] => {
                call(&Value::Global(*inner), inner_args)?
            }
            _ => Value::Invalid(Rc::from(
                "torch._tensor._rebuild_from_type_v2: expected (rebuild function, torch.Tensor or Parameter, args, state)",
            )),
        },
        Global::Inert(what) => Value::Opaque(what),
        Global::TensorClass | Global::ParameterClass | Global::Storage(_) => {
            return Err(format!("calling {g:?} from a pickle is not supported"))
        }
    })
}

/// Parses `data.pkl` and returns the state dict's tensors in order.
fn parse_state_dict(pickle: &[u8]) -> VmResult<Vec<(String, Rc<TensorRec>)>> {
    let mut vm = Vm::new(pickle);
    let top = vm.run()?;
    let Value::Dict(top_id) = top else {
        return Err(format!(
            "expected the top-level object to be a dict (a state dict or a {{'model': state_dict, ...}} wrapper), found {}",
            top.describe()
        ));
    };
    let mut sd = top_id;
    for key in ["model", "state_dict"] {
        if let Some(Value::Dict(id)) = vm.dicts[top_id].get_str(key) {
            sd = *id;
            break;
        }
    }
    let mut out = Vec::new();
    for (k, v) in &vm.dicts[sd].items {
        match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => out.push((k.to_string(), t.clone())),
            (Value::Str(k), Value::Invalid(why)) => {
                return Err(format!("tensor `{k}`: {why}"));
            }
            (k, Value::Tensor(_) | Value::Invalid(_)) => {
                return Err(format!(
                    "expected string keys for state-dict tensors, found {}",
                    k.describe()
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

impl crate::loader::TensorSource for TorchCheckpoint {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
    fn names(&self) -> Vec<String> {
        self.tensors().iter().map(|t| t.name.clone()).collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.shape.clone())
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        TorchCheckpoint::read_f32(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal pickle writer for hand-built test pickles.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn op(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn s(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(&mut self, i: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&i.to_le_bytes());
            self
        }
        fn global(&mut self, m: &str, n: &str) -> &mut Self {
            self.0.extend_from_slice(format!("c{m}\n{n}\n").as_bytes());
            self
        }
        fn ints(&mut self, v: &[i32]) -> &mut Self {
            self.op(b"(");
            for &i in v {
                self.int(i);
            }
            self.op(b"t")
        }
        /// `_rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), off, size, stride, False, OrderedDict())`
        fn tensor(
            &mut self,
            key: &str,
            numel: i32,
            off: i32,
            size: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b"((")
                .s("storage");
            self.global("torch", "FloatStorage")
                .s(key)
                .s("cpu")
                .int(numel)
                .op(b"tQ");
            self.int(off).ints(size).ints(stride).op(b"\x89");
            self.global("collections", "OrderedDict").op(b")RtR")
        }
        /// `{name: tensor}` around `body`, a complete pickle.
        fn dict1(name: &str, body: impl FnOnce(&mut P)) -> Vec<u8> {
            let mut p = P::default();
            p.op(b"\x80\x02}q\x00").s(name);
            body(&mut p);
            p.op(b"s.");
            p.0
        }
    }

    fn zip(entries: &[(&str, &[u8])], zip64: bool, method: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data) in entries {
            let lho = out.len() as u64;
            out.extend_from_slice(&LFH_SIG.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            let sat = |v: u64| if zip64 { 0xFFFF_FFFF } else { v as u32 };
            cd.extend_from_slice(&CDH_SIG.to_le_bytes());
            cd.extend_from_slice(&[20, 0, 20, 0, 0, 0]);
            cd.extend_from_slice(&method.to_le_bytes());
            cd.extend_from_slice(&[0; 8]);
            cd.extend_from_slice(&sat(data.len() as u64).to_le_bytes());
            cd.extend_from_slice(&sat(data.len() as u64).to_le_bytes());
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
            cd.extend_from_slice(&[0; 10]);
            cd.extend_from_slice(&sat(lho).to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
            if zip64 {
                cd.extend_from_slice(&[1, 0, 24, 0]);
                cd.extend_from_slice(&(data.len() as u64).to_le_bytes());
                cd.extend_from_slice(&(data.len() as u64).to_le_bytes());
                cd.extend_from_slice(&lho.to_le_bytes());
            }
        }
        let cd_off = out.len() as u64;
        out.extend_from_slice(&cd);
        let n = entries.len() as u64;
        if zip64 {
            let rec = out.len() as u64;
            out.extend_from_slice(&EOCD64_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for v in [n, n, cd.len() as u64, cd_off] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&EOCD64_LOC_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&rec.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&EOCD_SIG.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        if zip64 {
            out.extend_from_slice(&[0xFF; 12]);
        } else {
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
            out.extend_from_slice(&(cd_off as u32).to_le_bytes());
        }
        out.extend_from_slice(&[0, 0]);
        out
    }

    fn floats(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn open_bytes(tag: &str, bytes: &[u8]) -> Result<TorchCheckpoint> {
        let path =
            std::env::temp_dir().join(format!("minigpt4-torch-unit-{}-{tag}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let r = TorchCheckpoint::open(&path);
        // Read everything while the file exists.
        let r = r.and_then(|ck| {
            for t in ck.tensors() {
                ck.read_f32(&t.name)?;
            }
            Ok(ck)
        });
        let _ = std::fs::remove_file(&path);
        r
    }

    fn ckpt(pkl: &[u8], data: &[u8], zip64: bool) -> Vec<u8> {
        zip(
            &[
                ("arc/data.pkl", pkl),
                ("arc/byteorder", b"little"),
                ("arc/data/0", data),
            ],
            zip64,
            0,
        )
    }

    fn err(tag: &str, bytes: &[u8]) -> String {
        match open_bytes(tag, bytes) {
            Ok(_) => panic!("{tag}: expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn zip64_directory_and_3d_permuted_view() {
        // A [2,3,4] storage viewed as its (2,0,1) permutation: shape [4,2,3], strides [1,12,4].
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 24, 0, &[4, 2, 3], &[1, 12, 4]);
        });
        for zip64 in [false, true] {
            let path = std::env::temp_dir().join(format!(
                "minigpt4-torch-unit-{}-z64{zip64}",
                std::process::id()
            ));
            std::fs::write(&path, ckpt(&pkl, &floats(24), zip64)).unwrap();
            let ck = TorchCheckpoint::open(&path).unwrap();
            let got = ck.read_f32("w").unwrap();
            let mut want = Vec::new();
            for k in 0..4 {
                for i in 0..2 {
                    for j in 0..3 {
                        want.push((i * 12 + j * 4 + k) as f32);
                    }
                }
            }
            assert_eq!(got, want, "zip64={zip64}");
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn offset_view_reads_only_its_range() {
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 10, 7, &[3], &[1]);
        });
        let ck_bytes = ckpt(&pkl, &floats(10), false);
        let path =
            std::env::temp_dir().join(format!("minigpt4-torch-unit-{}-off", std::process::id()));
        std::fs::write(&path, &ck_bytes).unwrap();
        let ck = TorchCheckpoint::open(&path).unwrap();
        assert_eq!(ck.read_f32("w").unwrap(), vec![7.0, 8.0, 9.0]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn view_outside_storage_is_an_error_naming_the_tensor() {
        let pkl = P::dict1("enc.w", |p| {
            p.tensor("0", 10, 5, &[2, 4], &[4, 1]);
        });
        let msg = err("outside", &ckpt(&pkl, &floats(10), false));
        assert!(
            msg.contains("tensor `enc.w`") && msg.contains("reaches element 12"),
            "{msg}"
        );
    }

    #[test]
    fn overflowing_shape_is_an_error() {
        let pkl = P::dict1("w", |p| {
            p.tensor(
                "0",
                10,
                0,
                &[i32::MAX, i32::MAX, i32::MAX, i32::MAX, 0x7fff],
                &[0, 0, 0, 0, 0],
            );
        });
        let msg = err("overflow", &ckpt(&pkl, &floats(10), false));
        assert!(
            msg.contains("tensor `w`") && msg.contains("overflows"),
            "{msg}"
        );
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 10, 0, &[-1], &[1]);
        });
        let msg = err("negative", &ckpt(&pkl, &floats(10), false));
        assert!(
            msg.contains("tensor `w`") && msg.contains("non-negative"),
            "{msg}"
        );
    }

    #[test]
    fn storage_claims_more_than_record() {
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 11, 0, &[2], &[1]);
        });
        let msg = err("short-record", &ckpt(&pkl, &floats(10), false));
        assert!(
            msg.contains("tensor `w`") && msg.contains("claims 11 elements"),
            "{msg}"
        );
        let pkl = P::dict1("w", |p| {
            p.tensor("7", 1, 0, &[1], &[1]);
        });
        let msg = err("missing-record", &ckpt(&pkl, &floats(10), false));
        assert!(
            msg.contains("tensor `w`") && msg.contains("arc/data/7"),
            "{msg}"
        );
    }

    #[test]
    fn disallowed_globals_are_named() {
        let pkl = P::dict1("x", |p| {
            p.global("builtins", "eval").s("1+1").op(b"\x85R");
        });
        let msg = err("eval", &ckpt(&pkl, &floats(1), false));
        assert!(msg.contains("`builtins.eval` is not allowed"), "{msg}");
        // STACK_GLOBAL (protocol 4) goes through the same allow-list.
        let pkl = P::dict1("x", |p| {
            p.s("posix").s("system").op(b"\x93").s("true").op(b"\x85R");
        });
        let msg = err("stack-global", &ckpt(&pkl, &floats(1), false));
        assert!(msg.contains("`posix.system` is not allowed"), "{msg}");
        let pkl = P::dict1("x", |p| {
            p.global("torch", "ComplexFloatStorage");
        });
        let msg = err("complex", &ckpt(&pkl, &floats(1), false));
        assert!(
            msg.contains("`torch.ComplexFloatStorage` is not supported"),
            "{msg}"
        );
        // Even where it would sit outside the state dict.
        let mut p = P::default();
        p.op(b"\x80\x02}(").s("model").op(b"}").s("optimizer");
        p.global("subprocess", "Popen").op(b"u.");
        let msg = err("outside-sd", &ckpt(&p.0, &floats(1), false));
        assert!(msg.contains("subprocess.Popen"), "{msg}");
    }

    #[test]
    fn inert_globals_outside_the_state_dict_are_tolerated() {
        // {'model': {'w': tensor}, 'optimizer': {'b': _codecs.encode('x', 'latin1'), 's': set()}}
        let mut p = P::default();
        p.op(b"\x80\x02}(").s("model").op(b"}").s("w");
        p.tensor("0", 4, 0, &[2, 2], &[2, 1])
            .op(b"s")
            .s("optimizer")
            .op(b"}(")
            .s("b");
        p.global("_codecs", "encode")
            .s("x")
            .s("latin1")
            .op(b"\x86R")
            .s("s");
        p.global("builtins", "set")
            .op(b"]\x85R")
            .op(b"u")
            .s("epoch")
            .int(3)
            .op(b"u.");
        let ck = open_bytes("inert", &ckpt(&p.0, &floats(4), false)).unwrap();
        let names: Vec<&str> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w"]);
    }

    #[test]
    fn rebuild_parameter_and_from_type_v2() {
        let mut p = P::default();
        p.op(b"\x80\x02}(").s("p");
        p.global("torch._utils", "_rebuild_parameter").op(b"(");
        p.tensor("0", 4, 0, &[4], &[1]).op(b"\x88");
        p.global("collections", "OrderedDict").op(b")Rt").op(b"R");
        p.s("q")
            .global("torch._tensor", "_rebuild_from_type_v2")
            .op(b"(");
        p.global("torch._utils", "_rebuild_tensor_v2")
            .global("torch._tensor", "Tensor");
        p.op(b"((")
            .s("storage")
            .global("torch", "FloatStorage")
            .s("0")
            .s("cpu")
            .int(4)
            .op(b"tQ");
        p.int(1)
            .ints(&[3])
            .ints(&[1])
            .op(b"\x89")
            .global("collections", "OrderedDict");
        p.op(b")Rt}").op(b"tR").op(b"u.");
        let path =
            std::env::temp_dir().join(format!("minigpt4-torch-unit-{}-param", std::process::id()));
        std::fs::write(&path, ckpt(&p.0, &floats(4), false)).unwrap();
        let ck = TorchCheckpoint::open(&path).unwrap();
        assert_eq!(ck.read_f32("p").unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(ck.read_f32("q").unwrap(), vec![1.0, 2.0, 3.0]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unknown_and_unsupported_opcodes_name_offset() {
        let msg = parse_state_dict(b"\x80\x02}\xff.").unwrap_err();
        assert!(
            msg.contains("unknown pickle opcode 0xff") && msg.contains("byte 3"),
            "{msg}"
        );
        let msg = parse_state_dict(b"\x80\x02I42\n.").unwrap_err();
        assert!(
            msg.contains("unsupported pickle opcode INT") && msg.contains("byte 2"),
            "{msg}"
        );
        let msg = parse_state_dict(b"\x80\x02\x97.").unwrap_err();
        assert!(msg.contains("NEXT_BUFFER"), "{msg}");
    }

    #[test]
    fn vm_bounds() {
        // String longer than the data.
        let msg = parse_state_dict(b"\x80\x02X\xff\xff\xff\x7fabc.").unwrap_err();
        assert!(msg.contains("expected 2147483647 bytes"), "{msg}");
        let msg =
            parse_state_dict(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc.").unwrap_err();
        assert!(msg.contains("left in the pickle"), "{msg}");
        // Memo read before write, stack underflow, mark/stack confusion.
        assert!(parse_state_dict(b"\x80\x02h\x05.")
            .unwrap_err()
            .contains("memo key 5"));
        assert!(parse_state_dict(b"\x80\x02s.")
            .unwrap_err()
            .contains("underflow"));
        assert!(parse_state_dict(b"\x80\x02}(s.")
            .unwrap_err()
            .contains("underflow"));
        assert!(parse_state_dict(b"\x80\x02t.")
            .unwrap_err()
            .contains("MARK"));
        assert!(parse_state_dict(b"").unwrap_err().contains("opcode"));
        // Deep tuple nesting is bounded (no recursion blow-up on drop).
        let mut deep = b"\x80\x02)".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 100_000));
        deep.push(b'.');
        assert!(parse_state_dict(&deep)
            .unwrap_err()
            .contains("nested deeper"));
        // Stack depth is bounded.
        let mut wide = b"\x80\x02".to_vec();
        wide.extend(std::iter::repeat_n(b'N', MAX_STACK + 1));
        assert!(parse_state_dict(&wide)
            .unwrap_err()
            .contains("stack exceeds"));
        let mut marks = b"\x80\x02".to_vec();
        marks.extend(std::iter::repeat_n(b'(', MAX_MARKS + 1));
        assert!(parse_state_dict(&marks).unwrap_err().contains("MARK"));
        // Top level must be a dict.
        let msg = parse_state_dict(b"\x80\x02K\x07.").unwrap_err();
        assert!(
            msg.contains("top-level object to be a dict") && msg.contains("int 7"),
            "{msg}"
        );
    }

    #[test]
    fn containers_and_their_items_are_bounded() {
        // EMPTY_LIST POP, over and over: nothing stays on the stack, but every list was kept
        let mut many = b"\x80\x02".to_vec();
        for _ in 0..=MAX_CONTAINERS {
            many.extend_from_slice(b"]0");
        }
        many.push(b'.');
        let msg = parse_state_dict(&many).unwrap_err();
        assert!(
            msg.contains(&format!("at most {MAX_CONTAINERS} lists and dicts")),
            "{msg}"
        );
        // one list, appended to in batches of 4096 Nones until the item budget runs out
        let mut items = b"\x80\x02]".to_vec();
        for _ in 0..=MAX_ITEMS / 4096 {
            items.push(b'(');
            items.extend(std::iter::repeat_n(b'N', 4096));
            items.push(b'e');
        }
        items.push(b'.');
        let msg = parse_state_dict(&items).unwrap_err();
        assert!(
            msg.contains(&format!("at most {MAX_ITEMS} list and dict items")),
            "{msg}"
        );
    }

    #[test]
    fn opcodes_that_instantiate_or_extend_are_refused() {
        // INST and OBJ create instances of arbitrary classes, EXT* look up the copyreg
        // registry: torch.save never writes them.
        for (pkl, name) in [
            (&b"\x80\x02(ibuiltins\nobject\n."[..], "INST"),
            (
                &b"\x80\x02(cbuiltins\nobject\no."[..],
                "`builtins.object` is not allowed",
            ),
            (&b"\x80\x02\x82\x01."[..], "EXT1"),
            (&b"\x80\x02\x84\x01\x00\x00\x00."[..], "EXT4"),
        ] {
            let msg = parse_state_dict(pkl).unwrap_err();
            assert!(msg.contains(name), "{name}: {msg}");
        }
        // NEWOBJ of an allow-listed but non-inert global
        let mut p = P::default();
        p.op(b"\x80\x02");
        p.global("collections", "OrderedDict").op(b")\x81.");
        let msg = parse_state_dict(&p.0).unwrap_err();
        assert!(msg.contains("inert class to instantiate"), "{msg}");
    }

    #[test]
    fn records_sharing_bytes_are_refused() {
        // two tensors on two storages whose records are made to point at the same bytes
        let mut p = P::default();
        p.op(b"\x80\x02}q\x00(").s("a");
        p.tensor("0", 4, 0, &[4], &[1]);
        p.s("b").tensor("1", 4, 0, &[4], &[1]).op(b"u.");
        let mut z = zip(
            &[
                ("arc/data.pkl", &p.0),
                ("arc/data/0", &floats(4)),
                ("arc/data/1", &floats(4)),
            ],
            false,
            0,
        );
        assert_eq!(open_bytes("records-ok", &z).unwrap().tensors().len(), 2);
        let find = |z: &[u8], what: &[u8], last: bool| {
            let hits = z
                .windows(what.len())
                .enumerate()
                .filter(|(_, w)| *w == what);
            let pos: Vec<usize> = hits.map(|(i, _)| i).collect();
            if last {
                pos[pos.len() - 1]
            } else {
                pos[0]
            }
        };
        let lho0 = find(&z, b"arc/data/0", false) - 30;
        let cd1 = find(&z, b"arc/data/1", true) - 46;
        z[cd1 + 42..cd1 + 46].copy_from_slice(&(lho0 as u32).to_le_bytes());
        let msg = err("records-shared", &z);
        assert!(
            msg.contains("`arc/data/0`") && msg.contains("`arc/data/1`") && msg.contains("overlap"),
            "{msg}"
        );
        // a storage record pointing into the pickle's bytes
        let mut z = zip(
            &[
                ("arc/data.pkl", &p.0),
                ("arc/data/0", &floats(4)),
                ("arc/data/1", &floats(4)),
            ],
            false,
            0,
        );
        let lho_pkl = find(&z, b"arc/data.pkl", false) - 30;
        let cd0 = find(&z, b"arc/data/0", true) - 46;
        z[cd0 + 42..cd0 + 46].copy_from_slice(&(lho_pkl as u32).to_le_bytes());
        let msg = err("records-pickle", &z);
        assert!(
            msg.contains("`arc/data.pkl`") && msg.contains("overlap"),
            "{msg}"
        );
    }

    #[test]
    fn from_reader_reads_what_open_reads() {
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 6, 1, &[2, 2], &[1, 2]);
        });
        let z = ckpt(&pkl, &floats(6), false);
        let mut cur = std::io::Cursor::new(&z[..]);
        let ck =
            TorchCheckpoint::from_reader(&mut cur, z.len() as u64, Path::new("mem.pt")).unwrap();
        let b = ck.read_bytes_from(&mut cur, z.len() as u64, "w").unwrap();
        assert_eq!(bytes_to_f32(&b, TorchDType::F32), vec![1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn long_decoding() {
        assert!(matches!(decode_long(&[]), Value::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(decode_long(&[0x80, 0x00]), Value::Int(128)));
        let max = i64::MAX.to_le_bytes();
        assert!(matches!(decode_long(&max), Value::Int(i64::MAX)));
        let mut nine = i64::MIN.to_le_bytes().to_vec();
        nine.push(0xff);
        assert!(matches!(decode_long(&nine), Value::Int(i64::MIN)));
        assert!(matches!(
            decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]),
            Value::Opaque(_)
        ));
        assert!(matches!(
            decode_long(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Value::Opaque(_)
        ));
    }

    #[test]
    fn big_endian_compressed_and_layout_errors() {
        let pkl = P::dict1("w", |p| {
            p.tensor("0", 1, 0, &[1], &[1]);
        });
        let be = zip(
            &[
                ("arc/data.pkl", &pkl),
                ("arc/byteorder", b"big"),
                ("arc/data/0", &floats(1)),
            ],
            false,
            0,
        );
        assert!(err("be", &be).contains("big-endian"));
        let deflated = zip(&[("arc/data.pkl", &pkl)], false, 8);
        assert!(err("deflate", &deflated).contains("compression method 8"));
        let flat = zip(&[("data.pkl", &pkl)], false, 0);
        assert!(err("noarchive", &flat).contains("archive directory"));
        let nopkl = zip(&[("arc/version", b"3")], false, 0);
        assert!(err("nopkl", &nopkl).contains("arc/data.pkl"));
    }

    #[test]
    fn every_truncation_and_mutation_of_a_real_pickle_is_handled() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch/wrapper.pt"
        );
        let ck = TorchCheckpoint::open(Path::new(path)).unwrap();
        let mut f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        let pkl_entry = ck
            .entries
            .iter()
            .find(|e| e.name.ends_with("/data.pkl"))
            .unwrap();
        let pkl = read_entry(&mut f, len, pkl_entry, path).unwrap();
        let n = parse_state_dict(&pkl).unwrap().len();
        assert_eq!(n, ck.tensors().len());
        for cut in 0..pkl.len() - 1 {
            assert!(parse_state_dict(&pkl[..cut]).is_err(), "prefix {cut}");
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut b = pkl.clone();
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let i = (s % b.len() as u64) as usize;
            b[i] = (s >> 32) as u8;
            let _ = parse_state_dict(&b);
        }
    }
}
