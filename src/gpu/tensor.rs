//! GPU tensors: one or more buffers plus shape and dtype.
//!
//! A tensor is viewed as a matrix `[rows, cols]` (`cols` = last dimension, `rows` = product of
//! the others). Its bytes follow the layouts of [`crate::quant`]. A tensor whose bytes exceed the
//! device's storage-binding limit (128 MiB on lavapipe) is split along rows into *parts*, each its
//! own buffer laid out as if it were a tensor of its own; kernels run once per part. Activations
//! (f32) are always a single part.

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::quant::{self, DType};

/// A contiguous range of rows stored in its own buffer(s).
#[derive(Clone)]
pub struct Part {
    pub row_start: usize,
    pub rows: usize,
    /// The data words (f32, packed f16, packed i8 or packed nibbles).
    pub data: wgpu::Buffer,
    /// The f16 block scales (quantised dtypes only).
    pub scales: Option<wgpu::Buffer>,
}

/// Cloning shares the buffers (wgpu handles are reference-counted).
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub parts: Vec<Part>,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Bytes of the uniform view of a GEMV input (`X_UNIFORM` in `gemv.wgsl`, WebGPU's default
/// `maxUniformBufferBindingSize`): activations are allocated at least this large so that any
/// row of up to 16384 values can be bound that way.
pub const UNIFORM_X_BYTES: u64 = 64 << 10;

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&c, rest)) => (rest.iter().product(), c),
        None => (1, 1),
    }
}

/// Bytes of one row of the stored data array (or scales array) of a `dtype` tensor with `cols`
/// columns (may be fractional words; see [`crate::package`] for the stored form).
pub fn stored_row_bytes(dtype: DType, cols: usize, scales: bool) -> usize {
    match (dtype, scales) {
        (DType::F32, false) => 4 * cols,
        (DType::F16, false) => 2 * cols,
        (DType::Q8, false) => cols,
        (DType::Q4 | DType::Q4M, false) => cols / 2,
        (DType::Q8 | DType::Q4, true) => 2 * (cols / quant::QBLOCK),
        (DType::Q4M, true) => 4 * (cols / quant::QBLOCK),
        (DType::F32 | DType::F16, true) => 0,
    }
}

/// Bytes of the buffer that holds `words` words: whole 16-byte units, so that kernels may view
/// any tensor as vec4 elements (16-byte loads) without its last few words falling outside
/// the view.
fn buffer_bytes(words: usize) -> u64 {
    (words.max(1).next_multiple_of(4) * 4) as u64
}

fn new_buffer_unchecked(gpu: &Gpu, label: &str, words: usize) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: buffer_bytes(words),
        usage: USAGE,
        mapped_at_creation: false,
    })
}

/// A storage buffer of `words` u32 words for tensor `label`. Natively an out-of-memory (or any
/// other) error of the allocation is caught by an error scope and returned naming the tensor
/// and its size; in the browser, where scopes resolve asynchronously, it surfaces at the next
/// submit. A lost device is reported as such.
pub(crate) fn new_buffer(gpu: &Gpu, label: &str, words: usize) -> Result<wgpu::Buffer> {
    gpu.check_lost()?;
    #[cfg(not(target_arch = "wasm32"))]
    {
        let oom = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let b = new_buffer_unchecked(gpu, label, words);
        let errs = [
            pollster::block_on(invalid.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errs.into_iter().flatten().next() {
            return Err(Error::Gpu(format!(
                "allocating `{label}` ({} bytes) on '{}': {e}",
                buffer_bytes(words),
                gpu.info.name
            )));
        }
        Ok(b)
    }
    #[cfg(target_arch = "wasm32")]
    Ok(new_buffer_unchecked(gpu, label, words))
}

impl Tensor {
    pub fn rows(&self) -> usize {
        rows_cols(&self.shape).0
    }
    pub fn cols(&self) -> usize {
        rows_cols(&self.shape).1
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows per part so that every buffer of a part fits in one binding.
    fn rows_per_part(
        gpu: &Gpu,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<usize> {
        let fits = |r: usize| {
            let n = r * cols;
            (4 * dtype.data_words(n).max(dtype.scale_words(n))) as u64 <= gpu.max_binding
        };
        if fits(rows) {
            return Ok(rows.max(1));
        }
        if !fits(1) {
            return Err(Error::tensor(
                name,
                format!(
                    "rows of at most {} bytes (the device's storage binding limit)",
                    gpu.max_binding
                ),
                format!("a row of {} {} values", cols, dtype),
            ));
        }
        // largest r that fits, by bisection, rounded down so that every part starts on a word
        // boundary of both stored arrays (see `write_stored`)
        let (mut lo, mut hi) = (1usize, rows);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) {
                lo = mid
            } else {
                hi = mid
            }
        }
        let align = (1..=4)
            .find(|a| {
                (a * stored_row_bytes(dtype, cols, false)).is_multiple_of(4)
                    && (a * stored_row_bytes(dtype, cols, true)).is_multiple_of(4)
            })
            .unwrap_or(4);
        if lo < align {
            return Err(Error::tensor(
                name,
                format!(
                    "{align} rows of at most {} bytes (the device's storage binding limit)",
                    gpu.max_binding
                ),
                format!("rows of {} {} values", cols, dtype),
            ));
        }
        Ok(lo / align * align)
    }

    /// A zero-filled f32 activation tensor (one buffer; must fit in one binding).
    pub fn zeros(gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if (n * 4) as u64 > gpu.max_binding {
            return Err(Error::tensor(
                name,
                format!(
                    "an activation of at most {} bytes (storage binding limit)",
                    gpu.max_binding
                ),
                format!("{:?} f32 = {} bytes", shape, n * 4),
            ));
        }
        let (rows, _) = rows_cols(shape);
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            parts: vec![Part {
                row_start: 0,
                rows,
                data: new_buffer(gpu, name, n.max(UNIFORM_X_BYTES as usize / 4))?,
                scales: None,
            }],
        })
    }

    /// Encodes `x` into `dtype` on the CPU and uploads it, splitting rows across buffers when the
    /// tensor exceeds the binding limit. Host memory beyond `x` is one part's encoding.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        x: &[f32],
    ) -> Result<Tensor> {
        let (rows, cols) = rows_cols(shape);
        if x.len() != rows * cols {
            return Err(Error::tensor(
                name,
                format!("{} values for shape {:?}", rows * cols, shape),
                x.len(),
            ));
        }
        dtype.check_cols(name, cols)?;
        let per = Self::rows_per_part(gpu, name, dtype, rows, cols)?;
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < rows.max(1) {
            let r = per.min(rows - r0);
            let enc = quant::encode(dtype, &x[r0 * cols..(r0 + r) * cols], cols)?;
            parts.push(Self::upload_part(gpu, name, r0, r, &enc)?);
            r0 += r;
            if rows == 0 {
                break;
            }
        }
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            parts,
        })
    }

    /// Uploads a whole tensor already encoded in its GPU layout, split into parts on row
    /// boundaries when it exceeds the binding limit.
    pub fn upload_encoded(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        enc: &quant::Encoded,
    ) -> Result<Tensor> {
        let (rows, cols) = rows_cols(shape);
        let n = rows * cols;
        if enc.data.len() != enc.dtype.data_words(n) || enc.scales.len() != enc.dtype.scale_words(n)
        {
            return Err(Error::tensor(
                name,
                format!(
                    "{} data + {} scale words for {shape:?} {}",
                    enc.dtype.data_words(n),
                    enc.dtype.scale_words(n),
                    enc.dtype
                ),
                format!("{} + {}", enc.data.len(), enc.scales.len()),
            ));
        }
        let t = Self::empty(gpu, name, shape, enc.dtype)?;
        t.write_stored(&gpu.queue, false, 0, bytemuck::cast_slice(&enc.data));
        if enc.dtype.is_quantized() {
            t.write_stored(&gpu.queue, true, 0, bytemuck::cast_slice(&enc.scales));
        }
        Ok(t)
    }

    /// Allocates a weight tensor of `dtype` without data, split into parts like
    /// [`Tensor::upload_encoded`]; fill it with [`Tensor::write_stored`].
    pub fn empty(gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (rows, cols) = rows_cols(shape);
        dtype.check_cols(name, cols)?;
        let per = Self::rows_per_part(gpu, name, dtype, rows, cols)?;
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < rows.max(1) {
            let r = per.min(rows - r0).max(rows.min(1));
            let n = r.max(1) * cols;
            parts.push(Part {
                row_start: r0,
                rows: r,
                data: new_buffer(gpu, name, dtype.data_words(n))?,
                scales: match dtype.is_quantized() {
                    true => Some(new_buffer(gpu, name, dtype.scale_words(n))?),
                    false => None,
                },
            });
            r0 += r.max(1);
        }
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            parts,
        })
    }

    /// Writes bytes of the tensor's stored form (its data array, or with `scales` its scales
    /// array, as one contiguous little-endian run across all parts) starting at byte `offset`.
    /// `offset` and the length must be multiples of 4.
    pub fn write_stored(&self, queue: &wgpu::Queue, scales: bool, offset: u64, bytes: &[u8]) {
        let cols = self.cols();
        let row_bytes = stored_row_bytes(self.dtype, cols, scales) as u64;
        let end = offset + bytes.len() as u64;
        for p in &self.parts {
            let buf = match (scales, &p.scales) {
                (false, _) => &p.data,
                (true, Some(s)) => s,
                (true, None) => continue,
            };
            // the last part also takes the padding after the last row
            let last = p.row_start + p.rows >= self.rows();
            let p0 = p.row_start as u64 * row_bytes;
            let p1 = if last {
                u64::MAX
            } else {
                (p.row_start + p.rows) as u64 * row_bytes
            };
            let (a, b) = (offset.max(p0), end.min(p1));
            if a < b {
                let src = &bytes[(a - offset) as usize..(b - offset) as usize];
                queue.write_buffer(buf, a - p0, src);
            }
        }
    }

    fn upload_part(
        gpu: &Gpu,
        name: &str,
        row_start: usize,
        rows: usize,
        enc: &quant::Encoded,
    ) -> Result<Part> {
        let data = new_buffer(gpu, name, enc.data.len())?;
        gpu.queue
            .write_buffer(&data, 0, bytemuck::cast_slice(&enc.data));
        let scales = if enc.dtype.is_quantized() {
            let s = new_buffer(gpu, name, enc.scales.len())?;
            gpu.queue
                .write_buffer(&s, 0, bytemuck::cast_slice(&enc.scales));
            Some(s)
        } else {
            None
        };
        Ok(Part {
            row_start,
            rows,
            data,
            scales,
        })
    }

    /// The single buffer of an f32 activation tensor.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.parts[0].data
    }

    /// Checks dtype and shape (for op arguments).
    pub fn expect(&self, dtype: Option<DType>, shape: &[usize]) -> Result<()> {
        if let Some(d) = dtype {
            if self.dtype != d {
                return Err(Error::tensor(&self.name, format!("dtype {d}"), self.dtype));
            }
        }
        if self.shape != shape {
            return Err(Error::tensor(
                &self.name,
                format!("shape {shape:?}"),
                format!("{:?}", self.shape),
            ));
        }
        Ok(())
    }

    /// Overwrites an f32 tensor from the host.
    pub fn write_f32(&self, gpu: &Gpu, x: &[f32]) -> Result<()> {
        if self.dtype != DType::F32 || self.parts.len() != 1 || x.len() != self.numel() {
            return Err(Error::tensor(
                &self.name,
                format!("{} f32 values", self.numel()),
                format!("{} values for a {} tensor", x.len(), self.dtype),
            ));
        }
        gpu.queue
            .write_buffer(self.buffer(), 0, bytemuck::cast_slice(x));
        Ok(())
    }

    /// Reads an f32 tensor back to the host (submits nothing else; waits for the GPU).
    pub async fn read_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        if self.dtype != DType::F32 || self.parts.len() != 1 {
            return Err(Error::tensor(
                &self.name,
                "a single-part f32 tensor",
                format!("{} in {} parts", self.dtype, self.parts.len()),
            ));
        }
        let words = read_words(gpu, self.buffer(), 0, self.numel()).await?;
        Ok(bytemuck::cast_slice(&words).to_vec())
    }
}

/// A buffer of token ids (u32) for the embedding gather.
pub struct Ids {
    pub buffer: wgpu::Buffer,
    pub len: usize,
}

impl Ids {
    pub fn new(gpu: &Gpu, ids: &[u32]) -> Ids {
        let buffer = new_buffer_unchecked(gpu, "ids", ids.len());
        gpu.queue
            .write_buffer(&buffer, 0, bytemuck::cast_slice(ids));
        Ids {
            buffer,
            len: ids.len(),
        }
    }
}

/// Copies `words` u32 words from `buffer` (starting at word `offset`) back to the host.
pub async fn read_words(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: usize,
    words: usize,
) -> Result<Vec<u32>> {
    let size = (words.max(1) * 4) as u64;
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, (offset * 4) as u64, &staging, 0, size);
    gpu.queue.submit([enc.finish()]);
    let mapped = map_for_read(&staging);
    gpu.wait();
    read_mapped(gpu, &staging, mapped, words).await
}

/// A readback buffer's mapping, requested: the future [`read_mapped`] waits on.
pub(crate) type Mapping =
    futures_channel::oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>;

/// Asks for `staging` to be mapped for reading once the submitted work writing it is done.
pub(crate) fn map_for_read(staging: &wgpu::Buffer) -> Mapping {
    let (tx, rx) = futures_channel::oneshot::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    rx
}

/// The first `words` u32 words of `staging` once `mapped` ([`map_for_read`]) completes
/// (natively, after the caller has waited for the submission writing it); unmaps it. A lost
/// device is named as such.
pub(crate) async fn read_mapped(
    gpu: &Gpu,
    staging: &wgpu::Buffer,
    mapped: Mapping,
    words: usize,
) -> Result<Vec<u32>> {
    gpu.check_lost()?;
    mapped
        .await
        .map_err(|_| Error::Gpu("readback was cancelled (device lost?)".into()))?
        .map_err(|e| match gpu.check_lost() {
            Err(lost) => lost,
            Ok(()) => Error::Gpu(format!("readback failed: {e}")),
        })?;
    let out = {
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("readback mapping failed: {e}")))?;
        bytemuck::cast_slice(&view[..words * 4]).to_vec()
    };
    staging.unmap();
    Ok(out)
}
