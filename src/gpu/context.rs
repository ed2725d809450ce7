//! Instance, adapter and device creation; adapter listing for `minigpt4 info`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::shader::Variant;
use crate::quant::DType;

/// How to choose the adapter and which fast paths to allow. Every field can also come from the
/// environment (see [`GpuOptions::from_env`]); explicit values win.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// `vulkan`, `metal`, `dx12`, `gl` or `webgpu`; `None` = all backends.
    pub backend: Option<String>,
    /// An adapter index (as listed by `minigpt4 info`) or a case-insensitive name substring.
    pub adapter: Option<String>,
    /// Lower the storage-binding size used to split tensors (tests use it to force splitting).
    pub max_binding: Option<u64>,
    /// Use only the portable kernels (f32 arithmetic, no f16 reads, no subgroups).
    pub portable: bool,
}

impl GpuOptions {
    /// Reads `MINIGPT4_BACKEND` (falling back to `WGPU_BACKEND`), `MINIGPT4_ADAPTER`,
    /// `MINIGPT4_MAX_BINDING` and `MINIGPT4_PORTABLE=1`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let max_binding = match var("MINIGPT4_MAX_BINDING") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| Error::InvalidOption {
                name: "MINIGPT4_MAX_BINDING".into(),
                msg: format!("expected a byte count, found '{v}'"),
            })?),
            None => None,
        };
        Ok(GpuOptions {
            backend: var("MINIGPT4_BACKEND").or_else(|| var("WGPU_BACKEND")),
            adapter: var("MINIGPT4_ADAPTER"),
            max_binding,
            portable: var("MINIGPT4_PORTABLE").is_some_and(|v| v != "0"),
        })
    }

    /// Options given on the command line override the environment.
    pub fn merged_with_env(self) -> Result<Self> {
        let env = Self::from_env()?;
        Ok(GpuOptions {
            backend: self.backend.or(env.backend),
            adapter: self.adapter.or(env.adapter),
            max_binding: self.max_binding.or(env.max_binding),
            portable: self.portable || env.portable,
        })
    }

    pub fn backends(&self) -> Result<wgpu::Backends> {
        let Some(name) = &self.backend else {
            return Ok(wgpu::Backends::all());
        };
        let mut b = wgpu::Backends::empty();
        for part in name.split(',').map(|s| s.trim().to_ascii_lowercase()) {
            b |= match part.as_str() {
                "vulkan" | "vk" => wgpu::Backends::VULKAN,
                "metal" | "mtl" => wgpu::Backends::METAL,
                "dx12" | "d3d12" => wgpu::Backends::DX12,
                "gl" | "gles" | "opengl" => wgpu::Backends::GL,
                "webgpu" | "browser" => wgpu::Backends::BROWSER_WEBGPU,
                _ => {
                    return Err(Error::InvalidOption {
                        name: "backend".into(),
                        msg: format!("expected vulkan, metal, dx12, gl or webgpu, found '{part}'"),
                    })
                }
            };
        }
        Ok(b)
    }
}

/// What `minigpt4 info` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

impl AdapterReport {
    pub fn shader_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }
    pub fn subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }
    pub fn timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }
}

/// Limits a model (or the kernel library itself) needs from an adapter.
#[derive(Clone, Debug)]
pub struct Requirements {
    /// Why these are needed, shown in the error ("kernel library", "Vicuna-7B q4", ...).
    pub what: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_workgroups_per_dimension: u32,
}

impl Requirements {
    /// What every kernel in `shaders/` needs: the portable floor from DEVELOPERS.md.
    pub fn kernels() -> Self {
        Requirements {
            what: "kernel library".into(),
            max_buffer_size: 1 << 20,
            max_storage_buffer_binding_size: 1 << 20,
            max_storage_buffers_per_shader_stage: 8,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_storage_size: 16 << 10,
            max_compute_workgroups_per_dimension: 65535,
        }
    }

    /// Checks `limits`, naming the first limit that is too small.
    pub fn check(&self, adapter: &str, limits: &wgpu::Limits) -> Result<()> {
        let checks: [(&'static str, u64, u64); 6] = [
            (
                "max_buffer_size",
                self.max_buffer_size,
                limits.max_buffer_size,
            ),
            (
                "max_storage_buffer_binding_size",
                self.max_storage_buffer_binding_size,
                limits.max_storage_buffer_binding_size,
            ),
            (
                "max_storage_buffers_per_shader_stage",
                self.max_storage_buffers_per_shader_stage as u64,
                limits.max_storage_buffers_per_shader_stage as u64,
            ),
            (
                "max_compute_invocations_per_workgroup",
                self.max_compute_invocations_per_workgroup as u64,
                limits.max_compute_invocations_per_workgroup as u64,
            ),
            (
                "max_compute_workgroup_storage_size",
                self.max_compute_workgroup_storage_size as u64,
                limits.max_compute_workgroup_storage_size as u64,
            ),
            (
                "max_compute_workgroups_per_dimension",
                self.max_compute_workgroups_per_dimension as u64,
                limits.max_compute_workgroups_per_dimension as u64,
            ),
        ];
        for (limit, needed, offered) in checks {
            if offered < needed {
                return Err(Error::Limit {
                    adapter: adapter.to_string(),
                    limit,
                    needed,
                    offered,
                    why: self.what.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Lists the adapters of the chosen backends, in the order `--adapter N` indexes them.
pub async fn list_adapters(opts: &GpuOptions) -> Result<(wgpu::Instance, Vec<wgpu::Adapter>)> {
    let backends = opts.backends()?;
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    #[cfg(not(target_arch = "wasm32"))]
    let adapters = instance.enumerate_adapters(backends).await;
    #[cfg(target_arch = "wasm32")]
    let adapters = match instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
    {
        Ok(a) => vec![a],
        Err(_) => vec![],
    };
    Ok((instance, adapters))
}

fn reports_of(adapters: &[wgpu::Adapter]) -> Vec<AdapterReport> {
    adapters
        .iter()
        .enumerate()
        .map(|(index, a)| AdapterReport {
            index,
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
        })
        .collect()
}

/// Reports for every adapter, and the index of the one [`Gpu::new`] would pick.
pub async fn adapter_reports(opts: &GpuOptions) -> Result<(Vec<AdapterReport>, Result<usize>)> {
    let (_instance, adapters) = list_adapters(opts).await?;
    let reports = reports_of(&adapters);
    let chosen = choose(opts, &reports);
    Ok((reports, chosen))
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_desc(opts: &GpuOptions) -> String {
    match &opts.backend {
        Some(b) => format!("backend '{b}'"),
        None => "any backend".into(),
    }
}

/// Picks an adapter: `--adapter N` / `--adapter NAME`, else the most capable device type
/// (discrete > integrated > virtual > CPU), ties broken by listing order.
pub fn choose(opts: &GpuOptions, reports: &[AdapterReport]) -> Result<usize> {
    if reports.is_empty() {
        return Err(Error::NoAdapter(format!(
            "no adapter on {} (install a Vulkan, Metal, DX12 or GL driver; on Linux without a GPU, \
             Mesa's lavapipe: `apt-get install mesa-vulkan-drivers`)",
            backend_desc(opts)
        )));
    }
    match &opts.adapter {
        Some(sel) => {
            if let Ok(i) = sel.trim().parse::<usize>() {
                if i < reports.len() {
                    return Ok(i);
                }
                return Err(Error::NoAdapter(format!(
                    "adapter index {i} requested, but {} lists only {} adapter(s) (0..{})",
                    backend_desc(opts),
                    reports.len(),
                    reports.len() - 1
                )));
            }
            let needle = sel.to_ascii_lowercase();
            reports
                .iter()
                .find(|r| r.info.name.to_ascii_lowercase().contains(&needle))
                .map(|r| r.index)
                .ok_or_else(|| {
                    let names: Vec<String> = reports
                        .iter()
                        .map(|r| format!("'{}'", r.info.name))
                        .collect();
                    Error::NoAdapter(format!(
                        "no adapter name contains '{sel}' on {}; available: {}",
                        backend_desc(opts),
                        names.join(", ")
                    ))
                })
        }
        None => Ok(reports
            .iter()
            .min_by_key(|r| (type_rank(r.info.device_type), r.index))
            .map(|r| r.index)
            .unwrap_or(0)),
    }
}

type PipelineKey = (&'static str, &'static str, Variant, Vec<&'static str>);

/// An open device with its queue, what it can do, and the compiled-kernel cache.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// The fastest kernel variant this device supports (all-false with `portable`).
    pub best_variant: Variant,
    /// Largest byte size of one storage binding we use (the adapter's limit, or lower if forced).
    pub max_binding: u64,
    pub(crate) pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Invocations per output column of the block GEMV (see `shaders/gemv.wgsl`, `tune.rs`).
    gemv_lanes: AtomicU32,
    /// Whether an RMSNorm is fused into the one-row GEMV that reads it (tuned; see
    /// [`crate::gpu::tune::autotune`]).
    fuse_norm: AtomicBool,
    /// The tiled GEMM's form (`GEMM_WIDE`, `GEMM_TALL` and `GEMM_HALF` bits, see
    /// `shaders/matmul.wgsl`; tuned like the lanes).
    gemm_form: AtomicU32,
    /// The form for quantised weights where it differs (a CPU driver, where the untiled form
    /// wins on 4-bit weights and not on f16; tuned likewise).
    gemm_form_quant: AtomicU32,
    /// Per-shape block GEMV lanes: (rows, cols, dtype) → lanes.
    gemv_shapes: Mutex<HashMap<(usize, usize, DType), u32>>,
    /// Whether the GEMM form is also tuned per shape (a fast device; see
    /// [`crate::gpu::tune::tune_gemm_shapes`]).
    gemm_by_shape: AtomicBool,
    /// Whether small weights' GEMM forms are tuned per shape on any device (see
    /// [`crate::gpu::tune::GEMM_SMALL_WEIGHTS`]).
    gemm_small_shapes: AtomicBool,
    /// Per-shape GEMM forms: (rows of x, weight rows, weight columns, dtype) → form.
    gemm_shapes: Mutex<HashMap<(usize, usize, usize, DType), u32>>,
    /// Errors the device reported outside an error scope (wgpu would panic on them otherwise).
    errors: Arc<Mutex<Vec<String>>>,
    /// Set when the device is lost (driver reset, `destroy`, the browser reclaiming it).
    lost: Arc<Mutex<Option<String>>>,
    /// How this device was chosen (to open it again after a loss).
    pub options: GpuOptions,
    /// While timing ([`Gpu::start_timing`]): each recorded submit's start and end timestamps,
    /// resolved into a buffer, to be read by [`Gpu::finish_timing`].
    timing: Mutex<Option<Vec<wgpu::Buffer>>>,
}

impl Gpu {
    /// Opens the adapter chosen by `opts` and requests its own limits.
    pub async fn new(opts: &GpuOptions) -> Result<Self> {
        let (_instance, adapters) = list_adapters(opts).await?;
        let reports = reports_of(&adapters);
        let idx = choose(opts, &reports)?;
        let adapter = &adapters[idx];
        let info = adapter.get_info();
        let limits = adapter.limits();
        Requirements::kernels().check(&info.name, &limits)?;
        let offered = adapter.features();
        let mut wanted = wgpu::Features::empty();
        if !opts.portable {
            wanted |= offered
                & (wgpu::Features::SHADER_F16
                    | wgpu::Features::SUBGROUP
                    | wgpu::Features::TIMESTAMP_QUERY);
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("minigpt4"),
                required_features: wanted,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("could not open '{}': {e}", info.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost_sink.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        let best_variant = Variant {
            f16: wanted.contains(wgpu::Features::SHADER_F16),
            subgroups: wanted.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size >= 4,
        };
        // capped at 1 GiB so that element indices of every format (8 per word for q4) fit in u32
        let adapter_binding = (limits.max_storage_buffer_binding_size as u64)
            .min(limits.max_buffer_size)
            .min(1 << 30);
        let max_binding = match opts.max_binding {
            Some(m) => m.clamp(256, adapter_binding),
            None => adapter_binding,
        };
        Ok(Gpu {
            device,
            queue,
            limits,
            features: wanted,
            best_variant,
            max_binding,
            pipelines: Mutex::new(HashMap::new()),
            gemv_lanes: AtomicU32::new(crate::gpu::tune::default_gemv_lanes(&info)),
            gemv_shapes: Mutex::new(HashMap::new()),
            fuse_norm: AtomicBool::new(true),
            gemm_form: AtomicU32::new(0),
            gemm_form_quant: AtomicU32::new(0),
            gemm_by_shape: AtomicBool::new(false),
            gemm_small_shapes: AtomicBool::new(false),
            gemm_shapes: Mutex::new(HashMap::new()),
            info,
            errors,
            lost,
            options: opts.clone(),
            timing: Mutex::new(None),
        })
    }

    /// An error when the device has been lost: every later use fails with it, and the caller
    /// (CLI, server, page) must open a new device and reload the model.
    pub fn check_lost(&self) -> Result<()> {
        match self.lost.lock().ok().and_then(|l| l.clone()) {
            Some(why) => Err(Error::DeviceLost(format!(
                "the GPU device '{}' was lost ({why}); open it again and reload the model",
                self.info.name
            ))),
            None => Ok(()),
        }
    }

    /// Opens a new device on the adapter these options choose, with this one's tuned kernel
    /// sizes (after a loss: the model must then be loaded again onto it).
    pub async fn reopen(&self) -> Result<Gpu> {
        let g = Gpu::new(&self.options).await?;
        g.set_gemv_lanes(self.gemv_lanes());
        g.set_fuse_norm(self.fuse_norm());
        g.set_gemm_form(self.gemm_form());
        g.set_gemm_form_quant(self.gemm_form_quant());
        g.set_gemm_by_shape(self.gemm_by_shape());
        g.set_gemm_small_shapes(self.gemm_small_shapes());
        if let Ok(m) = self.gemv_shapes.lock() {
            for (&(n, k, dt), &l) in m.iter() {
                g.set_gemv_lanes_for(n, k, dt, l);
            }
        }
        if let Ok(m) = self.gemm_shapes.lock() {
            for (&(rows, n, k, dt), &f) in m.iter() {
                g.set_gemm_form_at(rows, n, k, dt, f);
            }
        }
        Ok(g)
    }

    /// Whether the device has been lost.
    pub fn is_lost(&self) -> bool {
        self.check_lost().is_err()
    }

    /// Returns (and clears) the errors the device reported since the last call.
    pub fn take_error(&self) -> Result<()> {
        self.check_lost()?;
        let mut v = self
            .errors
            .lock()
            .map_err(|_| Error::Gpu("error sink poisoned".into()))?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        drop(v);
        // a lost device shows up first as errors about invalid objects: let the device
        // process its loss (native) so that the caller is told the real cause
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.check_lost()?;
        Err(Error::Gpu(msg))
    }

    /// Invocations per output column of the block GEMV.
    pub fn gemv_lanes(&self) -> u32 {
        self.gemv_lanes.load(Ordering::Relaxed)
    }

    /// Whether [`crate::gpu::Recorder::rms_norm_matmul`] and `rms_norm_glu` fuse the norm into
    /// a one-row block GEMV (on until tuning decides otherwise).
    pub fn fuse_norm(&self) -> bool {
        self.fuse_norm.load(Ordering::Relaxed)
    }

    pub fn set_fuse_norm(&self, on: bool) {
        self.fuse_norm.store(on, Ordering::Relaxed);
    }

    /// The form [`crate::gpu::MatmulPath::Gemm`] runs in: 64×64 tiles of f32 until tuning
    /// decides otherwise (see [`crate::gpu::ops::GEMM_WIDE`], `GEMM_TALL` and `GEMM_HALF`).
    pub fn gemm_form(&self) -> u32 {
        self.gemm_form.load(Ordering::Relaxed)
    }

    /// The form a GEMM over quantised weights runs in where its shape has none of its own
    /// ([`Gpu::gemm_form_at`]): [`Gpu::gemm_form`] unless the tuning chose another for them.
    pub fn gemm_form_quant(&self) -> u32 {
        self.gemm_form_quant.load(Ordering::Relaxed)
    }

    /// Sets the form of GEMMs over quantised weights (after [`Gpu::set_gemm_form`], which sets
    /// both).
    pub fn set_gemm_form_quant(&self, form: u32) {
        self.gemm_form_quant.store(form, Ordering::Relaxed);
    }

    /// Sets the GEMM form for every shape and dtype, forgetting the per-shape choices.
    pub fn set_gemm_form(&self, form: u32) {
        self.gemm_form.store(form, Ordering::Relaxed);
        self.gemm_form_quant.store(form, Ordering::Relaxed);
        if let Ok(mut m) = self.gemm_shapes.lock() {
            m.clear();
        }
    }

    /// Whether GEMM forms are tuned per shape as well ([`crate::gpu::tune::tune_gemm_shapes`]):
    /// set by the tuning where the device is fast (off until then).
    pub fn gemm_by_shape(&self) -> bool {
        self.gemm_by_shape.load(Ordering::Relaxed)
    }

    pub fn set_gemm_by_shape(&self, on: bool) {
        self.gemm_by_shape.store(on, Ordering::Relaxed);
    }

    /// Whether the GEMM forms of small weights (at most
    /// [`crate::gpu::tune::GEMM_SMALL_WEIGHTS`] elements) are tuned per shape, whatever
    /// [`Gpu::gemm_by_shape`] says: cheap to measure on any device, and a small model's few
    /// columns leave a CPU driver's tiles with little to share out. Set by the tuning unless a
    /// form is pinned or `MINIGPT4_GEMM_SHAPES=0` (off until then).
    pub fn gemm_small_shapes(&self) -> bool {
        self.gemm_small_shapes.load(Ordering::Relaxed)
    }

    pub fn set_gemm_small_shapes(&self, on: bool) {
        self.gemm_small_shapes.store(on, Ordering::Relaxed);
    }

    /// Whether a GEMM over `[n, k]` weights has its form tuned per shape.
    pub fn gemm_tuned_at(&self, n: usize, k: usize) -> bool {
        self.gemm_by_shape()
            || (self.gemm_small_shapes() && n * k <= crate::gpu::tune::GEMM_SMALL_WEIGHTS)
    }

    /// The form of a tuned GEMM of `m` rows of x over `[n, k]` `dtype` weights, before
    /// [`crate::gpu::gemm_form_for`] trims it to the rows and columns: the form tuned for the
    /// weight shape at the row count nearest `m` (by ratio), else the adapter's (for quantised
    /// weights, [`Gpu::gemm_form_quant`]).
    pub fn gemm_form_at(&self, m: usize, n: usize, k: usize, dtype: DType) -> u32 {
        let distance = |rows: usize| (m.max(1) as f64 / rows.max(1) as f64).ln().abs();
        self.gemm_shapes
            .lock()
            .ok()
            .and_then(|map| {
                map.iter()
                    .filter(|(&(_, sn, sk, sd), _)| (sn, sk, sd) == (n, k, dtype))
                    .min_by(|(a, _), (b, _)| {
                        distance(a.0).total_cmp(&distance(b.0)).then(a.0.cmp(&b.0))
                    })
                    .map(|(_, &f)| f)
            })
            .unwrap_or_else(|| {
                if dtype.is_quantized() {
                    self.gemm_form_quant()
                } else {
                    self.gemm_form()
                }
            })
    }

    /// Whether a GEMM of exactly `m` rows over `[n, k]` `dtype` weights has its own form.
    pub fn has_gemm_form_at(&self, m: usize, n: usize, k: usize, dtype: DType) -> bool {
        self.gemm_shapes
            .lock()
            .is_ok_and(|map| map.contains_key(&(m, n, k, dtype)))
    }

    /// Drops the form of GEMMs of exactly `m` rows over `[n, k]` `dtype` weights.
    pub fn forget_gemm_form_at(&self, m: usize, n: usize, k: usize, dtype: DType) {
        if let Ok(mut map) = self.gemm_shapes.lock() {
            map.remove(&(m, n, k, dtype));
        }
    }

    /// Sets the form of GEMMs of `m` rows over `[n, k]` `dtype` weights (and of those whose
    /// row count is nearer `m` than any other tuned one's).
    pub fn set_gemm_form_at(&self, m: usize, n: usize, k: usize, dtype: DType, form: u32) {
        if let Ok(mut map) = self.gemm_shapes.lock() {
            map.insert((m, n, k, dtype), form);
        }
    }

    /// Sets the block GEMV's lanes (one of [`crate::gpu::ops::GEMV_LANES`]) for every
    /// weight, forgetting the per-shape choices.
    pub fn set_gemv_lanes(&self, lanes: u32) {
        self.gemv_lanes.store(lanes, Ordering::Relaxed);
        if let Ok(mut m) = self.gemv_shapes.lock() {
            m.clear();
        }
    }

    /// The lanes for an `[n, k]` weight of `dtype`: tuned for its shape (few or short rows, see
    /// [`crate::gpu::tune::tune_shapes`]), else the adapter's.
    pub fn gemv_lanes_for(&self, n: usize, k: usize, dtype: DType) -> u32 {
        self.gemv_shapes
            .lock()
            .ok()
            .and_then(|m| m.get(&(n, k, dtype)).copied())
            .unwrap_or_else(|| self.gemv_lanes())
    }

    /// Whether `[n, k]` `dtype` weights have their own lanes.
    pub fn has_gemv_lanes_for(&self, n: usize, k: usize, dtype: DType) -> bool {
        self.gemv_shapes
            .lock()
            .is_ok_and(|m| m.contains_key(&(n, k, dtype)))
    }

    /// Sets the lanes for `[n, k]` `dtype` weights.
    pub fn set_gemv_lanes_for(&self, n: usize, k: usize, dtype: DType, lanes: u32) {
        if let Ok(mut m) = self.gemv_shapes.lock() {
            m.insert((n, k, dtype), lanes);
        }
    }

    /// Checks this device against a model's requirements before anything is loaded.
    pub fn require(&self, req: &Requirements) -> Result<()> {
        req.check(&self.info.name, &self.limits)
    }

    /// Every kernel variant this device can run, portable first.
    pub fn variants(&self) -> Vec<Variant> {
        let mut v = vec![Variant::PORTABLE];
        if self.best_variant.f16 {
            v.push(Variant {
                f16: true,
                subgroups: false,
            });
        }
        if self.best_variant.subgroups {
            v.push(Variant {
                f16: false,
                subgroups: true,
            });
        }
        if self.best_variant.f16 && self.best_variant.subgroups {
            v.push(Variant {
                f16: true,
                subgroups: true,
            });
        }
        v
    }

    /// Whether decode submits each token's forward before the token before it is read back
    /// (`Llama::decode_greedy`, `Llama::decode_sampled`): it hides the round trip to a GPU and
    /// the browser's slow readback. Not on a CPU device natively: there the device's threads
    /// share the host's cores, with no idle time to fill; the overlap slowed SmolLM2 on
    /// lavapipe's 2 cores by 14–47 % in 5 of 8 runs and was even in the rest (and with one
    /// worker thread, `LP_NUM_THREADS=1`).
    /// `MINIGPT4_AHEAD=0|1` decides instead (natively).
    pub fn submits_ahead(&self) -> Result<bool> {
        #[cfg(target_arch = "wasm32")]
        return Ok(true);
        #[cfg(not(target_arch = "wasm32"))]
        self.cpu_default_off("MINIGPT4_AHEAD")
    }

    /// Whether sampled decoding (and greedy with a repetition penalty) picks its tokens on the
    /// GPU among 64 candidates (`Llama::forward_topk`, `Llama::decode_sampled`), reading back a
    /// few bytes a token, rather than reading back the logits for the host to sample. On every
    /// device: even on a CPU device, where the logits are in the host's memory already, the
    /// top-k (`topk.wgsl`) now costs less than the readback and the host's sampling (SmolLM2
    /// on lavapipe: 16.7 tok/s on the GPU against 14.3 from the logits; with the bitonic sort
    /// it had 7.3 against 13.9). `MINIGPT4_GPU_SAMPLING=0|1` decides instead (natively).
    pub fn samples_on_gpu(&self) -> Result<bool> {
        #[cfg(target_arch = "wasm32")]
        return Ok(true);
        #[cfg(not(target_arch = "wasm32"))]
        env_switch("MINIGPT4_GPU_SAMPLING", true)
    }

    /// A run-time choice that is off on a CPU device and on elsewhere, unless the environment
    /// variable `name` says 0 or 1.
    #[cfg(not(target_arch = "wasm32"))]
    fn cpu_default_off(&self, name: &str) -> Result<bool> {
        env_switch(name, self.info.device_type != wgpu::DeviceType::Cpu)
    }

    /// Whether the device has timestamp queries (GPU time for `bench` and the tuning).
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Starts measuring GPU time: until [`Gpu::finish_timing`], every [`Recorder`] submit
    /// writes timestamps at the start and end of its compute pass. Returns false, and does
    /// nothing, where the device has no timestamp queries, and in the browser: browsers
    /// coarsen timestamps (Chromium to 100 µs) against timing attacks, which would turn a
    /// short kernel's time into 0 or one step, so the page keeps its wall clock.
    ///
    /// [`Recorder`]: crate::gpu::Recorder
    pub fn start_timing(&self) -> bool {
        if cfg!(target_arch = "wasm32") || !self.has_timestamps() {
            return false;
        }
        if let Ok(mut t) = self.timing.lock() {
            *t = Some(Vec::new());
        }
        true
    }

    /// A query set for one submit's start and end, with the buffer it resolves into, while
    /// timing; the buffer is kept for [`Gpu::finish_timing`].
    pub(crate) fn timing_queries(&self) -> Option<(wgpu::QuerySet, wgpu::Buffer)> {
        let mut t = self.timing.lock().ok()?;
        let pending = t.as_mut()?;
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timing"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        pending.push(resolved.clone());
        Some((set, resolved))
    }

    /// Stops timing; the GPU seconds of the submits since [`Gpu::start_timing`] (the sum of
    /// each compute pass's end minus start), or None when it was not timing, nothing was
    /// submitted through a [`Recorder`] (a profiled run times its dispatches itself), or the
    /// clock did not move (a driver whose timestamps are all zero): the caller then uses its
    /// wall clock.
    ///
    /// [`Recorder`]: crate::gpu::Recorder
    pub async fn finish_timing(&self) -> Result<Option<f64>> {
        let pending = self.timing.lock().ok().and_then(|mut t| t.take());
        let Some(pending) = pending.filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let ns_per_tick = f64::from(self.queue.get_timestamp_period());
        let mut seconds = 0.0;
        for resolved in &pending {
            let w = crate::gpu::tensor::read_words(self, resolved, 0, 4).await?;
            seconds += ticks_between(&w) as f64 * ns_per_tick * 1e-9;
        }
        Ok(Some(seconds).filter(|&s| s > 0.0))
    }

    /// Waits for all submitted work (native); a no-op in the browser.
    pub fn wait(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        }
    }
}

/// End minus start of two resolved timestamps, as four little-endian u32 words (0 when the
/// end is not after the start: some drivers' clocks are not monotonic across a pass).
pub(crate) fn ticks_between(words: &[u32]) -> u64 {
    let at = |i: usize| u64::from(words[i]) | (u64::from(words[i + 1]) << 32);
    at(2).saturating_sub(at(0))
}

/// The environment variable `name` as a switch: `0` or `1`, else `default` where it is unset
/// or empty; anything else is an error naming it.
#[cfg(not(target_arch = "wasm32"))]
fn env_switch(name: &str, default: bool) -> Result<bool> {
    match std::env::var(name).ok().filter(|v| !v.is_empty()) {
        Some(v) => match v.as_str() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(Error::InvalidOption {
                name: name.into(),
                msg: format!("expected 0 or 1, found '{v}'"),
            }),
        },
        None => Ok(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_small_adapter_is_refused_naming_the_limit_and_both_numbers() {
        let mut limits = wgpu::Limits::downlevel_defaults();
        limits.max_storage_buffers_per_shader_stage = 4;
        let err = Requirements::kernels()
            .check("tiny", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tiny"), "{err}");
        assert!(
            err.contains("max_storage_buffers_per_shader_stage"),
            "{err}"
        );
        assert!(
            err.contains("offered 4") && err.contains("needed 8"),
            "{err}"
        );
        assert!(Requirements::kernels()
            .check("big", &wgpu::Limits::default())
            .is_ok());
    }

    #[test]
    fn backend_names_parse_and_bad_ones_are_named() {
        let o = |b: &str| GpuOptions {
            backend: Some(b.into()),
            ..Default::default()
        };
        assert_eq!(o("vulkan").backends().unwrap(), wgpu::Backends::VULKAN);
        assert_eq!(
            o("GL,vulkan").backends().unwrap(),
            wgpu::Backends::VULKAN | wgpu::Backends::GL
        );
        let e = o("cuda").backends().unwrap_err().to_string();
        assert!(
            e.contains("cuda") && e.contains("vulkan, metal, dx12, gl or webgpu"),
            "{e}"
        );
    }
}
