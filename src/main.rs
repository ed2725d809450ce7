//! `minigpt4`: the command-line front end.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use minigpt4::gpu::{adapter_reports, AdapterReport, GpuOptions};

#[derive(Parser)]
#[command(
    name = "minigpt4",
    version,
    about = "MiniGPT-4 on any GPU through wgpu"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct GpuArgs {
    /// Backend: vulkan, metal, dx12, gl or webgpu [env: MINIGPT4_BACKEND, WGPU_BACKEND]
    #[arg(long)]
    backend: Option<String>,
    /// Adapter index (as `minigpt4 info` lists them) or a name substring [env: MINIGPT4_ADAPTER]
    #[arg(long)]
    adapter: Option<String>,
    /// Use only the portable kernels (no f16, no subgroups) [env: MINIGPT4_PORTABLE=1]
    #[arg(long)]
    portable: bool,
}

impl GpuArgs {
    fn options(&self) -> minigpt4::Result<GpuOptions> {
        GpuOptions {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
            max_binding: None,
            portable: self.portable,
        }
        .merged_with_env()
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// List every GPU adapter, what it offers, and which one would be used
    Info {
        #[command(flatten)]
        gpu: GpuArgs,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn report_json(r: &AdapterReport, chosen: bool) -> serde_json::Value {
    let l = &r.limits;
    serde_json::json!({
        "index": r.index,
        "chosen": chosen,
        "name": r.info.name,
        "backend": format!("{:?}", r.info.backend),
        "device_type": format!("{:?}", r.info.device_type),
        "driver": r.info.driver,
        "driver_info": r.info.driver_info,
        "shader_f16": r.shader_f16(),
        "subgroups": r.subgroups(),
        "subgroup_min_size": r.info.subgroup_min_size,
        "subgroup_max_size": r.info.subgroup_max_size,
        "timestamps": r.timestamps(),
        "limits": {
            "max_buffer_size": l.max_buffer_size,
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
        },
    })
}

fn info(gpu: &GpuArgs, json: bool) -> anyhow::Result<()> {
    let opts = gpu.options()?;
    let (reports, chosen) = pollster::block_on(adapter_reports(&opts))?;
    let chosen_idx = chosen.as_ref().ok().copied();
    if json {
        let items: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| report_json(r, Some(r.index) == chosen_idx))
            .collect();
        let doc = serde_json::json!({
            "adapters": items,
            "chosen": chosen_idx,
            "error": chosen.as_ref().err().map(|e| e.to_string()),
        });
        println!("{doc:#}");
    } else {
        for r in &reports {
            let l = &r.limits;
            let mark = if Some(r.index) == chosen_idx {
                "  <- would be used"
            } else {
                ""
            };
            println!(
                "[{}] {} ({:?}, {:?}){}",
                r.index, r.info.name, r.info.backend, r.info.device_type, mark
            );
            println!("    driver: {} {}", r.info.driver, r.info.driver_info);
            println!(
                "    shader-f16: {}  subgroups: {}{}  timestamps: {}",
                if r.shader_f16() { "yes" } else { "no" },
                if r.subgroups() { "yes" } else { "no" },
                if r.subgroups() {
                    format!(
                        " (size {}..{})",
                        r.info.subgroup_min_size, r.info.subgroup_max_size
                    )
                } else {
                    String::new()
                },
                if r.timestamps() { "yes" } else { "no" },
            );
            println!(
                "    max buffer {}, max storage binding {}, storage buffers/stage {}, invocations/workgroup {}, workgroup memory {} KiB",
                mib(l.max_buffer_size),
                mib(l.max_storage_buffer_binding_size),
                l.max_storage_buffers_per_shader_stage,
                l.max_compute_invocations_per_workgroup,
                l.max_compute_workgroup_storage_size >> 10
            );
        }
    }
    chosen?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Info { gpu, json } => info(gpu, *json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
