//! safetensors files (single or sharded with `model.safetensors.index.json`), read tensor by
//! tensor. The JSON header is parsed and every entry validated (dtype, shape × dtype size =
//! byte length, ranges inside the file, no overlaps) before any data is read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::loader::TensorSource;

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => StDType::F32,
            "F16" => StDType::F16,
            "BF16" => StDType::BF16,
            "F64" => StDType::F64,
            "I64" => StDType::I64,
            "I32" => StDType::I32,
            "I16" => StDType::I16,
            "I8" => StDType::I8,
            "U8" => StDType::U8,
            "BOOL" => StDType::Bool,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            StDType::F64 | StDType::I64 => 8,
            StDType::F32 | StDType::I32 => 4,
            StDType::F16 | StDType::BF16 | StDType::I16 => 2,
            StDType::I8 | StDType::U8 | StDType::Bool => 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StTensor {
    pub name: String,
    pub dtype: StDType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// One safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, StTensor>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let f = File::open(path).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        Self::from_reader(f, len, path)
    }

    /// Reads and checks the header from `f`, which holds the `len` bytes of the file `path`
    /// (named in errors, and reopened to read tensors).
    pub fn from_reader(mut f: impl Read, len: u64, path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let mut nb = [0u8; 8];
        f.read_exact(&mut nb).map_err(|_| {
            Error::format(
                &p,
                format!(
                    "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
                ),
            )
        })?;
        let n = u64::from_le_bytes(nb);
        if n > MAX_HEADER || n > len - 8 {
            return Err(Error::format(&p, format!("header length {n} exceeds the file ({len} bytes) or the 100 MB limit: truncated, or not a safetensors file")));
        }
        let mut hb = vec![0u8; n as usize];
        f.read_exact(&mut hb).map_err(|e| Error::io(&p, e))?;
        let (tensors, metadata) = parse_header(&p, &hb, 8 + n, Some(len))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// A tensor's raw little-endian bytes.
    pub fn read_bytes(&self, t: &StTensor) -> Result<Vec<u8>> {
        let p = self.path.display().to_string();
        let f = File::open(&self.path).map_err(|e| Error::io(&p, e))?;
        self.read_bytes_from(f, t)
    }

    /// [`SafetensorsFile::read_bytes`] from an already open reader of the same file.
    pub fn read_bytes_from(&self, mut f: impl Read + Seek, t: &StTensor) -> Result<Vec<u8>> {
        let p = self.path.display().to_string();
        f.seek(SeekFrom::Start(t.start))
            .map_err(|e| Error::io(&p, e))?;
        let n = usize::try_from(t.end - t.start).map_err(|_| {
            Error::format(
                &p,
                format!(
                    "tensor `{}`: {} bytes do not fit in memory",
                    t.name,
                    t.end - t.start
                ),
            )
        })?;
        let mut b = vec![0u8; n];
        f.read_exact(&mut b)
            .map_err(|e| Error::format(&p, format!("tensor `{}`: {e}", t.name)))?;
        Ok(b)
    }

    /// The header entry of `name`, or an error naming the tensor and the file.
    pub fn entry(&self, name: &str) -> Result<&StTensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!("present in {}", self.path.display()),
                "missing",
            )
        })
    }

    /// An integer tensor (I32 or I64) as i64 values.
    pub fn read_ints(&self, name: &str) -> Result<Vec<i64>> {
        let t = self.entry(name)?;
        let b = self.read_bytes(t)?;
        Ok(match t.dtype {
            StDType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            StDType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            other => {
                return Err(Error::tensor(
                    name,
                    "an I32 or I64 tensor",
                    format!("{other:?}"),
                ))
            }
        })
    }

    pub fn read_f32_of(&self, t: &StTensor) -> Result<Vec<f32>> {
        let p = self.path.display().to_string();
        if t.dtype == StDType::F32 && cfg!(target_endian = "little") {
            // straight into the result: no second copy of a large tensor
            let mut v = vec![0f32; ((t.end - t.start) / 4) as usize];
            let mut f = File::open(&self.path).map_err(|e| Error::io(&p, e))?;
            f.seek(SeekFrom::Start(t.start))
                .map_err(|e| Error::io(&p, e))?;
            f.read_exact(bytemuck::cast_slice_mut(&mut v))
                .map_err(|e| Error::format(&p, format!("tensor `{}`: {e}", t.name)))?;
            return Ok(v);
        }
        let b = self.read_bytes(t)?;
        Ok(match t.dtype {
            StDType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDType::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::tensor(
                    &t.name,
                    "a floating-point tensor (F32, F16, BF16, F64)",
                    format!("{other:?} in {p}"),
                ))
            }
        })
    }
}

impl TensorSource for SafetensorsFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.entry(name)?;
        self.read_f32_of(t)
    }
}

/// Parses a safetensors JSON header: every entry's dtype, shape and byte range is checked
/// (shape × dtype size = length, no overlaps, and inside the file when its length `len` is
/// known). Ranges are returned as absolute offsets (`data_start` = 8 + header length).
pub fn parse_header(
    p: &str,
    hb: &[u8],
    data_start: u64,
    len: Option<u64>,
) -> Result<(BTreeMap<String, StTensor>, BTreeMap<String, String>)> {
    let header: serde_json::Value = serde_json::from_slice(hb)
        .map_err(|e| Error::format(p, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| Error::format(p, "header is not a JSON object"))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let bad = |what: String| Error::format(p, format!("tensor `{name}`: {what}"));
        let dt = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing dtype".into()))?;
        let dtype = StDType::parse(dt).ok_or_else(|| bad(format!("unsupported dtype {dt}")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
        let offs = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets must be [begin, end]".into()))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if offs.1 < offs.0 || offs.1 - offs.0 != numel as u64 {
            return Err(bad(format!(
                "shape {shape:?} × {dt} needs {numel} bytes, data_offsets {:?} give {}",
                [offs.0, offs.1],
                offs.1 as i128 - offs.0 as i128
            )));
        }
        // both offsets are checked against the address space, and the file when its length
        // is known
        let end = data_start
            .checked_add(offs.1)
            .filter(|&e| len.is_none_or(|l| e <= l))
            .ok_or_else(|| {
                bad(format!(
                    "data_offsets {:?} end past the file ({}): truncated or corrupt",
                    [offs.0, offs.1],
                    len.map_or("unknown length".into(), |l| format!(
                        "{l} bytes, data from byte {data_start}"
                    ))
                ))
            })?;
        tensors.insert(
            name.clone(),
            StTensor {
                name: name.clone(),
                dtype,
                shape,
                start: end - (offs.1 - offs.0),
                end,
            },
        );
    }
    let mut sorted: Vec<&StTensor> = tensors.values().collect();
    sorted.sort_by_key(|t| t.start);
    for w in sorted.windows(2) {
        if w[0].end > w[1].start {
            return Err(Error::format(
                p,
                format!("tensors `{}` and `{}` overlap", w[0].name, w[1].name),
            ));
        }
    }
    Ok((tensors, metadata))
}

/// Several sources seen as one (a sharded checkpoint); each name must live in exactly one.
pub struct Sharded {
    pub what: String,
    pub shards: Vec<Box<dyn TensorSource>>,
    index: HashMap<String, usize>,
}

impl Sharded {
    pub fn new(what: String, shards: Vec<Box<dyn TensorSource>>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, s) in shards.iter().enumerate() {
            for n in s.names() {
                if let Some(j) = index.insert(n.clone(), i) {
                    return Err(Error::format(
                        &what,
                        format!(
                            "tensor `{n}` appears in both {} and {}",
                            shards[j].describe(),
                            s.describe()
                        ),
                    ));
                }
            }
        }
        Ok(Sharded {
            what,
            shards,
            index,
        })
    }
}

impl TensorSource for Sharded {
    fn describe(&self) -> String {
        self.what.clone()
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index
            .get(name)
            .and_then(|&i| self.shards[i].shape(name))
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self.index.get(name) {
            Some(&i) => self.shards[i].read_f32(name),
            None => Err(Error::tensor(
                name,
                format!("present in {}", self.what),
                "missing",
            )),
        }
    }
    fn read_q4m(&self, name: &str) -> Result<Option<crate::quant::Encoded>> {
        match self.index.get(name) {
            Some(&i) => self.shards[i].read_q4m(name),
            None => Ok(None),
        }
    }
}

/// Reads the shard file names of an HF `*.index.json` (its `weight_map` values), in order.
pub fn index_shards(index: &Path) -> Result<Vec<PathBuf>> {
    let p = index.display().to_string();
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(&p, "missing `weight_map` object"))?;
    let mut files: Vec<String> = Vec::new();
    for (k, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| Error::format(&p, format!("weight_map[`{k}`] is not a file name")))?;
        if f.contains('/') || f.contains('\\') || f.contains("..") {
            return Err(Error::format(
                &p,
                format!("weight_map[`{k}`] = `{f}` is not a plain file name"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
