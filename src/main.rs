//! `minigpt4`: the command-line front end.

use std::process::ExitCode;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use minigpt4::chat::{generate, Conversation, Sampling, Stop};
use minigpt4::gpu::{adapter_reports, AdapterReport, Gpu, GpuOptions};
use minigpt4::model::llama::{Llama, LlamaFiles, QuantPolicy};
use minigpt4::model::minigpt4::MiniGpt4;
use minigpt4::quant::DType;

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

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Greedy decoding (argmax); the other sampling flags are ignored except --repetition-penalty
    #[arg(long)]
    greedy: bool,
    /// Softmax temperature
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep the K most likely tokens (0 = off)
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off)
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalise tokens already generated (1 = off; HF formula)
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed (runs with the same seed and settings repeat exactly)
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            greedy: self.greedy,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Chat about an image with MiniGPT-4
    Chat {
        /// A model package directory (made by `minigpt4 convert` or `download`); without it, the
        /// cached package of --variant, downloaded first if needed
        #[arg(long)]
        model: Option<PathBuf>,
        /// The variant to use (or download) when no --model is given
        #[arg(long, default_value = "vicuna0-7b")]
        variant: String,
        /// Download without asking when the cached package is missing
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        image: PathBuf,
        /// One question (streamed answer); without it, an interactive chat on stdin
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 300)]
        max_new_tokens: usize,
        /// Greedy decoding instead of the reference demo's sampling
        #[arg(long)]
        greedy: bool,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 1.05)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Measure copy bandwidth, GEMV / GEMM speed and end-to-end speed on this adapter
    Bench {
        /// Small shapes and few runs (proves the command works; numbers mean little)
        #[arg(long)]
        tiny: bool,
        /// Timed runs per measurement (median, min, max are reported)
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// End to end on random weights at the real dimensions: vicuna0-7b or vicuna0-13b (image
        /// encode, prefill, decode), or vit-g (the image encode alone: EVA ViT-g and Q-Former)
        #[arg(long)]
        synthetic: Option<String>,
        /// Layers of the synthetic LLM and ViT (default: all)
        #[arg(long)]
        layers: Option<usize>,
        /// GPU format of the synthetic LLM's linear layers
        #[arg(long, default_value = "q4")]
        quant: String,
        /// Print the JSON report
        #[arg(long)]
        json: bool,
        /// Only these parts, comma-separated: copy, gemv, attention, sampling, gemm, e2e, decode (default:
        /// all but decode, the synthetic LLM's decode alone, as the page's benchDecode measures it)
        #[arg(long, value_delimiter = ',')]
        parts: Vec<String>,
        /// Also measure decode on this LLaMA model (GGUF or HF directory) against the GEMV
        /// prediction for its bytes per token
        #[arg(long)]
        llm: Option<PathBuf>,
        /// End to end on a model package, as `chat` runs it: image encode, prefill of a first
        /// turn with the image, decode, time to first token, GPU memory
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions)
    Serve {
        /// A model package directory
        #[arg(long)]
        model: PathBuf,
        /// Address to bind (loopback by default; 0.0.0.0 exposes the server to the network)
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0 = any free port; the address is printed)
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Require `Authorization: Bearer KEY`
        #[arg(long, env = "MINIGPT4_API_KEY")]
        api_key: Option<String>,
        /// Requests waiting or running at most; more get 429
        #[arg(long, default_value_t = 16)]
        max_queue: usize,
        /// Allow browser requests from this origin (CORS)
        #[arg(long)]
        cors: Option<String>,
        /// Fetch http(s) image URLs (20 MiB, 20 s limits); otherwise only data: URLs
        #[arg(long)]
        allow_remote_images: bool,
        /// Context size (KV cache positions)
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Download the original MiniGPT-4 files and convert them into a cached model package
    Download {
        /// vicuna0-7b or vicuna0-13b (the others must be fetched by hand, then converted)
        #[arg(long, default_value = "vicuna0-7b")]
        variant: String,
        /// Where packages and downloads go [default: the platform cache dir, or $MINIGPT4_HOME]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A download manifest (JSON) instead of the built-in public URLs
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Do not ask before downloading
        #[arg(long)]
        yes: bool,
        /// Keep the original files after the conversion
        #[arg(long)]
        keep_downloads: bool,
        #[arg(long, default_value = "q4")]
        llm_quant: String,
        #[arg(long, default_value = "f16")]
        vision_quant: String,
    },
    /// Convert the original MiniGPT-4 checkpoints into a model package
    Convert {
        /// vicuna0-7b, vicuna0-13b, llama2-7b or minigptv2
        #[arg(long)]
        variant: String,
        /// EVA ViT-g weights (eva_vit_g.pth, or any .pth/.safetensors with MiniGPT-4 names)
        #[arg(long)]
        vit: PathBuf,
        /// BLIP-2 Q-Former checkpoint (blip2_pretrained_flant5xxl.pth; Vicuna variants)
        #[arg(long)]
        qformer: Option<PathBuf>,
        /// MiniGPT-4 checkpoint (pretrained_minigpt4*.pth: llama_proj, LoRA for MiniGPT-v2)
        #[arg(long)]
        minigpt4: Option<PathBuf>,
        /// The LLM: HF directory (safetensors or pytorch_model*.bin, tokenizer) or GGUF file
        #[arg(long)]
        llm: PathBuf,
        /// JSON with "vit" and/or "qformer" objects overriding the standard dimensions
        #[arg(long)]
        vision_config: Option<PathBuf>,
        /// The package directory to create
        #[arg(long)]
        out: PathBuf,
        /// GPU format of the LLM's linear layers: q4, q8, f16 or f32
        #[arg(long, default_value = "q4")]
        llm_quant: String,
        /// GPU format of the vision linear layers: f16, q8, q4 or f32
        #[arg(long, default_value = "f16")]
        vision_quant: String,
    },
    /// Generate text with a LLaMA model (GGUF file or Hugging Face model directory)
    Generate {
        /// A .gguf file or an HF directory (config.json + safetensors or pytorch_model*.bin)
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// GPU format of the linear layers
        #[arg(long, default_value = "q4")]
        quant: String,
        /// Do not add the BOS token even if the tokenizer's config asks for it
        #[arg(long)]
        no_bos: bool,
        /// Context size (KV cache capacity; default: the model's, at most 4096)
        #[arg(long)]
        ctx: Option<usize>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Teacher-forced top-1 agreement of quantised weights with f32 on a text
    Agreement {
        #[arg(long)]
        model: PathBuf,
        /// The text to run (its first --positions + 1 tokens are used)
        #[arg(long)]
        text_file: PathBuf,
        #[arg(long, default_value_t = 256)]
        positions: usize,
        /// Formats to compare with f32
        #[arg(long, default_value = "f16,q8,q4")]
        quants: String,
        #[command(flatten)]
        gpu: GpuArgs,
    },
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

fn open_gpu(args: &GpuArgs) -> anyhow::Result<Gpu> {
    Ok(pollster::block_on(Gpu::new(&args.options()?))?)
}

/// Opens the adapter and picks its kernel sizes (cached auto-tune, see `gpu::tune`).
fn open_tuned_gpu(args: &GpuArgs) -> anyhow::Result<Gpu> {
    let gpu = open_gpu(args)?;
    let (lanes, from) = pollster::block_on(minigpt4::gpu::tune::autotune(&gpu))?;
    log::debug!(
        "block GEMV: {lanes} lanes per column (from {from}); GEMM form {} ({} for quantised \
         weights){}",
        gpu.gemm_form(),
        gpu.gemm_form_quant(),
        if gpu.gemm_by_shape() {
            ", and a form per GEMM shape (measured when a model first runs it)"
        } else {
            ""
        }
    );
    Ok(gpu)
}

#[allow(clippy::too_many_arguments)]
fn run_generate(
    model: &Path,
    prompt: &str,
    max_new_tokens: usize,
    sampling: &SamplingArgs,
    quant: &str,
    no_bos: bool,
    ctx: Option<usize>,
    format: Format,
    gpu_args: &GpuArgs,
) -> anyhow::Result<()> {
    let quant = DType::parse(quant)?;
    let sampling = sampling.sampling();
    sampling.validate()?;
    let (cfg, files) = LlamaFiles::open(model)?;
    let tok = files.tokenizer(&cfg)?;
    let add_bos = tok.add_bos_default() && !no_bos;
    let prompt_ids = tok.encode(prompt, add_bos)?;
    let ctx = ctx.unwrap_or(cfg.max_pos.min(4096));
    if prompt_ids.len() + max_new_tokens > ctx.min(cfg.max_pos) {
        anyhow::bail!(
            "prompt ({} tokens) + --max-new-tokens ({max_new_tokens}) = {} exceeds the context of {} tokens",
            prompt_ids.len(),
            prompt_ids.len() + max_new_tokens,
            ctx.min(cfg.max_pos)
        );
    }
    let gpu = open_tuned_gpu(gpu_args)?;
    let mut llm = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(quant), ctx)
        .with_context(|| format!("loading {}", model.display()))?;
    let mut eos = cfg.eos.clone();
    eos.extend(tok.eos());
    let stop = Stop {
        max_new_tokens,
        eos,
        sequences: vec![],
    };
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = 0;
    let mut out = std::io::stdout();
    let (generated, _finish, timings) = pollster::block_on(generate(
        &gpu,
        &mut llm,
        &prompt_ids,
        &sampling,
        &stop,
        tok.vocab_size().min(cfg.vocab),
        |id| {
            ids.push(id);
            if format == Format::Text && !stop.eos.contains(&id) {
                if let Ok((piece, n)) = tok.decode_incremental(&ids, emitted) {
                    emitted = n;
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
            }
            true
        },
    ))?;
    let text = tok.decode(&generated, true)?;
    match format {
        Format::Text => {
            println!();
            log::info!("{}", timings.summary());
        }
        Format::Json => println!(
            "{}",
            serde_json::json!({ "prompt_token_ids": prompt_ids, "token_ids": generated, "text": text, "timings": timings })
        ),
    }
    Ok(())
}

fn run_agreement(
    model: &Path,
    text_file: &Path,
    positions: usize,
    quants: &str,
    gpu_args: &GpuArgs,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(text_file)
        .with_context(|| format!("reading {}", text_file.display()))?;
    let (cfg, files) = LlamaFiles::open(model)?;
    let tok = files.tokenizer(&cfg)?;
    let mut ids = tok.encode(&text, tok.add_bos_default())?;
    if ids.len() < positions + 1 {
        anyhow::bail!(
            "{} has {} tokens; --positions {positions} needs at least {}",
            text_file.display(),
            ids.len(),
            positions + 1
        );
    }
    ids.truncate(positions + 1);
    let input = &ids[..positions];
    let gpu = open_tuned_gpu(gpu_args)?;
    let ctx = positions.min(cfg.max_pos);
    let reference = {
        let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(DType::F32), ctx)?;
        pollster::block_on(m.top1_predictions(&gpu, input, 128))?
    };
    let mut results = serde_json::Map::new();
    for q in quants.split(',').map(str::trim).filter(|q| !q.is_empty()) {
        let dt = DType::parse(q)?;
        let mut m = Llama::load(&gpu, &cfg, &files, QuantPolicy::for_linear(dt), ctx)?;
        let preds = pollster::block_on(m.top1_predictions(&gpu, input, 128))?;
        let same = preds.iter().zip(&reference).filter(|(a, b)| a == b).count();
        results.insert(
            dt.name().into(),
            serde_json::json!(same as f64 / positions as f64),
        );
    }
    let text_top1 = reference
        .iter()
        .zip(&ids[1..])
        .filter(|(a, b)| a == b)
        .count() as f64
        / positions as f64;
    println!(
        "{:#}",
        serde_json::json!({ "model": model.display().to_string(), "positions": positions, "agreement_with_f32": results, "f32_next_token_accuracy": text_top1 })
    );
    Ok(())
}

struct ChatArgs<'a> {
    model: Option<&'a Path>,
    variant: &'a str,
    yes: bool,
    image: &'a Path,
    prompt: Option<&'a str>,
    max_new_tokens: usize,
    sampling: Sampling,
    format: Format,
    gpu: &'a GpuArgs,
}

fn load_image(model: &MiniGpt4, path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(minigpt4::image::preprocess(
        &bytes,
        &path.display().to_string(),
        model.vit.cfg.image_size,
    )?)
}

/// Set while an answer is being generated: Ctrl-C then stops that answer, not the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            INTERRUPTED.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
}

fn run_chat(a: ChatArgs) -> anyhow::Result<()> {
    install_ctrl_c();
    a.sampling.validate()?;
    let gpu = open_tuned_gpu(a.gpu)?;
    let path = match a.model {
        Some(p) => p.to_path_buf(),
        None => cached_package(a.variant, a.yes)?,
    };
    let mut model = minigpt4::package::load(&gpu, &path, 2048)?;
    let variant = model.variant;
    let label = model.label.clone();
    let mut image = pollster::block_on(model.encode_image(&gpu, &load_image(&model, a.image)?))?;
    let mut conv = Conversation::new(variant);
    conv.add_image();
    let ask = |model: &mut MiniGpt4,
               conv: &mut Conversation,
               image: &minigpt4::gpu::Tensor,
               q: &str|
     -> anyhow::Result<()> {
        conv.ask(q);
        let mut stream = minigpt4::chat::AnswerStream::new(model.tok.clone(), &[]);
        let mut out = std::io::stdout();
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let answer = pollster::block_on(model.answer(
            &gpu,
            conv,
            image,
            &a.sampling,
            a.max_new_tokens,
            |id| {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    return false;
                }
                let piece = stream.push(id);
                if a.format == Format::Text && !piece.is_empty() {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                true
            },
        ));
        GENERATING.store(false, Ordering::SeqCst);
        let answer = answer?;
        if answer.finish == minigpt4::chat::Finish::Cancelled {
            eprintln!("[stopped]");
        }
        match a.format {
            Format::Text => {
                println!("{}", stream.finish());
                log::info!("{}", answer.timings.summary());
            }
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "variant": label,
                    "prompt_token_ids": answer.prompt_token_ids,
                    "image_tokens": answer.image_tokens,
                    "token_ids": answer.token_ids,
                    "text": answer.text,
                    "timings": answer.timings,
                })
            ),
        }
        conv.add_answer(&answer.text);
        Ok(())
    };
    if let Some(q) = a.prompt {
        return ask(&mut model, &mut conv, &image, q);
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let q = line.trim();
        if q.is_empty() {
            continue;
        } else if q == "/quit" {
            return Ok(());
        } else if q == "/reset" {
            conv = Conversation::new(variant);
            conv.add_image();
        } else if let Some(p) = q.strip_prefix("/image ") {
            match load_image(&model, Path::new(p.trim())) {
                Ok(px) => {
                    image = pollster::block_on(model.encode_image(&gpu, &px))?;
                    conv = Conversation::new(variant);
                    conv.add_image();
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
        } else if let Err(e) = ask(&mut model, &mut conv, &image, q) {
            eprintln!("error: {e:#}");
        }
    }
}

/// Asks a yes/no question on the terminal (no terminal: no).
fn ask_yes(question: &str) -> bool {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        eprintln!("{question}\n(not a terminal: pass --yes to download)");
        return false;
    }
    eprint!("{question}\nDownload now? [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).is_ok()
        && matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[allow(clippy::too_many_arguments)]
fn run_download(
    variant: &str,
    dir: Option<&Path>,
    manifest: Option<&Path>,
    yes: bool,
    keep_downloads: bool,
    llm_quant: &str,
    vision_quant: &str,
) -> anyhow::Result<PathBuf> {
    use minigpt4::download::{default_dir, download, DownloadArgs, Manifest};
    let manifest = match manifest {
        Some(p) => Manifest::from_json_file(p)?,
        None => Manifest::builtin(variant)?,
    };
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => default_dir()?,
    };
    let args = DownloadArgs {
        manifest,
        dir,
        yes,
        keep_downloads,
        llm_quant: DType::parse(llm_quant)?,
        vision_quant: DType::parse(vision_quant)?,
    };
    Ok(download(&args, ask_yes)?)
}

/// The cached package of `variant`, downloaded (after asking, unless `yes`) when missing.
fn cached_package(variant: &str, yes: bool) -> anyhow::Result<PathBuf> {
    let dir = minigpt4::download::default_dir()?;
    let p = minigpt4::download::package_dir(&dir, variant);
    if p.join(minigpt4::package::CONFIG_FILE).is_file() {
        return Ok(p);
    }
    eprintln!(
        "no --model given and no cached {variant} package in {}",
        dir.display()
    );
    run_download(variant, Some(&dir), None, yes, false, "q4", "f16")
}

/// The process's peak resident memory in bytes (Linux: `VmHWM`).
fn peak_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[allow(clippy::too_many_arguments)]
fn run_convert(
    variant: &str,
    vit: &Path,
    qformer: Option<&Path>,
    minigpt4: Option<&Path>,
    llm: &Path,
    vision_config: Option<&Path>,
    out: &Path,
    llm_quant: &str,
    vision_quant: &str,
) -> anyhow::Result<()> {
    let mut vision = vec![vit.to_path_buf()];
    vision.extend(qformer.map(Path::to_path_buf));
    vision.extend(minigpt4.map(Path::to_path_buf));
    let args = minigpt4::convert::ConvertArgs {
        variant: variant.into(),
        vision,
        llm: llm.into(),
        vision_config: vision_config.map(Path::to_path_buf),
        out: out.into(),
        llm_quant: DType::parse(llm_quant)?,
        vision_quant: DType::parse(vision_quant)?,
    };
    let start = std::time::Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let path = minigpt4::convert::convert(&args, |i, n, name| {
        if tty && n > 0 {
            eprint!("\r\x1b[2K[{i}/{n}] {name}");
        }
    })?;
    if tty {
        eprintln!();
    }
    eprintln!(
        "wrote {} in {:.1} s{}",
        path.display(),
        start.elapsed().as_secs_f64(),
        peak_memory()
            .map(|b| format!(", peak memory {} MiB", b >> 20))
            .unwrap_or_default()
    );
    Ok(())
}

/// The library's log messages on stderr: warnings always, notes (`info`: the one-time kernel
/// tuning, which takes seconds) unless `MINIGPT4_LOG` says otherwise (`off`, `error`, `warn`,
/// `info`, `debug`).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        match r.level() {
            log::Level::Info => eprintln!("minigpt4: {}", r.args()),
            level => eprintln!("minigpt4: {}: {}", level.as_str().to_lowercase(), r.args()),
        }
    }

    fn flush(&self) {}
}

static LOG: StderrLog = StderrLog;

fn init_log() {
    let var = std::env::var("MINIGPT4_LOG").unwrap_or_default();
    let level = match var.trim() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "" | "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        other => {
            eprintln!(
                "minigpt4: warning: MINIGPT4_LOG: expected off, error, warn, info or debug, \
                 found '{other}'; using info"
            );
            log::LevelFilter::Info
        }
    };
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    init_log();
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Info { gpu, json } => info(gpu, *json),
        Cmd::Chat {
            model,
            variant,
            yes,
            image,
            prompt,
            max_new_tokens,
            greedy,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            format,
            gpu,
        } => run_chat(ChatArgs {
            model: model.as_deref(),
            variant,
            yes: *yes,
            image,
            prompt: prompt.as_deref(),
            max_new_tokens: *max_new_tokens,
            sampling: Sampling {
                greedy: *greedy,
                temperature: *temperature,
                top_k: *top_k,
                top_p: *top_p,
                repetition_penalty: *repetition_penalty,
                seed: *seed,
            },
            format: *format,
            gpu,
        }),
        Cmd::Bench {
            tiny,
            runs,
            synthetic,
            layers,
            quant,
            json,
            parts,
            llm,
            model,
            gpu,
        } => (|| -> anyhow::Result<()> {
            let g = open_gpu(gpu)?;
            let r = minigpt4::bench::run(
                &g,
                &minigpt4::bench::BenchArgs {
                    tiny: *tiny,
                    runs: *runs,
                    synthetic: synthetic.clone(),
                    layers: *layers,
                    quant: DType::parse(quant)?,
                    parts: parts.clone(),
                    llm: llm.clone(),
                    model: model.clone(),
                },
            )?;
            if *json {
                println!("{r:#}");
            } else {
                print!("{}", minigpt4::bench::human(&r));
            }
            Ok(())
        })(),
        Cmd::Serve {
            model,
            host,
            port,
            api_key,
            max_queue,
            cors,
            allow_remote_images,
            ctx,
            gpu,
        } => open_tuned_gpu(gpu).and_then(|g| {
            minigpt4::server::serve(
                minigpt4::server::ServeArgs {
                    model: model.clone(),
                    host: host.clone(),
                    port: *port,
                    api_key: api_key.clone(),
                    max_queue: *max_queue,
                    cors: cors.clone(),
                    allow_remote_images: *allow_remote_images,
                    ctx: *ctx,
                },
                g,
                |addr| {
                    eprintln!("listening on http://{addr}");
                },
            )
        }),
        Cmd::Download {
            variant,
            dir,
            manifest,
            yes,
            keep_downloads,
            llm_quant,
            vision_quant,
        } => run_download(
            variant,
            dir.as_deref(),
            manifest.as_deref(),
            *yes,
            *keep_downloads,
            llm_quant,
            vision_quant,
        )
        .map(|p| println!("{}", p.display())),
        Cmd::Convert {
            variant,
            vit,
            qformer,
            minigpt4,
            llm,
            vision_config,
            out,
            llm_quant,
            vision_quant,
        } => run_convert(
            variant,
            vit,
            qformer.as_deref(),
            minigpt4.as_deref(),
            llm,
            vision_config.as_deref(),
            out,
            llm_quant,
            vision_quant,
        ),
        Cmd::Generate {
            model,
            prompt,
            max_new_tokens,
            sampling,
            quant,
            no_bos,
            ctx,
            format,
            gpu,
        } => run_generate(
            model,
            prompt,
            *max_new_tokens,
            sampling,
            quant,
            *no_bos,
            *ctx,
            *format,
            gpu,
        ),
        Cmd::Agreement {
            model,
            text_file,
            positions,
            quants,
            gpu,
        } => run_agreement(model, text_file, *positions, quants, gpu),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
