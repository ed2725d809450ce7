//! `minigpt4 download`: fetches the original MiniGPT-4 files (spec §8.1) with progress, resume
//! and checksums, then converts them into a model package.
//!
//! What to fetch is a [`Manifest`]: the built-in ones name the public URLs; `--manifest FILE`
//! takes the same JSON (tests point one at a server on 127.0.0.1). Each file is downloaded to
//! `NAME.part`, resumed with an HTTP `Range` request after an interruption (also across runs),
//! checked against its size and SHA-256 when known, and only then renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::quant::DType;

/// One file to fetch.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub url: String,
    /// Where it goes, relative to the download directory.
    pub path: String,
    /// `vit`, `qformer` or `minigpt4` for the vision-side checkpoints (in that order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A 404 is not an error (e.g. `generation_config.json`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// An HF `*.index.json`: its `weight_map` shards are fetched from the same directory URL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shards: bool,
}

/// Everything a variant needs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub variant: String,
    pub files: Vec<FileSpec>,
    /// The LLM's HF directory, relative to the download directory.
    pub llm_dir: String,
    /// Overrides of the standard vision dimensions (`{"vit": …, "qformer": …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_config: Option<serde_json::Value>,
}

const GCS: &str = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2";
const HF: &str = "https://huggingface.co";

fn file(url: String, path: &str, role: Option<&str>) -> FileSpec {
    FileSpec {
        url,
        path: path.into(),
        role: role.map(Into::into),
        size: None,
        sha256: None,
        optional: false,
        shards: false,
    }
}

fn hf_llm(repo: &str, dir: &str) -> Vec<FileSpec> {
    let u = |f: &str| format!("{HF}/{repo}/resolve/main/{f}");
    let mut v = vec![
        file(u("config.json"), &format!("{dir}/config.json"), None),
        file(
            u("tokenizer.model"),
            &format!("{dir}/tokenizer.model"),
            None,
        ),
    ];
    let mut g = file(
        u("generation_config.json"),
        &format!("{dir}/generation_config.json"),
        None,
    );
    g.optional = true;
    v.push(g);
    let mut ix = file(
        u("pytorch_model.bin.index.json"),
        &format!("{dir}/pytorch_model.bin.index.json"),
        None,
    );
    ix.shards = true;
    v.push(ix);
    v
}

impl Manifest {
    /// The public sources of a variant (spec §8.1).
    pub fn builtin(variant: &str) -> Result<Self> {
        let vision = |minigpt4: FileSpec| {
            vec![
                file(format!("{GCS}/eva_vit_g.pth"), "eva_vit_g.pth", Some("vit")),
                file(
                    format!("{GCS}/blip2_pretrained_flant5xxl.pth"),
                    "blip2_pretrained_flant5xxl.pth",
                    Some("qformer"),
                ),
                minigpt4,
            ]
        };
        match variant {
            "vicuna0-7b" => {
                let mut files = vision(file(
                    format!("{HF}/spaces/Vision-CAIR/minigpt4/resolve/main/prerained_minigpt4_7b.pth"),
                    "prerained_minigpt4_7b.pth",
                    Some("minigpt4"),
                ));
                files.extend(hf_llm("Vision-CAIR/vicuna-7b", "vicuna-7b"));
                Ok(Manifest {
                    variant: variant.into(),
                    files,
                    llm_dir: "vicuna-7b".into(),
                    vision_config: None,
                })
            }
            "vicuna0-13b" => {
                let mut ckpt = file(
                    format!("{HF}/Vision-CAIR/MiniGPT-4/resolve/main/pretrained_minigpt4.pth"),
                    "pretrained_minigpt4.pth",
                    Some("minigpt4"),
                );
                ckpt.size = Some(47_369_169);
                ckpt.sha256 =
                    Some("1e7b8a3c21f146654c21a1a29a577dab2c3bd1aa3b1bc902f39e86954357a811".into());
                let mut files = vision(ckpt);
                files.extend(hf_llm("Vision-CAIR/vicuna", "vicuna-13b"));
                Ok(Manifest {
                    variant: variant.into(),
                    files,
                    llm_dir: "vicuna-13b".into(),
                    vision_config: None,
                })
            }
            "llama2-7b" | "minigptv2" => Err(Error::InvalidOption {
                name: "variant".into(),
                msg: format!(
                    "{variant}: its MiniGPT-4 checkpoint is published only on Google Drive (see the MiniGPT-4 README) and Llama-2-7b-chat needs an accepted licence on Hugging Face, so it cannot be fetched automatically; download them by hand and run `minigpt4 convert --variant {variant} --vit eva_vit_g.pth --minigpt4 CHECKPOINT.pth --llm Llama-2-7b-chat-hf/ --out PKG`"
                ),
            }),
            v => Err(Error::InvalidOption {
                name: "variant".into(),
                msg: format!("expected vicuna0-7b or vicuna0-13b, found '{v}'"),
            }),
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(&shown, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::format(&shown, format!("not a download manifest: {e}")))?;
        for f in &m.files {
            if f.path.starts_with('/') || f.path.split(['/', '\\']).any(|c| c == "..") {
                return Err(Error::format(
                    &shown,
                    format!(
                        "`{}` is not a relative path inside the download directory",
                        f.path
                    ),
                ));
            }
        }
        Ok(m)
    }
}

/// The platform's cache directory for packages and downloads: `$MINIGPT4_HOME`, else
/// `$XDG_CACHE_HOME/minigpt4-wgpu` or `~/.cache/minigpt4-wgpu` (Linux),
/// `~/Library/Caches/minigpt4-wgpu` (macOS), `%LOCALAPPDATA%\minigpt4-wgpu` (Windows).
pub fn default_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("MINIGPT4_HOME") {
        return Ok(d);
    }
    let base = if cfg!(windows) {
        var("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        var("HOME").map(|h| h.join("Library/Caches"))
    } else {
        var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))
    };
    base.map(|b| b.join("minigpt4-wgpu"))
        .ok_or_else(|| Error::InvalidOption {
            name: "--dir".into(),
            msg: "no cache directory (set HOME, MINIGPT4_HOME or pass --dir)".into(),
        })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .user_agent(concat!("minigpt4-wgpu/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, url: &str) -> ureq::RequestBuilder<B> {
    match std::env::var("HF_TOKEN") {
        Ok(t) if !t.is_empty() && url.starts_with("https://huggingface.co/") => {
            req.header("Authorization", format!("Bearer {t}"))
        }
        _ => req,
    }
}

fn http_err(url: &str, what: impl std::fmt::Display) -> Error {
    Error::Network {
        url: url.into(),
        msg: what.to_string(),
    }
}

/// The size the server reports for `url` (HEAD), if any.
pub fn remote_size(url: &str) -> Result<Option<u64>> {
    let r = with_auth(agent().head(url), url)
        .call()
        .map_err(|e| http_err(url, e))?;
    if !r.status().is_success() {
        return Ok(None);
    }
    Ok(r.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok()))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path.display(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

fn human(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

struct Progress {
    name: String,
    total: Option<u64>,
    start: Instant,
    start_bytes: u64,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn show(&mut self, done: u64, force: bool) {
        if !self.tty || (!force && self.last.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = (done - self.start_bytes) as f64 / secs;
        let eta = match self.total {
            Some(t) if rate > 0.0 && t > done => {
                let s = ((t - done) as f64 / rate) as u64;
                format!("  ETA {}m{:02}s", s / 60, s % 60)
            }
            _ => String::new(),
        };
        let of = self
            .total
            .map(|t| format!(" / {}", human(t as f64)))
            .unwrap_or_default();
        eprint!(
            "\r\x1b[2K{}  {}{of}  {}/s{eta}",
            self.name,
            human(done as f64),
            human(rate)
        );
        let _ = std::io::stderr().flush();
    }
}

/// Outcome of one file.
#[derive(Debug, PartialEq)]
pub enum Fetched {
    Downloaded,
    AlreadyThere,
    /// An optional file the server does not have.
    Absent,
}

/// Downloads `spec` into `dir`, resuming a `.part` file, retrying interrupted transfers up to
/// `retries` times, verifying size and SHA-256 when known.
pub fn fetch(spec: &FileSpec, dir: &Path, retries: usize) -> Result<Fetched> {
    let dest = dir.join(&spec.path);
    let part = dest.with_file_name(format!(
        "{}.part",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    if dest.is_file() {
        if let Some(want) = spec.size {
            let have = dest
                .metadata()
                .map_err(|e| Error::io(dest.display(), e))?
                .len();
            if have != want {
                std::fs::remove_file(&dest).map_err(|e| Error::io(dest.display(), e))?;
            }
        }
        if dest.is_file() {
            return Ok(Fetched::AlreadyThere);
        }
    }
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p.display(), e))?;
    }
    let url = &spec.url;
    let agent = agent();
    let mut attempt = 0;
    let tty = std::io::stderr().is_terminal();
    loop {
        let have = part.metadata().map(|m| m.len()).unwrap_or(0);
        let mut req = with_auth(agent.get(url), url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let mut resp = req.call().map_err(|e| http_err(url, e))?;
        let status = resp.status().as_u16();
        if status == 404 && spec.optional {
            return Ok(Fetched::Absent);
        }
        let (append, total) = match status {
            206 => (
                true,
                resp.headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next())
                    .and_then(|v| v.parse::<u64>().ok()),
            ),
            200 => (
                false,
                resp.headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok()),
            ),
            416 if have > 0 && spec.size.is_none_or(|s| s == have) => (true, Some(have)),
            s => {
                return Err(http_err(
                    url,
                    format!(
                        "HTTP {s}{}",
                        if s == 401 || s == 403 {
                            " (access denied: a gated model needs HF_TOKEN)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        };
        if let (Some(t), Some(s)) = (total, spec.size) {
            if t != s {
                return Err(http_err(
                    url,
                    format!("the server offers {t} bytes, the manifest expects {s}"),
                ));
            }
        }
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .map_err(|e| Error::io(part.display(), e))?;
        let mut done = if append { have } else { 0 };
        let mut p = Progress {
            name: spec.path.clone(),
            total: total.or(spec.size),
            start: Instant::now(),
            start_bytes: done,
            last: Instant::now() - Duration::from_secs(1),
            tty,
        };
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 20];
        let result: std::io::Result<()> = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = out.write_all(&buf[..n]) {
                        return Err(Error::io(part.display(), e));
                    }
                    done += n as u64;
                    p.show(done, false);
                }
                Err(e) => break Err(e),
            }
        };
        out.sync_all().map_err(|e| Error::io(part.display(), e))?;
        p.show(done, true);
        if tty {
            eprintln!();
        }
        let complete = result.is_ok() && total.is_none_or(|t| done == t);
        if !complete {
            attempt += 1;
            let why = match result {
                Err(e) => e.to_string(),
                Ok(()) => format!(
                    "the connection closed after {done} of {} bytes",
                    total.unwrap_or(0)
                ),
            };
            if attempt > retries {
                return Err(http_err(
                    url,
                    format!("download interrupted ({why}); {done} bytes kept in {}, run the command again to resume", part.display()),
                ));
            }
            eprintln!(
                "{}: interrupted ({why}); resuming from byte {done}",
                spec.path
            );
            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            continue;
        }
        if let Some(s) = spec.size.filter(|&s| s != done) {
            let _ = std::fs::remove_file(&part);
            return Err(http_err(url, format!("got {done} bytes, expected {s}")));
        }
        if let Some(want) = &spec.sha256 {
            let got = sha256_file(&part)?;
            if !got.eq_ignore_ascii_case(want) {
                let _ = std::fs::remove_file(&part);
                return Err(http_err(
                    url,
                    format!(
                        "SHA-256 mismatch: expected {want}, got {got} (the download was discarded)"
                    ),
                ));
            }
        }
        std::fs::rename(&part, &dest).map_err(|e| Error::io(dest.display(), e))?;
        return Ok(Fetched::Downloaded);
    }
}

/// The manifest's files with every `shards` index expanded into its shard files (the index is
/// downloaded for that).
pub fn resolve(m: &Manifest, dir: &Path) -> Result<Vec<FileSpec>> {
    let mut out = Vec::new();
    for f in &m.files {
        out.push(f.clone());
        if f.shards {
            fetch(f, dir, 3)?;
            let index = dir.join(&f.path);
            let base_url = f.url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&f.url);
            let base_path = f.path.rsplit_once('/').map(|(b, _)| b).unwrap_or("");
            for shard in crate::loader::safetensors::index_shards(&index)? {
                let name = shard
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                out.push(file(
                    format!("{base_url}/{name}"),
                    &if base_path.is_empty() {
                        name.clone()
                    } else {
                        format!("{base_path}/{name}")
                    },
                    None,
                ));
            }
        }
    }
    Ok(out)
}

/// What `minigpt4 download` takes.
pub struct DownloadArgs {
    pub manifest: Manifest,
    pub dir: PathBuf,
    pub yes: bool,
    pub keep_downloads: bool,
    pub llm_quant: DType,
    pub vision_quant: DType,
}

/// The package directory of a variant inside `dir`.
pub fn package_dir(dir: &Path, variant: &str) -> PathBuf {
    dir.join(variant)
}

/// Downloads everything, then converts. `confirm(message)` is asked before the large transfer
/// (unless `yes`); returning false cancels. Returns the package path.
pub fn download(a: &DownloadArgs, confirm: impl FnOnce(&str) -> bool) -> Result<PathBuf> {
    let out = package_dir(&a.dir, &a.manifest.variant);
    if out.join(crate::package::CONFIG_FILE).is_file() {
        return Ok(out);
    }
    let raw = a.dir.join("downloads").join(&a.manifest.variant);
    std::fs::create_dir_all(&raw).map_err(|e| Error::io(raw.display(), e))?;
    let files = resolve(&a.manifest, &raw)?;
    // sizes first, so the user knows what is coming
    let mut total = 0u64;
    let mut lines = Vec::new();
    for f in &files {
        let size = match f.size {
            Some(s) => Some(s),
            None if raw.join(&f.path).is_file() => None,
            None => remote_size(&f.url)?,
        };
        total += size.unwrap_or(0);
        lines.push(format!(
            "  {:>10}  {}",
            size.map(|s| human(s as f64)).unwrap_or_else(|| "?".into()),
            f.path
        ));
    }
    let msg = format!(
        "{} needs these files ({} in all), then a conversion into {}:\n{}",
        a.manifest.variant,
        human(total as f64),
        out.display(),
        lines.join("\n")
    );
    if !a.yes && !confirm(&msg) {
        return Err(Error::InvalidOption {
            name: "download".into(),
            msg: "cancelled".into(),
        });
    }
    for f in &files {
        fetch(f, &raw, 3)?;
    }
    let role = |r: &str| {
        files
            .iter()
            .find(|f| f.role.as_deref() == Some(r))
            .map(|f| raw.join(&f.path))
    };
    let vision: Vec<PathBuf> = ["vit", "qformer", "minigpt4"]
        .iter()
        .filter_map(|r| role(r))
        .collect();
    let vision_config = match &a.manifest.vision_config {
        Some(v) => {
            let p = raw.join("vision_config.json");
            std::fs::write(&p, v.to_string()).map_err(|e| Error::io(p.display(), e))?;
            Some(p)
        }
        None => None,
    };
    let args = crate::convert::ConvertArgs {
        variant: a.manifest.variant.clone(),
        vision,
        llm: raw.join(&a.manifest.llm_dir),
        vision_config,
        out: out.clone(),
        llm_quant: a.llm_quant,
        vision_quant: a.vision_quant,
    };
    eprintln!("converting into {}", out.display());
    let path = crate::convert::convert(&args, |_, _, _| {})?;
    if !a.keep_downloads {
        std::fs::remove_dir_all(&raw).map_err(|e| Error::io(raw.display(), e))?;
    }
    Ok(path)
}
