//! Every shader family, in every flag set and kernel variant a program can request, is parsed
//! and validated by naga and translated to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL
//! (OpenGL ES 3.1, portable variants only: wgpu's GL backend offers neither f16 nor subgroups),
//! so a Metal or DX12 break shows up on a Linux machine without those drivers.

use minigpt4::gpu::shader::{preprocess, FAMILIES};
use minigpt4::gpu::Variant;
use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn variants() -> [Variant; 4] {
    [
        Variant::PORTABLE,
        Variant {
            f16: true,
            subgroups: false,
        },
        Variant {
            f16: false,
            subgroups: true,
        },
        Variant {
            f16: true,
            subgroups: true,
        },
    ]
}

/// `file.wgsl` preprocessed for `flags` and `v`, parsed and validated by naga with the
/// capabilities the variant needs (panics naming the shader and the error).
fn parse_and_validate(
    file: &str,
    v: Variant,
    flags: &[&str],
) -> (naga::Module, naga::valid::ModuleInfo) {
    let what = format!("{file}.wgsl {flags:?} {}", v.name());
    let src = preprocess(file, v, flags, false).unwrap();
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    // unpack2x16float: wgpu grants this wherever the downlevel flag SHADER_F16_IN_F32 holds (all
    // Vulkan, Metal, DX12, GLES 3.1 and WebGPU adapters)
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if v.f16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if v.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    let info = Validator::new(ValidationFlags::all(), caps)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
    (module, info)
}

#[test]
fn every_shader_variant_translates_to_spirv_msl_hlsl_and_glsl() {
    let mut count = 0;
    for (file, flag_sets) in FAMILIES {
        for flags in flag_sets.iter() {
            for v in variants() {
                let what = format!("{file}.wgsl {flags:?} {}", v.name());
                let (module, info) = parse_and_validate(file, v, flags);

                let spv_opts = spv::Options {
                    lang_version: (1, 3),
                    ..Default::default()
                };
                spv::write_vec(&module, &info, &spv_opts, None)
                    .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));

                let msl_opts = msl::Options {
                    lang_version: (2, 4),
                    fake_missing_bindings: true,
                    ..Default::default()
                };
                msl::write_string(&module, &info, &msl_opts, &msl::PipelineOptions::default())
                    .unwrap_or_else(|e| panic!("{what}: MSL: {e}"));

                let hlsl_opts = hlsl::Options {
                    shader_model: hlsl::ShaderModel::V6_2,
                    fake_missing_bindings: true,
                    ..Default::default()
                };
                let mut out = String::new();
                hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl::PipelineOptions::default())
                    .write(&module, &info, None)
                    .unwrap_or_else(|e| panic!("{what}: HLSL: {e}"));

                if v == Variant::PORTABLE {
                    for ep in module.entry_points.iter() {
                        let opts = glsl::Options {
                            version: glsl::Version::Embedded {
                                version: 310,
                                is_webgl: false,
                            },
                            ..Default::default()
                        };
                        let pipe = glsl::PipelineOptions {
                            shader_stage: naga::ShaderStage::Compute,
                            entry_point: ep.name.clone(),
                            multiview: None,
                        };
                        let mut out = String::new();
                        glsl::Writer::new(
                            &mut out,
                            &module,
                            &info,
                            &opts,
                            &pipe,
                            naga::proc::BoundsCheckPolicies::default(),
                        )
                        .and_then(|mut w| w.write().map(|_| ()))
                        .unwrap_or_else(|e| panic!("{what}: GLSL {}: {e}", ep.name));
                    }
                }
                count += 1;
            }
        }
    }
    assert_eq!(
        count,
        FAMILIES.iter().map(|(_, f)| f.len()).sum::<usize>() * 4
    );
}

/// Workgroup memory each entry point uses (the workgroup variables it touches), in every flag
/// set and variant, against the floor the adapter check asks for (WebGPU's default, 16 KiB):
/// a kernel over it would fail to compile on a device that only offers the floor.
#[test]
fn no_kernel_uses_more_workgroup_memory_than_the_floor_asks_for() {
    let floor = minigpt4::gpu::Requirements::kernels().max_compute_workgroup_storage_size as u64;
    let mut most = (0, String::new());
    for (file, flag_sets) in FAMILIES {
        for flags in flag_sets.iter() {
            for v in variants() {
                let (module, info) = parse_and_validate(file, v, flags);
                for (i, ep) in module.entry_points.iter().enumerate() {
                    let uses = info.get_entry_point(i);
                    let bytes: u64 = module
                        .global_variables
                        .iter()
                        .filter(|(h, g)| {
                            g.space == naga::AddressSpace::WorkGroup && !uses[*h].is_empty()
                        })
                        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()) as u64)
                        .sum();
                    let what = format!("{file}.wgsl {} {flags:?} {}", ep.name, v.name());
                    assert!(bytes <= floor, "{what}: {bytes} bytes of workgroup memory");
                    if bytes > most.0 {
                        most = (bytes, what);
                    }
                }
            }
        }
    }
    // the 128×128 f32 GEMM fills it exactly (two 16-deep tiles of 128 vec4s of f32)
    assert_eq!(most.0, floor, "{}", most.1);
    assert!(
        most.1.contains("gemm") && most.1.contains("GEMM_TALL"),
        "{}",
        most.1
    );
}
