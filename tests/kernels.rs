//! Every kernel against the plain CPU reference (`minigpt4::cpu`), on random data, at sizes
//! that are not multiples of the workgroup size, for every weight dtype and every kernel
//! variant the adapter offers (portable f32 always; f16 reads and subgroups where offered).

#![allow(clippy::too_many_arguments)]

mod common;

use common::{assert_close, gpu, gpu_with, Rng};
use minigpt4::cpu;
use minigpt4::gpu::{
    attention_partials, gemm_form_for, is_gemm_form, kv_cache_shape, AttnShape, Gpu, GpuOptions,
    HeadView, Ids, MatmulPath, Recorder, RopeKv, RopeMode, RopeTable, Tensor, Variant,
    ATTN_TILED_FROM, ATTN_TILE_DIM, ATTN_TILE_ROWS, GEMM_HALF, GEMM_ROWS, GEMM_TALL, GEMM_WIDE,
    GEMV_LANES, GEMV_SUBGROUP, GEMV_UNIFORM_X, GEMV_WG16, GEMV_X_SUBGROUP,
};
use minigpt4::quant::{self, DType};

fn t(gpu: &Gpu, name: &str, shape: &[usize], x: &[f32]) -> Tensor {
    Tensor::upload(gpu, name, shape, DType::F32, x).unwrap()
}

/// An activation as the model makes them (`Tensor::zeros`, then written): padded to the
/// size the block GEMV can bind as a uniform, so the `X_UNIFORM` form runs on it.
fn act(gpu: &Gpu, name: &str, shape: &[usize], x: &[f32]) -> Tensor {
    let a = Tensor::zeros(gpu, name, shape).unwrap();
    a.write_f32(gpu, x).unwrap();
    a
}

fn read(gpu: &Gpu, x: &Tensor) -> Vec<f32> {
    pollster::block_on(x.read_f32(gpu)).unwrap()
}

fn run(rec: Recorder) {
    pollster::block_on(rec.submit()).unwrap()
}

/// A tolerance for each of the m × n dot products of k terms x[i, l] * w[j, l]: `f` of its
/// terms.
fn per_dot(
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    f: impl Fn(&mut dyn Iterator<Item = f32>) -> f32,
) -> Vec<f32> {
    let mut t = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            t[i * n + j] = f(&mut (0..k).map(|l| x[i * k + l] * w[j * k + l]));
        }
    }
    t
}

/// Tolerance of a dot product of k f32 terms: a few ulps of the sum of magnitudes.
fn dot_tol(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    per_dot(x, w, (m, n, k), |terms| {
        4e-7 * terms.map(f32::abs).sum::<f32>() * (k as f32).sqrt() + 1e-6
    })
}

/// Tolerance of a dot product computed in f16 steps of 16 terms summed in f32: about 20 f16
/// roundoffs of the root sum of squares of the terms (the errors are independent, so they
/// grow like that root, not like the sum of magnitudes).
fn half_tol(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    per_dot(x, w, (m, n, k), |terms| {
        1e-2 * terms.map(|t| t * t).sum::<f32>().sqrt() + 1e-5
    })
}

/// A GEMM's rows of x, weight rows, weight columns and weight dtype.
type GemmShape = (usize, usize, usize, DType);

/// The kernels and GEMM shapes that a matmul of `m` rows of x over `[n, k]` `dt` weights records
/// along `path` in variant `v` (nothing is submitted).
fn recorded_matmul(
    gpu: &Gpu,
    v: Variant,
    path: MatmulPath,
    (m, n, k): (usize, usize, usize),
    dt: DType,
) -> (Vec<String>, Vec<GemmShape>) {
    let x = Tensor::zeros(gpu, "x", &[m, k]).unwrap();
    let w = Tensor::empty(gpu, "w", &[n, k], dt).unwrap();
    let y = Tensor::zeros(gpu, "y", &[m, n]).unwrap();
    let mut rec = Recorder::with_variant(gpu, v);
    rec.matmul_with(path, &x, &w, None, &y, false).unwrap();
    (rec.kernels(), rec.gemm_shapes().to_vec())
}

fn check_matmul(
    gpu: &Gpu,
    v: Variant,
    dt: DType,
    path: MatmulPath,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    acc: bool,
    seed: u64,
) -> usize {
    let mut r = Rng::new(seed);
    let x = r.vec(m * k, 1.0);
    let wv = r.vec(n * k, 0.5);
    let b = r.vec(n, 1.0);
    let init = r.vec(m * n, 1.0);
    let wq = quant::round_trip(dt, &wv, k).unwrap();
    let mut want = cpu::matmul(&x, m, k, &wq, n, bias.then_some(&b[..]));
    if acc {
        for (w, i) in want.iter_mut().zip(&init) {
            *w += i;
        }
    }
    let xt = act(gpu, "x", &[m, k], &x);
    let w = Tensor::upload(gpu, "w", &[n, k], dt, &wv).unwrap();
    let bt = t(gpu, "b", &[n], &b);
    let out = t(gpu, "out", &[m, n], &init);
    let mut rec = Recorder::with_variant(gpu, v);
    rec.matmul_with(path, &xt, &w, bias.then_some(&bt), &out, acc)
        .unwrap();
    let dispatches = rec.len();
    run(rec);
    let got = read(gpu, &out);
    // the GEMM's f16 arithmetic: x, the weights, the products and 16-term sums rounded to f16
    // (a unit roundoff of 2^-11), f32 across the sums
    let form = match path {
        MatmulPath::GemmForm(f) => Some(f),
        MatmulPath::Gemm => Some(gemm_form_for(gpu.gemm_form_at(m, n, k, dt), m, n, dt)),
        _ => None,
    };
    let half = v.f16 && form.is_some_and(|f| f & GEMM_HALF != 0);
    let tol = if half {
        half_tol(&x, &wq, m, n, k)
    } else {
        dot_tol(&x, &wq, m, n, k)
    };
    for i in 0..m * n {
        assert!(
            (got[i] - want[i]).abs() <= tol[i] + 1e-6 * want[i].abs(),
            "matmul {dt} {path:?} {} m{m} n{n} k{k} bias={bias} acc={acc}: [{i}] got {} want {}",
            v.name(),
            got[i],
            want[i]
        );
    }
    dispatches
}

#[test]
fn matmul_all_dtypes_paths_variants_and_odd_sizes() {
    let gpu = gpu();
    let mut seed = 1;
    for v in gpu.variants() {
        for dt in DType::ALL {
            for path in [MatmulPath::Gemv, MatmulPath::Gemm] {
                // K must be a multiple of 32 for q8/q4; f32/f16 also get odd K
                let mut shapes = vec![
                    (1, 1, 32),
                    (1, 7, 96),
                    (3, 88, 64),
                    (7, 65, 160),
                    (65, 130, 96),
                ];
                if !dt.is_quantized() {
                    shapes.extend([(1, 5, 7), (2, 3, 1), (5, 257, 89), (66, 9, 17)]);
                }
                for (m, n, k) in shapes {
                    seed += 1;
                    check_matmul(
                        &gpu,
                        v,
                        dt,
                        path,
                        m,
                        n,
                        k,
                        seed % 2 == 0,
                        seed % 3 == 0,
                        seed,
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_tuning_measures_every_form_and_the_large_shape_only_on_a_fast_device() {
    use minigpt4::gpu::tune::{fastest_gemm, is_fast_gemm, measure_gemm_tuning};
    let gpu = gpu();
    let (small, large) = ((32, 128, 64), (64, 256, 128));
    let shapes = pollster::block_on(measure_gemm_tuning(&gpu, small, large, 1)).unwrap();
    let forms = minigpt4::gpu::gemm_candidates(&gpu);
    assert_eq!(shapes[0].0, small);
    // a CPU driver stops at the small shape; a GPU (tests/gpu-run.sh) measures the large one
    let fast = is_fast_gemm(small, &shapes[0].1);
    assert_eq!(shapes.len(), 1 + usize::from(fast), "{shapes:?}");
    for (shape, trials) in &shapes {
        let measured: Vec<u32> = trials.iter().map(|t| t.form).collect();
        assert_eq!(measured, forms, "{shape:?}");
        assert!(trials
            .iter()
            .all(|t| t.min_seconds > 0.0 && t.min_seconds <= t.seconds));
    }
    assert!(forms.contains(&fastest_gemm(&shapes.last().unwrap().1).unwrap()));
}

/// The form for quantised weights: measured over every form at the tuning's small shape on
/// 4-bit weights, and what a GEMM over quantised weights runs where its shape has no form of
/// its own, while unquantised weights keep the adapter's form; setting a form for every GEMM
/// sets both.
#[test]
fn quantised_weights_have_a_gemm_form_of_their_own() {
    use minigpt4::gpu::tune::{gemm_quant_choice, measure_gemm_quant};
    let gpu = gpu();
    let small = (32, 128, 64);
    let trials = pollster::block_on(measure_gemm_quant(&gpu, small, false, 1))
        .unwrap()
        .expect("measured where shapes are not tuned one by one");
    let forms = minigpt4::gpu::gemm_candidates(&gpu);
    assert_eq!(trials.iter().map(|t| t.form).collect::<Vec<_>>(), forms);
    assert!(forms.contains(&gemm_quant_choice(Some(&trials), 0)));
    // a device that tunes every shape on its own measures nothing here
    let by_shape = pollster::block_on(measure_gemm_quant(&gpu, small, true, 1)).unwrap();
    assert!(by_shape.is_none());
    // nothing measured: the form for every GEMM
    assert_eq!(gemm_quant_choice(Some(&[]), GEMM_WIDE), GEMM_WIDE);
    assert_eq!(gemm_quant_choice(None, GEMM_WIDE), GEMM_WIDE);

    let (m, n, k) = (40, 64, 64);
    let kernels =
        |dt: DType| recorded_matmul(&gpu, gpu.best_variant, MatmulPath::Gemm, (m, n, k), dt).0;
    gpu.set_gemm_form(GEMM_WIDE);
    gpu.set_gemm_form_quant(GEMM_ROWS);
    assert_eq!(gpu.gemm_form_at(m, n, k, DType::Q4), GEMM_ROWS);
    assert_eq!(gpu.gemm_form_at(m, n, k, DType::F16), GEMM_WIDE);
    let q = kernels(DType::Q4M);
    assert!(
        q.iter().all(|s| s.starts_with("gemv::gemv_rows4 ")),
        "{q:?}"
    );
    let f = kernels(DType::F16);
    assert!(f.iter().any(|s| s.starts_with("matmul::gemm ")), "{f:?}");
    // and computes what the CPU does, in both
    for dt in [DType::Q4, DType::Q8, DType::F16] {
        check_matmul(
            &gpu,
            gpu.best_variant,
            dt,
            MatmulPath::Gemm,
            9,
            70,
            64,
            true,
            false,
            31,
        );
    }
    gpu.set_gemm_form(0);
    assert_eq!(gpu.gemm_form_quant(), 0);
}

/// GEMM forms per shape (a fast device's tuning, forced here): each model shape with more rows
/// than the GEMV takes is measured in the forms the candidates become at that shape, the
/// fastest is kept, and a tuned GEMM runs in the form of its weight shape's nearest tuned row
/// count, correctly; where the device does not tune per shape nothing is measured.
#[test]
fn gemm_forms_tuned_per_shape_are_the_forms_that_run() {
    use minigpt4::gpu::tune::{measure_gemm_shape, tune_gemm_shapes};
    // a device of its own: the per-shape choices belong to one `Gpu`
    let gpu = gpu_with(GpuOptions::default());
    gpu.set_gemm_form(0);
    let (a, b, few) = (
        (40, 192, 64, DType::F16),
        (50, 200, 96, DType::Q4),
        (3, 64, 64, DType::F16),
    );
    pollster::block_on(tune_gemm_shapes(&gpu, &[a, b])).unwrap();
    assert!(!gpu.has_gemm_form_at(a.0, a.1, a.2, a.3), "tuned while off");
    gpu.set_gemm_by_shape(true);
    pollster::block_on(tune_gemm_shapes(&gpu, &[a, b, few])).unwrap();
    let trimmed = |(m, n, _, dt): (usize, usize, usize, DType)| -> Vec<u32> {
        let mut v = Vec::new();
        for f in minigpt4::gpu::gemm_candidates(&gpu) {
            let f = gemm_form_for(f, m, n, dt);
            if !v.contains(&f) {
                v.push(f);
            }
        }
        v
    };
    for s in [a, b] {
        assert!(gpu.has_gemm_form_at(s.0, s.1, s.2, s.3), "{s:?}");
        let f = gpu.gemm_form_at(s.0, s.1, s.2, s.3);
        assert!(trimmed(s).contains(&f), "{s:?}: {f}");
    }
    // at most GEMV_MAX_ROWS rows run on the GEMV: nothing to tune
    assert!(!gpu.has_gemm_form_at(few.0, few.1, few.2, few.3));

    // the measurement: every form the candidates become at the shape, as a tuned GEMM runs
    // it; the shape keeps no form of its own afterwards
    let c = (60, 192, 64, DType::F16);
    let trials = pollster::block_on(measure_gemm_shape(&gpu, (c.0, c.1, c.2), c.3, 1)).unwrap();
    let measured: Vec<u32> = trials.iter().map(|t| t.form).collect();
    assert_eq!(measured, trimmed(c));
    assert!(trials
        .iter()
        .all(|t| t.min_seconds > 0.0 && t.min_seconds <= t.seconds));
    assert!(!gpu.has_gemm_form_at(c.0, c.1, c.2, c.3));

    // which form runs: the nearest tuned row count's (by ratio) for the same weight shape,
    // trimmed to the rows; another weight shape keeps the adapter's form
    gpu.set_gemm_form(0);
    let (n, k, dt) = (192, 64, DType::F16);
    gpu.set_gemm_form_at(40, n, k, dt, GEMM_WIDE);
    gpu.set_gemm_form_at(200, n, k, dt, GEMM_TALL | GEMM_HALF);
    let gemm_flags = |m: usize, n: usize| -> String {
        let (kernels, shapes) =
            recorded_matmul(&gpu, gpu.best_variant, MatmulPath::Gemm, (m, n, k), dt);
        assert_eq!(shapes, &[(m, n, k, dt)]);
        kernels
            .iter()
            .find(|s| s.starts_with("matmul::gemm "))
            // (the f32 forms' subgroup sharing, where the adapter allows it, is checked in
            // gemm_every_form_dtype_and_variant)
            .map(|s| s.replace(",ROWS_SG", ""))
            .unwrap_or_else(|| panic!("no GEMM among {kernels:?}"))
    };
    assert_eq!(gemm_flags(40, n), "matmul::gemm W_F16,GEMM_WIDE");
    assert_eq!(gemm_flags(70, n), "matmul::gemm W_F16,GEMM_WIDE");
    assert_eq!(gemm_flags(20, n), "matmul::gemm W_F16,GEMM_WIDE,GEMM_SHORT");
    assert_eq!(gemm_flags(150, n), "matmul::gemm W_F16,GEMM_TALL,GEMM_HALF");
    assert_eq!(gemm_flags(150, 128), "matmul::gemm W_F16");
    // and computes what the CPU reference does, in f32 and in the f16 form (the kernels
    // above: each 128-row form costs seconds to compile on llvmpipe's GL)
    for v in gpu.variants() {
        for m in [40, 70, 150] {
            check_matmul(
                &gpu,
                v,
                dt,
                MatmulPath::Gemm,
                m,
                n,
                k,
                false,
                true,
                m as u64,
            );
        }
    }
    // a form set for every shape (MINIGPT4_GEMM, bench) replaces the per-shape ones
    gpu.set_gemm_form(GEMM_WIDE);
    assert_eq!(gemm_flags(40, n), "matmul::gemm W_F16,GEMM_WIDE");
    assert_eq!(gemm_flags(150, n), "matmul::gemm W_F16,GEMM_WIDE");
}

#[test]
fn gemm_every_form_dtype_and_variant() {
    let gpu = gpu();
    let mut seed = 900;
    // (the variants without subgroups: those with them differ only in ROWS_SG, below)
    for v in gpu.variants().into_iter().filter(|v| !v.subgroups) {
        for form in (0..12u32).chain([GEMM_ROWS]) {
            assert!(is_gemm_form(form));
            // Each form with a quantised and an unquantised dtype, in turn: the weight decoding
            // is the same code in every form (every dtype is tested on the default form
            // above), and each (form, dtype, bias) is a pipeline of its own to compile, which
            // takes seconds on llvmpipe's GL.
            let f = form as usize;
            let quantised = [DType::Q4, DType::Q8, DType::Q4M][f % 3];
            let plain = [DType::F32, DType::F16][f % 2];
            for dt in [quantised, plain] {
                let bias = f.is_multiple_of(2);
                // a second 64-row / 64-column block that is partly outside the output, one
                // wholly outside it, and several tiles each way
                let mut shapes = vec![(65, 130, 96), (130, 70, 64), (200, 257, 160)];
                if !dt.is_quantized() {
                    shapes.extend([(129, 131, 17), (5, 257, 89)]);
                }
                for (m, n, k) in shapes {
                    seed += 1;
                    let path = MatmulPath::GemmForm(form);
                    check_matmul(&gpu, v, dt, path, m, n, k, bias, seed % 3 == 0, seed);
                }
            }
        }
    }
    // the f32 tile forms in the subgroup variants: where the adapter allows it
    // (`rows_subgroup_fits`: a CPU driver with subgroups of 8 or 16) x's vec4s are shared
    // through the subgroup (ROWS_SG), the f16 tile forms keep plain loads
    for v in gpu.variants().into_iter().filter(|v| v.subgroups) {
        let shared = minigpt4::gpu::rows_subgroup_fits(&gpu);
        for form in 0..12u32 {
            let dt = [DType::F16, DType::Q4M, DType::F32][form as usize % 3];
            let (m, n, k) = [(65, 130, 96), (130, 70, 64), (200, 257, 160)][form as usize % 3];
            let path = MatmulPath::GemmForm(form);
            let (kernels, _) = recorded_matmul(&gpu, v, path, (m, n, k), dt);
            let want = shared && form & GEMM_HALF == 0;
            assert!(
                kernels.iter().all(|k| k.starts_with("matmul::gemm ")),
                "{kernels:?}"
            );
            assert!(
                kernels.iter().all(|k| k.contains("ROWS_SG") == want),
                "{kernels:?} form {form} in {}",
                v.name()
            );
            seed += 1;
            check_matmul(
                &gpu,
                v,
                dt,
                path,
                m,
                n,
                k,
                form % 2 == 0,
                seed % 3 == 0,
                seed,
            );
        }
    }
    // the untiled form's own code per dtype (four rows of x per workgroup, all in one
    // dispatch: a ragged last group of 1, 2 or 3 rows; one row alone (x as a uniform where the
    // lanes allow); many row groups over several column groups; several weight parts; widths
    // that fall back to the tiles)
    for (i, dt) in [DType::Q4, DType::Q4M, DType::Q8, DType::F16, DType::F32]
        .into_iter()
        .enumerate()
    {
        for (m, n, k) in [
            (5, 130, 96),
            (6, 300, 64),
            (11, 257, 160),
            (8, 64, 32),
            (7, 40, 48),
            (1, 70, 64),
            (37, 200, 64),
        ] {
            if dt.is_quantized() && k % 32 != 0 {
                continue;
            }
            seed += 1;
            let (bias, acc) = (seed.is_multiple_of(2), (seed + i as u64).is_multiple_of(3));
            let path = MatmulPath::GemmForm(GEMM_ROWS);
            check_matmul(&gpu, gpu.best_variant, dt, path, m, n, k, bias, acc, seed);
        }
    }
    // which kernels the untiled form records: one gemv_rows4 for all rows of x, sharing x
    // through the subgroup where the variant and the subgroup sizes allow (checked above
    // against the CPU in the best variant, and without it in the others)
    for v in gpu.variants() {
        let path = MatmulPath::GemmForm(GEMM_ROWS);
        let (kernels, _) = recorded_matmul(&gpu, v, path, (6, 40, 64), DType::Q4);
        assert_eq!(kernels.len(), 1, "{kernels:?}");
        let shared = v.subgroups && minigpt4::gpu::x_subgroup_fits(&gpu, 16);
        for k in kernels {
            assert!(k.starts_with("gemv::gemv_rows4 "), "{k}");
            assert_eq!(k.contains("X_SG"), shared, "{k} in {}", v.name());
        }
    }
    // MatmulPath::Gemm runs the adapter's form (here set by hand), trimmed to the shape
    for form in [GEMM_WIDE | GEMM_TALL, GEMM_HALF | GEMM_TALL] {
        gpu.set_gemm_form(form);
        // (32 rows: 32-row tiles)
        for (m, n, k) in [(70, 300, 96), (257, 64, 64), (32, 130, 64), (7, 40, 32)] {
            check_matmul(
                &gpu,
                gpu.best_variant,
                DType::Q4,
                MatmulPath::Gemm,
                m,
                n,
                k,
                true,
                false,
                7,
            );
        }
    }
    gpu.set_gemm_form(0);
    assert!(!is_gemm_form(12) && !is_gemm_form(GEMM_ROWS | GEMM_WIDE) && !is_gemm_form(32));
    let x = Tensor::zeros(&gpu, "x", &[70, 64]).unwrap();
    let w = Tensor::zeros(&gpu, "w", &[8, 64]).unwrap();
    let out = Tensor::zeros(&gpu, "out", &[70, 8]).unwrap();
    let err = Recorder::new(&gpu)
        .matmul_with(MatmulPath::GemmForm(12), &x, &w, None, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("GEMM") && err.contains("12"), "{err}");
}

#[test]
fn a_tuned_gemm_leaves_its_last_few_rows_to_the_block_gemv() {
    let gpu = gpu();
    let mut seed = 1700;
    // 64- and 128-row tiles; the ViT's 257 rows and a few more or fewer past whole tiles
    // the tail's GEMV in several lane forms (x as a uniform: read from row `row0`), with and
    // without bias and accumulation; each shape takes some (every pipeline is compiled on its
    // own, which takes seconds on llvmpipe's GL)
    let forms = [
        (true, false, 8),
        (false, true, 1 | GEMV_UNIFORM_X),
        (true, true, 4 | GEMV_WG16),
    ];
    for form in [0, GEMM_WIDE | GEMM_TALL] {
        gpu.set_gemm_form(form);
        let tile = if form & GEMM_TALL != 0 { 128 } else { 64 };
        for (i, (m, n, k, dt)) in [
            (257, 72, 1408, DType::F16),
            (tile + 1, 130, 96, DType::Q4),
            (tile + 2, 65, 64, DType::Q8),
            (2 * tile + 3, 70, 160, DType::Q4M),
            (tile + 4, 33, 32, DType::F32),
        ]
        .into_iter()
        .enumerate()
        {
            let some = if i == 0 {
                &forms[..]
            } else {
                &forms[i % 3..i % 3 + 1]
            };
            for &(bias, acc, lanes) in some {
                gpu.set_gemv_lanes(lanes);
                seed += 1;
                let d = check_matmul(
                    &gpu,
                    gpu.best_variant,
                    dt,
                    MatmulPath::Gemm,
                    m,
                    n,
                    k,
                    bias,
                    acc,
                    seed,
                );
                assert_eq!(
                    d, 2,
                    "GEMM body and GEMV tail: {m}x{n}x{k} {dt} form {form} lanes {lanes:#x}"
                );
            }
        }
        // one dispatch: no whole tile, more than 4 rows past them, a K the block GEMV cannot
        // take, whole tiles only, and a form given by the caller
        for (m, n, k, dt, path) in [
            (3, 40, 64, DType::F16, MatmulPath::Gemm),
            (tile + 5, 40, 64, DType::Q4, MatmulPath::Gemm),
            (tile + 1, 40, 89, DType::F16, MatmulPath::Gemm),
            (2 * tile, 40, 64, DType::Q8, MatmulPath::Gemm),
            (tile + 1, 40, 64, DType::F16, MatmulPath::GemmForm(form)),
        ] {
            seed += 1;
            let d = check_matmul(&gpu, gpu.best_variant, dt, path, m, n, k, true, false, seed);
            assert_eq!(d, 1, "one GEMM: {m}x{n}x{k} {dt} {path:?}");
        }
    }
    // the MLP's silu(gate) * up with many rows: gate's tail stores silu, up's multiplies in
    gpu.set_gemm_form(GEMM_TALL);
    let (m, n, k) = (130, 40, 64);
    let mut r = Rng::new(seed);
    let (x, g, u) = (r.vec(m * k, 1.0), r.vec(n * k, 0.5), r.vec(n * k, 0.5));
    let gate = cpu::matmul(&x, m, k, &g, n, None);
    let up = cpu::matmul(&x, m, k, &u, n, None);
    let xt = act(&gpu, "x", &[m, k], &x);
    let gt = Tensor::upload(&gpu, "gate", &[n, k], DType::F32, &g).unwrap();
    let ut = Tensor::upload(&gpu, "up", &[n, k], DType::F32, &u).unwrap();
    let out = t(&gpu, "out", &[m, n], &vec![0.0; m * n]);
    let mut rec = Recorder::new(&gpu);
    rec.matmul_glu(MatmulPath::Gemm, &xt, &gt, &ut, &out)
        .unwrap();
    assert_eq!(rec.len(), 4);
    run(rec);
    let got = read(&gpu, &out);
    let tol = dot_tol(&x, &g, m, n, k);
    for i in 0..m * n {
        let want = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        assert!(
            (got[i] - want).abs() <= 4.0 * tol[i] * (1.0 + up[i].abs()) + 1e-5,
            "glu [{i}] got {} want {want}",
            got[i]
        );
    }
    // a weight split into parts (a 28 KiB binding limit): each part's GEMM and tail
    let small = gpu_with(GpuOptions {
        max_binding: Some(28 << 10),
        ..Default::default()
    });
    small.set_gemm_form(0);
    let (m, n, k) = (65, 100, 96);
    let x = r.vec(m * k, 1.0);
    let wv = r.vec(n * k, 0.5);
    let w = Tensor::upload(&small, "w", &[n, k], DType::F32, &wv).unwrap();
    assert!(w.parts.len() > 1);
    let xt = act(&small, "x", &[m, k], &x);
    let out = Tensor::zeros(&small, "out", &[m, n]).unwrap();
    let mut rec = Recorder::new(&small);
    rec.matmul(&xt, &w, None, &out, false).unwrap();
    assert_eq!(rec.len(), 2 * w.parts.len());
    run(rec);
    let want = cpu::matmul(&x, m, k, &wv, n, None);
    assert_close(
        "split weight, GEMM and tail",
        &read(&small, &out),
        &want,
        2e-5,
        1e-5,
    );
    gpu.set_gemm_form(0);
}

#[test]
fn block_gemv_every_lane_count_dtype_and_variant() {
    let gpu = gpu();
    let mut seed = 500;
    for v in gpu.variants() {
        for dt in DType::ALL {
            let mut candidates = GEMV_LANES.to_vec();
            candidates.extend(GEMV_LANES.map(|l| l | GEMV_UNIFORM_X));
            // workgroups of 16 at every lane count that fits one
            candidates.extend([1, 4, 8, 16].map(|l| l | GEMV_WG16));
            candidates.extend([1, 16].map(|l| l | GEMV_WG16 | GEMV_UNIFORM_X));
            if v.subgroups {
                candidates.push(GEMV_SUBGROUP);
                // x shared through the subgroup, in every workgroup size and x binding
                for bits in [0, GEMV_WG16, GEMV_UNIFORM_X, GEMV_WG16 | GEMV_UNIFORM_X] {
                    candidates.push(1 | GEMV_X_SUBGROUP | bits);
                }
            }
            for lanes in candidates {
                // N not a multiple of the columns per workgroup; K from one block to many,
                // with lanes idle when K has fewer blocks than lanes; M from 1 to 4. For one
                // row (x staged in chunks of 32 to 128 blocks): several chunks, the last one
                // partial, with an odd and an even number of blocks (pairs of blocks share a
                // scale word in q4 and q8).
                for (m, n, k) in [
                    (1, 1, 32),
                    (1, 7, 96),
                    (2, 33, 64),
                    (4, 65, 1408),
                    (3, 130, 2048),
                    (1, 130, 4160),
                    (1, 67, 4192),
                ] {
                    seed += 1;
                    if lanes == GEMV_SUBGROUP && m > 1 {
                        continue;
                    }
                    check_matmul(
                        &gpu,
                        v,
                        dt,
                        MatmulPath::GemvBlocks(lanes),
                        m,
                        n,
                        k,
                        seed % 2 == 0,
                        seed % 3 == 0,
                        seed,
                    );
                }
            }
        }
    }
    // The error a block GEMV with `lanes` gives, recorded with `variant`.
    let refused = |variant: Variant, lanes: u32, x: &Tensor, w: &Tensor, out: &Tensor| {
        Recorder::with_variant(&gpu, variant)
            .matmul_with(MatmulPath::GemvBlocks(lanes), x, w, None, out, false)
            .unwrap_err()
            .to_string()
    };
    let best = gpu.best_variant;
    // more than 4 rows or a K that is not whole blocks is refused, not miscomputed
    for (m, k) in [(5, 64), (1, 40)] {
        let x = Tensor::zeros(&gpu, "x", &[m, k]).unwrap();
        let w = Tensor::zeros(&gpu, "w", &[8, k]).unwrap();
        let out = Tensor::zeros(&gpu, "out", &[m, 8]).unwrap();
        let err = refused(best, 8, &x, &w, &out);
        assert!(err.contains("block GEMV") && err.contains('x'), "{err}");
    }
    let x = Tensor::zeros(&gpu, "x", &[1, 64]).unwrap();
    let w = Tensor::zeros(&gpu, "w", &[8, 64]).unwrap();
    let out = Tensor::zeros(&gpu, "out", &[1, 8]).unwrap();
    let err = refused(best, 12, &x, &w, &out);
    assert!(err.contains("found 12"), "{err}");
    // x shared through the subgroup takes one lane
    let err = refused(best, 4 | GEMV_X_SUBGROUP, &x, &w, &out);
    assert!(err.contains("1 lane, found 4"), "{err}");
    // the subgroup form needs a subgroup variant, and one row of x
    let err = refused(Variant::PORTABLE, GEMV_SUBGROUP, &x, &w, &out);
    assert!(
        err.contains("subgroup") && err.contains("portable"),
        "{err}"
    );
    if best.subgroups {
        let x2 = Tensor::zeros(&gpu, "x2", &[2, 64]).unwrap();
        let out2 = Tensor::zeros(&gpu, "out2", &[2, 8]).unwrap();
        let err = refused(best, GEMV_SUBGROUP, &x2, &w, &out2);
        assert!(err.contains("x2") && err.contains("2 rows"), "{err}");
    }
}

#[test]
fn gate_and_up_projections_store_silu_gate_times_up() {
    let gpu = gpu();
    let mut r = Rng::new(31);
    for v in gpu.variants() {
        for dt in [DType::Q4, DType::Q4M, DType::Q8, DType::F16, DType::F32] {
            let mut paths = vec![
                MatmulPath::Auto,
                MatmulPath::Gemv,
                MatmulPath::GemvBlocks(1),
                MatmulPath::GemvBlocks(4),
                MatmulPath::GemvBlocks(8),
                MatmulPath::GemvBlocks(64),
                MatmulPath::GemvBlocks(1 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(8 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(1 | GEMV_WG16 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(4 | GEMV_WG16),
                MatmulPath::Gemm,
            ];
            if v.subgroups {
                paths.push(MatmulPath::GemvBlocks(GEMV_SUBGROUP));
                paths.push(MatmulPath::GemvBlocks(1 | GEMV_X_SUBGROUP | GEMV_UNIFORM_X));
                paths.push(MatmulPath::GemvBlocks(1 | GEMV_X_SUBGROUP | GEMV_WG16));
            }
            for path in paths {
                // m = 1 on the block GEMV with quantised weights is the one-dispatch GLU: N
                // not a multiple of its columns per workgroup, K an odd (unpaired) and an
                // even (paired) number of blocks
                for (m, n, k) in [(1, 300, 96), (1, 130, 128), (3, 300, 96), (70, 300, 96)] {
                    if m > 4 && !matches!(path, MatmulPath::Auto | MatmulPath::Gemm)
                        || m > 1 && path == MatmulPath::GemvBlocks(GEMV_SUBGROUP)
                    {
                        continue;
                    }
                    let x = r.vec(m * k, 1.0);
                    let (gv, uv) = (r.vec(n * k, 0.5), r.vec(n * k, 0.5));
                    let gq = quant::round_trip(dt, &gv, k).unwrap();
                    let uq = quant::round_trip(dt, &uv, k).unwrap();
                    let g = cpu::matmul(&x, m, k, &gq, n, None);
                    let u = cpu::matmul(&x, m, k, &uq, n, None);
                    let want: Vec<f32> = g
                        .iter()
                        .zip(&u)
                        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect();
                    let gate = Tensor::upload(&gpu, "gate", &[n, k], dt, &gv).unwrap();
                    let up = Tensor::upload(&gpu, "up", &[n, k], dt, &uv).unwrap();
                    // whatever the output held before is overwritten, not added to
                    let out = t(&gpu, "out", &[m, n], &r.vec(m * n, 1.0));
                    let mut rec = Recorder::with_variant(&gpu, v);
                    rec.matmul_glu(path, &act(&gpu, "x", &[m, k], &x), &gate, &up, &out)
                        .unwrap();
                    run(rec);
                    assert_close(
                        &format!("silu(gate) * up {dt} {path:?} m{m} n{n} k{k} {}", v.name()),
                        &read(&gpu, &out),
                        &want,
                        1e-4,
                        1e-4,
                    );
                }
            }
        }
    }
    // gate and up of different shapes are refused
    let x = Tensor::zeros(&gpu, "x", &[1, 64]).unwrap();
    let gate = Tensor::zeros(&gpu, "gate", &[8, 64]).unwrap();
    let up = Tensor::zeros(&gpu, "up", &[16, 64]).unwrap();
    let out = Tensor::zeros(&gpu, "out", &[1, 8]).unwrap();
    let err = Recorder::new(&gpu)
        .matmul_glu(MatmulPath::Auto, &x, &gate, &up, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("up") && err.contains("[16, 64]"), "{err}");
}

#[test]
fn rms_norm_fused_into_the_gemv_matches_norm_then_matmul() {
    let gpu = gpu();
    let mut r = Rng::new(77);
    let eps = 1e-5;
    for v in gpu.variants() {
        for dt in [DType::Q4, DType::Q4M, DType::Q8, DType::F16] {
            let mut paths = vec![
                MatmulPath::Auto,
                MatmulPath::GemvBlocks(1),
                MatmulPath::GemvBlocks(8),
                MatmulPath::GemvBlocks(64),
                MatmulPath::GemvBlocks(1 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(4 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(1 | GEMV_WG16 | GEMV_UNIFORM_X),
                MatmulPath::GemvBlocks(16 | GEMV_WG16),
                MatmulPath::Gemm,
            ];
            if v.subgroups {
                paths.push(MatmulPath::GemvBlocks(GEMV_SUBGROUP));
                paths.push(MatmulPath::GemvBlocks(1 | GEMV_X_SUBGROUP));
                paths.push(MatmulPath::GemvBlocks(
                    1 | GEMV_X_SUBGROUP | GEMV_WG16 | GEMV_UNIFORM_X,
                ));
            }
            // fused wherever it can be, and (Auto only) never
            let runs = paths
                .iter()
                .map(|&p| (p, true))
                .chain([(MatmulPath::Auto, false)]);
            for (path, fuse) in runs {
                gpu.set_fuse_norm(fuse);
                // N not a multiple of the columns per workgroup, K odd and even in blocks;
                // two rows of x are never fused
                for (m, n, k) in [(1, 300, 96), (1, 130, 128), (2, 70, 64)] {
                    if m > 1 && path == MatmulPath::GemvBlocks(GEMV_SUBGROUP) {
                        continue;
                    }
                    // large values, as in LLaMA's residual stream
                    let x = r.vec(m * k, 8.0);
                    let nw = r.vec(k, 1.0);
                    let h = cpu::rms_norm(&x, k, &nw, eps);
                    let (wv, uv) = (r.vec(n * k, 0.5), r.vec(n * k, 0.5));
                    let wq = quant::round_trip(dt, &wv, k).unwrap();
                    let uq = quant::round_trip(dt, &uv, k).unwrap();
                    let want = cpu::matmul(&h, m, k, &wq, n, None);
                    let up_h = cpu::matmul(&h, m, k, &uq, n, None);
                    let want_glu: Vec<f32> = want
                        .iter()
                        .zip(&up_h)
                        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect();
                    let w = Tensor::upload(&gpu, "w", &[n, k], dt, &wv).unwrap();
                    let up = Tensor::upload(&gpu, "up", &[n, k], dt, &uv).unwrap();
                    let blocks = !matches!(path, MatmulPath::Gemm) && m == 1 && fuse;
                    // the norm's weights padded as the model pads them (bound like x), and
                    // not (read as a storage buffer)
                    for padded in [true, false] {
                        let norm = if padded {
                            act(&gpu, "norm", &[k], &nw)
                        } else {
                            t(&gpu, "norm", &[k], &nw)
                        };
                        let what = format!(
                            "{dt} {path:?} fuse {fuse} padded {padded} m{m} n{n} k{k} {}",
                            v.name()
                        );
                        let xs = act(&gpu, "x", &[m, k], &x);
                        let hs = Tensor::zeros(&gpu, "h", &[m, k]).unwrap();
                        let out = t(&gpu, "out", &[m, n], &r.vec(m * n, 1.0));
                        let mut rec = Recorder::with_variant(&gpu, v);
                        rec.rms_norm_matmul(path, &xs, &norm, eps, &hs, &w, &out)
                            .unwrap();
                        // one dispatch when fused, the norm and the matmul otherwise
                        assert_eq!(rec.len() == 1, blocks, "{what}");
                        run(rec);
                        assert_close(&what, &read(&gpu, &out), &want, 1e-4, 1e-4);
                        let mut rec = Recorder::with_variant(&gpu, v);
                        rec.rms_norm_glu(path, &xs, &norm, eps, &hs, &w, &up, &out)
                            .unwrap();
                        assert_eq!(rec.len() == 1, blocks && dt.is_quantized(), "{what}");
                        run(rec);
                        let what = format!("silu(gate) * up of the norm, {what}");
                        assert_close(&what, &read(&gpu, &out), &want_glu, 1e-4, 1e-4);
                    }
                }
            }
        }
    }
    // the norm's weights must match x's width, fused or not
    for fuse in [true, false] {
        gpu.set_fuse_norm(fuse);
        let x = Tensor::zeros(&gpu, "x", &[1, 64]).unwrap();
        let norm = Tensor::zeros(&gpu, "attn_norm", &[32]).unwrap();
        let w = Tensor::zeros(&gpu, "w", &[8, 64]).unwrap();
        let out = Tensor::zeros(&gpu, "out", &[1, 8]).unwrap();
        let err = Recorder::new(&gpu)
            .rms_norm_matmul(MatmulPath::Auto, &x, &norm, 1e-5, &x, &w, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_norm") && err.contains("[64]"), "{err}");
    }
}

#[test]
fn measuring_the_fused_norm_times_both_forms_and_leaves_the_choice() {
    let gpu = gpu();
    for was in [false, true] {
        gpu.set_fuse_norm(was);
        let (fused, separate) =
            pollster::block_on(minigpt4::gpu::tune::measure_fuse_norm(&gpu, 256, 1, 1)).unwrap();
        assert!(fused > 0.0 && fused < 10.0, "{fused}");
        assert!(separate > 0.0 && separate < 10.0, "{separate}");
        assert_eq!(gpu.fuse_norm(), was);
    }
}

#[test]
fn matmul_at_vit_width_and_auto_path() {
    let gpu = gpu();
    // ViT-g width: K = 1408 (44 blocks), a non-multiple-of-64 N.
    for dt in DType::ALL {
        check_matmul(
            &gpu,
            gpu.best_variant,
            dt,
            MatmulPath::Auto,
            1,
            33,
            1408,
            true,
            false,
            7,
        );
        check_matmul(
            &gpu,
            gpu.best_variant,
            dt,
            MatmulPath::Auto,
            9,
            20,
            1408,
            true,
            true,
            8,
        );
    }
}

#[test]
fn tensors_larger_than_the_binding_limit_are_split_and_still_correct() {
    // Force a 4 KiB binding limit: a [300, 64] weight becomes several parts in every dtype.
    let gpu = gpu_with(GpuOptions {
        max_binding: Some(4096),
        ..Default::default()
    });
    assert_eq!(gpu.max_binding, 4096);
    let (m, n, k) = (3, 300, 64);
    let mut r = Rng::new(99);
    let x = r.vec(m * k, 1.0);
    let wv = r.vec(n * k, 1.0);
    let b = r.vec(n, 1.0);
    for dt in DType::ALL {
        let w = Tensor::upload(&gpu, "w", &[n, k], dt, &wv).unwrap();
        assert!(w.parts.len() > 1, "{dt}: expected a split tensor");
        for p in &w.parts {
            assert!(p.data.size() <= 4096);
        }
        let wq = quant::round_trip(dt, &wv, k).unwrap();
        for path in [
            MatmulPath::Gemv,
            MatmulPath::GemvBlocks(16),
            MatmulPath::Gemm,
        ] {
            let xt = t(&gpu, "x", &[m, k], &x);
            let bt = t(&gpu, "b", &[n], &b);
            let out = Tensor::zeros(&gpu, "out", &[m, n]).unwrap();
            let mut rec = Recorder::new(&gpu);
            rec.matmul_with(path, &xt, &w, Some(&bt), &out, false)
                .unwrap();
            run(rec);
            let want = cpu::matmul(&x, m, k, &wq, n, Some(&b));
            assert_close(
                &format!("split matmul {dt} {path:?}"),
                &read(&gpu, &out),
                &want,
                2e-5,
                1e-5,
            );
        }
        // silu(gate) * up of one row, gate and up both split (one GLU dispatch per part pair)
        if dt.is_quantized() {
            let uv = r.vec(n * k, 1.0);
            let up = Tensor::upload(&gpu, "up", &[n, k], dt, &uv).unwrap();
            let x1 = t(&gpu, "x1", &[1, k], &x[..k]);
            let out = Tensor::zeros(&gpu, "glu", &[1, n]).unwrap();
            let mut rec = Recorder::new(&gpu);
            rec.matmul_glu(MatmulPath::GemvBlocks(4), &x1, &w, &up, &out)
                .unwrap();
            run(rec);
            let g = cpu::matmul(&x[..k], 1, k, &wq, n, None);
            let uq = quant::round_trip(dt, &uv, k).unwrap();
            let want: Vec<f32> = cpu::matmul(&x[..k], 1, k, &uq, n, None)
                .iter()
                .zip(&g)
                .map(|(u, g)| g / (1.0 + (-g).exp()) * u)
                .collect();
            assert_close(
                &format!("split silu(gate) * up {dt}"),
                &read(&gpu, &out),
                &want,
                1e-4,
                1e-4,
            );
        }
        // embedding rows gathered from every part
        let ids: Vec<u32> = vec![0, 299, 150, 37, 38, 0, 200, 64];
        let idt = Ids::new(&gpu, &ids);
        let out = Tensor::zeros(&gpu, "emb", &[ids.len(), k]).unwrap();
        let mut rec = Recorder::new(&gpu);
        rec.embedding(&idt, &w, &out).unwrap();
        run(rec);
        assert_close(
            &format!("split embedding {dt}"),
            &read(&gpu, &out),
            &cpu::embedding(&ids, &wq, k),
            0.0,
            0.0,
        );
    }
    // an activation above the limit is refused with the numbers
    let err = Tensor::zeros(&gpu, "big", &[2048])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("big") && err.contains("4096") && err.contains("8192"),
        "{err}"
    );
}

#[test]
fn layer_norm_and_rms_norm() {
    let gpu = gpu();
    let mut r = Rng::new(3);
    for v in gpu.variants() {
        for (rows, cols, eps) in [
            (1, 1, 1e-5),
            (3, 7, 1e-6),
            (257, 88, 1e-12),
            (2, 1408, 1e-6),
            (5, 65, 1e-5),
            (1, 4096, 1e-5),
        ] {
            let x: Vec<f32> = r.vec(rows * cols, 3.0).iter().map(|v| v + 1.5).collect();
            let w = r.vec(cols, 1.0);
            let b = r.vec(cols, 1.0);
            let (xt, wt, bt) = (
                t(&gpu, "x", &[rows, cols], &x),
                t(&gpu, "w", &[cols], &w),
                t(&gpu, "b", &[cols], &b),
            );
            let o1 = Tensor::zeros(&gpu, "ln", &[rows, cols]).unwrap();
            let o2 = Tensor::zeros(&gpu, "rms", &[rows, cols]).unwrap();
            let mut rec = Recorder::with_variant(&gpu, v);
            rec.layer_norm(&xt, &wt, &bt, eps, &o1).unwrap();
            rec.rms_norm(&xt, &wt, eps, &o2).unwrap();
            run(rec);
            let what = format!("{} rows{rows} cols{cols}", v.name());
            assert_close(
                &format!("layer_norm {what}"),
                &read(&gpu, &o1),
                &cpu::layer_norm(&x, cols, &w, &b, eps),
                1e-5,
                1e-5,
            );
            assert_close(
                &format!("rms_norm {what}"),
                &read(&gpu, &o2),
                &cpu::rms_norm(&x, cols, &w, eps),
                1e-5,
                1e-5,
            );
        }
    }
}

#[test]
fn softmax_rows() {
    let gpu = gpu();
    let mut r = Rng::new(4);
    for v in gpu.variants() {
        for (rows, cols, scale) in [(1, 1, 1.0), (3, 7, 0.5), (4, 257, 0.125), (2, 1000, 2.0)] {
            let x = r.vec(rows * cols, 8.0);
            let xt = t(&gpu, "x", &[rows, cols], &x);
            let mut rec = Recorder::with_variant(&gpu, v);
            rec.softmax(&xt, scale).unwrap();
            run(rec);
            assert_close(
                &format!("softmax {} {rows}x{cols}", v.name()),
                &read(&gpu, &xt),
                &cpu::softmax(&x, cols, scale),
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn elementwise_kernels() {
    let gpu = gpu();
    let mut r = Rng::new(5);
    for n in [1usize, 7, 255, 257, 6144 + 3] {
        let cols = if n % 7 == 0 { 7 } else { 1 };
        let x = r.vec(n, 10.0);
        let y = r.vec(n, 2.0);
        let b = r.vec(cols, 1.0);
        let xt = |gpu: &Gpu| t(gpu, "x", &[n / cols, cols], &x);
        let yt = t(&gpu, "y", &[n / cols, cols], &y);
        let bt = t(&gpu, "b", &[cols], &b);
        let (a, g, s, sc, ab) = (xt(&gpu), xt(&gpu), xt(&gpu), xt(&gpu), xt(&gpu));
        let mut rec = Recorder::new(&gpu);
        rec.add(&a, &yt).unwrap();
        rec.gelu(&g).unwrap();
        rec.silu_mul(&s, &yt).unwrap();
        rec.scale(&sc, -0.37).unwrap();
        rec.add_bias(&ab, &bt).unwrap();
        run(rec);
        let add: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let scaled: Vec<f32> = x.iter().map(|a| a * -0.37).collect();
        let biased: Vec<f32> = x.iter().enumerate().map(|(i, a)| a + b[i % cols]).collect();
        assert_close(&format!("add {n}"), &read(&gpu, &a), &add, 0.0, 0.0);
        assert_close(
            &format!("gelu {n}"),
            &read(&gpu, &g),
            &cpu::gelu(&x),
            1e-6,
            2e-6,
        );
        assert_close(
            &format!("silu_mul {n}"),
            &read(&gpu, &s),
            &cpu::silu_mul(&x, &y),
            1e-6,
            2e-6,
        );
        assert_close(&format!("scale {n}"), &read(&gpu, &sc), &scaled, 0.0, 0.0);
        assert_close(
            &format!("add_bias {n}"),
            &read(&gpu, &ab),
            &biased,
            0.0,
            0.0,
        );
    }
}

#[test]
fn gelu_is_the_exact_erf_form_not_tanh() {
    let gpu = gpu();
    // at x = -3 the tanh approximation differs from the erf form by ~3e-4
    let x = vec![-3.0f32, -1.0, 0.0, 0.5, 2.0, 6.0];
    let xt = t(&gpu, "x", &[6], &x);
    let mut rec = Recorder::new(&gpu);
    rec.gelu(&xt).unwrap();
    run(rec);
    let want = [
        -0.0040496886f32,
        -0.15865526,
        0.0,
        0.34573123,
        1.9544997,
        6.0,
    ];
    assert_close("gelu erf", &read(&gpu, &xt), &want, 1e-6, 1e-6);
}

#[test]
fn rope_kv_matches_rope_then_cache_copy_bit_for_bit() {
    let gpu = gpu();
    let mut r = Rng::new(61);
    for (heads, kv_heads, d, rows, pos0) in [(4, 2, 8, 3, 5), (3, 3, 64, 1, 17), (2, 1, 2, 2, 0)] {
        for mode in [RopeMode::Half, RopeMode::Interleaved] {
            for dt in [DType::F32, DType::F16] {
                let what = format!("rope_kv h{heads} kv{kv_heads} d{d} t{rows} {mode:?} {dt}");
                let (q, kv) = (heads * d, kv_heads * d);
                let width = q + 2 * kv;
                let table = RopeTable::new(&gpu, d, pos0 + rows + 2, 10000.0).unwrap();
                let x = r.vec(rows * width, 2.0);
                let ctx = pos0 + rows + 2;
                // the fused kernel
                let qkv1 = t(&gpu, "qkv", &[rows, width], &x);
                let shape = kv_cache_shape(kv_heads, ctx, d);
                let cache1 = Tensor::empty(&gpu, "cache", &shape, dt).unwrap();
                let mut rec = Recorder::new(&gpu);
                rec.rope_kv(&qkv1, rows, heads, kv_heads, &table, pos0, mode, &cache1)
                    .unwrap();
                run(rec);
                // rotation of q and k, then a copy of each k and v head into its block
                let qkv2 = t(&gpu, "qkv", &[rows, width], &x);
                let cache2 = Tensor::empty(&gpu, "cache", &shape, dt).unwrap();
                let view = HeadView::rows(&qkv2, 0, width);
                let mut rec = Recorder::new(&gpu);
                rec.rope(view, rows, heads + kv_heads, &table, pos0, mode)
                    .unwrap();
                for b in 0..2 * kv_heads {
                    let to = (b * ctx + pos0) * d;
                    rec.copy_rows(&qkv2, q + b * d, width, &cache2, to, d, rows, d)
                        .unwrap();
                }
                run(rec);
                let (a, b) = (read(&gpu, &qkv1), read(&gpu, &qkv2));
                for row in 0..rows {
                    let s = row * width..row * width + q;
                    assert_eq!(&a[s.clone()], &b[s], "{what}: q of row {row}");
                }
                let words = ctx * 2 * kv * if dt == DType::F16 { 1 } else { 2 } / 2;
                let w1 = pollster::block_on(minigpt4::gpu::tensor::read_words(
                    &gpu,
                    cache1.buffer(),
                    0,
                    words,
                ))
                .unwrap();
                let w2 = pollster::block_on(minigpt4::gpu::tensor::read_words(
                    &gpu,
                    cache2.buffer(),
                    0,
                    words,
                ))
                .unwrap();
                assert_eq!(w1, w2, "{what}: cache");
                // every head's block got the rows' positions, and nothing else
                let vals = cache_values(&gpu, &cache1);
                assert_eq!(vals.len(), ctx * 2 * kv);
                for (e, &v) in vals.iter().enumerate() {
                    let (b, p) = (e / (ctx * d), e / d % ctx);
                    if !(pos0..pos0 + rows).contains(&p) {
                        assert_eq!(v, 0.0, "{what}: block {b} position {p}");
                    }
                }
                for b in 0..2 * kv_heads {
                    for p in pos0..pos0 + rows {
                        let head = &vals[(b * ctx + p) * d..][..d];
                        assert!(head.iter().any(|&v| v != 0.0), "{what}: {b} {p}");
                    }
                }
            }
        }
    }
    // a cache of the wrong shape (here rows of [k, v]) is refused with both shapes
    let table = RopeTable::new(&gpu, 8, 4, 10000.0).unwrap();
    let qkv = Tensor::zeros(&gpu, "qkv", &[1, 32]).unwrap();
    let cache = Tensor::empty(&gpu, "cache", &[4, 8], DType::F16).unwrap();
    let err = Recorder::new(&gpu)
        .rope_kv(&qkv, 1, 2, 1, &table, 0, RopeMode::Half, &cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache") && err.contains("[2, >= 1, 8]") && err.contains("[4, 8]"),
        "{err}"
    );
}

/// The cache's words decoded to f32 (f16 pairs or f32 values).
fn cache_values(gpu: &Gpu, cache: &Tensor) -> Vec<f32> {
    let f16 = cache.dtype == DType::F16;
    let n = cache.rows() * cache.cols();
    let words = if f16 { n / 2 } else { n };
    let w = pollster::block_on(minigpt4::gpu::tensor::read_words(
        gpu,
        cache.buffer(),
        0,
        words,
    ))
    .unwrap();
    if f16 {
        w.iter()
            .flat_map(|&w| [w & 0xffff, w >> 16].map(|h| half::f16::from_bits(h as u16).to_f32()))
            .collect()
    } else {
        w.iter().map(|&w| f32::from_bits(w)).collect()
    }
}

/// The rotary step fused into the QKV projection's store (`ROPE` in `gemv.wgsl`) leaves the
/// projection's output and the KV cache as the projection followed by `rope_kv` does, for
/// every weight dtype, GEMV form, pairing, cache dtype, with the norm fused or not, GQA or
/// not; in one dispatch (two with the norm apart) where it applies, and the ops one after
/// another where it does not.
#[test]
fn qkv_projection_with_the_rotary_step_fused_matches_the_steps_apart() {
    let gpu = gpu();
    let mut r = Rng::new(83);
    let eps = 1e-5;
    let forms = [
        MatmulPath::GemvBlocks(1),
        MatmulPath::GemvBlocks(4),
        MatmulPath::GemvBlocks(64),
        MatmulPath::GemvBlocks(1 | GEMV_UNIFORM_X),
        MatmulPath::GemvBlocks(1 | GEMV_WG16 | GEMV_UNIFORM_X),
        MatmulPath::GemvBlocks(16 | GEMV_WG16),
        // (the same as 1 lane where the variant has no subgroups)
        MatmulPath::GemvBlocks(1 | GEMV_X_SUBGROUP | GEMV_UNIFORM_X),
        MatmulPath::GemvBlocks(1 | GEMV_X_SUBGROUP | GEMV_WG16),
    ];
    // (heads, kv_heads, head_dim, K, position): GQA, MHA, and head dims of 4 and 8
    let shapes = [(4, 2, 8, 64, 5), (3, 3, 16, 96, 17), (2, 1, 4, 32, 0)];
    let was = gpu.fuse_norm();
    for v in gpu.variants() {
        let mut runs: Vec<(DType, MatmulPath, bool)> = [DType::Q4, DType::Q4M, DType::Q8]
            .into_iter()
            .chain([DType::F16, DType::F32])
            .map(|dt| (dt, MatmulPath::Auto, true))
            .collect();
        if v == Variant::PORTABLE {
            runs.extend(forms.iter().map(|&p| (DType::Q4M, p, true)));
            runs.push((DType::Q4, MatmulPath::GemvBlocks(4), false));
            runs.push((DType::Q8, MatmulPath::Auto, false));
        } else {
            // the other variants change how f16 weights are read and add the subgroup form
            runs.retain(|r| matches!(r.0, DType::F16 | DType::Q4M));
        }
        if v.subgroups {
            runs.push((DType::Q4, MatmulPath::GemvBlocks(GEMV_SUBGROUP), true));
            runs.push((DType::Q4M, MatmulPath::GemvBlocks(GEMV_SUBGROUP), false));
        }
        for (i, &(dt, path, fuse)) in runs.iter().enumerate() {
            gpu.set_fuse_norm(fuse);
            for (j, &(heads, kv_heads, d, k, pos0)) in shapes.iter().enumerate() {
                let mode = [RopeMode::Half, RopeMode::Interleaved][(i + j) % 2];
                let kv_dt = [DType::F16, DType::F32][(i / 2 + j) % 2];
                let what = format!(
                    "{dt} {path:?} fuse {fuse} h{heads} kv{kv_heads} d{d} k{k} pos {pos0} \
                     {mode:?} {kv_dt} {}",
                    v.name()
                );
                let width = (heads + 2 * kv_heads) * d;
                let ctx = pos0 + 3;
                let table = RopeTable::new(&gpu, d, ctx, 10000.0).unwrap();
                let x = r.vec(k, 8.0);
                let nw = r.vec(k, 1.0);
                let w =
                    Tensor::upload(&gpu, "wqkv", &[width, k], dt, &r.vec(width * k, 0.5)).unwrap();
                let (xs, norm) = (act(&gpu, "x", &[1, k], &x), act(&gpu, "norm", &[k], &nw));
                let h = Tensor::zeros(&gpu, "h", &[1, k]).unwrap();
                let mut outs = Vec::new();
                for fused in [true, false] {
                    let qkv = Tensor::zeros(&gpu, "qkv", &[1, width]).unwrap();
                    let shape = kv_cache_shape(kv_heads, ctx, d);
                    let cache = Tensor::empty(&gpu, "cache", &shape, kv_dt).unwrap();
                    let mut rec = Recorder::with_variant(&gpu, v);
                    if fused {
                        let rope = RopeKv {
                            heads,
                            kv_heads,
                            table: &table,
                            pos0,
                            mode,
                            cache: &cache,
                        };
                        rec.rms_norm_qkv_rope(path, &xs, &norm, eps, &h, &w, &qkv, rope)
                            .unwrap();
                        let kernels = rec.kernels();
                        assert_eq!(kernels.len(), if fuse { 1 } else { 2 }, "{what}");
                        let last = kernels.last().unwrap();
                        assert!(
                            last.starts_with("gemv::gemv") && last.contains("ROPE"),
                            "{what}"
                        );
                    } else {
                        rec.rms_norm_matmul(path, &xs, &norm, eps, &h, &w, &qkv)
                            .unwrap();
                        rec.rope_kv(&qkv, 1, heads, kv_heads, &table, pos0, mode, &cache)
                            .unwrap();
                    }
                    run(rec);
                    outs.push((read(&gpu, &qkv), cache_values(&gpu, &cache)));
                }
                let (a, b) = (&outs[0], &outs[1]);
                assert_close(&format!("qkv, {what}"), &a.0, &b.0, 1e-5, 1e-5);
                assert_close(&format!("cache, {what}"), &a.1, &b.1, 1e-5, 1e-5);
                // the position was written in every head's block, and nothing else
                for b in 0..2 * kv_heads {
                    let head = &a.1[(b * ctx + pos0) * d..][..d];
                    assert!(head.iter().any(|&v| v != 0.0), "{what}: block {b}");
                }
                let rest = a.1.iter().enumerate().filter(|(e, _)| e / d % ctx != pos0);
                assert!(rest.clone().all(|(_, &v)| v == 0.0), "{what}");
            }
        }
    }
    gpu.set_fuse_norm(was);
    // where it cannot fuse (two rows, a head dim of 2), the steps run apart and agree
    let table = RopeTable::new(&gpu, 2, 8, 10000.0).unwrap();
    for (rows, d) in [(2, 4), (1, 2)] {
        let (heads, kv_heads, k) = (2, 1, 32);
        let width = (heads + 2 * kv_heads) * d;
        let table4 = RopeTable::new(&gpu, d, 8, 10000.0).unwrap();
        let table = if d == 2 { &table } else { &table4 };
        let x = r.vec(rows * k, 2.0);
        let nw = r.vec(k, 1.0);
        let w =
            Tensor::upload(&gpu, "wqkv", &[width, k], DType::Q8, &r.vec(width * k, 0.5)).unwrap();
        let (xs, norm) = (act(&gpu, "x", &[rows, k], &x), act(&gpu, "norm", &[k], &nw));
        let h = Tensor::zeros(&gpu, "h", &[rows, k]).unwrap();
        let mut outs = Vec::new();
        for fused in [true, false] {
            let qkv = Tensor::zeros(&gpu, "qkv", &[rows, width]).unwrap();
            let shape = kv_cache_shape(kv_heads, 8, d);
            let cache = Tensor::empty(&gpu, "cache", &shape, DType::F16).unwrap();
            let mut rec = Recorder::new(&gpu);
            let mode = RopeMode::Half;
            if fused {
                let rope = RopeKv {
                    heads,
                    kv_heads,
                    table,
                    pos0: 3,
                    mode,
                    cache: &cache,
                };
                rec.rms_norm_qkv_rope(MatmulPath::Auto, &xs, &norm, eps, &h, &w, &qkv, rope)
                    .unwrap();
                assert!(
                    rec.kernels().iter().all(|k| !k.contains("ROPE")),
                    "{rows} {d}"
                );
            } else {
                rec.rms_norm_matmul(MatmulPath::Auto, &xs, &norm, eps, &h, &w, &qkv)
                    .unwrap();
                rec.rope_kv(&qkv, rows, heads, kv_heads, table, 3, mode, &cache)
                    .unwrap();
            }
            run(rec);
            outs.push((read(&gpu, &qkv), cache_values(&gpu, &cache)));
        }
        assert_eq!(outs[0], outs[1], "rows {rows} head dim {d}");
    }
    // a cache of the wrong shape is refused before anything is recorded
    let table = RopeTable::new(&gpu, 8, 4, 10000.0).unwrap();
    let (x, norm) = (
        act(&gpu, "x", &[1, 32], &[1.0; 32]),
        act(&gpu, "n", &[32], &[1.0; 32]),
    );
    let h = Tensor::zeros(&gpu, "h", &[1, 32]).unwrap();
    let w = Tensor::zeros(&gpu, "wqkv", &[32, 32]).unwrap();
    let qkv = Tensor::zeros(&gpu, "qkv", &[1, 32]).unwrap();
    let cache = Tensor::empty(&gpu, "layer0.cache", &[4, 8], DType::F16).unwrap();
    let rope = RopeKv {
        heads: 2,
        kv_heads: 1,
        table: &table,
        pos0: 0,
        mode: RopeMode::Half,
        cache: &cache,
    };
    let mut rec = Recorder::new(&gpu);
    let err = rec
        .rms_norm_qkv_rope(MatmulPath::Auto, &x, &norm, eps, &h, &w, &qkv, rope)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer0.cache") && err.contains("[2, >= 1, 8]") && err.contains("[4, 8]"),
        "{err}"
    );
    assert!(rec.is_empty());
}

#[test]
fn rope_both_pairings_with_strided_views() {
    let gpu = gpu();
    let mut r = Rng::new(6);
    for (heads, d, rows, pos0, theta) in [
        (3, 64, 5, 7, 10000.0f32),
        (2, 128, 3, 0, 10000.0),
        (1, 88, 4, 1000, 100000.0),
        (4, 2, 1, 5, 10000.0),
    ] {
        for mode in [RopeMode::Half, RopeMode::Interleaved] {
            let table = RopeTable::new(&gpu, d, pos0 + rows + 3, theta).unwrap();
            let x = r.vec(rows * heads * d, 2.0);
            // place the rows inside a wider "fused qkv" tensor: offset 5, stride heads*d + 11
            let stride = heads * d + 11;
            let mut big = r.vec(5 + rows * stride, 1.0);
            for t in 0..rows {
                big[5 + t * stride..][..heads * d]
                    .copy_from_slice(&x[t * heads * d..][..heads * d]);
            }
            let bt = t(&gpu, "qkv", &[big.len()], &big);
            let mut rec = Recorder::new(&gpu);
            rec.rope(
                HeadView::rows(&bt, 5, stride),
                rows,
                heads,
                &table,
                pos0,
                mode,
            )
            .unwrap();
            run(rec);
            let got = read(&gpu, &bt);
            let want = cpu::rope(&x, heads, d, pos0, theta, mode == RopeMode::Interleaved);
            let mut got_rows = Vec::new();
            for t in 0..rows {
                got_rows.extend_from_slice(&got[5 + t * stride..][..heads * d]);
                // untouched padding
                assert_eq!(
                    &got[5 + t * stride + heads * d..]
                        [..(stride - heads * d).min(got.len() - 5 - t * stride - heads * d)],
                    &big[5 + t * stride + heads * d..]
                        [..(stride - heads * d).min(got.len() - 5 - t * stride - heads * d)]
                );
            }
            assert_close(&format!("rope {mode:?} d{d}"), &got_rows, &want, 1e-6, 1e-6);
        }
    }
}

/// Which attention kernels and KV storage a check uses.
#[derive(Clone, Copy, Debug)]
struct AttnPath {
    /// Split-K decode kernels (with a partials buffer).
    split: bool,
    kv: DType,
    /// q in an activation buffer at whole vec4s, so the kernels read it as a uniform
    /// (`Q_UNIFORM`, where the head dim allows); a small unaligned storage buffer otherwise.
    q_uniform: bool,
    /// Keys and values head-major (`[kv heads, capacity, head_dim]`, as `Llama` keeps its
    /// cache): heads `capacity * head_dim` apart, rows `head_dim`; else rows of heads.
    head_major: bool,
}

/// Keys or values `[capacity, kv heads * head_dim]` as rows of heads, or head-major.
fn kv_view(t: &Tensor, head_major: bool, cap: usize, d: usize) -> HeadView<'_> {
    match head_major {
        true => HeadView::head_major(t, 0, d, cap * d),
        false => HeadView::whole(t),
    }
}

fn check_attention(
    gpu: &Gpu,
    v: Variant,
    path: AttnPath,
    t_: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    seed: u64,
) {
    let mut r = Rng::new(seed);
    let q = r.vec(t_ * hq * d, 1.0);
    // an f16 cache holds rounded keys and values: the reference sees the same ones
    let k = quant::round_trip(path.kv, &r.vec(s * hkv * d, 1.0), d).unwrap();
    let vv = quant::round_trip(path.kv, &r.vec(s * hkv * d, 1.0), d).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let want = cpu::attention(&q, &k, &vv, t_, s, hq, hkv, d, causal, scale);
    // q inside a fused [t, q | pad] buffer; k and v inside a "cache" with room for more rows
    let (qoff, qs) = match path.q_uniform {
        true => (4, (hq * d).next_multiple_of(4) + 4),
        false => (2, hq * d + 3),
    };
    let mut qbuf = r.vec(t_ * qs + qoff, 1.0);
    for i in 0..t_ {
        qbuf[qoff + i * qs..][..hq * d].copy_from_slice(&q[i * hq * d..][..hq * d]);
    }
    let cap = s + 5;
    let mut kc = vec![0f32; cap * hkv * d];
    let mut vc = vec![0f32; cap * hkv * d];
    if path.head_major {
        for j in 0..s {
            for g in 0..hkv {
                let (from, to) = ((j * hkv + g) * d, (g * cap + j) * d);
                kc[to..to + d].copy_from_slice(&k[from..from + d]);
                vc[to..to + d].copy_from_slice(&vv[from..from + d]);
            }
        }
    } else {
        kc[..k.len()].copy_from_slice(&k);
        vc[..vv.len()].copy_from_slice(&vv);
    }
    let (qt, kt, vt) = (
        match path.q_uniform {
            true => act(gpu, "q", &[qbuf.len()], &qbuf),
            false => t(gpu, "q", &[qbuf.len()], &qbuf),
        },
        Tensor::upload(gpu, "k", &[cap, hkv * d], path.kv, &kc).unwrap(),
        Tensor::upload(gpu, "v", &[cap, hkv * d], path.kv, &vc).unwrap(),
    );
    let out = Tensor::zeros(gpu, "o", &[t_, hq * d]).unwrap();
    let part = Tensor::zeros(gpu, "part", &[attention_partials(t_, hq, s, d)]).unwrap();
    let mut rec = Recorder::with_variant(gpu, v);
    rec.attention_with(
        HeadView::rows(&qt, qoff, qs),
        kv_view(&kt, path.head_major, cap, d),
        kv_view(&vt, path.head_major, cap, d),
        HeadView::whole(&out),
        AttnShape {
            t: t_,
            s,
            heads: hq,
            kv_heads: hkv,
            head_dim: d,
            causal,
            scale,
        },
        path.split.then_some(&part),
    )
    .unwrap();
    // the tiled kernel shares its row operands through the subgroup where the variant and the
    // subgroup sizes allow
    if t_ >= ATTN_TILED_FROM && d <= ATTN_TILE_DIM {
        let kernels = rec.kernels();
        let shared = v.subgroups && minigpt4::gpu::rows_subgroup_fits(gpu);
        assert_eq!(kernels.len(), 1, "{kernels:?}");
        assert!(
            kernels[0].starts_with("attention::attention_tiled"),
            "{kernels:?}"
        );
        assert_eq!(
            kernels[0].contains("ROWS_SG"),
            shared,
            "{kernels:?} in {}",
            v.name()
        );
    }
    run(rec);
    assert_close(
        &format!(
            "attention {} {path:?} t{t_} s{s} hq{hq} hkv{hkv} d{d} causal={causal}",
            v.name()
        ),
        &read(gpu, &out),
        &want,
        2e-6,
        1e-5,
    );
}

#[test]
fn attention_prefill_decode_cross_and_gqa() {
    let gpu = gpu();
    let mut seed = 10;
    for v in gpu.variants() {
        for (t_, s, hq, hkv, d, causal) in [
            (5, 5, 4, 4, 88, false),    // ViT-style, head dim 88
            (7, 7, 4, 2, 128, true),    // LLaMA prefill, GQA
            (1, 70, 6, 2, 64, true),    // decode against a cache of 70
            (3, 10, 2, 1, 64, true),    // prefill continuing after 7 cached tokens
            (32, 257, 3, 3, 64, false), // Q-Former cross-attention shape (3 heads)
            (1, 1, 1, 1, 1, true),
            (2, 65, 3, 1, 200, false),
            // grouped-query attention over several query rows, in groups of 2, 3 and 4 heads
            // per workgroup (two per KV group for 8 and 6), one head for 5; head dims by eight
            // and not (one query row keeps a head per workgroup)
            (2, 70, 8, 1, 64, true),
            (2, 90, 12, 2, 36, true),
            (3, 40, 10, 2, 64, true),
            (2, 33, 4, 2, 12, true),
            // keys in one step of 64, 128, 192 and 256 per chunk (the step grows with the
            // context up to 256): SmolLM2's heads decoding at 150 and 200 keys, and prefill
            // rows whose visible keys straddle 192
            (1, 150, 9, 3, 64, true),
            (1, 200, 9, 3, 64, true),
            (4, 194, 4, 2, 64, true),
        ] {
            for q_uniform in [false, true] {
                seed += 1;
                let path = AttnPath {
                    split: false,
                    kv: DType::F32,
                    q_uniform,
                    head_major: seed % 4 >= 2,
                };
                check_attention(&gpu, v, path, t_, s, hq, hkv, d, causal, seed);
            }
        }
    }
}

#[test]
fn tiled_attention_for_many_rows() {
    // from ATTN_TILED_FROM query rows and up to ATTN_TILE_DIM dims: tiles of ATTN_TILE_ROWS
    // rows, keys 64 per tile, dims 16 per chunk; heads of up to 64, 96 and 128 dims each take
    // their own form (TD64, TD96, neither), as do heads whose dims and offsets go by eight
    // (eight halves or floats per load) and those that do not
    assert_eq!(
        (ATTN_TILED_FROM, ATTN_TILE_ROWS, ATTN_TILE_DIM),
        (8, 16, 128)
    );
    let gpu = gpu();
    let mut seed = 90;
    for v in gpu.variants() {
        for kv in [DType::F32, DType::F16] {
            for (t_, s, hq, hkv, d, causal) in [
                (8, 8, 2, 2, 64, false),     // the fewest rows: half a row tile
                (16, 16, 4, 2, 128, true),   // one full row tile, the largest head, GQA
                (17, 17, 3, 3, 88, false),   // a second row tile of one row; the ViT's head
                (20, 50, 4, 1, 64, true),    // prefill after 30 cached tokens
                (40, 150, 2, 2, 100, true),  // three key tiles, the last partial; 100 dims
                (24, 30, 2, 1, 90, true),    // 90 dims: six groups of 16 (TD96), not by 8
                (18, 37, 3, 1, 56, true),    // 56 dims: four groups (TD64), keys 16 per step
                (12, 12, 1, 1, 3, false),    // a head narrower than a chunk
                (70, 70, 2, 1, 16, true),    // keys of the second tile only for late rows
                (257, 257, 2, 2, 88, false), // the ViT's rows
                (9, 9, 2, 2, 136, false),    // past the largest head: the row kernel
            ] {
                seed += 1;
                let path = AttnPath {
                    split: false,
                    kv,
                    q_uniform: seed % 2 == 0,
                    head_major: seed % 4 >= 2,
                };
                check_attention(&gpu, v, path, t_, s, hq, hkv, d, causal, seed);
            }
        }
    }
}

#[test]
fn split_k_decode_attention_and_f16_kv_cache() {
    let gpu = gpu();
    let mut seed = 40;
    for v in gpu.variants() {
        for kv in [DType::F32, DType::F16] {
            for split in [false, true] {
                for (t_, s, hq, hkv, d, causal) in [
                    (1, 70, 6, 2, 64, true),    // one split
                    (1, 1, 1, 1, 2, true),      // a single key
                    (1, 600, 4, 1, 128, true),  // three splits, the last partial
                    (3, 513, 2, 2, 64, true),   // rows that see different lengths; a split
                    (4, 256, 2, 1, 200, false), // exactly one full split, head dim > 64
                    (2, 1030, 3, 3, 100, true), // five splits
                    (1, 700, 9, 3, 64, true),   // SmolLM2's heads: three per KV group
                    (2, 300, 8, 1, 36, true),   // four per workgroup, two per group
                ] {
                    for q_uniform in [false, true] {
                        seed += 1;
                        let path = AttnPath {
                            split,
                            kv,
                            q_uniform,
                            head_major: seed % 4 >= 2,
                        };
                        check_attention(&gpu, v, path, t_, s, hq, hkv, d, causal, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn kv_cache_rows_are_written_as_f16() {
    let gpu = gpu();
    let mut r = Rng::new(77);
    let (rows, cols, stride) = (3, 12, 20);
    let src = r.vec(rows * stride, 2.0);
    let st = t(&gpu, "src", &[rows, stride], &src);
    // a new buffer is zero-filled
    let cache = Tensor::empty(&gpu, "cache16", &[8, 16], DType::F16).unwrap();
    let mut rec = Recorder::new(&gpu);
    // rows 2..5 of the cache, columns 4..16, from source columns 6..18
    rec.copy_rows(&st, 6, stride, &cache, 2 * 16 + 4, 16, rows, cols)
        .unwrap();
    run(rec);
    let words = pollster::block_on(minigpt4::gpu::tensor::read_words(
        &gpu,
        cache.buffer(),
        0,
        8 * 16 / 2,
    ))
    .unwrap();
    let got: Vec<f32> = words
        .iter()
        .flat_map(|w| {
            [
                half::f16::from_bits(*w as u16).to_f32(),
                half::f16::from_bits((*w >> 16) as u16).to_f32(),
            ]
        })
        .collect();
    for row in 0..8 {
        for col in 0..16 {
            let want = if (2..5).contains(&row) && col >= 4 {
                half::f16::from_f32(src[(row - 2) * stride + 6 + col - 4]).to_f32()
            } else {
                0.0
            };
            let g = got[row * 16 + col];
            assert!(
                (g - want).abs() <= want.abs() * 1e-3,
                "[{row},{col}] {g} vs {want}"
            );
        }
    }
    // odd offsets cannot address f16 pairs
    let err = {
        let mut rec = Recorder::new(&gpu);
        rec.copy_rows(&st, 0, stride, &cache, 3, 16, 1, 4)
            .unwrap_err()
            .to_string()
    };
    assert!(err.contains("cache16") && err.contains("even"), "{err}");
}

#[test]
fn embedding_gather_every_dtype() {
    let gpu = gpu();
    let mut r = Rng::new(8);
    for v in gpu.variants() {
        for dt in DType::ALL {
            let (rows, cols) = (37, if dt.is_quantized() { 96 } else { 7 });
            let table = r.vec(rows * cols, 1.0);
            let w = Tensor::upload(&gpu, "emb", &[rows, cols], dt, &table).unwrap();
            let ids = vec![0u32, 36, 5, 5, 17];
            let out = Tensor::zeros(&gpu, "out", &[ids.len(), cols]).unwrap();
            let mut rec = Recorder::with_variant(&gpu, v);
            rec.embedding(&Ids::new(&gpu, &ids), &w, &out).unwrap();
            run(rec);
            let want = cpu::embedding(&ids, &quant::round_trip(dt, &table, cols).unwrap(), cols);
            assert_close(
                &format!("embedding {dt} {}", v.name()),
                &read(&gpu, &out),
                &want,
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn patch_embedding_is_im2col_then_matmul() {
    let gpu = gpu();
    let mut r = Rng::new(9);
    for (c, h, w, p) in [(3, 28, 42, 14), (2, 5, 5, 1), (3, 14, 14, 14)] {
        let img = r.vec(c * h * w, 1.0);
        let it = t(&gpu, "img", &[c, h, w], &img);
        let np = (h / p) * (w / p);
        let cols = Tensor::zeros(&gpu, "cols", &[np, c * p * p]).unwrap();
        // conv weight [width, C, p, p] seen as [width, C·p·p], with bias
        let width = 10;
        let wv = r.vec(width * c * p * p, 0.2);
        let bias = r.vec(width, 1.0);
        let wt = Tensor::upload(&gpu, "patch_w", &[width, c * p * p], DType::F16, &wv).unwrap();
        let bt = t(&gpu, "patch_b", &[width], &bias);
        let out = Tensor::zeros(&gpu, "patches", &[np, width]).unwrap();
        let mut rec = Recorder::new(&gpu);
        rec.im2col(&it, p, &cols).unwrap();
        rec.matmul(&cols, &wt, Some(&bt), &out, false).unwrap();
        run(rec);
        let want_cols = cpu::im2col(&img, c, h, w, p);
        assert_close("im2col", &read(&gpu, &cols), &want_cols, 0.0, 0.0);
        // direct convolution on the CPU
        let wq = quant::round_trip(DType::F16, &wv, c * p * p).unwrap();
        let mut conv = vec![0f32; np * width];
        for py in 0..h / p {
            for px in 0..w / p {
                for o in 0..width {
                    let mut acc = bias[o] as f64;
                    for ch in 0..c {
                        for ky in 0..p {
                            for kx in 0..p {
                                acc += img[(ch * h + py * p + ky) * w + px * p + kx] as f64
                                    * wq[((o * c + ch) * p + ky) * p + kx] as f64;
                            }
                        }
                    }
                    conv[(py * (w / p) + px) * width + o] = acc as f32;
                }
            }
        }
        assert_close("patch conv", &read(&gpu, &out), &conv, 1e-5, 1e-5);
    }
}

#[test]
fn a_replayed_plan_reuses_every_bind_group_and_takes_new_parameters() {
    let gpu = gpu();
    let mut r = Rng::new(5);
    let (n, k) = (40, 64);
    let wv = r.vec(n * k, 1.0);
    let w = Tensor::upload(&gpu, "w", &[n, k], DType::Q4, &wv).unwrap();
    let wq = quant::round_trip(DType::Q4, &wv, k).unwrap();
    let src = r.vec(8 * k, 1.0);
    let st = t(&gpu, "src", &[8, k], &src);
    let x = Tensor::zeros(&gpu, "x", &[1, k]).unwrap();
    let out = Tensor::zeros(&gpu, "out", &[1, n]).unwrap();
    // "decode step" i: copy row i of src into x, then out = x · Wᵀ
    let step = |rec: &mut Recorder, i: usize| {
        rec.copy_rows(&st, i * k, k, &x, 0, k, 1, k).unwrap();
        rec.matmul(&x, &w, None, &out, false).unwrap();
    };
    let mut rec = Recorder::new(&gpu);
    step(&mut rec, 0);
    let mut plan = pollster::block_on(rec.submit_keep()).unwrap();
    assert_eq!(plan.len(), 2);
    for i in 1..8 {
        let mut rec = Recorder::replaying(&gpu, plan);
        step(&mut rec, i);
        assert_eq!(
            rec.reused, 2,
            "step {i}: every dispatch reuses its bind group"
        );
        plan = pollster::block_on(rec.submit_keep()).unwrap();
        let want = cpu::matmul(&src[i * k..(i + 1) * k], 1, k, &wq, n, None);
        assert_close(
            &format!("replayed step {i}"),
            &read(&gpu, &out),
            &want,
            1e-5,
            1e-5,
        );
    }
    // a recording that differs (another output buffer) gets new bind groups and is still right
    let out2 = Tensor::zeros(&gpu, "out2", &[1, n]).unwrap();
    let mut rec = Recorder::replaying(&gpu, plan);
    rec.copy_rows(&st, 0, k, &x, 0, k, 1, k).unwrap();
    rec.matmul(&x, &w, None, &out2, false).unwrap();
    assert_eq!(rec.reused, 1);
    run(rec);
    let want = cpu::matmul(&src[..k], 1, k, &wq, n, None);
    assert_close("changed replay", &read(&gpu, &out2), &want, 1e-5, 1e-5);
}

#[test]
fn top_k_candidates_with_the_repetition_penalty() {
    let gpu = gpu();
    let mut r = Rng::new(12);
    // sizes: under one candidate list, one workgroup, and the chunk bests' way (1025 its
    // smallest, 32001 = Vicuna-v0's vocab, 49152 = SmolLM2's) with one or two sorting passes
    // over the bests; then the same sizes with the best entries crowded into few chunks, all
    // entries equal, and a NaN
    let sizes = [10usize, 700, 1024, 1025, 5000, 32001, 49152];
    for case in 0..sizes.len() + 4 {
        let n = sizes[case.min(sizes.len() - 1)];
        let mut x = r.vec(n, 4.0);
        // exact ties decided by the lower index, also across workgroups and chunks
        for i in (0..n).step_by(97) {
            x[i] = 3.5;
        }
        match case.checked_sub(sizes.len()) {
            // the best 80 in 5 chunks, in the middle of the vector and at its end
            Some(0) => (0..80).for_each(|j| x[n / 2 / 16 * 16 + j] = 10.0 + j as f32),
            Some(1) => (0..80).for_each(|j| x[n - 1 - j] = 10.0 + (j % 7) as f32),
            Some(2) => x.iter_mut().for_each(|v| *v = -0.25),
            // a NaN ranks first (so sampling sees it and leaves the pick to the host), as a
            // NaN orders with total_cmp; -0 below +0
            Some(3) => {
                x[n / 3] = f32::NAN;
                x[7] = 0.0;
                x[8] = -0.0;
                x[9] = 9.0;
                x[10] = 9.0;
            }
            _ => {}
        }
        let mut mask = vec![0u32; n.div_ceil(32)];
        let penalized: Vec<usize> = (0..n).step_by(7).collect();
        for &i in &penalized {
            mask[i / 32] |= 1 << (i % 32);
        }
        let penalty = 1.3f32;
        let key = |i: usize| {
            let v = x[i];
            if mask[i / 32] & (1 << (i % 32)) != 0 {
                if v < 0.0 {
                    v * penalty
                } else {
                    v / penalty
                }
            } else {
                v
            }
        };
        let mut want: Vec<usize> = (0..n).collect();
        want.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        want.truncate(64);
        let xt = t(&gpu, "logits", &[n], &x);
        let m = Ids::new(&gpu, &mask);
        let words = minigpt4::gpu::ops::topk_words(n);
        let (ping, pong) = (
            Ids::new(&gpu, &vec![0; words]),
            Ids::new(&gpu, &vec![0; words]),
        );
        let mut rec = Recorder::new(&gpu);
        let best = rec.topk(&xt, n, &m, penalty, &ping, &pong).unwrap();
        let buf = best.buffer.clone();
        run(rec);
        let got =
            pollster::block_on(minigpt4::gpu::tensor::read_words(&gpu, &buf, 0, 192)).unwrap();
        let ids: Vec<usize> = got
            .chunks(3)
            .filter(|c| c[1] != u32::MAX)
            .map(|c| c[1] as usize)
            .collect();
        assert_eq!(ids, want, "case {case}, n {n}");
        for c in got.chunks(3).filter(|c| c[1] != u32::MAX) {
            assert_eq!(c[2], x[c[1] as usize].to_bits(), "raw logit of {}", c[1]);
            // (WGSL's division may be off by 2.5 ulp)
            let (k, got_k) = (key(c[1] as usize), f32::from_bits(c[0]));
            assert!(
                (k.is_nan() && got_k.is_nan()) || (got_k - k).abs() <= 1e-6 * k.abs(),
                "key of {}: {got_k}, want {k}",
                c[1]
            );
        }
        if case == sizes.len() + 3 {
            assert_eq!(ids[0], n / 3, "the NaN first");
            assert!(f32::from_bits(got[0]).is_nan(), "the NaN's key");
        }
    }
}

/// The top-k kernel's output for `logits` (best first after the penalty on `penalized`, ties by
/// id; three words each, padded with `u32::MAX` ids), built on the host.
fn candidate_words(logits: &[f32], penalized: &[u32], penalty: f32) -> Vec<u32> {
    let mut key = logits.to_vec();
    minigpt4::chat::repetition_penalty(&mut key, penalized, penalty);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| key[b].total_cmp(&key[a]).then(a.cmp(&b)));
    let mut words = Vec::new();
    for slot in 0..64 {
        match order.get(slot) {
            Some(&i) => words.extend([key[i].to_bits(), i as u32, logits[i].to_bits()]),
            None => words.extend([(-3.0e38f32).to_bits(), u32::MAX, (-3.0e38f32).to_bits()]),
        }
    }
    words
}

#[test]
fn gpu_sampling_picks_what_the_host_picks_among_the_candidates() {
    use minigpt4::chat::{sample_candidates, Sampling};
    use minigpt4::gpu::SampleParams;
    use minigpt4::model::llama::Candidate;
    let gpu = gpu();
    let mut r = Rng::new(21);
    let (mut sampled, mut fell_back) = (0, 0);
    for case in 0..160usize {
        // vocabularies under one candidate list (every id a candidate) and above it
        let n = [20, 63, 64, 100, 700, 5000][case % 6];
        let mut logits = r.vec(n, 3.0 + (case % 4) as f32);
        match case % 16 {
            // every logit equal: a tie reaching the last candidate when the vocabulary is larger
            5 => logits.iter_mut().for_each(|v| *v = 0.5),
            // ties among the best
            7 => (0..n).step_by(3).for_each(|i| logits[i] = 2.0),
            // a NaN: the host decides
            9 => logits[n / 2] = f32::NAN,
            _ => {}
        }
        let penalized: Vec<u32> = (0..case % 12)
            .map(|j| ((j * 37 + case) % n) as u32)
            .collect();
        let s = Sampling {
            greedy: false,
            temperature: [1.0, 0.7, 1.6][case % 3],
            top_k: 1 + (case * 7) % 63,
            top_p: [1.0, 0.9, 0.5, 0.99][case % 4],
            repetition_penalty: [1.0, 1.05, 1.5][(case / 3) % 3],
            seed: 0,
        };
        let u = (r.next_u32() as f64 / 2f64.powi(32)) as f32;
        let words = candidate_words(&logits, &penalized, s.repetition_penalty);
        let cands = Candidate::from_words(&words);
        // with a NaN among them the host samples the full logits (as it does itself for a
        // larger vocabulary)
        let nan = cands.iter().any(|c| c.logit.is_nan());
        let want = sample_candidates(&cands, &penalized, &s, u as f64).filter(|_| !nan);
        let mut mask = vec![0u32; n.div_ceil(32)];
        for &id in &penalized {
            mask[id as usize / 32] |= 1 << (id % 32);
        }
        let (c, m) = (Ids::new(&gpu, &words), Ids::new(&gpu, &mask));
        let (token, picked) = (Ids::new(&gpu, &[7]), Ids::new(&gpu, &[7]));
        let p = SampleParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            u,
        };
        let mut rec = Recorder::new(&gpu);
        rec.sample(&c, &p, &m, &token, &picked).unwrap();
        run(rec);
        let words_of = |b: &Ids, len| {
            pollster::block_on(minigpt4::gpu::tensor::read_words(&gpu, &b.buffer, 0, len)).unwrap()
        };
        let (got, tok, mask_after) = (
            words_of(&picked, 1)[0],
            words_of(&token, 1)[0],
            words_of(&m, mask.len()),
        );
        match want {
            Some(id) => {
                sampled += 1;
                assert_eq!(got, id, "case {case}: n {n}, {s:?}, u {u}");
                assert_eq!(tok, id, "case {case}: the next input");
                mask[id as usize / 32] |= 1 << (id % 32);
                assert_eq!(
                    mask_after, mask,
                    "case {case}: the penalty set gains the pick"
                );
            }
            None => {
                fell_back += 1;
                assert_eq!(got, u32::MAX, "case {case}: n {n}, {s:?}: the host's turn");
                assert!(
                    (tok as usize) < n,
                    "case {case}: a valid id to embed, found {tok}"
                );
                assert_eq!(mask_after, mask, "case {case}: no pick, no change");
            }
        }
    }
    // both paths ran
    assert!(
        sampled > 100 && fell_back >= 10,
        "{sampled} sampled, {fell_back} for the host"
    );
}

#[test]
fn copy_concat_and_slice() {
    let gpu = gpu();
    let mut r = Rng::new(11);
    // concat: [cls(1,5); patches(4,5)] -> [5,5]; then slice rows 1.. back out (drop CLS)
    let cls = r.vec(5, 1.0);
    let patches = r.vec(20, 1.0);
    let (ct, pt) = (
        t(&gpu, "cls", &[1, 5], &cls),
        t(&gpu, "patches", &[4, 5], &patches),
    );
    let all = Tensor::zeros(&gpu, "all", &[5, 5]).unwrap();
    let back = Tensor::zeros(&gpu, "back", &[4, 5]).unwrap();
    // strided: copy column block 1..4 of each row of `all` into a [5, 3] tensor
    let cols = Tensor::zeros(&gpu, "cols", &[5, 3]).unwrap();
    let mut rec = Recorder::new(&gpu);
    rec.copy_rows(&ct, 0, 5, &all, 0, 5, 1, 5).unwrap();
    rec.copy_rows(&pt, 0, 5, &all, 5, 5, 4, 5).unwrap();
    run(rec);
    let mut rec = Recorder::new(&gpu);
    rec.copy_rows(&all, 5, 5, &back, 0, 5, 4, 5).unwrap();
    rec.copy_rows(&all, 1, 5, &cols, 0, 3, 5, 3).unwrap();
    run(rec);
    let mut want_all = cls.clone();
    want_all.extend_from_slice(&patches);
    assert_close("concat", &read(&gpu, &all), &want_all, 0.0, 0.0);
    assert_close("slice", &read(&gpu, &back), &patches, 0.0, 0.0);
    let want_cols: Vec<f32> = (0..5)
        .flat_map(|r| want_all[r * 5 + 1..r * 5 + 4].to_vec())
        .collect();
    assert_close("strided", &read(&gpu, &cols), &want_cols, 0.0, 0.0);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let gpu = gpu();
    let x = Tensor::zeros(&gpu, "x", &[2, 64]).unwrap();
    let w = Tensor::upload(&gpu, "w.weight", &[8, 32], DType::Q4, &[0.0; 256]).unwrap();
    let out = Tensor::zeros(&gpu, "out", &[2, 8]).unwrap();
    let mut rec = Recorder::new(&gpu);
    let e = rec
        .matmul(&x, &w, None, &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.weight") && e.contains("[8, 32]") && e.contains("64"),
        "{e}"
    );
    let e = Tensor::upload(&gpu, "odd", &[2, 20], DType::Q8, &[0.0; 40])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("odd") && e.contains("32"), "{e}");
    let e = Tensor::upload(&gpu, "short", &[2, 20], DType::F32, &[0.0; 39])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("short") && e.contains("40") && e.contains("39"),
        "{e}"
    );
    let q = Tensor::zeros(&gpu, "q", &[1, 64]).unwrap();
    let e = rec
        .attention(
            HeadView::whole(&q),
            HeadView::whole(&q),
            HeadView::whole(&q),
            HeadView::whole(&out),
            AttnShape {
                t: 1,
                s: 1,
                heads: 3,
                kv_heads: 2,
                head_dim: 16,
                causal: true,
                scale: 1.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv_heads"), "{e}");
    // head-major keys: the last head's last row must lie inside the tensor (2 heads of 40
    // rows of 16 need 1280 elements; 64 of [1, 64] are there), and the queries' heads must be
    // side by side
    let shape = AttnShape {
        t: 1,
        s: 40,
        heads: 2,
        kv_heads: 2,
        head_dim: 16,
        causal: true,
        scale: 1.0,
    };
    let kv = HeadView::head_major(&q, 0, 16, 40 * 16);
    let e = rec
        .attention(HeadView::whole(&q), kv, kv, HeadView::whole(&out), shape)
        .unwrap_err()
        .to_string();
    assert!(e.contains("keys") && e.contains("1280"), "{e}");
    let cache = Tensor::zeros(&gpu, "cache", &kv_cache_shape(2, 40, 16)).unwrap();
    let (k, v) = minigpt4::gpu::kv_cache_views(&cache).unwrap();
    let e = rec
        .attention(k, k, v, HeadView::whole(&out), shape)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cache") && e.contains("head stride 640"), "{e}");
    let e = minigpt4::gpu::kv_cache_views(&q).err().unwrap().to_string();
    assert!(e.contains("q") && e.contains("[1, 64]"), "{e}");
    assert!(rec.is_empty());
}

#[test]
fn argmax_first_maximum() {
    let gpu = gpu();
    let mut r = Rng::new(12);
    // (the kernel's 256 invocations take four loads a step: 1024 logits)
    for n in [1usize, 7, 64, 65, 1000, 1024, 1026, 4099, 32001] {
        let mut x = r.vec(n, 5.0);
        if n > 10 {
            // a tie: the lower index wins
            x[n / 3] = 9.0;
            x[n / 2] = 9.0;
        }
        if n > 2100 {
            // ties within one invocation's step and across its steps
            for i in [1300, 1300 + 256, 1300 + 1024, 1300 - 256] {
                x[i] = 11.0;
            }
        }
        let xt = t(&gpu, "x", &[n], &x);
        let out = Ids::new(&gpu, &[123456]);
        let limit = if n > 10 { n - 1 } else { n };
        let mut rec = Recorder::new(&gpu);
        rec.argmax(&xt, limit, &out).unwrap();
        run(rec);
        let got = pollster::block_on(minigpt4::gpu::tensor::read_words(&gpu, &out.buffer, 0, 1))
            .unwrap()[0];
        assert_eq!(got, minigpt4::chat::argmax(&x[..limit]), "n {n}");
    }
}

#[test]
fn small_weights_get_lanes_tuned_for_their_shape() {
    // a device of its own: the per-shape choices belong to one `Gpu`
    let gpu = gpu_with(GpuOptions::default());
    // few rows; many short rows (a small model's LM head); a 7B projection; K off the blocks
    let (small, short, large, odd) = (
        (576, 576, DType::Q4M),
        (4096, 64, DType::Q4),
        (4096, 4096, DType::Q4),
        (100, 40, DType::F16),
    );
    let shapes = [small, short, large, odd];
    pollster::block_on(minigpt4::gpu::tune::tune_shapes(&gpu, &shapes)).unwrap();
    for s in [small, short] {
        assert!(gpu.has_gemv_lanes_for(s.0, s.1, s.2), "{s:?}");
        assert!(minigpt4::gpu::gemv_candidates(&gpu).contains(&gpu.gemv_lanes_for(s.0, s.1, s.2)));
    }
    // large weights keep the adapter's lanes; widths off the block size take no block GEMV
    assert!(!gpu.has_gemv_lanes_for(large.0, large.1, large.2));
    assert_eq!(
        gpu.gemv_lanes_for(large.0, large.1, large.2),
        gpu.gemv_lanes()
    );
    assert!(!gpu.has_gemv_lanes_for(odd.0, odd.1, odd.2));
    // an explicit choice (MINIGPT4_GEMV_LANES, bench) replaces the per-shape ones
    gpu.set_gemv_lanes(16);
    assert_eq!(gpu.gemv_lanes_for(small.0, small.1, small.2), 16);
}

/// GPU time from timestamp queries (what `bench` and the tuning time kernels by): the submits
/// between start and finish are measured, and a device without timestamp queries (a portable
/// one does not ask for them) says so, leaving the caller to its wall clock.
#[test]
fn gpu_timing_measures_the_submits_in_between() {
    let n = 1 << 18;
    let timed = |gpu: &Gpu, submits: usize| -> (bool, Option<f64>) {
        let a = Tensor::zeros(gpu, "a", &[n]).unwrap();
        let b = Tensor::zeros(gpu, "b", &[n]).unwrap();
        let started = gpu.start_timing();
        for _ in 0..submits {
            let mut rec = Recorder::new(gpu);
            rec.add(&a, &b).unwrap();
            pollster::block_on(rec.submit()).unwrap();
        }
        (started, pollster::block_on(gpu.finish_timing()).unwrap())
    };
    let gpu = gpu();
    if gpu.has_timestamps() {
        for submits in [1, 3] {
            let (started, t) = timed(&gpu, submits);
            assert!(started);
            assert!(t.is_some_and(|t| t > 0.0 && t < 60.0), "{t:?}");
        }
        // nothing submitted: nothing measured
        assert_eq!(timed(&gpu, 0), (true, None));
    }
    // finished: no longer timing
    assert_eq!(pollster::block_on(gpu.finish_timing()).unwrap(), None);
    let portable = gpu_with(GpuOptions {
        portable: true,
        ..Default::default()
    });
    assert!(!portable.has_timestamps());
    assert_eq!(timed(&portable, 1), (false, None));
}
