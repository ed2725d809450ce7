//! Records dispatches for one forward pass and submits them together.
//!
//! Ops append commands; nothing runs until [`Recorder::submit`]. All kernel parameters of a
//! recording live in a few uniform buffers (one 256-byte slot per dispatch), written once at
//! submit, so recording allocates no buffer per op beyond one per 256 dispatches.
//!
//! A recording can be kept as a [`Plan`] ([`Recorder::submit_keep`]) and replayed
//! ([`Recorder::replaying`]): when the ops record the same kernels on the same buffers again
//! (a decode step: only positions and lengths change, and those are parameters), the pipelines,
//! bind groups and parameter buffers of the plan are reused and only the parameter bytes are
//! rewritten. A dispatch that differs simply gets a new bind group, so a replay is never wrong,
//! only slower.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::shader::Variant;
use crate::quant::DType;

/// Bytes of one parameter slot (>= every adapter's uniform offset alignment).
const SLOT: usize = 256;
const SLOTS_PER_CHUNK: usize = 256;
/// Most workgroups per dispatch dimension we use (the WebGPU default limit).
pub const MAX_GROUPS: u32 = 65535;

struct Cmd {
    file: &'static str,
    entry: &'static str,
    variant: Variant,
    flags: Vec<&'static str>,
    pipeline: Arc<wgpu::ComputePipeline>,
    buffers: Vec<(u32, wgpu::Buffer)>,
    bind: wgpu::BindGroup,
    groups: [u32; 3],
}

impl Cmd {
    /// How the profile names this dispatch: file, entry, flags and workgroup count (which
    /// tells shapes apart).
    #[cfg(not(target_arch = "wasm32"))]
    fn profile_name(&self) -> String {
        let [x, y, z] = self.groups;
        format!(
            "{}::{} {} ({} groups)",
            self.file,
            self.entry,
            self.flags.join(","),
            x * y * z
        )
    }
}

/// A submitted recording kept for replay (see the module docs).
#[derive(Default)]
pub struct Plan {
    cmds: Vec<Cmd>,
    chunks: Vec<wgpu::Buffer>,
}

impl Plan {
    /// Dispatches in the plan.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// The workgroup count of each dispatch, in order.
    pub fn workgroups(&self) -> Vec<u32> {
        self.cmds
            .iter()
            .map(|c| c.groups.iter().product())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    /// Kernel variant used by ops recorded from now on.
    pub variant: Variant,
    cmds: Vec<Cmd>,
    chunks: Vec<(wgpu::Buffer, Vec<u8>)>,
    /// The plan being replayed, consumed in order: its commands are matched by position, and
    /// its parameter buffers are handed out again as chunks are needed.
    old_cmds: std::vec::IntoIter<Cmd>,
    old_chunks: std::vec::IntoIter<wgpu::Buffer>,
    /// Dispatches whose bind group came from the replayed plan.
    pub reused: usize,
    /// The shapes of the tuned GEMMs recorded (rows of x, weight rows, weight columns, dtype),
    /// each once ([`Recorder::gemm_shapes`]).
    gemm_shapes: Vec<(usize, usize, usize, DType)>,
    /// Buffer copies (source, destination, bytes) encoded after the dispatches, in the same
    /// command buffer (a readback staged with the work that produces it); not part of a plan.
    after: Vec<(wgpu::Buffer, wgpu::Buffer, u64)>,
}

/// A 1-D workgroup count spread over x and y so that neither exceeds [`MAX_GROUPS`]. Kernels
/// rebuild the linear index as `wg.x + wg.y * nwg.x` and ignore indices past the count.
pub fn grid(count: u32) -> [u32; 3] {
    let count = count.max(1);
    if count <= MAX_GROUPS {
        [count, 1, 1]
    } else {
        let y = count.div_ceil(MAX_GROUPS);
        [count.div_ceil(y), y, 1]
    }
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Recorder {
            gpu,
            variant: gpu.best_variant,
            cmds: Vec::new(),
            chunks: Vec::new(),
            old_cmds: Vec::new().into_iter(),
            old_chunks: Vec::new().into_iter(),
            reused: 0,
            gemm_shapes: Vec::new(),
            after: Vec::new(),
        }
    }

    /// A recorder that reuses what it can of `plan` (see the module docs).
    pub fn replaying(gpu: &'g Gpu, plan: Plan) -> Self {
        Recorder {
            cmds: Vec::with_capacity(plan.cmds.len()),
            old_cmds: plan.cmds.into_iter(),
            old_chunks: plan.chunks.into_iter(),
            ..Self::new(gpu)
        }
    }

    pub fn with_variant(gpu: &'g Gpu, variant: Variant) -> Self {
        Recorder {
            variant,
            ..Self::new(gpu)
        }
    }

    fn param_slot(&mut self, params: &[u32]) -> (usize, usize) {
        let need_new = match self.chunks.last() {
            Some((_, data)) => data.len() >= SLOT * SLOTS_PER_CHUNK,
            None => true,
        };
        if need_new {
            let buf = self.old_chunks.next().unwrap_or_else(|| {
                self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: (SLOT * SLOTS_PER_CHUNK) as u64,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            });
            self.chunks
                .push((buf, Vec::with_capacity(SLOT * SLOTS_PER_CHUNK)));
        }
        let chunk = self.chunks.len() - 1;
        let data = &mut self.chunks[chunk].1;
        let offset = data.len();
        let mut slot = [0u8; SLOT];
        let bytes: &[u8] = bytemuck::cast_slice(params);
        slot[..bytes.len()].copy_from_slice(bytes);
        data.extend_from_slice(&slot);
        (chunk, offset)
    }

    /// Records one dispatch of `entry` in `shaders/<file>.wgsl`. Binding 0 is the uniform
    /// parameter block; `buffers` are `(binding, buffer)` storage bindings (whole buffers).
    pub fn dispatch(
        &mut self,
        file: &'static str,
        entry: &'static str,
        flags: &[&'static str],
        params: &[u32],
        buffers: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        if params.len() * 4 > SLOT {
            return Err(Error::Gpu(format!("{file}::{entry}: too many parameters")));
        }
        let (chunk, offset) = self.param_slot(params);
        let same = self.old_cmds.next().filter(|c| {
            c.file == file
                && c.entry == entry
                && c.variant == self.variant
                && c.flags == flags
                && c.buffers.len() == buffers.len()
                && c.buffers
                    .iter()
                    .zip(buffers)
                    .all(|((b1, x), (b2, y))| b1 == b2 && x == *y)
        });
        // the parameter slot is at the same place in a replay (slots are handed out in order)
        if let Some(c) = same {
            self.cmds.push(Cmd { groups, ..c });
            self.reused += 1;
            return Ok(());
        }
        let pipeline = self.gpu.pipeline(file, entry, self.variant, flags)?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.chunks[chunk].0,
                offset: offset as u64,
                size: wgpu::BufferSize::new(SLOT as u64),
            }),
        }];
        for (binding, buffer) in buffers {
            entries.push(wgpu::BindGroupEntry {
                binding: *binding,
                resource: buffer.as_entire_binding(),
            });
        }
        let bind = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        self.cmds.push(Cmd {
            file,
            entry,
            variant: self.variant,
            flags: flags.to_vec(),
            pipeline,
            buffers: buffers.iter().map(|(b, x)| (*b, (*x).clone())).collect(),
            bind,
            groups,
        });
        Ok(())
    }

    /// Number of dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    /// Each dispatch recorded so far as `file::entry FLAG,FLAG` (tests check which kernel and
    /// form an op chose).
    pub fn kernels(&self) -> Vec<String> {
        self.cmds
            .iter()
            .map(|c| format!("{}::{} {}", c.file, c.entry, c.flags.join(",")))
            .collect()
    }

    /// Notes a tuned GEMM's shape (see [`Recorder::gemm_shapes`]).
    pub(crate) fn note_gemm_shape(&mut self, shape: (usize, usize, usize, DType)) {
        if !self.gemm_shapes.contains(&shape) {
            self.gemm_shapes.push(shape);
        }
    }

    /// The shapes of the tuned GEMMs (`MatmulPath::Gemm`, as `Auto` resolves for more than a
    /// few rows) recorded so far, each once: rows of x, weight rows, weight columns, dtype. A
    /// model records its forward once without submitting it to learn which GEMM shapes to tune
    /// ([`crate::gpu::tune::tune_gemm_shapes`]).
    pub fn gemm_shapes(&self) -> &[(usize, usize, usize, DType)] {
        &self.gemm_shapes
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Writes the parameters and submits everything in one command buffer. Validation errors
    /// (a wrong binding, an out-of-memory) are caught by an error scope and returned.
    pub async fn submit(self) -> Result<()> {
        self.submit_keep().await.map(drop)
    }

    /// Copies the first `bytes` of `src` into `dst` after the recorded dispatches, in the same
    /// command buffer: a readback that needs no submit of its own.
    pub fn copy_after(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) {
        self.after.push((src.clone(), dst.clone(), bytes));
    }

    fn encode_after(&self, enc: &mut wgpu::CommandEncoder) {
        for (src, dst, bytes) in &self.after {
            enc.copy_buffer_to_buffer(src, 0, dst, 0, *bytes);
        }
    }

    /// Like [`Recorder::submit`], and returns the recording as a [`Plan`] to replay.
    pub async fn submit_keep(self) -> Result<Plan> {
        Ok(self.submit_indexed().await?.0)
    }

    /// Like [`Recorder::submit_keep`], and also returns the submission's index (to wait for
    /// this submission alone, natively, while later ones run).
    pub async fn submit_indexed(self) -> Result<(Plan, wgpu::SubmissionIndex)> {
        let gpu = self.gpu;
        gpu.check_lost()?;
        for (buf, data) in &self.chunks {
            gpu.queue.write_buffer(buf, 0, data);
        }
        #[cfg(not(target_arch = "wasm32"))]
        if profile::enabled() {
            if gpu.has_timestamps() {
                return self.submit_timestamped().await;
            }
            return self.submit_profiled();
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        let timing = gpu.timing_queries();
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("forward"),
                timestamp_writes: timing.as_ref().map(|(set, _)| {
                    wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }
                }),
            });
            let mut last: Option<&Arc<wgpu::ComputePipeline>> = None;
            for cmd in &self.cmds {
                if !last.is_some_and(|p| Arc::ptr_eq(p, &cmd.pipeline)) {
                    pass.set_pipeline(&cmd.pipeline);
                    last = Some(&cmd.pipeline);
                }
                pass.set_bind_group(0, &cmd.bind, &[]);
                pass.dispatch_workgroups(cmd.groups[0], cmd.groups[1], cmd.groups[2]);
            }
        }
        if let Some((set, resolved)) = &timing {
            enc.resolve_query_set(set, 0..2, resolved, 0);
        }
        self.encode_after(&mut enc);
        let index = gpu.queue.submit([enc.finish()]);
        if let Some(err) = scope.pop().await {
            gpu.check_lost()?;
            return Err(Error::Gpu(err.to_string()));
        }
        gpu.take_error()?;
        Ok((self.into_plan(), index))
    }

    fn into_plan(self) -> Plan {
        Plan {
            cmds: self.cmds,
            chunks: self.chunks.into_iter().map(|(b, _)| b).collect(),
        }
    }

    /// Profiling (`MINIGPT4_PROFILE=1`) where the adapter has timestamp queries: the recording
    /// runs as one command buffer, as it would, but every dispatch in a compute pass of its own
    /// with timestamps written at its start and end; each dispatch's GPU time is added to its
    /// kernel's total.
    #[cfg(not(target_arch = "wasm32"))]
    async fn submit_timestamped(self) -> Result<(Plan, wgpu::SubmissionIndex)> {
        let gpu = self.gpu;
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let mut sets = Vec::new();
        for chunk in self.cmds.chunks(profile::PASSES_PER_SET) {
            let queries = 2 * chunk.len() as u32;
            let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: queries,
            });
            for (i, cmd) in chunk.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(cmd.entry),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                pass.set_pipeline(&cmd.pipeline);
                pass.set_bind_group(0, &cmd.bind, &[]);
                pass.dispatch_workgroups(cmd.groups[0], cmd.groups[1], cmd.groups[2]);
            }
            let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile"),
                size: 8 * queries as u64,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            enc.resolve_query_set(&set, 0..queries, &resolved, 0);
            sets.push((resolved, chunk.len()));
        }
        self.encode_after(&mut enc);
        let index = gpu.queue.submit([enc.finish()]);
        if let Some(err) = scope.pop().await {
            gpu.check_lost()?;
            return Err(Error::Gpu(err.to_string()));
        }
        let ns_per_tick = f64::from(gpu.queue.get_timestamp_period());
        let mut cmds = self.cmds.iter();
        for (resolved, n) in &sets {
            let words = crate::gpu::tensor::read_words(gpu, resolved, 0, 4 * n).await?;
            for (pair, cmd) in words.chunks_exact(4).zip(cmds.by_ref()) {
                let secs = crate::gpu::context::ticks_between(pair) as f64 * ns_per_tick * 1e-9;
                profile::add(cmd.profile_name(), secs);
            }
        }
        gpu.take_error()?;
        Ok((self.into_plan(), index))
    }

    /// Profiling (`MINIGPT4_PROFILE=1`) without timestamp queries: every dispatch submitted
    /// and waited for on its own, its wall time added to its kernel's total. Slow; for finding
    /// where time goes.
    #[cfg(not(target_arch = "wasm32"))]
    fn submit_profiled(self) -> Result<(Plan, wgpu::SubmissionIndex)> {
        let gpu = self.gpu;
        gpu.queue.submit([]);
        gpu.wait();
        for cmd in &self.cmds {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&cmd.pipeline);
                pass.set_bind_group(0, &cmd.bind, &[]);
                pass.dispatch_workgroups(cmd.groups[0], cmd.groups[1], cmd.groups[2]);
            }
            let t = std::time::Instant::now();
            gpu.queue.submit([enc.finish()]);
            gpu.wait();
            profile::add(cmd.profile_name(), t.elapsed().as_secs_f64());
        }
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        self.encode_after(&mut enc);
        let index = gpu.queue.submit([enc.finish()]);
        gpu.take_error()?;
        Ok((self.into_plan(), index))
    }
}

/// Per-kernel wall time totals while `MINIGPT4_PROFILE=1` (native only).
#[cfg(not(target_arch = "wasm32"))]
pub mod profile {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static TOTALS: Mutex<Option<HashMap<String, (f64, u64)>>> = Mutex::new(None);

    /// Dispatches timed per query set (two timestamps each: 4096 queries, wgpu's maximum).
    pub(super) const PASSES_PER_SET: usize = 2048;

    pub fn enabled() -> bool {
        std::env::var("MINIGPT4_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0")
    }

    pub(super) fn add(name: String, seconds: f64) {
        if let Ok(mut t) = TOTALS.lock() {
            let e = t.get_or_insert_with(HashMap::new).entry(name).or_default();
            e.0 += seconds;
            e.1 += 1;
        }
    }

    /// Takes the totals so far: (kernel, seconds, dispatches), slowest first.
    pub fn take() -> Vec<(String, f64, u64)> {
        let mut v: Vec<_> = TOTALS
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, (s, n))| (k, s, n))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}
