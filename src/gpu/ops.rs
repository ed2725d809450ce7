//! Typed wrappers over the WGSL kernels. Each call checks its arguments' shapes and dtypes and
//! records one or more dispatches; nothing runs until the recorder is submitted.

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::recorder::{grid, Recorder};
use crate::gpu::shader::Variant;
use crate::gpu::tensor::{Ids, Tensor, UNIFORM_X_BYTES};
use crate::quant::DType;

fn f(v: f32) -> u32 {
    v.to_bits()
}

fn u(v: usize) -> u32 {
    v as u32
}

fn wflag(d: DType) -> &'static str {
    match d {
        DType::F32 => "W_F32",
        DType::F16 => "W_F16",
        DType::Q8 => "W_Q8",
        DType::Q4 => "W_Q4",
        DType::Q4M => "W_Q4M",
    }
}

/// `x` is f32 and holds the `n` (at least 1) elements a selection reads.
fn need_first(x: &Tensor, n: usize) -> Result<()> {
    need_f32(x)?;
    if n == 0 || n > x.numel() {
        return Err(Error::tensor(
            &x.name,
            format!("at least {n} elements (n >= 1)"),
            x.numel(),
        ));
    }
    Ok(())
}

/// An RMSNorm fused into the block GEMV that reads its output (`NORM` in `gemv.wgsl`).
#[derive(Clone, Copy)]
struct Norm<'a> {
    weight: &'a Tensor,
    eps: f32,
}

impl<'a> Norm<'a> {
    /// The norm of `x`'s rows with `weight`, checked as [`Recorder::rms_norm`] checks it.
    fn checked(x: &Tensor, weight: &'a Tensor, eps: f32) -> Result<Self> {
        for t in [x, weight] {
            need_f32(t)?;
        }
        weight.expect(None, &[x.cols()])?;
        Ok(Norm { weight, eps })
    }
}

/// Whether `x` (`m` rows from row `row0`) can be bound as the block GEMV's uniform input: one
/// row, in a buffer of [`UNIFORM_X_BYTES`] up to the adapter's uniform binding limit.
fn uniform_x(gpu: &Gpu, x: &Tensor, row0: usize, m: usize) -> bool {
    m == 1 && uniform_span(gpu, x, (row0 + 1) * x.cols())
}

/// Whether `t`'s first `floats` values can be read through a uniform binding of its whole
/// buffer, declared as [`UNIFORM_X_BYTES`]: the buffer at least that large and at most the
/// adapter's uniform binding limit.
fn uniform_span(gpu: &Gpu, t: &Tensor, floats: usize) -> bool {
    let size = t.buffer().size();
    t.parts.len() == 1
        && floats * 4 <= UNIFORM_X_BYTES as usize
        && size >= UNIFORM_X_BYTES
        && size <= gpu.limits.max_uniform_buffer_binding_size
}

/// The block GEMV's subgroup form needs a subgroup variant and one row of x.
fn need_subgroups(v: Variant, m: usize, x: &str) -> Result<()> {
    if !v.subgroups {
        return Err(Error::Gpu(format!(
            "block GEMV lanes {GEMV_SUBGROUP} (subgroups) need a subgroup kernel variant, found {}",
            v.name()
        )));
    }
    if m != 1 {
        return Err(Error::tensor(
            x,
            "one row of x (block GEMV with subgroups)",
            format!("{m} rows"),
        ));
    }
    Ok(())
}

fn need_f32(t: &Tensor) -> Result<()> {
    if t.dtype != DType::F32 || t.parts.len() != 1 {
        return Err(Error::tensor(
            &t.name,
            "a single-part f32 activation",
            format!("{} in {} parts", t.dtype, t.parts.len()),
        ));
    }
    Ok(())
}

fn need_len(t: &Tensor, what: &str, min: usize) -> Result<()> {
    if t.numel() < min {
        return Err(Error::tensor(
            &t.name,
            format!("at least {min} elements ({what})"),
            t.numel(),
        ));
    }
    Ok(())
}

/// Which matmul kernel to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// For M <= 4: the block GEMV when K is a multiple of 32 (with the adapter's tuned lane
    /// count), the reduction GEMV otherwise; tiled GEMM for more rows.
    Auto,
    /// One workgroup per output element, a reduction over any K (`matmul.wgsl` `gemv`).
    Gemv,
    /// Whole 32-weight blocks, `64 / lanes` output columns per workgroup (`gemv.wgsl`); needs
    /// M <= 4 and K % 32 == 0. Lanes: 1, 4, 8, 16, 32 or 64.
    GemvBlocks(u32),
    /// The tiled GEMM in the adapter's tuned form ([`crate::gpu::Gpu::gemm_form`]).
    Gemm,
    /// The tiled GEMM in a given form: [`GEMM_WIDE`], [`GEMM_TALL`] and [`GEMM_HALF`] bits
    /// (0: 64×64 tiles, 4×4 outputs per invocation, f32).
    GemmForm(u32),
}

/// Bit of a GEMM form: 128 output columns per tile, 4×8 outputs per invocation (`GEMM_WIDE`
/// in `matmul.wgsl`): fewer workgroup-memory loads per multiply-add, more registers.
pub const GEMM_WIDE: u32 = 1;

/// Bit of a GEMM form: 128 rows of x per tile, 8×4 outputs per invocation (`GEMM_TALL`);
/// with [`GEMM_WIDE`], 128×128 tiles of 8×8.
pub const GEMM_TALL: u32 = 4;

/// Bit of a GEMM form: tiles held in f16 and each 16-deep step multiplied and summed in f16
/// before its f32 accumulation (`GEMM_HALF`; needs the f16 kernel variant, and is the f32
/// form of the same tile without it).
pub const GEMM_HALF: u32 = 2;

/// Bit of a GEMM form: 32 rows of x per tile in workgroups of 16×8 invocations (`GEMM_SHORT`;
/// not with [`GEMM_TALL`]). Not a tuned choice: a tuned GEMM of at most 32 rows takes it (see
/// [`gemm_form_for`]).
pub const GEMM_SHORT: u32 = 8;

/// A GEMM form of its own, not a bit to combine: no tiles, the block GEMV's kernel taking
/// four rows of x at a time (`gemv_rows4` in `gemv.wgsl`, a workgroup per four rows and
/// column group, one dispatch for all rows), each weight loaded and unpacked once per four
/// rows, with no workgroup memory and no barrier.
/// What CPU drivers run fastest (their barriers are coroutine switches); a GPU's tuning keeps
/// the tiles. Needs K a multiple of 32; other widths run the 64×64 tiles.
pub const GEMM_ROWS: u32 = 16;

/// Whether `form` is a GEMM form value.
pub fn is_gemm_form(form: u32) -> bool {
    form == GEMM_ROWS
        || (form & !(GEMM_WIDE | GEMM_TALL | GEMM_HALF | GEMM_SHORT) == 0
            && form & (GEMM_TALL | GEMM_SHORT) != GEMM_TALL | GEMM_SHORT)
}

/// The form a tuned GEMM (`MatmulPath::Gemm`) runs in for `m` rows of x and `n` output
/// columns of `dtype` weights: `form` without the bits whose second block would lie wholly
/// outside the output (128-row tiles for at most 64 rows, 128-column tiles for at most 64
/// columns), which would only double the work, with 32-row tiles for at most 32 rows (half a
/// 64-row tile would multiply zeros), and without f16 arithmetic for f32 weights (a model
/// loaded in f32 computes in f32).
pub fn gemm_form_for(form: u32, m: usize, n: usize, dtype: DType) -> u32 {
    if form == GEMM_ROWS {
        return form;
    }
    let mut f = form;
    if dtype == DType::F32 {
        f &= !GEMM_HALF;
    }
    if m <= 64 {
        f &= !GEMM_TALL;
    }
    if m <= 32 {
        f |= GEMM_SHORT;
    }
    if n <= 64 {
        f &= !GEMM_WIDE;
    }
    f
}

/// Rows of an `m`-row tuned GEMM with `tile_rows`-row tiles (and `k` a multiple of 32) that go
/// to the block GEMV instead: at most [`GEMV_MAX_ROWS`] rows past whole tiles. The ViT's 257
/// rows (1025 at 448 px) would otherwise take a third tile row of 128 (or a fifth of 64) for
/// one row, a third (a fifth) of the GEMM's arithmetic for nothing; the GEMV reads the weights
/// once for it. 0 where there is no such tail, or no whole tile before it.
pub fn gemm_tail(m: usize, tile_rows: usize, k: usize) -> usize {
    let tail = m % tile_rows;
    if m > tile_rows && tail <= GEMV_MAX_ROWS && k.is_multiple_of(32) {
        tail
    } else {
        0
    }
}

/// The GEMM's candidates on `gpu`: the four tile shapes, each also in f16 where the adapter
/// offers f16, and [`GEMM_ROWS`].
pub fn gemm_candidates(gpu: &Gpu) -> Vec<u32> {
    let tiles = [0, GEMM_WIDE, GEMM_TALL, GEMM_WIDE | GEMM_TALL];
    let mut v = tiles.to_vec();
    if gpu.best_variant.f16 {
        v.extend(tiles.map(|t| t | GEMM_HALF));
    }
    v.push(GEMM_ROWS);
    v
}

/// Lane counts the block GEMV is compiled for.
pub const GEMV_LANES: [u32; 6] = [1, 4, 8, 16, 32, 64];

/// "Lanes" value of the block GEMV's subgroup form (`gemv_sg` in `gemv.wgsl`, subgroup
/// variants, one row of x): a subgroup per group of four weight rows, its invocations
/// splitting K, summed with `subgroupAdd`.
pub const GEMV_SUBGROUP: u32 = 0;

/// Bit of a block-GEMV lane value: x read through a uniform binding (`X_UNIFORM` in
/// `gemv.wgsl`), where x is one row of at most 16384 values in a buffer of
/// [`UNIFORM_X_BYTES`] up to the adapter's uniform binding limit (as a storage buffer
/// otherwise). `4 | GEMV_UNIFORM_X`: 4 lanes per column, x as a uniform.
pub const GEMV_UNIFORM_X: u32 = 0x100;

/// Bit of a block-GEMV lane value: workgroups of 16 invocations instead of 64 (`WG16` in
/// `gemv.wgsl`; lane counts up to 16), a quarter of the rows each. CPU drivers run one
/// workgroup per thread, so a small matrix (SmolLM2's 576 rows: three workgroups of 256 rows
/// on two threads) spreads evenly. `1 | GEMV_WG16 | GEMV_UNIFORM_X`: 1 lane, 16 invocations,
/// x as a uniform.
pub const GEMV_WG16: u32 = 0x200;

/// Bit of a block-GEMV lane value (1 lane only): x shared through the subgroup (`X_SG` in
/// `gemv.wgsl`): each invocation loads one of a block's 8 x vec4s and takes the others by
/// `subgroupBroadcast`, instead of every invocation loading all 8. Where it cannot run (a
/// variant without subgroups, several rows of x, subgroups smaller than 8 or larger than the
/// workgroup) the same form runs without it. `1 | GEMV_X_SUBGROUP | GEMV_WG16 |
/// GEMV_UNIFORM_X`: 1 lane, 16 invocations, x as a uniform, shared through the subgroup.
pub const GEMV_X_SUBGROUP: u32 = 0x400;

/// Whether `lanes` is a block-GEMV lane value: a lane count, with or without
/// [`GEMV_UNIFORM_X`], (up to 16 lanes) [`GEMV_WG16`] and (1 lane) [`GEMV_X_SUBGROUP`], or
/// [`GEMV_SUBGROUP`].
pub fn is_gemv_lanes(lanes: u32) -> bool {
    let count = lanes & !(GEMV_UNIFORM_X | GEMV_WG16 | GEMV_X_SUBGROUP);
    lanes == GEMV_SUBGROUP
        || (GEMV_LANES.contains(&count)
            && (lanes & GEMV_WG16 == 0 || count <= 16)
            && (lanes & GEMV_X_SUBGROUP == 0 || count == 1))
}

/// Whether the block GEMV can share x through subgroups ([`GEMV_X_SUBGROUP`]) on `gpu` in a
/// workgroup of `invocations`: subgroup kernels, and subgroups of at least 8 invocations that
/// the workgroup fills (so that lanes 0..7 are always there to broadcast from).
pub fn x_subgroup_fits(gpu: &Gpu, invocations: u32) -> bool {
    let (min, max) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    gpu.best_variant.subgroups && min >= 8 && max >= min && invocations.is_multiple_of(max)
}

/// Whether the tiled attention and the tiled GEMM's f32 forms can share their row operands
/// through subgroups (`ROWS_SG` in `attention.wgsl` and `matmul.wgsl`): subgroup kernels on
/// a CPU driver whose subgroups hold 8 or 16 invocations. The kernels need each subgroup
/// inside one row group of 16 consecutive invocations; llvmpipe's subgroups are its SIMD
/// chunks in invocation order, while WebGPU and Vulkan leave the order to the driver, so GPUs
/// (subgroups of 32 or 64 besides) keep the plain kernels.
pub fn rows_subgroup_fits(gpu: &Gpu) -> bool {
    let (min, max) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    gpu.best_variant.subgroups
        && gpu.info.device_type == wgpu::DeviceType::Cpu
        && min >= 8
        && max >= min
        && max <= 16
}

/// Lane counts also tried with 16-invocation workgroups ([`GEMV_WG16`]).
const GEMV_WG16_LANES: [u32; 2] = [1, 4];

/// The block GEMV's candidates on `gpu`: every lane count with x as a storage buffer and as a
/// uniform, 1 and 4 lanes also in workgroups of 16, and the subgroup form where the adapter
/// offers subgroups.
pub fn gemv_candidates(gpu: &Gpu) -> Vec<u32> {
    let mut v = GEMV_LANES.to_vec();
    v.extend(GEMV_LANES.map(|l| l | GEMV_UNIFORM_X));
    for x in [0, GEMV_UNIFORM_X] {
        v.extend(GEMV_WG16_LANES.map(|l| l | GEMV_WG16 | x));
    }
    if gpu.best_variant.subgroups {
        v.push(GEMV_SUBGROUP);
    }
    for (bits, invocations) in [(0, 64), (GEMV_WG16, 16)] {
        if x_subgroup_fits(gpu, invocations) {
            let l = 1 | GEMV_X_SUBGROUP | bits;
            v.extend([l, l | GEMV_UNIFORM_X]);
        }
    }
    v
}

/// Lanes the subgroup form falls back to where it cannot run (a recorder without subgroups,
/// or more than one row of x).
const GEMV_SUBGROUP_FALLBACK: u32 = 8;

/// Rows of weights per workgroup of `gemv_sg`: `SG_GROUPS` groups of four.
const GEMV_SG_ROWS: usize = 8;

fn lanes_flag(lanes: u32) -> Result<&'static str> {
    Ok(match lanes {
        1 => "LANES1",
        4 => "LANES4",
        8 => "LANES8",
        16 => "LANES16",
        32 => "LANES32",
        64 => "LANES64",
        _ => {
            return Err(Error::Gpu(format!(
                "block GEMV: expected 1, 4, 8, 16, 32 or 64 lanes, found {lanes}"
            )))
        }
    })
}

/// Rows of x up to which [`MatmulPath::Auto`] picks the GEMV kernel.
pub const GEMV_MAX_ROWS: usize = 4;

/// The block GEMV's lanes for `m` (at most [`GEMV_MAX_ROWS`]) rows of x on an `[n, k]` weight
/// of `dt`: the shape's or the adapter's tuned value, without subgroups where the variant has
/// none or x has several rows.
fn block_lanes(gpu: &Gpu, v: Variant, m: usize, n: usize, k: usize, dt: DType) -> u32 {
    match gpu.gemv_lanes_for(n, k, dt) {
        GEMV_SUBGROUP if !v.subgroups || m > 1 => GEMV_SUBGROUP_FALLBACK,
        lanes => lanes,
    }
}

/// The kernel [`MatmulPath::Auto`] stands for with `m` rows of x and `[n, k]` weights, for a
/// recorder of kernel variant `v`.
fn resolve(
    gpu: &Gpu,
    v: Variant,
    path: MatmulPath,
    m: usize,
    n: usize,
    k: usize,
    dt: DType,
) -> MatmulPath {
    match path {
        MatmulPath::Auto if m <= GEMV_MAX_ROWS && k.is_multiple_of(32) => {
            MatmulPath::GemvBlocks(block_lanes(gpu, v, m, n, k, dt))
        }
        MatmulPath::Auto if m <= GEMV_MAX_ROWS => MatmulPath::Gemv,
        MatmulPath::Auto => MatmulPath::Gemm,
        other => other,
    }
}

/// Candidates the GPU top-k keeps (`KEEP` in `topk.wgsl`), the span one workgroup ranks, and
/// the chunks whose bests stand for a vector longer than that span (`CHUNK`).
pub const TOPK_KEEP: usize = 64;
const TOPK_SPAN: usize = 1024;
const TOPK_CHUNK: usize = 16;

/// u32 words of each candidate buffer [`Recorder::topk`] needs for `n` elements.
pub fn topk_words(n: usize) -> usize {
    n.div_ceil(TOPK_SPAN).max(1) * TOPK_KEEP * 3
}

/// What [`Recorder::sample`] samples with: the warp (temperature, top-k below
/// [`TOPK_KEEP`], top-p) and the draw `u`, uniform in [0, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
}

/// Keys per split of the split-K decode attention (`CH` in `attention.wgsl`).
pub const ATTN_SPLIT: usize = 256;

/// Query rows from which attention takes the tiled kernel (`attention_tiled`), and the rows
/// and largest head_dim of its tiles (`TR`, `TD` in `attention.wgsl`).
pub const ATTN_TILED_FROM: usize = 8;
pub const ATTN_TILE_ROWS: usize = 16;
pub const ATTN_TILE_DIM: usize = 128;

/// f32 elements the split-K decode attention needs for its partial results.
pub fn attention_partials(t: usize, heads: usize, s: usize, head_dim: usize) -> usize {
    t * heads * s.div_ceil(ATTN_SPLIT).max(1) * (head_dim + 2)
}

/// Rotary pairing convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// HF `rotate_half`: element i pairs with i + head_dim/2.
    Half,
    /// Interleaved (Meta / GGUF): element 2i pairs with 2i + 1.
    Interleaved,
}

/// A host-computed cos/sin table for rotary embeddings.
pub struct RopeTable {
    pub head_dim: usize,
    pub max_pos: usize,
    pub buffer: Tensor,
}

impl RopeTable {
    /// cos/sin of `pos * theta^(-2i/head_dim)` for pos < max_pos, in f32 exactly as HF computes
    /// `inv_freq` and `freqs` (f32 products), then `cos`/`sin` in f32.
    pub fn values(head_dim: usize, max_pos: usize, theta: f32) -> Vec<f32> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut v = Vec::with_capacity(max_pos * half * 2);
        for pos in 0..max_pos {
            for &fr in &inv {
                let a = pos as f32 * fr;
                v.push(a.cos());
                v.push(a.sin());
            }
        }
        v
    }

    pub fn new(gpu: &crate::gpu::Gpu, head_dim: usize, max_pos: usize, theta: f32) -> Result<Self> {
        if !head_dim.is_multiple_of(2) || head_dim == 0 {
            return Err(Error::tensor("rope", "an even head_dim", head_dim));
        }
        let v = Self::values(head_dim, max_pos, theta);
        let buffer = Tensor::upload(gpu, "rope_table", &[max_pos, head_dim], DType::F32, &v)?;
        Ok(RopeTable {
            head_dim,
            max_pos,
            buffer,
        })
    }
}

/// A LLaMA layer's rotary step and KV-cache write, as [`Recorder::rms_norm_qkv_rope`] takes it:
/// `heads` query and `kv_heads` key/value heads of the table's head dim, rows at positions
/// `pos0 ..`, the rotated k and v written to `cache` (see [`Recorder::rope_kv`]).
#[derive(Clone, Copy)]
pub struct RopeKv<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub table: &'a RopeTable,
    pub pos0: usize,
    pub mode: RopeMode,
    pub cache: &'a Tensor,
}

/// The shape of a LLaMA layer's KV cache of `ctx` positions: head-major,
/// `[2 * kv_heads, ctx, head_dim]`, the keys of KV head g in block g and its values in block
/// `kv_heads + g`, position p at row p of a block. Each head's keys (and values) are then
/// contiguous: attention reads a head's run of positions as one stream (neighbouring
/// invocations, neighbouring keys), where rows of `[k heads, v heads]` per position would put
/// each key's slice of a head on a memory page of its own.
pub fn kv_cache_shape(kv_heads: usize, ctx: usize, head_dim: usize) -> [usize; 3] {
    [2 * kv_heads, ctx, head_dim]
}

/// The keys and the values of a cache of [`kv_cache_shape`] as attention reads them.
pub fn kv_cache_views(cache: &Tensor) -> Result<(HeadView<'_>, HeadView<'_>)> {
    match cache.shape[..] {
        [blocks, ctx, d] if blocks % 2 == 0 => {
            let hs = ctx * d;
            Ok((
                HeadView::head_major(cache, 0, d, hs),
                HeadView::head_major(cache, blocks / 2 * hs, d, hs),
            ))
        }
        _ => Err(Error::tensor(
            &cache.name,
            "a KV cache [2 * kv_heads, ctx, head_dim]",
            format!("{:?}", cache.shape),
        )),
    }
}

/// Checks `rows` rows of `qkv` and `rope` as [`Recorder::rope_kv`] needs them; whether the
/// cache is f16 (else f32).
fn check_rope_kv(qkv: &Tensor, rows: usize, rope: &RopeKv) -> Result<bool> {
    let RopeKv {
        heads,
        kv_heads,
        table,
        pos0,
        cache,
        ..
    } = *rope;
    need_f32(qkv)?;
    let d = table.head_dim;
    let width = (heads + 2 * kv_heads) * d;
    qkv.expect(None, &[rows, width])?;
    let f16 = match cache.dtype {
        DType::F16 if cache.parts.len() == 1 => true,
        DType::F32 if cache.parts.len() == 1 => false,
        other => {
            return Err(Error::tensor(
                &cache.name,
                "a single-part f32 or f16 KV cache",
                format!("{other} in {} parts", cache.parts.len()),
            ))
        }
    };
    let fits = matches!(cache.shape[..], [_, ctx, _]
        if cache.shape[..] == kv_cache_shape(kv_heads, ctx, d) && ctx >= pos0 + rows);
    if !fits {
        return Err(Error::tensor(
            &cache.name,
            format!("a KV cache [{}, >= {}, {d}]", 2 * kv_heads, pos0 + rows),
            format!("{:?}", cache.shape),
        ));
    }
    if pos0 + rows > table.max_pos {
        return Err(Error::tensor(
            "rope_table",
            format!("positions up to {}", pos0 + rows),
            format!("a table of {} positions", table.max_pos),
        ));
    }
    Ok(f16)
}

/// A strided view of rows of heads inside a tensor: element (t, h, i) at
/// `offset + t * stride + h * head_stride + i`, where `head_stride` is `head_dim` (the heads
/// of a row side by side) unless given: a head-major KV cache (`[heads, ctx, head_dim]`, each
/// head's keys contiguous) has stride `head_dim` and head stride `ctx * head_dim`.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    pub t: &'a Tensor,
    pub offset: usize,
    pub stride: usize,
    pub head_stride: Option<usize>,
}

impl<'a> HeadView<'a> {
    /// A contiguous `[rows, heads * head_dim]` tensor.
    pub fn whole(t: &'a Tensor) -> Self {
        Self::rows(t, 0, t.cols())
    }

    /// Rows `stride` apart from `offset`, each holding its heads side by side.
    pub fn rows(t: &'a Tensor, offset: usize, stride: usize) -> Self {
        HeadView {
            t,
            offset,
            stride,
            head_stride: None,
        }
    }

    /// Heads `head_stride` apart from `offset`, each holding its rows `stride` apart.
    pub fn head_major(t: &'a Tensor, offset: usize, stride: usize, head_stride: usize) -> Self {
        HeadView {
            t,
            offset,
            stride,
            head_stride: Some(head_stride),
        }
    }

    /// Elements between heads for heads of `head_dim` values.
    fn head_step(&self, head_dim: usize) -> usize {
        self.head_stride.unwrap_or(head_dim)
    }

    /// Refuses a view whose heads are not side by side (where a kernel assumes they are).
    fn need_heads_side_by_side(&self, what: &str, head_dim: usize) -> Result<()> {
        match self.head_stride {
            Some(hs) if hs != head_dim => Err(Error::tensor(
                &self.t.name,
                format!("{what} with heads side by side (head stride {head_dim})"),
                format!("head stride {hs}"),
            )),
            _ => Ok(()),
        }
    }
}

/// Attention geometry.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query rows.
    pub t: usize,
    /// Key/value rows visible (cache length including the new rows).
    pub s: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// What a matmul does with each output value before storing it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Epilogue {
    /// Store (or add, with accumulate) as it is.
    None,
    /// Store silu(value).
    Silu,
    /// Multiply what the output holds by the value.
    MulInto,
}

impl Recorder<'_> {
    /// `out[M, N] (+)= x[M, K] · Wᵀ (+ bias)` for a weight `[N, K]` in any dtype, split or not.
    pub fn matmul(
        &mut self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.matmul_with(MatmulPath::Auto, x, w, bias, out, accumulate)
    }

    pub fn matmul_with(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
        accumulate: bool,
    ) -> Result<()> {
        self.matmul_impl(path, x, Epilogue::None, w, bias, out, accumulate, None)
    }

    /// `out = silu(x · gateᵀ) * (x · upᵀ)` (LLaMA's MLP before the down projection). For one
    /// row of x and quantised weights on the block GEMV this is one dispatch in which gate and
    /// up share every x load (`GLU` in `gemv.wgsl`); otherwise the gate projection writes silu
    /// of its result and the up projection multiplies into it. Either way there is no separate
    /// pass, and the down projection reads a plain input.
    pub fn matmul_glu(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        if gate.shape != up.shape {
            return Err(Error::tensor(
                &up.name,
                format!("the shape of `{}` {:?}", gate.name, gate.shape),
                format!("{:?}", up.shape),
            ));
        }
        if let Some(lanes) = self.glu_lanes(path, x, gate, up) {
            return self.gemv_glu(lanes, x, gate, up, out, None);
        }
        self.matmul_impl(path, x, Epilogue::Silu, gate, None, out, false, None)?;
        self.matmul_impl(path, x, Epilogue::MulInto, up, None, out, false, None)
    }

    /// The block GEMV lanes of the one-dispatch GLU where it applies: one row of `x`, `gate`
    /// and `up` quantised, of one dtype and shape `[N, K]`, split into the same parts.
    fn glu_lanes(&self, path: MatmulPath, x: &Tensor, gate: &Tensor, up: &Tensor) -> Option<u32> {
        let (m, n, k) = (x.rows(), gate.rows(), x.cols());
        let same_parts = gate.parts.len() == up.parts.len()
            && gate
                .parts
                .iter()
                .zip(&up.parts)
                .all(|(a, b)| (a.row_start, a.rows) == (b.row_start, b.rows));
        let fits = m == 1
            && gate.shape == up.shape
            && gate.dtype == up.dtype
            && gate.dtype.is_quantized()
            && same_parts
            && gate.shape.len() == 2
            && gate.cols() == k;
        match resolve(self.gpu, self.variant, path, m, n, k, gate.dtype) {
            MatmulPath::GemvBlocks(lanes) if fits => Some(lanes),
            _ => None,
        }
    }

    /// `out = rms_norm(x) · wᵀ` (LLaMA's attention input and logits). For one row of x on the
    /// block GEMV, where [`Gpu::fuse_norm`] says so, this is one dispatch (`NORM` in
    /// `gemv.wgsl`): the GEMV reads x times the norm's weights, sums the squares of x from the
    /// same loads, and scales each total by 1 / rms(x). That saves a dispatch but repeats the
    /// norm's arithmetic in every invocation, so tuning decides. Otherwise `h` (x's shape)
    /// receives the normalised x and the matmul reads it.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_matmul(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        norm_w: &Tensor,
        eps: f32,
        h: &Tensor,
        w: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        let norm = Norm::checked(x, norm_w, eps)?;
        let (m, k) = (x.rows(), x.cols());
        if self.gpu.fuse_norm() && m == 1 && w.shape.len() == 2 && w.cols() == k {
            let blocks = resolve(self.gpu, self.variant, path, m, w.rows(), k, w.dtype);
            if matches!(blocks, MatmulPath::GemvBlocks(_)) {
                return self.matmul_impl(
                    blocks,
                    x,
                    Epilogue::None,
                    w,
                    None,
                    out,
                    false,
                    Some(norm),
                );
            }
        }
        self.rms_norm(x, norm_w, eps, h)?;
        self.matmul_with(path, h, w, None, out, false)
    }

    /// `out = silu(rms_norm(x) · gateᵀ) * (rms_norm(x) · upᵀ)` (LLaMA's MLP input): one
    /// dispatch where [`Recorder::matmul_glu`] takes one and the norm can be fused as in
    /// [`Recorder::rms_norm_matmul`]; otherwise through `h`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_glu(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        norm_w: &Tensor,
        eps: f32,
        h: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        let norm = Norm::checked(x, norm_w, eps)?;
        if self.gpu.fuse_norm() {
            if let Some(lanes) = self.glu_lanes(path, x, gate, up) {
                return self.gemv_glu(lanes, x, gate, up, out, Some(norm));
            }
        }
        self.rms_norm(x, norm_w, eps, h)?;
        self.matmul_glu(path, h, gate, up, out)
    }

    /// `qkv = rms_norm(x) · wᵀ` (a LLaMA layer's fused QKV projection), then
    /// [`Recorder::rope_kv`] on its rows. For one row of x on the block GEMV, with `w` in one
    /// part and a head dim divisible by 4, the rotation and the cache write happen in the
    /// GEMV's store (`ROPE` in `gemv.wgsl`): one dispatch fewer per layer, and one dispatch in
    /// all where the norm is fused too (as in [`Recorder::rms_norm_matmul`]). Otherwise the
    /// same ops one after another; either way `qkv` ends with q rotated and k, v as projected.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_qkv_rope(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        norm_w: &Tensor,
        eps: f32,
        h: &Tensor,
        w: &Tensor,
        qkv: &Tensor,
        rope: RopeKv,
    ) -> Result<()> {
        let norm = Norm::checked(x, norm_w, eps)?;
        let (m, k) = (x.rows(), x.cols());
        let f16 = check_rope_kv(qkv, m, &rope)?;
        let fits = m == 1
            && k.is_multiple_of(32)
            && w.parts.len() == 1
            && w.shape.len() == 2
            && w.cols() == k
            && w.rows() == qkv.cols()
            && rope.table.head_dim.is_multiple_of(4);
        if fits {
            let blocks = resolve(self.gpu, self.variant, path, m, w.rows(), k, w.dtype);
            if let MatmulPath::GemvBlocks(lanes) = blocks {
                if self.gpu.fuse_norm() {
                    return self.gemv_rope(lanes, x, w, qkv, Some(norm), &rope, f16);
                }
                self.rms_norm(x, norm_w, eps, h)?;
                return self.gemv_rope(lanes, h, w, qkv, None, &rope, f16);
            }
        }
        self.rms_norm_matmul(path, x, norm_w, eps, h, w, qkv)?;
        self.rope_kv_checked(qkv, m, &rope, f16)
    }

    /// The one-dispatch QKV projection, rotation and cache write of
    /// [`Recorder::rms_norm_qkv_rope`]: `x` one row, `w` one part, checked by the caller.
    #[allow(clippy::too_many_arguments)]
    fn gemv_rope(
        &mut self,
        lanes: u32,
        x: &Tensor,
        w: &Tensor,
        qkv: &Tensor,
        norm: Option<Norm>,
        rope: &RopeKv,
        f16: bool,
    ) -> Result<()> {
        let (n, k) = (w.rows(), x.cols());
        let (form, entry, rows_per_group) = self.gemv_form(lanes, 1, x, 0, 1, norm)?;
        let mut flags = vec![wflag(w.dtype), "ROPE"];
        flags.extend(form);
        if f16 {
            flags.push("KV_F16");
        }
        let d = rope.table.head_dim;
        let params = [
            1,
            u(n),
            u(k),
            u(k),
            u(n),
            0,
            0,
            0,
            f(norm.map_or(0.0, |n| n.eps)),
            0,
            u(rope.pos0),
            u(rope.heads * d),
            u(rope.kv_heads * d),
            u(d),
            (rope.mode == RopeMode::Interleaved) as u32,
            u(rope.cache.shape[1]),
        ];
        let part = &w.parts[0];
        let mut bufs = vec![
            (1, x.buffer()),
            (2, &part.data),
            (5, qkv.buffer()),
            (9, rope.table.buffer.buffer()),
            (10, rope.cache.buffer()),
        ];
        if let Some(s) = &part.scales {
            bufs.push((3, s));
        }
        if let Some(n) = norm {
            bufs.push((8, n.weight.buffer()));
        }
        let groups = grid(u(n.div_ceil(rows_per_group)));
        self.dispatch("gemv", entry, &flags, &params, &bufs, groups)
    }

    /// The one-dispatch silu(gate) * up of [`Recorder::matmul_glu`]: `x` one row, `gate` and
    /// `up` quantised, of one dtype and split into the same parts.
    fn gemv_glu(
        &mut self,
        lanes: u32,
        x: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        out: &Tensor,
        norm: Option<Norm>,
    ) -> Result<()> {
        need_f32(x)?;
        need_f32(out)?;
        let (n, k) = (gate.rows(), x.cols());
        out.expect(None, &[1, n])?;
        let (form, entry, rows_per_group) = self.gemv_form(lanes, 1, x, 0, 1, norm)?;
        let mut flags = vec![wflag(gate.dtype), "GLU"];
        flags.extend(form);
        for (g, u_) in gate.parts.iter().zip(&up.parts) {
            let (Some(gs), Some(us)) = (&g.scales, &u_.scales) else {
                return Err(Error::tensor(&gate.name, "block scales", "none"));
            };
            let eps = f(norm.map_or(0.0, |n| n.eps));
            let params = [1, u(g.rows), u(k), u(k), u(n), u(g.row_start), 0, 0, eps, 0];
            let mut bufs = vec![
                (1, x.buffer()),
                (2, &g.data),
                (3, gs),
                (5, out.buffer()),
                (6, &u_.data),
                (7, us),
            ];
            if let Some(n) = norm {
                bufs.push((8, n.weight.buffer()));
            }
            // a column takes two weight rows (gate and up)
            let groups = grid(u(g.rows.div_ceil(rows_per_group / 2)));
            self.dispatch("gemv", entry, &flags, &params, &bufs, groups)?;
        }
        Ok(())
    }

    /// The block GEMV form `lanes` stands for with `m` rows of `x` (and a fused RMSNorm's
    /// weights): its flags (the lane count, `X_UNIFORM` where x and those weights can be bound
    /// as uniforms, `WG16`, `X_SG` where the kernel shares the x of up to `sg_rows` rows
    /// through the subgroup, `NORM`), its entry point, and the weight rows one workgroup
    /// covers.
    #[allow(clippy::too_many_arguments)]
    fn gemv_form(
        &self,
        lanes: u32,
        sg_rows: usize,
        x: &Tensor,
        row0: usize,
        m: usize,
        norm: Option<Norm>,
    ) -> Result<(Vec<&'static str>, &'static str, usize)> {
        let (mut flags, entry, rows) = match lanes {
            GEMV_SUBGROUP => {
                need_subgroups(self.variant, m, &x.name)?;
                // the module's plain entry point needs a lane count to compile
                (vec!["LANES1"], "gemv_sg", GEMV_SG_ROWS)
            }
            l => {
                let lanes = l & !(GEMV_UNIFORM_X | GEMV_WG16 | GEMV_X_SUBGROUP);
                let mut flags = vec![lanes_flag(lanes)?];
                // a fused norm's weights are bound the way x is
                if l & GEMV_UNIFORM_X != 0
                    && uniform_x(self.gpu, x, row0, m)
                    && norm.is_none_or(|n| uniform_x(self.gpu, n.weight, 0, 1))
                {
                    flags.push("X_UNIFORM");
                }
                let mut invocations = 64;
                if l & GEMV_WG16 != 0 {
                    if lanes > 16 {
                        return Err(Error::Gpu(format!(
                            "block GEMV: workgroups of 16 take at most 16 lanes, found {lanes}"
                        )));
                    }
                    flags.push("WG16");
                    invocations = 16;
                }
                if l & GEMV_X_SUBGROUP != 0 {
                    if lanes != 1 {
                        return Err(Error::Gpu(format!(
                            "block GEMV: x shared through the subgroup takes 1 lane, found {lanes}"
                        )));
                    }
                    if self.variant.subgroups
                        && m <= sg_rows
                        && x_subgroup_fits(self.gpu, invocations)
                    {
                        flags.push("X_SG");
                    }
                }
                (flags, "gemv", 4 * invocations as usize / lanes as usize)
            }
        };
        if norm.is_some() {
            flags.push("NORM");
        }
        Ok((flags, entry, rows))
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_impl(
        &mut self,
        path: MatmulPath,
        x: &Tensor,
        epilogue: Epilogue,
        w: &Tensor,
        bias: Option<&Tensor>,
        out: &Tensor,
        accumulate: bool,
        norm: Option<Norm>,
    ) -> Result<()> {
        need_f32(x)?;
        need_f32(out)?;
        let (m, k) = (x.rows(), x.cols());
        let (n, wk) = (w.rows(), w.cols());
        if w.shape.len() != 2 || wk != k {
            return Err(Error::tensor(
                &w.name,
                format!("a [N, {k}] weight for input `{}` {:?}", x.name, x.shape),
                format!("{:?}", w.shape),
            ));
        }
        out.expect(None, &{
            let mut s = x.shape.clone();
            *s.last_mut().unwrap_or(&mut 0) = n;
            s
        })?;
        if let Some(b) = bias {
            need_f32(b)?;
            b.expect(None, &[n])?;
        }
        let path = resolve(self.gpu, self.variant, path, m, n, k, w.dtype);
        if path == MatmulPath::Gemm {
            self.note_gemm_shape((m, n, k, w.dtype));
        }
        let mut flags = vec![wflag(w.dtype)];
        if bias.is_some() {
            flags.push("BIAS");
        }
        // the block GEMV's entry point and weight rows per workgroup
        let mut block_gemv = ("gemv", 1);
        if let MatmulPath::GemvBlocks(lanes) = path {
            if m > GEMV_MAX_ROWS || !k.is_multiple_of(32) {
                return Err(Error::tensor(
                    &x.name,
                    format!(
                        "at most {GEMV_MAX_ROWS} rows and a width divisible by 32 (block GEMV)"
                    ),
                    format!("{:?}", x.shape),
                ));
            }
            let (form, entry, rows_per_group) = self.gemv_form(lanes, 1, x, 0, m, norm)?;
            flags.extend(form);
            block_gemv = (entry, rows_per_group);
        }
        // gemv_form adds NORM
        if norm.is_some() && (m != 1 || !matches!(path, MatmulPath::GemvBlocks(_))) {
            return Err(Error::tensor(
                &x.name,
                "one row on the block GEMV (a fused RMSNorm)",
                format!("{:?} on {path:?}", x.shape),
            ));
        }
        match epilogue {
            Epilogue::None => {}
            Epilogue::Silu => flags.push("OUT_SILU"),
            Epilogue::MulInto => flags.push("OUT_MUL"),
        }
        for part in &w.parts {
            // rows row0 .. row0 + rows of x and out
            let params = |row0: usize, rows: usize| {
                [
                    u(rows),
                    u(part.rows),
                    u(k),
                    u(k),
                    u(n),
                    u(part.row_start),
                    u(part.row_start),
                    accumulate as u32,
                    f(norm.map_or(0.0, |n| n.eps)),
                    u(row0),
                ]
            };
            let mut bufs: Vec<(u32, &wgpu::Buffer)> =
                vec![(1, x.buffer()), (2, &part.data), (5, out.buffer())];
            if let Some(n) = norm {
                bufs.push((8, n.weight.buffer()));
            }
            if let Some(s) = &part.scales {
                bufs.push((3, s));
            }
            if let Some(b) = bias {
                bufs.push((4, b.buffer()));
            }
            match path {
                MatmulPath::GemvBlocks(_) => {
                    let groups = grid(u(part.rows.div_ceil(block_gemv.1)));
                    let p = params(0, m);
                    self.dispatch("gemv", block_gemv.0, &flags, &p, &bufs, groups)?;
                }
                MatmulPath::Gemv | MatmulPath::Auto => {
                    let groups = grid(u(m * part.rows));
                    self.dispatch("matmul", "gemv", &flags, &params(0, m), &bufs, groups)?;
                }
                MatmulPath::Gemm | MatmulPath::GemmForm(_) => {
                    let mut form = match path {
                        MatmulPath::GemmForm(f) => f,
                        _ => {
                            let f = self.gpu.gemm_form_at(m, n, k, w.dtype);
                            gemm_form_for(f, m, part.rows, w.dtype)
                        }
                    };
                    if !is_gemm_form(form) {
                        return Err(Error::Gpu(format!(
                            "GEMM: expected a form of 0 to 11 without both 4 and 8, or \
                             {GEMM_ROWS}, found {form}"
                        )));
                    }
                    if form == GEMM_ROWS {
                        if k.is_multiple_of(32) {
                            // four rows of x per workgroup, all rows in one dispatch, x as a
                            // uniform where it fits (one row), in workgroups of 16 (more of
                            // them to spread over a CPU's threads), x shared through the
                            // subgroup where it can be
                            let lanes = 1 | GEMV_UNIFORM_X | GEMV_WG16 | GEMV_X_SUBGROUP;
                            let gemv = (Some("gemv_rows4"), lanes, 0, m);
                            let p = params(0, m);
                            self.gemv_rows(gemv, x, &flags, &p, &bufs, part.rows)?;
                            continue;
                        }
                        form = gemm_form_for(0, m, part.rows, w.dtype);
                    }
                    let mut gemm_flags = flags.clone();
                    let mut tile = [64, 64]; // columns, rows
                    if form & GEMM_WIDE != 0 {
                        gemm_flags.push("GEMM_WIDE");
                        tile[0] = 128;
                    }
                    if form & GEMM_TALL != 0 {
                        gemm_flags.push("GEMM_TALL");
                        tile[1] = 128;
                    }
                    if form & GEMM_SHORT != 0 {
                        gemm_flags.push("GEMM_SHORT");
                        tile[1] = 32;
                    }
                    if form & GEMM_HALF != 0 {
                        // (the f32 form where the recorder's variant has no f16)
                        gemm_flags.push("GEMM_HALF");
                    } else if self.variant.subgroups && rows_subgroup_fits(self.gpu) {
                        // f32 tiles: x's vec4s shared through the subgroup
                        gemm_flags.push("ROWS_SG");
                    }
                    // a tuned GEMM leaves a few rows past its whole tiles (the ViT's 257 =
                    // 2 · 128 + 1) to the block GEMV, instead of a tile row mostly empty
                    let tail = match path {
                        MatmulPath::Gemm => gemm_tail(m, tile[1], k),
                        _ => 0,
                    };
                    let body = m - tail;
                    let groups = [u(part.rows.div_ceil(tile[0])), u(body.div_ceil(tile[1])), 1];
                    let p = params(0, body);
                    self.dispatch("matmul", "gemm", &gemm_flags, &p, &bufs, groups)?;
                    if tail > 0 {
                        let lanes = block_lanes(self.gpu, self.variant, tail, n, k, w.dtype);
                        let p = params(body, tail);
                        let gemv = (None, lanes, body, tail);
                        self.gemv_rows(gemv, x, &flags, &p, &bufs, part.rows)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A block-GEMV dispatch over rows `row0 .. row0 + rows` of x for a matmul's weight part
    /// of `weight_rows` rows: a tuned GEMM's tail, or its untiled form. `gemv` is
    /// (entry point, `None` for the lanes' own; lanes; row0; rows), `flags` the matmul's
    /// (the lanes' form is added), `params` those of the rows.
    fn gemv_rows(
        &mut self,
        (entry, lanes, row0, rows): (Option<&'static str>, u32, usize, usize),
        x: &Tensor,
        flags: &[&'static str],
        params: &[u32],
        bufs: &[(u32, &wgpu::Buffer)],
        weight_rows: usize,
    ) -> Result<()> {
        // gemv_rows4 shares the x of a workgroup's (up to) four rows through the subgroup, in
        // a workgroup per four rows and column group; the decode GEMV one row's
        let (sg_rows, row_groups) = match entry {
            Some("gemv_rows4") => (4, rows.div_ceil(4)),
            _ => (1, 1),
        };
        let form_rows = rows.min(sg_rows);
        let (form, own_entry, per_group) =
            self.gemv_form(lanes, sg_rows, x, row0, form_rows, None)?;
        let mut all = flags.to_vec();
        all.extend(form);
        let groups = grid(u(weight_rows.div_ceil(per_group) * row_groups));
        self.dispatch(
            "gemv",
            entry.unwrap_or(own_entry),
            &all,
            params,
            bufs,
            groups,
        )
    }

    /// LayerNorm over the last dimension (eps as given; statistics in f32).
    pub fn layer_norm(
        &mut self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
        out: &Tensor,
    ) -> Result<()> {
        for t in [x, weight, bias, out] {
            need_f32(t)?;
        }
        let (rows, cols) = (x.rows(), x.cols());
        weight.expect(None, &[cols])?;
        bias.expect(None, &[cols])?;
        out.expect(None, &x.shape)?;
        self.dispatch(
            "norm",
            "layer_norm",
            &[],
            &[u(rows), u(cols), f(eps), u(cols)],
            &[
                (1, x.buffer()),
                (2, weight.buffer()),
                (3, bias.buffer()),
                (4, out.buffer()),
            ],
            grid(u(rows)),
        )
    }

    /// RMSNorm over the last dimension (LLaMA).
    pub fn rms_norm(&mut self, x: &Tensor, weight: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
        for t in [x, weight, out] {
            need_f32(t)?;
        }
        let (rows, cols) = (x.rows(), x.cols());
        weight.expect(None, &[cols])?;
        out.expect(None, &x.shape)?;
        self.dispatch(
            "norm",
            "rms_norm",
            &[],
            &[u(rows), u(cols), f(eps), u(cols)],
            &[(1, x.buffer()), (2, weight.buffer()), (4, out.buffer())],
            grid(u(rows)),
        )
    }

    /// In-place softmax of `x * scale` over the last dimension.
    pub fn softmax(&mut self, x: &Tensor, scale: f32) -> Result<()> {
        need_f32(x)?;
        self.dispatch(
            "softmax",
            "softmax",
            &[],
            &[u(x.rows()), u(x.cols()), f(scale)],
            &[(1, x.buffer())],
            grid(u(x.rows())),
        )
    }

    fn elementwise(
        &mut self,
        entry: &'static str,
        x: &Tensor,
        y: Option<&Tensor>,
        cols: usize,
        s: f32,
    ) -> Result<()> {
        need_f32(x)?;
        let n = x.numel();
        let mut bufs = vec![(1, x.buffer())];
        if let Some(y) = y {
            need_f32(y)?;
            bufs.push((2, y.buffer()));
        }
        self.dispatch(
            "elementwise",
            entry,
            &[],
            &[u(n), u(cols), f(s)],
            &bufs,
            grid(u(n.div_ceil(256))),
        )
    }

    /// `x += y` (same shape).
    pub fn add(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        y.expect(None, &x.shape)?;
        self.elementwise("add", x, Some(y), 1, 0.0)
    }

    /// `x[r, c] += bias[c]`.
    pub fn add_bias(&mut self, x: &Tensor, bias: &Tensor) -> Result<()> {
        bias.expect(None, &[x.cols()])?;
        self.elementwise("add_bias", x, Some(bias), x.cols(), 0.0)
    }

    /// Exact (erf) GELU in place.
    pub fn gelu(&mut self, x: &Tensor) -> Result<()> {
        self.elementwise("gelu", x, None, 1, 0.0)
    }

    /// `gate = silu(gate) * up` in place.
    pub fn silu_mul(&mut self, gate: &Tensor, up: &Tensor) -> Result<()> {
        up.expect(None, &gate.shape)?;
        self.elementwise("silu_mul", gate, Some(up), 1, 0.0)
    }

    /// `x *= s` in place.
    pub fn scale(&mut self, x: &Tensor, s: f32) -> Result<()> {
        self.elementwise("scale", x, None, 1, s)
    }

    /// Rotary embedding in place on `rows` rows of `heads` heads, positions `pos0..`.
    pub fn rope(
        &mut self,
        x: HeadView,
        rows: usize,
        heads: usize,
        table: &RopeTable,
        pos0: usize,
        mode: RopeMode,
    ) -> Result<()> {
        need_f32(x.t)?;
        let d = table.head_dim;
        x.need_heads_side_by_side("rope rows", d)?;
        if rows > 0 && pos0 + rows > table.max_pos {
            return Err(Error::tensor(
                "rope_table",
                format!("positions up to {}", pos0 + rows),
                format!("a table of {} positions", table.max_pos),
            ));
        }
        if rows > 0 {
            need_len(
                x.t,
                "rope rows",
                x.offset + (rows - 1) * x.stride + heads * d,
            )?;
        }
        let n = rows * heads * d / 2;
        self.dispatch(
            "rope",
            "rope",
            &[],
            &[
                u(rows),
                u(heads),
                u(d),
                u(x.offset),
                u(x.stride),
                u(pos0),
                (mode == RopeMode::Interleaved) as u32,
            ],
            &[(1, x.t.buffer()), (2, table.buffer.buffer())],
            grid(u(n.div_ceil(256))),
        )
    }

    /// A LLaMA layer's rotation and cache write in one dispatch (`rope_kv` in `rope.wgsl`).
    /// `qkv` holds `rows` rows `[q (heads), k (kv_heads), v (kv_heads)]` of `head_dim` values
    /// each; row r has position `pos0 + r`. q is rotated in place; the rotated k and v are
    /// written to position `pos0 + r` of every head's block of `cache` ([`kv_cache_shape`],
    /// f32 or f16). The same as [`Recorder::rope`] over q and k followed by a copy of each k
    /// and v head into its block, in one dispatch.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &mut self,
        qkv: &Tensor,
        rows: usize,
        heads: usize,
        kv_heads: usize,
        table: &RopeTable,
        pos0: usize,
        mode: RopeMode,
        cache: &Tensor,
    ) -> Result<()> {
        let rope = RopeKv {
            heads,
            kv_heads,
            table,
            pos0,
            mode,
            cache,
        };
        let f16 = check_rope_kv(qkv, rows, &rope)?;
        self.rope_kv_checked(qkv, rows, &rope, f16)
    }

    /// The dispatch of [`Recorder::rope_kv`], its arguments checked by [`check_rope_kv`]
    /// (which said whether the cache is f16).
    fn rope_kv_checked(
        &mut self,
        qkv: &Tensor,
        rows: usize,
        rope: &RopeKv,
        f16: bool,
    ) -> Result<()> {
        let (heads, kv_heads) = (rope.heads, rope.kv_heads);
        let d = rope.table.head_dim;
        let width = (heads + 2 * kv_heads) * d;
        if rows == 0 {
            return Ok(());
        }
        let items = rows * (heads * d / 2 + kv_heads * d);
        self.dispatch(
            "rope",
            "rope_kv",
            if f16 { &["KV_F16"] } else { &[] },
            &[
                u(rows),
                u(heads),
                u(d),
                0,
                u(width),
                u(rope.pos0),
                (rope.mode == RopeMode::Interleaved) as u32,
                u(kv_heads),
                u(rope.cache.shape[1]),
            ],
            &[
                (1, qkv.buffer()),
                (2, rope.table.buffer.buffer()),
                (3, rope.cache.buffer()),
            ],
            grid(u(items.div_ceil(256))),
        )
    }

    /// Attention of `t` query rows against `s` key/value rows (see `shaders/attention.wgsl`).
    /// With `causal`, query i sees keys `0 ..= i + (s - t)`. Keys and values are f32 or (a KV
    /// cache) both f16.
    pub fn attention(
        &mut self,
        q: HeadView,
        k: HeadView,
        v: HeadView,
        out: HeadView,
        a: AttnShape,
    ) -> Result<()> {
        self.attention_with(q, k, v, out, a, None)
    }

    /// Like [`Recorder::attention`]; with `partials` (at least [`attention_partials`] f32
    /// elements) and at most 4 query rows, uses the split-K decode kernels.
    pub fn attention_with(
        &mut self,
        q: HeadView,
        k: HeadView,
        v: HeadView,
        out: HeadView,
        a: AttnShape,
        partials: Option<&Tensor>,
    ) -> Result<()> {
        for t in [q.t, out.t] {
            need_f32(t)?;
        }
        let kv_f16 = k.t.dtype == DType::F16;
        for t in [k.t, v.t] {
            if t.dtype != k.t.dtype
                || t.parts.len() != 1
                || !matches!(t.dtype, DType::F32 | DType::F16)
            {
                return Err(Error::tensor(
                    &t.name,
                    "single-part f32 or f16 keys and values of one dtype",
                    format!("{} in {} parts", t.dtype, t.parts.len()),
                ));
            }
        }
        if a.head_dim == 0 || a.head_dim > 256 {
            return Err(Error::tensor(
                "attention",
                "a head_dim in 1..=256",
                a.head_dim,
            ));
        }
        if a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
            return Err(Error::tensor(
                "attention",
                format!("kv_heads dividing heads ({})", a.heads),
                a.kv_heads,
            ));
        }
        if a.s == 0 || (a.causal && a.s < a.t) {
            return Err(Error::tensor(
                "attention",
                format!("at least {} key rows", a.t.max(1)),
                a.s,
            ));
        }
        q.need_heads_side_by_side("queries", a.head_dim)?;
        out.need_heads_side_by_side("attention output", a.head_dim)?;
        let span = |view: &HeadView, rows: usize, heads: usize| {
            view.offset
                + (rows - 1) * view.stride
                + (heads - 1) * view.head_step(a.head_dim)
                + a.head_dim
        };
        need_len(q.t, "queries", span(&q, a.t, a.heads))?;
        need_len(k.t, "keys", span(&k, a.s, a.kv_heads))?;
        need_len(v.t, "values", span(&v, a.s, a.kv_heads))?;
        need_len(out.t, "attention output", span(&out, a.t, a.heads))?;
        if std::ptr::eq(out.t, q.t) || std::ptr::eq(out.t, k.t) || std::ptr::eq(out.t, v.t) {
            return Err(Error::tensor(
                &out.t.name,
                "an output distinct from q, k and v",
                "the same tensor",
            ));
        }
        let kv_flags: &[&'static str] = if kv_f16 { &["KV_F16"] } else { &[] };
        // hr: query heads per workgroup
        let params = |hr: usize| {
            [
                u(a.t),
                u(a.s),
                u(a.heads),
                u(a.kv_heads),
                u(a.head_dim),
                u(q.offset),
                u(q.stride),
                u(k.offset),
                u(k.stride),
                u(v.offset),
                u(v.stride),
                u(out.offset),
                u(out.stride),
                a.causal as u32,
                u(a.s - a.t.min(a.s)),
                f(a.scale),
                u(hr),
                u(k.head_step(a.head_dim)),
                u(v.head_step(a.head_dim)),
            ]
        };
        let bufs = [
            (1, q.t.buffer()),
            (2, k.t.buffer()),
            (3, v.t.buffer()),
            (4, out.t.buffer()),
        ];
        // many query rows (the ViT, the Q-Former, prefill): tiles of keys staged once for
        // ATTN_TILE_ROWS rows
        if a.t >= ATTN_TILED_FROM && a.head_dim <= ATTN_TILE_DIM {
            // each invocation's dims of the head: 4, 6 or 8 groups of 16
            let mut flags = kv_flags.to_vec();
            match a.head_dim {
                ..=64 => flags.push("TD64"),
                65..=96 => flags.push("TD96"),
                _ => {}
            }
            if self.variant.subgroups && rows_subgroup_fits(self.gpu) {
                flags.push("ROWS_SG");
            }
            return self.dispatch(
                "attention",
                "attention_tiled",
                &flags,
                &params(1),
                &bufs,
                grid(u(a.t.div_ceil(ATTN_TILE_ROWS) * a.heads)),
            );
        }
        let mut flags = kv_flags.to_vec();
        // q through a uniform where it fits one, in whole vec4s (every decode step)
        let q_uniform = (q.offset | q.stride | a.head_dim).is_multiple_of(4)
            && uniform_span(self.gpu, q.t, span(&q, a.t, a.heads));
        if q_uniform {
            flags.push("Q_UNIFORM");
        }
        // grouped-query attention: up to four query heads of a KV group per workgroup, sharing
        // every key and value load (with q as a uniform: no query row to stage). Also for one
        // decode row, though it divides the workgroups: on lavapipe SmolLM2's 9 heads in 3
        // workgroups took 160 µs a layer at 128 keys where 9 workgroups took 272 µs.
        let group = a.heads / a.kv_heads;
        let hr = if q_uniform {
            [4, 3, 2]
                .into_iter()
                .find(|r| group.is_multiple_of(*r))
                .unwrap_or(1)
        } else {
            1
        };
        if hr > 1 {
            flags.push(["HEADS2", "HEADS3", "HEADS4"][hr - 2]);
        }
        let params = params(hr);
        // split-K for decode (a few query rows) when the caller gave room for the partials
        let split = partials.is_some() && a.t <= GEMV_MAX_ROWS;
        if let Some(part) = partials.filter(|_| split) {
            need_f32(part)?;
            need_len(
                part,
                "attention partials",
                attention_partials(a.t, a.heads, a.s, a.head_dim),
            )?;
            let splits = a.s.div_ceil(ATTN_SPLIT);
            let bufs = [
                (1, q.t.buffer()),
                (2, k.t.buffer()),
                (3, v.t.buffer()),
                (5, part.buffer()),
            ];
            self.dispatch(
                "attention",
                "attention_split",
                &flags,
                &params,
                &bufs,
                grid(u(a.t * a.heads / hr * splits)),
            )?;
            return self.dispatch(
                "attention",
                "attention_combine",
                kv_flags,
                &params,
                &[(4, out.t.buffer()), (5, part.buffer())],
                grid(u(a.t * a.heads)),
            );
        }
        self.dispatch(
            "attention",
            "attention",
            &flags,
            &params,
            &bufs,
            grid(u(a.t * a.heads / hr)),
        )
    }

    /// `out[t] = table[ids[t]]` (dequantised to f32), for a table in any dtype, split or not.
    pub fn embedding(&mut self, ids: &Ids, table: &Tensor, out: &Tensor) -> Result<()> {
        need_f32(out)?;
        let cols = table.cols();
        out.expect(None, &[ids.len, cols])?;
        let flags = [wflag(table.dtype)];
        let n = ids.len * cols;
        for part in &table.parts {
            let mut bufs: Vec<(u32, &wgpu::Buffer)> =
                vec![(1, &ids.buffer), (2, &part.data), (5, out.buffer())];
            if let Some(s) = &part.scales {
                bufs.push((3, s));
            }
            self.dispatch(
                "embedding",
                "embedding",
                &flags,
                &[u(ids.len), u(cols), u(part.row_start), u(part.rows)],
                &bufs,
                grid(u(n.div_ceil(256))),
            )?;
        }
        Ok(())
    }

    /// Patches of a `[C, H, W]` image for a `patch`×`patch`, stride-`patch` convolution:
    /// `out[(H/p)·(W/p), C·p·p]`.
    pub fn im2col(&mut self, img: &Tensor, patch: usize, out: &Tensor) -> Result<()> {
        need_f32(img)?;
        need_f32(out)?;
        if img.shape.len() != 3
            || patch == 0
            || !img.shape[1].is_multiple_of(patch)
            || !img.shape[2].is_multiple_of(patch)
        {
            return Err(Error::tensor(
                &img.name,
                format!("[C, H, W] with H and W divisible by {patch}"),
                format!("{:?}", img.shape),
            ));
        }
        let (c, h, w) = (img.shape[0], img.shape[1], img.shape[2]);
        let (gh, gw) = (h / patch, w / patch);
        out.expect(None, &[gh * gw, c * patch * patch])?;
        self.dispatch(
            "im2col",
            "im2col",
            &[],
            &[u(c), u(h), u(w), u(patch), u(gw), u(gh)],
            &[(1, img.buffer()), (2, out.buffer())],
            grid(u(out.numel().div_ceil(256))),
        )
    }

    /// Index of the first maximum of the first `n` elements of `x`, written to `out[0]` (u32).
    pub fn argmax(&mut self, x: &Tensor, n: usize, out: &Ids) -> Result<()> {
        need_first(x, n)?;
        self.dispatch(
            "argmax",
            "argmax",
            &[],
            &[u(n)],
            &[(1, x.buffer()), (2, &out.buffer)],
            [1, 1, 1],
        )
    }

    /// Samples a token among the candidates [`Recorder::topk`] left in `cands` (see
    /// `shaders/sample.wgsl`) with the draw `u` in [0, 1): its id goes to word 0 of `token` and
    /// of `picked` (there `u32::MAX` where the host must sample from the full logits instead),
    /// and its bit is set in `mask`, the repetition penalty's set.
    pub fn sample(
        &mut self,
        cands: &Ids,
        s: &SampleParams,
        mask: &Ids,
        token: &Ids,
        picked: &Ids,
    ) -> Result<()> {
        if cands.len < TOPK_KEEP * 3 || token.len == 0 || picked.len == 0 {
            return Err(Error::tensor(
                "sample",
                format!("{} candidate words, a token and a pick word", TOPK_KEEP * 3),
                format!("{}, {} and {}", cands.len, token.len, picked.len),
            ));
        }
        if !(s.temperature > 0.0 && s.top_k > 0 && s.top_k < TOPK_KEEP) {
            return Err(Error::InvalidOption {
                name: "sampling".into(),
                msg: format!(
                    "GPU sampling takes a positive temperature and a top-k of 1 to {}, found {} \
                     and {}",
                    TOPK_KEEP - 1,
                    s.temperature,
                    s.top_k
                ),
            });
        }
        self.dispatch(
            "sample",
            "sample",
            &[],
            &[f(s.temperature), u(s.top_k), f(s.top_p), f(s.u)],
            &[
                (1, &cands.buffer),
                (2, &mask.buffer),
                (3, &token.buffer),
                (4, &picked.buffer),
            ],
            [1, 1, 1],
        )
    }

    /// The best [`TOPK_KEEP`] entries of the first `n` elements of `x` (see `shaders/topk.wgsl`):
    /// ranked by value after the repetition penalty `penalty` on the ids whose bit is set in
    /// `mask` (`ceil(n / 32)` words). Passes alternate between `ping` and `pong` (each at least
    /// [`topk_words`]`(n)` words); returns the one holding the final candidates, three words
    /// each: ranking key bits, index (`u32::MAX` for padding when `n` < 64), raw value bits.
    pub fn topk<'b>(
        &mut self,
        x: &Tensor,
        n: usize,
        mask: &Ids,
        penalty: f32,
        ping: &'b Ids,
        pong: &'b Ids,
    ) -> Result<&'b Ids> {
        need_first(x, n)?;
        if mask.len < n.div_ceil(32) || ping.len < topk_words(n) || pong.len < topk_words(n) {
            return Err(Error::tensor(
                "topk",
                format!(
                    "a mask of {} words and candidate buffers of {}",
                    n.div_ceil(32),
                    topk_words(n)
                ),
                format!("{}, {} and {}", mask.len, ping.len, pong.len),
            ));
        }
        if n <= TOPK_SPAN {
            // one workgroup ranks all
            self.dispatch(
                "topk",
                "topk",
                &[],
                &[u(n), f(penalty)],
                &[(1, x.buffer()), (2, &mask.buffer), (4, &ping.buffer)],
                [1, 1, 1],
            )?;
            return Ok(ping);
        }
        // the best of each chunk (as many as 16 × fewer than n: they fit where the first pass
        // of a pass over every entry would write its candidates), their best 64 by ranking
        // passes, then the entries of those 64 chunks ranked (see `topk.wgsl`)
        let chunks = n.div_ceil(TOPK_CHUNK);
        self.dispatch(
            "topk",
            "topk_bests",
            &[],
            &[u(n), f(penalty)],
            &[(1, x.buffer()), (2, &mask.buffer), (4, &ping.buffer)],
            grid(u(chunks.div_ceil(256))),
        )?;
        let (mut cur, mut other) = (ping, pong);
        let mut count = chunks;
        loop {
            let groups = count.div_ceil(TOPK_SPAN);
            self.dispatch(
                "topk",
                "topk",
                &["NEXT"],
                &[u(count), f(penalty)],
                &[(3, &cur.buffer), (4, &other.buffer)],
                grid(u(groups)),
            )?;
            std::mem::swap(&mut cur, &mut other);
            if groups == 1 {
                break;
            }
            count = groups * TOPK_KEEP;
        }
        self.dispatch(
            "topk",
            "topk",
            &["GATHER"],
            &[u(n), f(penalty)],
            &[
                (1, x.buffer()),
                (2, &mask.buffer),
                (3, &cur.buffer),
                (4, &other.buffer),
            ],
            [1, 1, 1],
        )?;
        Ok(other)
    }

    /// Copies `rows`×`cols` elements between two distinct tensors with row strides and
    /// element offsets (concat, slice, KV-cache writes). The source is f32; the destination is
    /// f32, or f16 (a KV cache; then `cols`, `dst_off` and `dst_stride` must be even).
    #[allow(clippy::too_many_arguments)]
    pub fn copy_rows(
        &mut self,
        src: &Tensor,
        src_off: usize,
        src_stride: usize,
        dst: &Tensor,
        dst_off: usize,
        dst_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need_f32(src)?;
        let f16 = dst.dtype == DType::F16 && dst.parts.len() == 1;
        if !f16 {
            need_f32(dst)?;
        }
        if std::ptr::eq(src, dst) {
            return Err(Error::tensor(
                &dst.name,
                "a destination distinct from the source",
                "the same tensor",
            ));
        }
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        need_len(src, "copy source", src_off + (rows - 1) * src_stride + cols)?;
        need_len(
            dst,
            "copy destination",
            dst_off + (rows - 1) * dst_stride + cols,
        )?;
        let params = [
            u(rows),
            u(cols),
            u(src_off),
            u(src_stride),
            u(dst_off),
            u(dst_stride),
        ];
        if f16 {
            if ![cols, dst_off, dst_stride]
                .iter()
                .all(|v| v.is_multiple_of(2))
            {
                return Err(Error::tensor(
                    &dst.name,
                    "an even column count, offset and stride (f16 pairs)",
                    format!("cols {cols}, offset {dst_off}, stride {dst_stride}"),
                ));
            }
            return self.dispatch(
                "copy",
                "copy_rows_f16",
                &[],
                &params,
                &[(1, src.buffer()), (5, dst.buffer())],
                grid(u((rows * cols / 2).div_ceil(256))),
            );
        }
        self.dispatch(
            "copy",
            "copy_rows",
            &[],
            &params,
            &[(1, src.buffer()), (2, dst.buffer())],
            grid(u((rows * cols).div_ceil(256))),
        )
    }
}
