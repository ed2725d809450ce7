//! How fast this adapter reads q4-shaped weights: storage-buffer loads against texture fetches,
//! alone and with the q4 GEMV's 4-bit unpacking and multiply-adds (x held in registers, no
//! scales), one weight row per invocation as the block GEMV reads them on CPU drivers. It
//! measures the driver, not this crate's kernels (`minigpt4 bench` does that); the README's
//! Speed section quotes it for lavapipe.
//!
//!     cargo run --release --example load_probe
//!
//! The adapter is the default one of the backends in `WGPU_BACKEND` (all where unset).

use std::time::Instant;

const ROWS: u32 = 8192; // weight rows
const BLOCKS: u32 = 128; // 16-byte blocks per row: K = 4096 at 4 bits
const REPS: u32 = 10; // dispatches per timed submit

const SHADER: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var tex: texture_2d<u32>;

const BLOCKS: u32 = 128u;
const M4 = vec4<i32>(0xF, 0xF0, 0xF00, 0xF000);

// 32 weights of a block against x, unpacked as gemv.wgsl unpacks them (x depends on k so that
// nothing folds away)
fn q4(v: vec4<u32>, k: u32) -> vec4<f32> {
    let xa = vec4<f32>(f32(k), 0.5, 0.25, 0.125);
    let xb = vec4<f32>(0.3, f32(k) * 0.1, 0.7, 0.9);
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let w = bitcast<i32>(v[j]);
        s += vec4<f32>(vec4<i32>(w) & M4) * xa + vec4<f32>(vec4<i32>(w >> 16u) & M4) * xb;
    }
    return s;
}

@compute @workgroup_size(16)
fn buffer_loads(@builtin(global_invocation_id) g: vec3<u32>) {
    var a = vec4<u32>(0u);
    for (var k = 0u; k < BLOCKS; k++) {
        a ^= src[g.x * BLOCKS + k];
    }
    out[g.x] = a.x ^ a.y ^ a.z ^ a.w;
}

@compute @workgroup_size(16)
fn texture_loads(@builtin(global_invocation_id) g: vec3<u32>) {
    var a = vec4<u32>(0u);
    for (var k = 0u; k < BLOCKS; k++) {
        a ^= textureLoad(tex, vec2<u32>(k, g.x), 0);
    }
    out[g.x] = a.x ^ a.y ^ a.z ^ a.w;
}

@compute @workgroup_size(16)
fn buffer_q4(@builtin(global_invocation_id) g: vec3<u32>) {
    var a = vec4<f32>(0.0);
    for (var k = 0u; k < BLOCKS; k++) {
        a += q4(src[g.x * BLOCKS + k], k);
    }
    out[g.x] = bitcast<u32>(dot(a, vec4<f32>(1.0)));
}

@compute @workgroup_size(16)
fn texture_q4(@builtin(global_invocation_id) g: vec3<u32>) {
    var a = vec4<f32>(0.0);
    for (var k = 0u; k < BLOCKS; k++) {
        a += q4(textureLoad(tex, vec2<u32>(k, g.x), 0), k);
    }
    out[g.x] = bitcast<u32>(dot(a, vec4<f32>(1.0)));
}
"#;

const KERNELS: [(&str, &str); 4] = [
    ("buffer_loads", "storage-buffer loads alone"),
    ("texture_loads", "texture fetches alone"),
    (
        "buffer_q4",
        "storage-buffer loads + q4 unpack and multiply-adds",
    ),
    (
        "texture_q4",
        "texture fetches + q4 unpack and multiply-adds",
    ),
];

fn main() {
    if let Err(e) = pollster::block_on(run()) {
        eprintln!("load_probe: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    let instance = wgpu::Instance::new(desc);
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .map_err(|e| format!("no adapter: {e}"))?;
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor::default())
        .await
        .map_err(|e| format!("could not open the adapter: {e}"))?;
    let info = adapter.get_info();
    println!("adapter {} ({:?})", info.name, info.backend);

    let bytes = ROWS as u64 * BLOCKS as u64 * 16;
    let data: Vec<u32> = (0..bytes / 4)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761))
        .collect();
    let src = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("weights"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&src, 0, bytemuck::cast_slice(&data));
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("out"),
        size: ROWS as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let size = wgpu::Extent3d {
        width: BLOCKS,
        height: ROWS,
        depth_or_array_layers: 1,
    };
    let tex = device.create_texture(&wgpu::TextureDescriptor {
        label: Some("weights as a texture"),
        size,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Uint,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    queue.write_texture(
        tex.as_image_copy(),
        bytemuck::cast_slice(&data),
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(BLOCKS * 16),
            rows_per_image: Some(ROWS),
        },
        size,
    );
    let view = tex.create_view(&Default::default());
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("load_probe"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });

    println!(
        "{} MB of 16-byte blocks, one row of {BLOCKS} per invocation, best of 3 submits of {REPS}",
        bytes / 1_000_000
    );
    for round in 1..=3 {
        for (entry, what) in KERNELS {
            let pipe = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 1,
                resource: out.as_entire_binding(),
            }];
            entries.push(if entry.starts_with("buffer") {
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: src.as_entire_binding(),
                }
            } else {
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(&view),
                }
            });
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipe.get_bind_group_layout(0),
                entries: &entries,
            });
            let mut best = f64::MAX;
            for _ in 0..3 {
                let mut enc = device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipe);
                    pass.set_bind_group(0, &group, &[]);
                    for _ in 0..REPS {
                        pass.dispatch_workgroups(ROWS / 16, 1, 1);
                    }
                }
                let t = Instant::now();
                queue.submit([enc.finish()]);
                device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| format!("waiting for {entry}: {e}"))?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gbs = (bytes * REPS as u64) as f64 / best / 1e9;
            println!("round {round}  {gbs:6.2} GB/s  {what}");
        }
    }
    Ok(())
}
