//! Per-adapter kernel choices: a small auto-tune at load, cached (on disk natively, in the
//! browser's Cache API in the page).
//!
//! Three choices are tuned. The block GEMV's lanes per output column (`shaders/gemv.wgsl`),
//! the kernel that decides decode speed; whether an RMSNorm is fused into the one-row GEMV
//! that reads it ([`measure_fuse_norm`]); and the tiled GEMM's form (`shaders/matmul.wgsl`:
//! tile shape and f16 arithmetic, [`measure_gemm`]), the kernel of prefill and the ViT. Each
//! GEMV candidate runs a 4-bit 4096×4096 GEMV (the size of a 7B attention projection) a few
//! times and the fastest wins. Weights with fewer
//! than [`SMALL_ROWS`] rows or rows shorter than [`SHORT_ROWS`] (small models) are then tuned
//! shape by shape when a model first runs ([`tune_shapes`]): with few workgroups, how they
//! spread over the device decides, and no single shape predicts that (SmolLM2's 576-row
//! matrices want 4 lanes on lavapipe where a 1024-row one wants 1); with short rows, what a
//! workgroup costs besides its weights does. On a fast device the GEMM's form is tuned shape by shape too, for
//! the same reason ([`tune_gemm_shapes`]). The choices are stored under a key naming the
//! adapter, driver, backend, kernel variant and kernel sources, so later runs skip the
//! measurement: natively in `<cache dir>/tune.json`, in the page by the worker
//! (`web/worker.js`, the Cache API).
//! `MINIGPT4_GEMV_LANES`, `MINIGPT4_FUSE_NORM`, `MINIGPT4_GEMM` and `MINIGPT4_GEMM_SHAPES`
//! override them natively.

#[cfg(not(target_arch = "wasm32"))]
use crate::error::Error;
use crate::error::Result;
use crate::gpu::ops::is_gemv_lanes;
use crate::gpu::ops::{
    gemm_candidates, gemm_form_for, gemv_candidates, is_gemm_form, MatmulPath, GEMM_HALF,
    GEMV_MAX_ROWS,
};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::ops::{GEMV_LANES, GEMV_SUBGROUP, GEMV_UNIFORM_X, GEMV_WG16, GEMV_X_SUBGROUP};
use crate::gpu::tensor::read_words;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::quant::DType;

/// The block GEMV's lanes per output column before any tuning: CPU drivers (lavapipe,
/// SwiftShader) pay for every reduction step, GPUs want neighbouring lanes reading
/// neighbouring blocks.
pub fn default_gemv_lanes(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::Cpu => 8,
        _ => 32,
    }
}

/// Weights with fewer output rows than this get lanes tuned for their own shape.
pub const SMALL_ROWS: usize = 2048;

/// Weights whose rows are shorter than this (K, the input width) get lanes tuned for their own
/// shape too: a small model's LM head has the many rows of a 7B one and a fraction of its
/// row length, and the 4096×4096 tuning does not predict it (SmolLM2's 49152×576 q8 head on
/// lavapipe: 61–62 % of copy in workgroups of 64, 48–53 % in the workgroups of 16 that the
/// 4096×4096 GEMV chose, where both forms read at 86–88 %).
pub const SHORT_ROWS: usize = 2048;

/// Whether an `[n, k]` weight's GEMV lanes are measured for its own shape ([`tune_shapes`]):
/// fewer than [`SMALL_ROWS`] rows or rows shorter than [`SHORT_ROWS`], K in whole blocks.
pub fn tuned_by_shape(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && k.is_multiple_of(32) && (n < SMALL_ROWS || k < SHORT_ROWS)
}

/// Seconds on a monotonic clock (the page's clock in the browser).
pub fn now_s() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() / 1e3
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static T0: OnceLock<Instant> = OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_secs_f64()
    }
}

/// One candidate's measurement.
#[derive(Clone, Debug)]
pub struct Trial {
    pub lanes: u32,
    /// Median seconds of one GEMV.
    pub seconds: f64,
    /// The fastest run's seconds of one GEMV: what the choice is made on, since other work
    /// on the machine can only ever add time.
    pub min_seconds: f64,
    pub gb_per_s: f64,
}

/// Times the block GEMV in each of its forms ([`gemv_candidates`]) on a `[n, k]` q4 weight:
/// `runs` timed submits of at least `reps` GEMVs each ([`measure_candidates`]), median and
/// fastest run per candidate.
pub async fn measure_gemv(
    gpu: &Gpu,
    n: usize,
    k: usize,
    reps: usize,
    runs: usize,
) -> Result<Vec<Trial>> {
    measure_gemv_of(gpu, n, k, DType::Q4, reps, runs).await
}

/// [`measure_gemv`] for a weight of any dtype.
pub async fn measure_gemv_of(
    gpu: &Gpu,
    n: usize,
    k: usize,
    dtype: DType,
    reps: usize,
    runs: usize,
) -> Result<Vec<Trial>> {
    let w = Tensor::empty(gpu, "tune.w", &[n, k], dtype)?;
    let x = Tensor::zeros(gpu, "tune.x", &[1, k])?;
    let y = Tensor::zeros(gpu, "tune.y", &[1, n])?;
    let bytes = dtype.bytes(n * k) as f64;
    let record = |rec: &mut Recorder, lanes: u32| {
        rec.matmul_with(MatmulPath::GemvBlocks(lanes), &x, &w, None, &y, false)
    };
    let timed = measure_candidates(gpu, &gemv_candidates(gpu), record, &y, reps, runs).await?;
    Ok(timed
        .into_iter()
        .map(|(lanes, seconds, min_seconds)| Trial {
            lanes,
            seconds,
            min_seconds,
            gb_per_s: bytes / seconds / 1e9,
        })
        .collect())
}

/// GPU seconds a timed run should hold at least: shorter runs measure launch latency and clock
/// changes more than the kernel (a 4096×4096 q4 GEMV takes a few microseconds on a big GPU).
pub const TUNE_RUN_S: f64 = 1e-3;

/// The same where runs are timed by the wall clock (no timestamp queries; the page, whose
/// clock counts milliseconds), which also counts the submit and the wait.
pub const TUNE_RUN_WALL_S: f64 = 1e-2;

/// How long the first candidate runs before anything is timed, so that a GPU has left its
/// idle clocks (a big one idles at a fifth of its clock).
const TUNE_WARM_S: f64 = 0.02;

/// Repetitions per timed run: enough that a run holds `run_s` ([`TUNE_RUN_S`] or
/// [`TUNE_RUN_WALL_S`]) when one repetition takes `one` seconds, at least `min` (the
/// caller's), at most 256.
pub fn reps_for(one: f64, min: usize, run_s: f64) -> usize {
    let want = if one > 0.0 {
        (run_s / one).ceil().min(256.0) as usize
    } else {
        256
    };
    want.max(min.max(1))
}

/// Times `record`ed work for each of `candidates`: first the first candidate runs for
/// [`TUNE_WARM_S`] (pipelines compiled, buffers resident, clocks up), which also sets the
/// repetitions per run ([`reps_for`], the same for every candidate, for runs of
/// [`TUNE_RUN_S`] on the GPU's clock or [`TUNE_RUN_WALL_S`] on the wall's); then each
/// candidate runs once untimed, and `runs` rounds time each candidate once
/// ([`interleaved_rounds`]). Returns (candidate, median, fastest) seconds of one repetition.
/// `out` is what the work writes (read back to wait for it without timestamps).
async fn measure_candidates<C: Copy>(
    gpu: &Gpu,
    candidates: &[C],
    record: impl Fn(&mut Recorder, C) -> Result<()>,
    out: &Tensor,
    min_reps: usize,
    runs: usize,
) -> Result<Vec<(C, f64, f64)>> {
    let Some(&first) = candidates.first() else {
        return Ok(Vec::new());
    };
    let run = |c: C, reps: usize| {
        let mut rec = Recorder::new(gpu);
        let recorded = (0..reps).try_for_each(|_| record(&mut rec, c));
        async move {
            recorded?;
            timed_submit(gpu, rec, out).await
        }
    };
    let min_reps = min_reps.max(1);
    let (t0, mut one, mut n) = (now_s(), (f64::MAX, false), 0);
    while n < 2 || now_s() - t0 < TUNE_WARM_S {
        let (t, on_gpu) = run(first, min_reps).await?;
        one = (t / min_reps as f64, on_gpu);
        n += 1;
    }
    let run_s = if one.1 { TUNE_RUN_S } else { TUNE_RUN_WALL_S };
    let reps = reps_for(one.0, min_reps, run_s);
    for &c in candidates {
        run(c, reps).await?;
    }
    interleaved_rounds(candidates, runs, |c| {
        let timed = run(c, reps);
        async move { Ok(timed.await?.0 / reps as f64) }
    })
    .await
}

/// A candidate more than this many times slower than the fastest one in the first round is
/// not timed again: it cannot win, and on a slow device (a CPU driver, the page on
/// SwiftShader) the slow candidates' runs are most of a measurement's time (the block GEMV at
/// 64 lanes reads 6 times slower than at 1 on lavapipe).
pub const PRUNE_SLOWER: f64 = 2.0;

/// Times every candidate once per round, `runs` rounds (at least one), and returns each
/// candidate's (median, fastest) time. Round by round, not candidate by candidate: a busy spell
/// on the machine (another process, a CI job beside it) that lasts several runs then slows
/// every candidate alike instead of all the runs of one, which the choice would then be made
/// against and the cache would keep. After the first round, candidates more than
/// [`PRUNE_SLOWER`] times slower than its fastest drop out (their one time stands).
pub async fn interleaved_rounds<C: Copy, F, Fut>(
    candidates: &[C],
    runs: usize,
    mut time: F,
) -> Result<Vec<(C, f64, f64)>>
where
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut times = vec![Vec::with_capacity(runs.max(1)); candidates.len()];
    for round in 0..runs.max(1) {
        let best = times
            .iter()
            .filter_map(|t| t.first().copied())
            .fold(f64::INFINITY, f64::min);
        for (t, &c) in times.iter_mut().zip(candidates) {
            if round > 0 && t[0] > PRUNE_SLOWER * best {
                continue;
            }
            t.push(time(c).await?);
        }
    }
    Ok(candidates
        .iter()
        .zip(&mut times)
        .map(|(&c, t)| {
            let (median, min) = median_and_min(t);
            (c, median, min)
        })
        .collect())
}

/// The median and the fastest of `times` (sorted in place; never below a nanosecond, so rates
/// stay finite).
fn median_and_min(times: &mut [f64]) -> (f64, f64) {
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2].max(1e-9), times[0].max(1e-9))
}

/// One GEMM form's measurement.
#[derive(Clone, Debug)]
pub struct GemmTrial {
    pub form: u32,
    /// Median seconds of one GEMM.
    pub seconds: f64,
    /// The fastest run's seconds.
    pub min_seconds: f64,
    pub gflop_per_s: f64,
}

/// The GEMM shape the forms are tuned at first (m, n, k, f16 weights): the ViT's and
/// prefill's kind of work at a size that costs well under a second on a CPU driver
/// (0.27 GFLOP). K is of the models' own order (768 to 11008): at K = 512 the untiled form's
/// dispatch per four rows of x (as it then was) weighed more than at any real shape, and on
/// lavapipe that form tied with the tiles there while it ran the ViT's f16 GEMMs at twice
/// their rate.
pub const GEMM_TUNE_SHAPE: (usize, usize, usize) = (128, 1024, 1024);

/// The shape a fast device's forms are tuned at next, and chosen by: the ViT's fc1 (257 rows
/// rounded to 256; 2.2 GFLOP). At the small shape a 128×128 tile makes 8 workgroups, far too few
/// to fill a big GPU, so that shape alone would favour small tiles wherever it is measured.
pub const GEMM_TUNE_SHAPE_LARGE: (usize, usize, usize) = (256, 6144, 1408);

/// GFLOP/s of the best form at the small shape from which the large shape is measured too (a
/// CPU driver runs at a few to tens of GFLOP/s; there the large shape would cost seconds).
pub const GEMM_LARGE_FROM_GFLOPS: f64 = 100.0;

/// How much faster (fastest runs) an f16-arithmetic GEMM form must be than its f32 twin to be
/// chosen: f16 costs precision, so a win inside the noise does not take it.
pub const GEMM_HALF_MARGIN: f64 = 0.85;

/// Times the tiled GEMM in each of its forms ([`gemm_candidates`]) on an `[m, k]` x and an
/// `[n, k]` weight of `dtype`: `runs` timed submits ([`measure_candidates`]).
pub async fn measure_gemm(
    gpu: &Gpu,
    shape: (usize, usize, usize),
    dtype: DType,
    runs: usize,
) -> Result<Vec<GemmTrial>> {
    let forms = gemm_candidates(gpu);
    time_gemm_forms(gpu, shape, dtype, &forms, runs, |rec, form, x, w, y| {
        rec.matmul_with(MatmulPath::GemmForm(form), x, w, None, y, false)
    })
    .await
}

/// Times a GEMM on an `[m, k]` x, an `[n, k]` weight of `dtype` and an `[m, n]` output in each
/// of `forms`, as `record` records it (form, recorder, x, w, out): `runs` timed submits
/// ([`measure_candidates`]).
async fn time_gemm_forms(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    forms: &[u32],
    runs: usize,
    record: impl Fn(&mut Recorder, u32, &Tensor, &Tensor, &Tensor) -> Result<()>,
) -> Result<Vec<GemmTrial>> {
    let w = Tensor::empty(gpu, "tune.gemm.w", &[n, k], dtype)?;
    let x = Tensor::zeros(gpu, "tune.gemm.x", &[m, k])?;
    let y = Tensor::zeros(gpu, "tune.gemm.y", &[m, n])?;
    let flop = 2.0 * (m * n * k) as f64;
    let record = |rec: &mut Recorder, form: u32| record(rec, form, &x, &w, &y);
    let timed = measure_candidates(gpu, forms, record, &y, 1, runs).await?;
    Ok(timed
        .into_iter()
        .map(|(form, seconds, min_seconds)| GemmTrial {
            form,
            seconds,
            min_seconds,
            gflop_per_s: flop / seconds / 1e9,
        })
        .collect())
}

/// Whether the fastest run of the best form at `shape` reached [`GEMM_LARGE_FROM_GFLOPS`].
pub fn is_fast_gemm((m, n, k): (usize, usize, usize), trials: &[GemmTrial]) -> bool {
    let flop = 2.0 * (m * n * k) as f64;
    trials
        .iter()
        .any(|t| flop / t.min_seconds.max(1e-9) / 1e9 >= GEMM_LARGE_FROM_GFLOPS)
}

/// A GEMM shape (m, n, k) with every form's trial at it.
pub type ShapeTrials = ((usize, usize, usize), Vec<GemmTrial>);

/// What the tuning's measurements ([`measure_gemm_tuning`]) choose: the GEMM form, the
/// fastest at the last shape measured ([`fastest_gemm`]; 64×64 f32 when there is none), and
/// whether forms are tuned per shape too ([`tune_gemm_shapes`]): where the large shape was
/// measured, a fast device, on which tiles against the device's width differ from shape to
/// shape.
pub fn gemm_choice(shapes: &[ShapeTrials]) -> (u32, bool) {
    let form = shapes
        .last()
        .and_then(|(_, trials)| fastest_gemm(trials))
        .unwrap_or(0);
    (form, shapes.len() > 1)
}

/// Every GEMM form at `small` over 4-bit weights, where forms are not tuned per shape
/// (`by_shape` false: a slow device; a fast one tunes every shape on its own, so there is
/// nothing to measure); the form for quantised weights is chosen from them
/// ([`gemm_quant_choice`]). On lavapipe the untiled form (`GEMM_ROWS`) runs 4-bit weights at
/// about twice the best tile's GFLOP/s and f16 weights at about the same: the f16 shape alone
/// would give a 7B's prefill the slower form.
pub async fn measure_gemm_quant(
    gpu: &Gpu,
    small: (usize, usize, usize),
    by_shape: bool,
    runs: usize,
) -> Result<Option<Vec<GemmTrial>>> {
    if by_shape {
        return Ok(None);
    }
    Ok(Some(measure_gemm(gpu, small, DType::Q4, runs).await?))
}

/// The form for quantised weights from [`measure_gemm_quant`]'s trials: the fastest
/// ([`fastest_gemm`]), else (none measured) `form`, the one for every GEMM.
pub fn gemm_quant_choice(trials: Option<&[GemmTrial]>, form: u32) -> u32 {
    trials.and_then(fastest_gemm).unwrap_or(form)
}

/// The GEMM forms' tuning measurements: every form at `small`, then, where the best of them ran
/// at [`GEMM_LARGE_FROM_GFLOPS`] or more (a GPU), every form again at `large`. The choice is
/// made on the last shape measured ([`fastest_gemm`]). Returns each shape with its trials.
pub async fn measure_gemm_tuning(
    gpu: &Gpu,
    small: (usize, usize, usize),
    large: (usize, usize, usize),
    runs: usize,
) -> Result<Vec<ShapeTrials>> {
    let trials = measure_gemm(gpu, small, DType::F16, runs).await?;
    let fast = is_fast_gemm(small, &trials);
    let mut out = vec![(small, trials)];
    if fast {
        out.push((large, measure_gemm(gpu, large, DType::F16, runs).await?));
    }
    Ok(out)
}

/// The GEMM form to use: the fastest f32 form by its fastest run, replaced by the fastest
/// f16 form only where that beats it by [`GEMM_HALF_MARGIN`].
pub fn fastest_gemm(trials: &[GemmTrial]) -> Option<u32> {
    let best = |half: bool| {
        trials
            .iter()
            .filter(|t| (t.form & GEMM_HALF != 0) == half)
            .min_by(|a, b| a.min_seconds.total_cmp(&b.min_seconds))
    };
    match (best(false), best(true)) {
        (Some(f), Some(h)) if h.min_seconds < GEMM_HALF_MARGIN * f.min_seconds => Some(h.form),
        (Some(f), _) => Some(f.form),
        (None, h) => h.map(|h| h.form),
    }
}

/// Seconds `work` takes, and whether they are the GPU's: the GPU time of the [`Recorder`]
/// submits inside it, from timestamp queries ([`Gpu::start_timing`]), else the wall clock
/// around it (so `work` must wait for its GPU work).
pub async fn gpu_or_wall(
    gpu: &Gpu,
    work: impl std::future::Future<Output = Result<()>>,
) -> Result<(f64, bool)> {
    gpu.start_timing();
    let t = now_s();
    let done = work.await;
    let wall = now_s() - t;
    let gpu_s = gpu.finish_timing().await;
    done?;
    Ok(match gpu_s? {
        Some(s) => (s, true),
        None => (wall, false),
    })
}

/// Seconds the recording takes to run ([`gpu_or_wall`]; the wall clock runs until a 4-byte
/// readback of `out`, which waits for the work on every platform).
async fn timed_submit(gpu: &Gpu, rec: Recorder<'_>, out: &Tensor) -> Result<(f64, bool)> {
    let work = async {
        rec.submit().await?;
        read_words(gpu, out.buffer(), 0, 1).await.map(drop)
    };
    gpu_or_wall(gpu, work).await
}

/// The fastest candidate by its fastest run (ties to the earlier, narrower one).
pub fn fastest(trials: &[Trial]) -> Option<u32> {
    trials
        .iter()
        .min_by(|a, b| a.min_seconds.total_cmp(&b.min_seconds))
        .map(|t| t.lanes)
}

/// The key a tuning result is stored under: everything that can change the best choice (the
/// adapter, its driver, the kernel variant, the kernels' own source, and how the choices are
/// measured: [`TUNING_METHOD`]).
pub fn cache_key(gpu: &Gpu) -> String {
    let i = &gpu.info;
    format!(
        "{} | {:?} | {} {} | {} | v{} | kernels {:016x} | tuning {TUNING_METHOD}",
        i.name,
        i.backend,
        i.driver,
        i.driver_info,
        gpu.best_variant.name(),
        env!("CARGO_PKG_VERSION"),
        crate::gpu::shader::sources_fingerprint()
    )
}

/// Raised when the measurement itself changes, so that choices cached by an older method are
/// measured again (2: candidates timed round by round, see [`interleaved_rounds`]).
pub const TUNING_METHOD: u32 = 2;

/// A number naming a tuned choice (from the environment or the cache file), checked by `ok`;
/// the error names `what`, says what was `expected` and what was found.
#[cfg(not(target_arch = "wasm32"))]
fn parse_choice(what: &str, v: &str, ok: fn(u32) -> bool, expected: String) -> Result<u32> {
    v.trim()
        .parse::<u32>()
        .ok()
        .filter(|&c| ok(c))
        .ok_or_else(|| Error::InvalidOption {
            name: what.into(),
            msg: format!("expected {expected}, found '{v}'"),
        })
}

#[cfg(not(target_arch = "wasm32"))]
fn parse_lanes(what: &str, v: &str) -> Result<u32> {
    let expected = format!(
        "one of {GEMV_LANES:?}, one of them plus {GEMV_UNIFORM_X} (x as a uniform), up to 16 \
         lanes plus {GEMV_WG16} (workgroups of 16), 1 lane plus {GEMV_X_SUBGROUP} (x shared \
         through the subgroup), or {GEMV_SUBGROUP} (subgroups)"
    );
    parse_choice(what, v, is_gemv_lanes, expected)
}

#[cfg(not(target_arch = "wasm32"))]
fn parse_gemm_form(what: &str, v: &str) -> Result<u32> {
    let expected = "a GEMM form from 0 to 11 (1: 128 columns per tile, 2: f16 arithmetic, 4: 128 \
                    rows per tile, 8: 32 rows per tile, not with 4), or 16 (no tiles: four rows \
                    of x at a time)";
    parse_choice(what, v, is_gemm_form, expected.into())
}

/// The environment variable `name`, when set and not empty (the page has no environment).
#[cfg(not(target_arch = "wasm32"))]
fn env_choice(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `MINIGPT4_GEMV_LANES`, when set (natively): lanes for every weight, no tuning.
fn override_lanes() -> Result<Option<u32>> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(v) = env_choice("MINIGPT4_GEMV_LANES") {
        return parse_lanes("MINIGPT4_GEMV_LANES", &v).map(Some);
    }
    Ok(None)
}

/// `MINIGPT4_GEMM`, when set (natively): the GEMM form for every GEMM, no tuning (0 to 11:
/// [`crate::gpu::GEMM_WIDE`] 1, [`crate::gpu::GEMM_HALF`] 2, [`crate::gpu::GEMM_TALL`] 4,
/// [`crate::gpu::GEMM_SHORT`] 8, not with 4; or [`crate::gpu::GEMM_ROWS`] 16).
pub fn override_gemm() -> Result<Option<u32>> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(v) = env_choice("MINIGPT4_GEMM") {
        return parse_gemm_form("MINIGPT4_GEMM", &v).map(Some);
    }
    Ok(None)
}

/// `MINIGPT4_GEMM_SHAPES`, when set (natively): `1` tunes the GEMM's form per shape as well
/// ([`tune_gemm_shapes`]), `0` does not, whatever the tuning found the device to be.
pub fn override_gemm_shapes() -> Result<Option<bool>> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(v) = env_choice("MINIGPT4_GEMM_SHAPES") {
        return parse_switch("MINIGPT4_GEMM_SHAPES", &v).map(Some);
    }
    Ok(None)
}

/// `0` or `1` of an environment switch named `name`.
#[cfg(not(target_arch = "wasm32"))]
fn parse_switch(name: &str, v: &str) -> Result<bool> {
    match v.trim() {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(Error::InvalidOption {
            name: name.into(),
            msg: format!("expected 0 or 1, found '{v}'"),
        }),
    }
}

/// `MINIGPT4_FUSE_NORM`, when set (natively): `1` fuses RMSNorm into the GEMV after it, `0`
/// keeps it a dispatch of its own, without measuring.
pub fn override_fuse_norm() -> Result<Option<bool>> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(v) = env_choice("MINIGPT4_FUSE_NORM") {
        return parse_switch("MINIGPT4_FUSE_NORM", &v).map(Some);
    }
    Ok(None)
}

/// The most bytes of stored tuning results read (a few hundred per adapter; anything larger is
/// not ours and is ignored).
const TUNE_CACHE_MAX: usize = 1 << 20;

#[cfg(target_arch = "wasm32")]
thread_local! {
    /// The page's tuning results: seeded by the worker from the browser's Cache API
    /// ([`set_page_tuning`]) and read back after tuning ([`page_tuning`]) to be stored there.
    static PAGE_TUNING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Seeds the page's tuning cache with what an earlier page load stored (the JSON that
/// [`page_tuning`] returned). Anything that is not such JSON is ignored: the kernels are then
/// tuned again.
#[cfg(target_arch = "wasm32")]
pub fn set_page_tuning(json: &str) {
    PAGE_TUNING.with(|t| *t.borrow_mut() = json.as_bytes().to_vec());
}

/// The page's tuning results as JSON, for the worker to store (the browser's Cache API).
#[cfg(target_arch = "wasm32")]
pub fn page_tuning() -> String {
    PAGE_TUNING.with(|t| String::from_utf8_lossy(&t.borrow()).into_owned())
}

/// The tuning results of every adapter, as stored: natively in `<cache dir>/tune.json`, in the
/// page in the worker's Cache API (through [`set_page_tuning`] and [`page_tuning`]). The
/// stored bytes are untrusted: JSON that does not parse is an empty cache, and each value is
/// checked as it is read (a value that is not a valid choice is no choice).
struct TuneCache {
    #[cfg(not(target_arch = "wasm32"))]
    path: Option<std::path::PathBuf>,
    key: String,
    all: serde_json::Value,
    /// Whether a choice was set since the cache was read (only then is it written back).
    dirty: bool,
}

impl TuneCache {
    fn open(gpu: &Gpu) -> TuneCache {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let path = crate::download::default_dir()
                .ok()
                .map(|d| d.join("tune.json"));
            let bytes = path.as_ref().and_then(|p| std::fs::read(p).ok());
            TuneCache {
                path,
                ..TuneCache::parse(cache_key(gpu), bytes.as_deref())
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            let bytes = PAGE_TUNING.with(|t| t.borrow().clone());
            TuneCache::parse(cache_key(gpu), Some(&bytes))
        }
    }

    /// The cache read from `bytes` (none: empty), for the adapter named by `key`.
    fn parse(key: String, bytes: Option<&[u8]>) -> TuneCache {
        let all = bytes
            .filter(|b| b.len() <= TUNE_CACHE_MAX)
            .and_then(|b| serde_json::from_slice(b).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        TuneCache {
            #[cfg(not(target_arch = "wasm32"))]
            path: None,
            key,
            all,
            dirty: false,
        }
    }

    /// The lanes stored under `gemv_lanes`, or under a shape's name in `shapes`.
    fn get(&self, shape: Option<&str>) -> Option<u32> {
        let v = &self.all[&self.key];
        let v = match shape {
            Some(s) => &v["shapes"][s],
            None => &v["gemv_lanes"],
        };
        let l = u32::try_from(v.as_u64()?).ok()?;
        is_gemv_lanes(l).then_some(l)
    }

    fn set(&mut self, shape: Option<&str>, lanes: u32) {
        match shape {
            Some(s) => {
                let entry = self.entry();
                if !entry["shapes"].is_object() {
                    entry["shapes"] = serde_json::json!({});
                }
                entry["shapes"][s] = lanes.into();
            }
            None => self.set_field("gemv_lanes", lanes.into()),
        }
    }

    /// This adapter's entry, made an object if it was not one (for a choice to be set in it).
    fn entry(&mut self) -> &mut serde_json::Value {
        self.dirty = true;
        let entry = &mut self.all[&self.key];
        if !entry.is_object() {
            *entry = serde_json::json!({});
        }
        entry
    }

    /// A choice stored under this adapter's key (`fuse_norm`, `gemm_form`).
    fn field(&self, name: &str) -> Option<&serde_json::Value> {
        self.all[&self.key].get(name)
    }

    fn set_field(&mut self, name: &str, value: serde_json::Value) {
        self.entry()[name] = value;
    }

    /// Whether the norm is fused (see [`measure_fuse_norm`]), as stored.
    fn get_fuse_norm(&self) -> Option<bool> {
        self.field("fuse_norm")?.as_bool()
    }

    /// The GEMM form, as stored (a value that is not one is no choice).
    fn get_gemm_form(&self) -> Option<u32> {
        self.get_gemm_form_of("gemm_form")
    }

    /// A GEMM form stored under `field` (`gemm_form`, `gemm_form_quant`); a value that is not
    /// one is none.
    fn get_gemm_form_of(&self, field: &str) -> Option<u32> {
        let f = u32::try_from(self.field(field)?.as_u64()?).ok()?;
        is_gemm_form(f).then_some(f)
    }

    /// Whether GEMM forms are tuned per shape too (see [`tune_gemm_shapes`]), as stored.
    fn get_gemm_by_shape(&self) -> Option<bool> {
        self.field("gemm_by_shape")?.as_bool()
    }

    /// A shape's GEMM form (under `gemm_shapes`), as stored (a value that is not one is no
    /// choice).
    fn get_gemm_shape(&self, shape: &str) -> Option<u32> {
        let f = u32::try_from(self.field("gemm_shapes")?.get(shape)?.as_u64()?).ok()?;
        is_gemm_form(f).then_some(f)
    }

    fn set_gemm_shape(&mut self, shape: &str, form: u32) {
        let entry = self.entry();
        if !entry["gemm_shapes"].is_object() {
            entry["gemm_shapes"] = serde_json::json!({});
        }
        entry["gemm_shapes"][shape] = form.into();
    }

    /// Writes the cache back if a choice was set. Best effort: a read-only cache directory (or
    /// full browser storage) only costs a re-measurement next time.
    fn save(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let bytes = serde_json::to_vec_pretty(&self.all).unwrap_or_default();
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(p) = &self.path {
            let _ = write_atomically(p, &bytes);
        }
        #[cfg(target_arch = "wasm32")]
        PAGE_TUNING.with(|t| *t.borrow_mut() = bytes);
    }
}

/// Chooses the block GEMV's lanes, the norm fusion and the GEMM form for this adapter and sets
/// them on `gpu`: each from its environment override (`MINIGPT4_GEMV_LANES`,
/// `MINIGPT4_FUSE_NORM`, `MINIGPT4_GEMM`), else from the tuning cache, else by
/// measuring (and caching). Returns the lanes and where they came from.
pub async fn autotune(gpu: &Gpu) -> Result<(u32, &'static str)> {
    let mut cache = TuneCache::open(gpu);
    let chosen = autotune_in(gpu, &mut cache).await;
    cache.save();
    chosen
}

/// [`autotune`] with the cache open; the caller writes it back (once, if anything was set).
async fn autotune_in(gpu: &Gpu, cache: &mut TuneCache) -> Result<(u32, &'static str)> {
    tune_gemm_in(gpu, cache).await?;
    let fuse_override = override_fuse_norm()?;
    if let Some(fuse) = fuse_override {
        gpu.set_fuse_norm(fuse);
    }
    if let Some(lanes) = override_lanes()? {
        gpu.set_gemv_lanes(lanes);
        return Ok((lanes, "MINIGPT4_GEMV_LANES"));
    }
    if let (Some(lanes), Some(fuse)) = (cache.get(None), cache.get_fuse_norm()) {
        gpu.set_gemv_lanes(lanes);
        gpu.set_fuse_norm(fuse_override.unwrap_or(fuse));
        return Ok((lanes, "the tuning cache"));
    }
    log::info!(
        "measuring the GEMV's forms on {} (once: the choice is cached)",
        gpu.info.name
    );
    let trials = measure_gemv(gpu, 4096, 4096, 2, 3).await?;
    let lanes = fastest(&trials).unwrap_or_else(|| gpu.gemv_lanes());
    gpu.set_gemv_lanes(lanes);
    // at the lanes just chosen
    let (fused, separate) = measure_fuse_norm(gpu, 4096, 2, 3).await?;
    gpu.set_fuse_norm(fuse_override.unwrap_or(fused <= separate));
    cache.set(None, lanes);
    cache.set_field("fuse_norm", (fused <= separate).into());
    Ok((lanes, "measurement"))
}

/// Chooses the GEMM form for this adapter and sets it on `gpu`: from `MINIGPT4_GEMM`, else
/// from the tuning cache, else by measuring ([`measure_gemm_tuning`]; and caching).
pub async fn tune_gemm(gpu: &Gpu) -> Result<u32> {
    let mut cache = TuneCache::open(gpu);
    let form = tune_gemm_in(gpu, &mut cache).await;
    cache.save();
    form
}

/// [`tune_gemm`] with the cache already open (`autotune` reads and writes the file once); the
/// caller writes it back.
async fn tune_gemm_in(gpu: &Gpu, cache: &mut TuneCache) -> Result<u32> {
    // (a bad value is an error before anything is measured)
    let by_shape_override = override_gemm_shapes()?;
    let stored = (
        cache.get_gemm_form(),
        cache.get_gemm_by_shape(),
        cache.get_gemm_form_of("gemm_form_quant"),
    );
    let pinned = override_gemm()?;
    let (form, by_shape, quant) = match (pinned, stored) {
        // a pinned form is every GEMM's
        (Some(f), _) => (f, false, f),
        (None, (Some(f), Some(by_shape), Some(q))) => (f, by_shape, q),
        // (a form stored without the by-shape answer or the quantised form: measured again)
        (None, _) => {
            log::info!(
                "measuring the GEMM's forms on {} (once: the choice is cached)",
                gpu.info.name
            );
            let shapes =
                measure_gemm_tuning(gpu, GEMM_TUNE_SHAPE, GEMM_TUNE_SHAPE_LARGE, 2).await?;
            let (f, by_shape) = gemm_choice(&shapes);
            let quant = measure_gemm_quant(gpu, GEMM_TUNE_SHAPE, by_shape, 2).await?;
            let q = gemm_quant_choice(quant.as_deref(), f);
            cache.set_field("gemm_form", f.into());
            cache.set_field("gemm_by_shape", by_shape.into());
            cache.set_field("gemm_form_quant", q.into());
            (f, by_shape, q)
        }
    };
    gpu.set_gemm_form(form);
    gpu.set_gemm_form_quant(quant);
    gpu.set_gemm_by_shape(by_shape_override.unwrap_or(by_shape));
    gpu.set_gemm_small_shapes(small_shapes_tuned(pinned, by_shape_override));
    Ok(form)
}

/// Whether small weights' GEMMs are tuned per shape ([`Gpu::gemm_small_shapes`]): yes unless a
/// form is pinned (`MINIGPT4_GEMM`) or per-shape tuning is off (`MINIGPT4_GEMM_SHAPES=0`).
/// `pinned` is [`override_gemm`]'s answer, `by_shape_override` [`override_gemm_shapes`]'.
pub fn small_shapes_tuned(pinned: Option<u32>, by_shape_override: Option<bool>) -> bool {
    pinned.is_none() && by_shape_override != Some(false)
}

/// The most weight elements (rows × columns) whose GEMM forms are tuned per shape on every
/// device ([`Gpu::gemm_small_shapes`]): SmolLM2-135M's largest layer matrix (1536 × 576) is
/// under it, a 7B's smallest is 16 times over. Measuring one form at 128 rows of x costs at
/// most 2^27 multiply-adds then, about a tenth of a second on a CPU driver.
pub const GEMM_SMALL_WEIGHTS: usize = 1 << 20;

/// Rows of x at which a model's prefill GEMMs are tuned per shape ([`tune_gemm_shapes`]): a
/// follow-up turn's few tokens and a first turn with an image (about 100); other row counts
/// take the nearer one's form.
pub const GEMM_PREFILL_ROWS: [usize; 2] = [32, 128];

/// Tunes the tiled GEMM's form for each shape of `shapes` (rows of x, weight rows, weight
/// columns, dtype) with more than [`GEMV_MAX_ROWS`] rows that has none yet, where the GEMM is
/// tuned per shape ([`Gpu::gemm_tuned_at`]: every shape on a fast device or with
/// `MINIGPT4_GEMM_SHAPES=1`, small weights' shapes on any device): from
/// the tuning cache when it holds the shape, else by measuring each form as a tuned GEMM runs
/// it at that shape ([`measure_gemm_shape`]; caching the result). On a big GPU the form tuned
/// at one large shape fills the device there but leaves it mostly idle at the ViT's fc2 (257
/// rows, 1408 columns: 22 tiles of 128×128) or a 100-token prefill; a shape's own measurement
/// sees that. On CPU drivers the largest tiles win at large shapes and each measurement costs
/// seconds, so only small weights are measured there: a small model's few columns make few
/// tiles for the threads to share (the untiled form ran SmolLM2-135M's prefill about twice as
/// fast on lavapipe).
pub async fn tune_gemm_shapes(gpu: &Gpu, shapes: &[(usize, usize, usize, DType)]) -> Result<()> {
    let mut todo: Vec<(usize, usize, usize, DType)> = shapes
        .iter()
        .copied()
        .filter(|&(m, n, k, dt)| {
            m > GEMV_MAX_ROWS
                && n > 0
                && k > 0
                && gpu.gemm_tuned_at(n, k)
                && !gpu.has_gemm_form_at(m, n, k, dt)
        })
        .collect();
    todo.sort_by_key(|&(m, n, k, dt)| (m, n, k, dt.name()));
    todo.dedup();
    if todo.is_empty() {
        return Ok(());
    }
    let mut cache = TuneCache::open(gpu);
    let tuned = tune_gemm_shapes_in(gpu, &mut cache, &todo).await;
    cache.save();
    tuned
}

async fn tune_gemm_shapes_in(
    gpu: &Gpu,
    cache: &mut TuneCache,
    todo: &[(usize, usize, usize, DType)],
) -> Result<()> {
    let mut told = false;
    for &(m, n, k, dt) in todo {
        let name = format!("{m}x{n}x{k} {}", dt.name());
        if let Some(f) = cache.get_gemm_shape(&name) {
            gpu.set_gemm_form_at(m, n, k, dt, f);
            continue;
        }
        if !std::mem::replace(&mut told, true) {
            log::info!(
                "measuring the GEMM's forms at {} shapes (once: cached)",
                todo.len()
            );
        }
        let trials = measure_gemm_shape(gpu, (m, n, k), dt, 2).await?;
        let form = fastest_gemm(&trials).unwrap_or_else(|| gpu.gemm_form());
        gpu.set_gemm_form_at(m, n, k, dt, form);
        cache.set_gemm_shape(&name, form);
    }
    Ok(())
}

/// [`tune_gemm_shapes`] for the GEMM shapes that `record` records: where GEMMs are tuned per
/// shape, the work is recorded once into a recorder that is dropped, not submitted (so the
/// shapes tuned are exactly the ones the model runs), then the shapes are tuned.
pub async fn tune_gemm_shapes_of(
    gpu: &Gpu,
    record: impl FnOnce(&mut Recorder) -> Result<()>,
) -> Result<()> {
    if !gpu.gemm_by_shape() && !gpu.gemm_small_shapes() {
        return Ok(());
    }
    let mut rec = Recorder::new(gpu);
    record(&mut rec)?;
    let shapes = rec.gemm_shapes().to_vec();
    drop(rec);
    tune_gemm_shapes(gpu, &shapes).await
}

/// Times a tuned GEMM (`MatmulPath::Gemm`: trimmed to the rows and columns, the last few rows
/// on the GEMV) at one shape in each form the adapter's candidates become there
/// ([`gemm_candidates`] through [`gemm_form_for`], each once), on an `[m, k]` x and an `[n, k]`
/// weight of `dtype`. Each trial's `form` is the candidate as set for the shape. Leaves the
/// shape without a form of its own.
pub async fn measure_gemm_shape(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    runs: usize,
) -> Result<Vec<GemmTrial>> {
    let mut forms: Vec<u32> = Vec::new();
    for f in gemm_candidates(gpu) {
        let f = gemm_form_for(f, m, n, dtype);
        if !forms.contains(&f) {
            forms.push(f);
        }
    }
    // the recording reads the shape's form as it records
    let timed = time_gemm_forms(gpu, (m, n, k), dtype, &forms, runs, |rec, form, x, w, y| {
        gpu.set_gemm_form_at(m, n, k, dtype, form);
        rec.matmul_with(MatmulPath::Gemm, x, w, None, y, false)
    })
    .await;
    gpu.forget_gemm_form_at(m, n, k, dtype);
    timed
}

/// Fastest-run seconds of an RMSNorm followed by a one-row q4 `[k, k]` GEMV, fused into the
/// GEMV and as two dispatches, at the adapter's lanes: `runs` timed submits of at least `reps`
/// each ([`measure_candidates`]). The fused form saves a dispatch and repeats the norm's
/// arithmetic in every invocation; which costs more depends on the device. Leaves
/// [`Gpu::fuse_norm`] as it found it.
pub async fn measure_fuse_norm(
    gpu: &Gpu,
    k: usize,
    reps: usize,
    runs: usize,
) -> Result<(f64, f64)> {
    let w = Tensor::empty(gpu, "tune.w", &[k, k], DType::Q4)?;
    let x = Tensor::zeros(gpu, "tune.x", &[1, k])?;
    let norm = Tensor::zeros(gpu, "tune.norm", &[k])?;
    let h = Tensor::zeros(gpu, "tune.h", &[1, k])?;
    let y = Tensor::zeros(gpu, "tune.y", &[1, k])?;
    let was = gpu.fuse_norm();
    // the recording reads the choice as it records
    let record = |rec: &mut Recorder, fuse: bool| {
        gpu.set_fuse_norm(fuse);
        rec.rms_norm_matmul(MatmulPath::Auto, &x, &norm, 1e-6, &h, &w, &y)
    };
    let timed = measure_candidates(gpu, &[true, false], record, &y, reps, runs).await;
    gpu.set_fuse_norm(was);
    let mut fastest = timed?.into_iter().map(|(_, _, min)| min);
    Ok((
        fastest.next().unwrap_or(f64::MAX),
        fastest.next().unwrap_or(f64::MAX),
    ))
}

/// Tunes the block GEMV's lanes for each `[n, k]` weight shape and dtype of `shapes` that
/// [`tuned_by_shape`] names and that has none yet: from the
/// tuning cache when it holds the shape, else by measuring every lane count (a few
/// milliseconds per shape) and caching the result. `MINIGPT4_GEMV_LANES` turns it off.
pub async fn tune_shapes(gpu: &Gpu, shapes: &[(usize, usize, DType)]) -> Result<()> {
    let mut todo: Vec<(usize, usize, DType)> = shapes
        .iter()
        .copied()
        .filter(|&(n, k, dt)| tuned_by_shape(n, k) && !gpu.has_gemv_lanes_for(n, k, dt))
        .collect();
    todo.sort_by_key(|&(n, k, dt)| (n, k, dt.name()));
    todo.dedup();
    if todo.is_empty() || override_lanes()?.is_some() {
        return Ok(());
    }
    let mut cache = TuneCache::open(gpu);
    let mut told = false;
    for &(n, k, dt) in &todo {
        let name = format!("{n}x{k} {}", dt.name());
        if let Some(l) = cache.get(Some(&name)) {
            gpu.set_gemv_lanes_for(n, k, dt, l);
            continue;
        }
        if !std::mem::replace(&mut told, true) {
            log::info!(
                "measuring the GEMV's forms at {} shapes (once: cached)",
                todo.len()
            );
        }
        // enough GEMVs per timed submit that the submit itself does not decide
        let reps = ((1usize << 22) / (n * k).max(1)).clamp(2, 64);
        let trials = measure_gemv_of(gpu, n, k, dt, reps, 5).await?;
        let lanes = fastest(&trials).unwrap_or_else(|| gpu.gemv_lanes());
        gpu.set_gemv_lanes_for(n, k, dt, lanes);
        cache.set(Some(&name), lanes);
    }
    cache.save();
    Ok(())
}

#[cfg(not(target_arch = "wasm32"))]
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("json.{}.partial", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_timed_round_by_round_so_a_busy_spell_slows_all_alike() {
        // the machine is busy (everything twice as slow) for the first three runs of ten; 'a'
        // is truly faster than 'b'. Timed candidate by candidate, all three of a's runs would
        // fall in the busy spell and b would win.
        let mut calls = Vec::new();
        let timed = pollster::block_on(interleaved_rounds(&['a', 'b'], 5, |c| {
            calls.push(c);
            let busy = if calls.len() <= 3 { 2.0 } else { 1.0 };
            let cost = if c == 'a' { 1.0 } else { 1.2 };
            async move { Ok(cost * busy) }
        }))
        .unwrap();
        assert_eq!(calls, "ababababab".chars().collect::<Vec<_>>());
        assert_eq!(timed, vec![('a', 1.0, 1.0), ('b', 1.2, 1.2)]);
        // a candidate more than twice as slow as the first round's fastest is timed once; one
        // at twice or less stays (here the busy first round makes c look 3.6 / 2 = 1.8 times
        // slower than a: it stays; d is 2.5 times slower: it drops out)
        let mut calls = Vec::new();
        let timed = pollster::block_on(interleaved_rounds(&['a', 'c', 'd'], 3, |x| {
            calls.push(x);
            let busy = if calls.len() == 1 { 2.0 } else { 1.0 };
            let cost = match x {
                'a' => 1.0,
                'c' => 3.6,
                _ => 5.0,
            };
            async move { Ok(cost * busy) }
        }))
        .unwrap();
        assert_eq!(calls, "acdacac".chars().collect::<Vec<_>>());
        assert_eq!(
            timed,
            vec![('a', 1.0, 1.0), ('c', 3.6, 3.6), ('d', 5.0, 5.0)]
        );
        // an error stops the measurement and is returned
        let failed = pollster::block_on(interleaved_rounds(&[1u32, 2], 3, |c| async move {
            if c == 2 {
                Err(crate::error::Error::Gpu("lost".into()))
            } else {
                Ok(1.0)
            }
        }));
        assert!(failed.is_err());
        // no candidates: nothing timed
        let none = pollster::block_on(interleaved_rounds(&[] as &[u32], 3, |_| async { Ok(1.0) }));
        assert!(none.unwrap().is_empty());
    }

    #[test]
    fn small_models_matrices_and_short_rows_are_tuned_by_shape() {
        // SmolLM2-135M: its layer matrices (few rows) and its LM head (short rows)
        for (n, k) in [
            (576, 576),
            (960, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ] {
            assert!(tuned_by_shape(n, k), "{n}x{k}");
        }
        // Vicuna 7B / 13B and Llama-2 7B: every matrix takes the 4096×4096 tuning
        for (n, k) in [
            (4096, 4096),
            (12288, 4096),
            (22016, 4096),
            (4096, 11008),
            (32001, 4096),
            (5120, 5120),
            (27648, 5120),
            (5120, 13824),
            (32001, 5120),
        ] {
            assert!(!tuned_by_shape(n, k), "{n}x{k}");
        }
        // no whole blocks, or nothing to measure
        assert!(!tuned_by_shape(576, 100));
        assert!(!tuned_by_shape(0, 576));
        assert!(!tuned_by_shape(576, 0));
    }

    #[test]
    fn the_fastest_trial_wins_and_bad_overrides_are_named() {
        let t = |lanes, seconds| Trial {
            lanes,
            seconds,
            min_seconds: seconds,
            gb_per_s: 0.0,
        };
        assert_eq!(fastest(&[t(4, 2.0), t(8, 1.0), t(16, 1.5)]), Some(8));
        // decided on the fastest run, not the median (noise only adds time)
        let noisy = Trial {
            min_seconds: 0.5,
            ..t(16, 3.0)
        };
        assert_eq!(fastest(&[t(4, 2.0), t(8, 1.0), noisy]), Some(16));
        assert_eq!(fastest(&[]), None);
        assert_eq!(parse_lanes("X", " 16 ").unwrap(), 16);
        assert_eq!(parse_lanes("X", "260").unwrap(), 4 | GEMV_UNIFORM_X);
        assert_eq!(parse_lanes("X", "0").unwrap(), GEMV_SUBGROUP);
        assert_eq!(
            parse_lanes("X", "769").unwrap(),
            1 | GEMV_UNIFORM_X | GEMV_WG16
        );
        assert_eq!(parse_lanes("X", "528").unwrap(), 16 | GEMV_WG16);
        // x shared through the subgroup: 1 lane only
        assert_eq!(
            parse_lanes("X", "1793").unwrap(),
            1 | GEMV_X_SUBGROUP | GEMV_WG16 | GEMV_UNIFORM_X
        );
        assert!(parse_lanes("X", "1028").is_err());
        // 32 lanes do not fit a workgroup of 16
        assert!(parse_lanes("X", "544").is_err());
        assert!(parse_lanes("X", "258").is_err() && parse_lanes("X", "2").is_err());
        let e = parse_lanes("MINIGPT4_GEMV_LANES", "12")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MINIGPT4_GEMV_LANES") && e.contains("12"), "{e}");
    }

    #[test]
    fn the_tuning_cache_reads_only_valid_choices_of_its_own_adapter() {
        let key = || "adapter A".to_string();
        let mut c = TuneCache::parse(key(), None);
        assert_eq!(
            (c.get(None), c.get_fuse_norm(), c.get_gemm_form()),
            (None, None, None)
        );
        // written back only once a choice is set
        assert!(!c.dirty);
        c.set(None, 1 | GEMV_UNIFORM_X);
        assert!(c.dirty);
        c.set(Some("576x576 q4m"), 4);
        c.set_field("fuse_norm", true.into());
        c.set_field("gemm_form", 5.into());
        c.set_field("gemm_by_shape", true.into());
        c.set_field("gemm_form_quant", 16.into());
        c.set_gemm_shape("257x1408x6144 f16", 1);
        let bytes = serde_json::to_vec(&c.all).unwrap();
        // read back: every choice, and nothing for another adapter
        let c = TuneCache::parse(key(), Some(&bytes));
        assert_eq!(c.get(None), Some(1 | GEMV_UNIFORM_X));
        assert_eq!(c.get(Some("576x576 q4m")), Some(4));
        assert_eq!(c.get(Some("960x576 q4m")), None);
        assert_eq!(
            (c.get_fuse_norm(), c.get_gemm_form(), c.get_gemm_by_shape()),
            (Some(true), Some(5), Some(true))
        );
        assert_eq!(c.get_gemm_form_of("gemm_form_quant"), Some(16));
        assert_eq!(c.get_gemm_shape("257x1408x6144 f16"), Some(1));
        assert_eq!(c.get_gemm_shape("257x6144x1408 f16"), None);
        let other = TuneCache::parse("adapter B".into(), Some(&bytes));
        assert_eq!((other.get(None), other.get_gemm_form()), (None, None));
        assert_eq!(other.get_gemm_shape("257x1408x6144 f16"), None);
        // stored bytes are untrusted: values that are no valid choice are no choice, and bytes
        // that are not a JSON object (or are far too large) are an empty cache
        let bad = br#"{"adapter A": {"gemv_lanes": 12, "gemm_form": 12, "fuse_norm": 1,
                        "gemm_form_quant": 17,
                        "shapes": {"576x576 q4m": -4, "960x576 q4m": 4294967297},
                        "gemm_by_shape": "yes",
                        "gemm_shapes": {"40x64x64 f16": 12, "41x64x64 f16": "1"}}}"#;
        let c = TuneCache::parse(key(), Some(bad));
        assert_eq!(
            (c.get(None), c.get_fuse_norm(), c.get_gemm_form()),
            (None, None, None)
        );
        assert_eq!(c.get_gemm_by_shape(), None);
        assert_eq!(c.get_gemm_form_of("gemm_form_quant"), None);
        assert_eq!(c.get_gemm_shape("40x64x64 f16"), None);
        assert_eq!(c.get_gemm_shape("41x64x64 f16"), None);
        assert_eq!(c.get(Some("576x576 q4m")), None);
        assert_eq!(c.get(Some("960x576 q4m")), None);
        for junk in [
            &b"not json"[..],
            b"[1, 2]",
            b"{\"adapter A\": 3}",
            b"\xff\xfe",
        ] {
            let mut c = TuneCache::parse(key(), Some(junk));
            assert_eq!(c.get(None), None);
            c.set(Some("576x576 q4m"), 4); // an entry that was not an object is replaced
            assert_eq!(c.get(Some("576x576 q4m")), Some(4));
            c.set_gemm_shape("40x64x64 f16", 9);
            assert_eq!(c.get_gemm_shape("40x64x64 f16"), Some(9));
        }
        let mut big = bytes.clone();
        big.resize(TUNE_CACHE_MAX + 1, b' ');
        assert_eq!(TuneCache::parse(key(), Some(&big)).get(None), None);
    }

    #[test]
    fn the_gemm_form_takes_f16_arithmetic_only_for_a_clear_win() {
        use crate::gpu::ops::{gemm_form_for, GEMM_SHORT, GEMM_TALL, GEMM_WIDE};
        let t = |form, min_seconds| GemmTrial {
            form,
            seconds: min_seconds,
            min_seconds,
            gflop_per_s: 0.0,
        };
        let f32s = [t(0, 2.0), t(GEMM_WIDE, 1.0), t(GEMM_TALL, 1.5)];
        assert_eq!(fastest_gemm(&f32s), Some(GEMM_WIDE));
        // 10 % faster in f16: inside the margin, the f32 form stays
        let mut v = f32s.to_vec();
        v.push(t(GEMM_HALF | GEMM_TALL, 0.9));
        assert_eq!(fastest_gemm(&v), Some(GEMM_WIDE));
        // 30 % faster: taken
        v.push(t(GEMM_HALF | GEMM_WIDE, 0.7));
        assert_eq!(fastest_gemm(&v), Some(GEMM_HALF | GEMM_WIDE));
        assert_eq!(fastest_gemm(&[t(GEMM_HALF, 1.0)]), Some(GEMM_HALF));
        assert_eq!(fastest_gemm(&[]), None);

        // the tuned form per shape: no second block wholly outside the output, 32-row tiles
        // for at most 32 rows, no f16 arithmetic on f32 weights
        let all = GEMM_WIDE | GEMM_TALL | GEMM_HALF;
        assert_eq!(gemm_form_for(all, 257, 4224, DType::F16), all);
        assert_eq!(
            gemm_form_for(all, 32, 768, DType::F16),
            GEMM_WIDE | GEMM_HALF | GEMM_SHORT
        );
        assert_eq!(gemm_form_for(GEMM_TALL, 5, 64, DType::F32), GEMM_SHORT);
        assert_eq!(gemm_form_for(0, 33, 64, DType::Q4), 0);
        assert!(is_gemm_form(GEMM_SHORT | GEMM_WIDE | GEMM_HALF));
        assert!(!is_gemm_form(GEMM_SHORT | GEMM_TALL));
        assert!(is_gemm_form(crate::gpu::ops::GEMM_ROWS));
        assert!(!is_gemm_form(17) && !is_gemm_form(32));
        assert_eq!(
            gemm_form_for(crate::gpu::ops::GEMM_ROWS, 5, 64, DType::F32),
            16
        );
        assert_eq!(
            gemm_form_for(all, 64, 4224, DType::Q4),
            GEMM_WIDE | GEMM_HALF
        );
        assert_eq!(gemm_form_for(all, 65, 64, DType::Q8), GEMM_TALL | GEMM_HALF);
        assert_eq!(
            gemm_form_for(all, 300, 300, DType::F32),
            GEMM_WIDE | GEMM_TALL
        );

        // a device that runs the small shape at 100 GFLOP/s or more is tuned at the large one
        let shape = GEMM_TUNE_SHAPE;
        let flop = 2.0 * (shape.0 * shape.1 * shape.2) as f64;
        let at = |gflops: f64| t(0, flop / (gflops * 1e9));
        assert!(!is_fast_gemm(shape, &[at(9.0), at(60.0)]));
        assert!(is_fast_gemm(shape, &[at(9.0), at(150.0)]));
        assert!(!is_fast_gemm(shape, &[]));

        // repetitions per timed run: a millisecond of work, within the caller's minimum and 256
        assert_eq!(reps_for(2e-3, 2, TUNE_RUN_S), 2);
        assert_eq!(reps_for(1e-4, 2, TUNE_RUN_S), 10);
        assert_eq!(reps_for(1e-4, 12, TUNE_RUN_S), 12);
        assert_eq!(reps_for(3e-6, 2, TUNE_RUN_S), 256);
        assert_eq!(reps_for(0.0, 1, TUNE_RUN_S), 256);
        // on the wall clock, ten times as long
        assert_eq!(reps_for(1e-4, 2, TUNE_RUN_WALL_S), 100);

        assert_eq!(parse_gemm_form("X", " 5 ").unwrap(), GEMM_WIDE | GEMM_TALL);
        assert_eq!(parse_gemm_form("X", "9").unwrap(), GEMM_SHORT | GEMM_WIDE);
        let e = parse_gemm_form("MINIGPT4_GEMM", "12")
            .unwrap_err()
            .to_string();
        assert!(e.contains("MINIGPT4_GEMM") && e.contains("12"), "{e}");
        assert!(parse_gemm_form("X", "wide").is_err());
    }
}
