//! WGSL sources, a tiny explicit preprocessor, and the compiled-pipeline cache.
//!
//! The preprocessor understands, at the start of a line:
//! `#include NAME` (another file of `shaders/`), `#if FLAG`, `#if !FLAG`, `#if A || B` (any of
//! them), `#else`, `#endif`.
//! Flags come from the kernel [`Variant`] (`F16`, `SUBGROUPS`) and from the op (e.g. `W_Q4`).
//! Nothing else is rewritten, so the shader a driver sees is the file with lines removed.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;

/// Run-time kernel variant: which optional adapter features a kernel may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Variant {
    /// f16 arithmetic where a kernel asks for it (the tiled GEMM's `GEMM_HALF` forms; needs
    /// `shader-f16`). f16 weights are read as words and unpacked to f32 in every variant.
    pub f16: bool,
    /// Reductions with `subgroupAdd` / `subgroupMax` (needs subgroups).
    pub subgroups: bool,
}

impl Variant {
    /// f32 arithmetic, no f16, no subgroups: runs everywhere.
    pub const PORTABLE: Variant = Variant {
        f16: false,
        subgroups: false,
    };

    pub fn name(&self) -> String {
        match (self.f16, self.subgroups) {
            (false, false) => "portable".into(),
            (true, false) => "f16".into(),
            (false, true) => "subgroups".into(),
            (true, true) => "f16+subgroups".into(),
        }
    }
}

/// Every shader file, embedded at compile time.
pub const SOURCES: &[(&str, &str)] = &[
    ("common", include_str!("../../shaders/common.wgsl")),
    ("weights", include_str!("../../shaders/weights.wgsl")),
    ("matmul_out", include_str!("../../shaders/matmul_out.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("gemv", include_str!("../../shaders/gemv.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("im2col", include_str!("../../shaders/im2col.wgsl")),
    ("copy", include_str!("../../shaders/copy.wgsl")),
    ("argmax", include_str!("../../shaders/argmax.wgsl")),
    ("topk", include_str!("../../shaders/topk.wgsl")),
    ("sample", include_str!("../../shaders/sample.wgsl")),
];

/// The kernel families (files with entry points) and the op flag sets each is compiled with.
/// Used by the naga cross-compilation test to cover every variant a program can request.
pub const FAMILIES: &[(&str, &[&[&str]])] = &[
    (
        "matmul",
        &[
            &["W_F32"],
            &["W_F16"],
            &["W_Q8"],
            &["W_Q4"],
            &["W_F32", "BIAS"],
            &["W_F16", "BIAS"],
            &["W_Q8", "BIAS"],
            &["W_Q4", "BIAS"],
            &["W_Q4M"],
            &["W_Q4M", "BIAS"],
            &["W_Q4", "OUT_SILU"],
            &["W_Q4M", "OUT_MUL"],
            &["W_F16", "OUT_SILU"],
            &["W_F32", "OUT_MUL"],
            &["W_Q4", "GEMM_WIDE"],
            &["W_F16", "GEMM_TALL", "BIAS"],
            &["W_Q4M", "GEMM_WIDE", "GEMM_TALL", "OUT_MUL"],
            &["W_Q8", "GEMM_HALF"],
            &["W_F16", "GEMM_WIDE", "GEMM_HALF", "OUT_SILU"],
            &["W_Q4", "GEMM_TALL", "GEMM_HALF", "BIAS"],
            &["W_F32", "GEMM_WIDE", "GEMM_TALL", "GEMM_HALF"],
            &["W_F16", "GEMM_SHORT", "BIAS"],
            &["W_Q4", "GEMM_SHORT", "GEMM_WIDE", "GEMM_HALF", "OUT_MUL"],
            &["W_F16", "ROWS_SG"],
            &["W_F16", "GEMM_WIDE", "GEMM_TALL", "ROWS_SG", "BIAS"],
            &["W_Q4M", "GEMM_TALL", "ROWS_SG", "OUT_MUL"],
            &["W_F32", "GEMM_SHORT", "GEMM_WIDE", "ROWS_SG"],
        ],
    ),
    (
        "gemv",
        &[
            &["W_F32", "LANES4"],
            &["W_F16", "LANES4"],
            &["W_Q8", "LANES4"],
            &["W_Q4", "LANES4"],
            &["W_Q4M", "LANES4"],
            &["W_Q4", "LANES8"],
            &["W_F32", "BIAS", "LANES1"],
            &["W_F16", "LANES1"],
            &["W_Q8", "LANES1"],
            &["W_Q4", "LANES1"],
            &["W_Q4M", "BIAS", "LANES1"],
            &["W_F32", "BIAS", "LANES16"],
            &["W_F16", "BIAS", "LANES16"],
            &["W_Q8", "BIAS", "LANES16"],
            &["W_Q4", "BIAS", "LANES16"],
            &["W_Q4M", "BIAS", "LANES16"],
            &["W_Q4", "LANES32"],
            &["W_Q4", "LANES1", "OUT_SILU"],
            &["W_Q4M", "LANES8", "OUT_MUL"],
            &["W_F32", "LANES16", "OUT_SILU"],
            &["W_F16", "LANES64", "OUT_MUL"],
            &["W_Q8", "LANES4", "OUT_SILU"],
            &["W_F32", "LANES64"],
            &["W_F16", "LANES64"],
            &["W_Q8", "LANES64"],
            &["W_Q4", "LANES64"],
            &["W_Q4M", "LANES64"],
            &["W_Q4", "LANES1", "GLU"],
            &["W_Q4M", "LANES4", "GLU"],
            &["W_Q8", "LANES64", "GLU"],
            &["W_F32", "BIAS", "LANES1", "X_UNIFORM"],
            &["W_F16", "LANES1", "X_UNIFORM"],
            &["W_Q8", "LANES1", "X_UNIFORM"],
            &["W_Q4", "LANES1", "OUT_SILU", "X_UNIFORM"],
            &["W_Q4M", "LANES1", "GLU", "X_UNIFORM"],
            &["W_Q4", "LANES1", "X_UNIFORM", "WG16"],
            &["W_Q4M", "LANES4", "GLU", "WG16"],
            &["W_Q8", "LANES16", "BIAS", "WG16"],
            &["W_Q4M", "LANES1", "GLU", "X_UNIFORM", "NORM"],
            &["W_Q8", "LANES8", "NORM"],
            &["W_Q4", "LANES4", "GLU", "NORM"],
            &["W_F16", "LANES4", "X_UNIFORM", "WG16", "NORM"],
            &["W_Q4M", "LANES1", "ROPE"],
            &["W_Q4", "LANES4", "ROPE", "KV_F16"],
            &["W_Q8", "LANES64", "X_UNIFORM", "NORM", "ROPE", "KV_F16"],
            &["W_F16", "LANES1", "X_UNIFORM", "WG16", "ROPE", "KV_F16"],
            &["W_F32", "LANES16", "WG16", "NORM", "ROPE"],
        ],
    ),
    ("norm", &[&[]]),
    ("softmax", &[&[]]),
    ("elementwise", &[&[]]),
    ("rope", &[&[], &["KV_F16"]]),
    (
        "attention",
        &[
            &[],
            &["KV_F16"],
            &["Q_UNIFORM"],
            &["KV_F16", "Q_UNIFORM"],
            &["HEADS2", "Q_UNIFORM"],
            &["KV_F16", "HEADS3", "Q_UNIFORM"],
            &["HEADS4", "Q_UNIFORM"],
            &["KV_F16", "HEADS4", "Q_UNIFORM"],
            &["TD64"],
            &["KV_F16", "TD64"],
            &["TD96"],
            &["KV_F16", "TD96"],
            &["ROWS_SG"],
            &["KV_F16", "ROWS_SG"],
            &["TD64", "ROWS_SG"],
            &["KV_F16", "TD64", "ROWS_SG"],
            &["TD96", "ROWS_SG"],
            &["KV_F16", "TD96", "ROWS_SG"],
        ],
    ),
    (
        "embedding",
        &[&["W_F32"], &["W_F16"], &["W_Q8"], &["W_Q4"], &["W_Q4M"]],
    ),
    ("im2col", &[&[]]),
    ("copy", &[&[]]),
    ("argmax", &[&[]]),
    ("topk", &[&[], &["NEXT"], &["GATHER"]]),
    ("sample", &[&[]]),
];

/// A fingerprint (FNV-1a, 64 bits) of every kernel source: tuning results cached on disk are
/// keyed by it, so that a changed kernel is measured again instead of reusing stale choices.
pub fn sources_fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, src) in SOURCES {
        for b in name.bytes().chain([0]).chain(src.bytes()).chain([0]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn source(name: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Gpu(format!("no shader file '{name}.wgsl'")))
}

/// Op flags that declare f16 arithmetic: kept only for the f16 variant (without it a kernel
/// asked for one of them is its f32 form).
pub const F16_ONLY_FLAGS: &[&str] = &["GEMM_HALF"];

/// Op flags that need subgroup operations: kept only for a subgroup variant.
pub const SUBGROUP_ONLY_FLAGS: &[&str] = &["ROWS_SG"];

/// Expands `#include` and `#if` lines of `shaders/<name>.wgsl` for the given flags.
pub fn preprocess(name: &str, variant: Variant, flags: &[&str], web: bool) -> Result<String> {
    let mut all: Vec<&str> = flags
        .iter()
        .copied()
        .filter(|f| variant.f16 || !F16_ONLY_FLAGS.contains(f))
        .filter(|f| variant.subgroups || !SUBGROUP_ONLY_FLAGS.contains(f))
        .collect();
    if variant.f16 {
        all.push("F16");
    }
    if variant.subgroups {
        all.push("SUBGROUPS");
    }
    let mut out = String::new();
    if variant.f16 {
        out.push_str("enable f16;\n");
    }
    if variant.subgroups && web {
        // naga (native) rejects this directive; browsers require it.
        out.push_str("enable subgroups;\n");
    }
    expand(name, &all, &mut out, 0)?;
    Ok(out)
}

fn expand(name: &str, flags: &[&str], out: &mut String, depth: usize) -> Result<()> {
    if depth > 4 {
        return Err(Error::Gpu(format!("#include nested too deep at '{name}'")));
    }
    expand_src(name, source(name)?, flags, out, depth)
}

fn expand_src(name: &str, src: &str, flags: &[&str], out: &mut String, depth: usize) -> Result<()> {
    // stack of (this branch active, any enclosing branch inactive)
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |s: &Vec<(bool, bool)>| s.iter().all(|(a, _)| *a);
    for (lineno, line) in src.lines().enumerate() {
        let t = line.trim_start();
        let bad = |what: &str| Error::Gpu(format!("{name}.wgsl:{}: {what}", lineno + 1));
        if let Some(rest) = t.strip_prefix("#if ") {
            let on = rest.split("||").any(|term| {
                let term = term.trim();
                match term.strip_prefix('!') {
                    Some(f) => !flags.contains(&f.trim()),
                    None => flags.contains(&term),
                }
            });
            stack.push((on, false));
        } else if t.starts_with("#else") {
            let top = stack.last_mut().ok_or_else(|| bad("#else without #if"))?;
            top.0 = !top.0;
        } else if t.starts_with("#endif") {
            stack.pop().ok_or_else(|| bad("#endif without #if"))?;
        } else if let Some(inc) = t.strip_prefix("#include ") {
            if active(&stack) {
                expand(inc.trim(), flags, out, depth + 1)?;
            }
        } else if t.starts_with('#') {
            return Err(bad("unknown directive"));
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(Error::Gpu(format!("{name}.wgsl: unterminated #if")));
    }
    Ok(())
}

impl Gpu {
    /// The compute pipeline for `entry` of `shaders/<file>.wgsl`, compiled once per
    /// (file, entry, variant, flags) and cached.
    pub fn pipeline(
        &self,
        file: &'static str,
        entry: &'static str,
        variant: Variant,
        flags: &[&'static str],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (file, entry, variant, flags.to_vec());
        if let Some(p) = self.pipelines.lock().map_err(poisoned)?.get(&key) {
            return Ok(p.clone());
        }
        if (variant.f16 && !self.best_variant.f16)
            || (variant.subgroups && !self.best_variant.subgroups)
        {
            return Err(Error::Gpu(format!(
                "kernel variant '{}' requested, but '{}' does not offer it",
                variant.name(),
                self.info.name
            )));
        }
        let web = cfg!(target_arch = "wasm32");
        let code = preprocess(file, variant, flags, web)?;
        let module = kernel_module(&self.device, file, code);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        self.take_error().map_err(|e| {
            Error::Gpu(format!(
                "compiling {file}.wgsl `{entry}` ({}, {flags:?}): {e}",
                variant.name()
            ))
        })?;
        let p = Arc::new(pipeline);
        self.pipelines
            .lock()
            .map_err(poisoned)?
            .insert(key, p.clone());
        Ok(p)
    }
}

/// A shader module of our own kernels. wgpu by default adds a second counter to every loop
/// (`force_loop_bounding`) so that an endless loop cannot be assumed away by a driver's
/// compiler; that counter runs in every iteration of every inner loop and can keep loops with
/// constant trip counts from being unrolled, and it is more code to compile (the eight GEMM
/// forms compiled in about 25 % less time on lavapipe without it, 11 % less on llvmpipe's
/// GL). Every loop in `shaders/` is a counted `for` over constants or shape parameters, and
/// the kernels are trusted code (README, threat model), so it is off. The bounds checks stay
/// on: a kernel's buffer accesses are clamped as before. In the browser the option does not
/// apply (the browser decides).
pub fn kernel_module(device: &wgpu::Device, label: &str, code: String) -> wgpu::ShaderModule {
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(code.into()),
    };
    let checks = wgpu::ShaderRuntimeChecks {
        force_loop_bounding: false,
        ..wgpu::ShaderRuntimeChecks::checked()
    };
    // SAFETY: the code is ours (preprocessed from shaders/), every loop terminates (see above),
    // and bounds checks are kept.
    unsafe { device.create_shader_module_trusted(desc, checks) }
}

fn poisoned<T>(_: T) -> Error {
    Error::Gpu("pipeline cache lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditionals_select_lines() {
        let src = "a\n#if X\nx\n#else\nnot x\n#endif\n#if !Y\nnot y\n#endif\n\
                   #if Y || X\nx or y\n#endif\n#if Y || !Z\ny or not z\n#endif\nb\n";
        let run = |flags: &[&str]| {
            let mut out = String::new();
            expand_src("t", src, flags, &mut out, 0).unwrap();
            out.lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join("|")
        };
        assert_eq!(run(&[]), "a|not x|not y|y or not z|b");
        assert_eq!(run(&["X"]), "a|x|not y|x or y|y or not z|b");
        assert_eq!(run(&["Y", "Z"]), "a|not x|x or y|y or not z|b");
        assert_eq!(run(&["Z"]), "a|not x|not y|b");
        let mut out = String::new();
        let e = expand_src("t", "#if X\n", &[], &mut out, 0).unwrap_err();
        assert!(e.to_string().contains("unterminated"), "{e}");
    }

    #[test]
    fn no_kernel_binds_more_storage_buffers_than_the_floor_asks_for() {
        let floor = crate::gpu::Requirements::kernels().max_storage_buffers_per_shader_stage;
        let mut most = 0;
        for (file, flag_sets) in FAMILIES {
            for flags in flag_sets.iter() {
                let s = preprocess(file, Variant::PORTABLE, flags, false).unwrap();
                let n = s.matches("var<storage").count() as u32;
                assert!(n <= floor, "{file} {flags:?}: {n} storage buffers");
                most = most.max(n);
            }
        }
        // the GEMV with GLU, a fused norm and x as a storage buffer binds 7
        assert_eq!(most, 7);
    }

    #[test]
    fn every_family_preprocesses_for_every_variant() {
        for (file, flag_sets) in FAMILIES {
            for flags in flag_sets.iter() {
                for f16 in [false, true] {
                    for subgroups in [false, true] {
                        let v = Variant { f16, subgroups };
                        let s = preprocess(file, v, flags, false).unwrap();
                        assert!(!s.contains("#if"), "{file}");
                        assert_eq!(s.contains("enable f16"), f16);
                    }
                }
            }
        }
    }
}
