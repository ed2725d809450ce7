//! Records dispatches for one forward pass and submits them together.
//!
//! Ops append commands; nothing runs until [`Recorder::submit`]. All kernel parameters of a
//! recording live in a few uniform buffers (one 256-byte slot per dispatch), written once at
//! submit, so recording allocates no buffer per op beyond one per 256 dispatches.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::shader::Variant;

/// Bytes of one parameter slot (>= every adapter's uniform offset alignment).
const SLOT: usize = 256;
const SLOTS_PER_CHUNK: usize = 256;
/// Most workgroups per dispatch dimension we use (the WebGPU default limit).
pub const MAX_GROUPS: u32 = 65535;

enum Cmd {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bind: wgpu::BindGroup,
        groups: [u32; 3],
    },
}

pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    /// Kernel variant used by ops recorded from now on.
    pub variant: Variant,
    cmds: Vec<Cmd>,
    chunks: Vec<(wgpu::Buffer, Vec<u8>)>,
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
            let buf = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: (SLOT * SLOTS_PER_CHUNK) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
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
        let pipeline = self.gpu.pipeline(file, entry, self.variant, flags)?;
        let (chunk, offset) = self.param_slot(params);
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
        self.cmds.push(Cmd::Dispatch {
            pipeline,
            bind,
            groups,
        });
        Ok(())
    }

    /// Number of dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Writes the parameters and submits everything in one command buffer. Validation errors
    /// (a wrong binding, an out-of-memory) are caught by an error scope and returned.
    pub async fn submit(self) -> Result<()> {
        let gpu = self.gpu;
        for (buf, data) in &self.chunks {
            gpu.queue.write_buffer(buf, 0, data);
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("forward"),
                timestamp_writes: None,
            });
            for cmd in &self.cmds {
                match cmd {
                    Cmd::Dispatch {
                        pipeline,
                        bind,
                        groups,
                    } => {
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                    }
                }
            }
        }
        gpu.queue.submit([enc.finish()]);
        if let Some(err) = scope.pop().await {
            return Err(Error::Gpu(err.to_string()));
        }
        gpu.take_error()
    }
}
