//! `minigpt4 download` against a local HTTP server on 127.0.0.1 that serves the tiny model in
//! its original formats (tests/fixtures/minigpt4/vicuna0_tiny_orig): a clean download and
//! conversion, a transfer cut in the middle that resumes with a Range request, a checksum
//! mismatch that fails clearly and leaves no package, an optional file the server lacks.

mod common;

use common::{fixture, tmp};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minigpt4::download::{download, fetch, sha256_file, DownloadArgs, Fetched, FileSpec, Manifest};
use minigpt4::quant::DType;

/// (method, path, Range header)
type Log = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A minimal static HTTP/1.1 server: GET and HEAD, `Range: bytes=N-`, and per-path cuts (the
/// body stops after N bytes, once).
struct Server {
    base: String,
    log: Log,
    cut: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let log: Log = Arc::default();
        let cut: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (log2, cut2) = (log.clone(), cut.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (root, log, cut) = (root.clone(), log2.clone(), cut2.clone());
                std::thread::spawn(move || {
                    let _ = serve(s, &root, &log, &cut);
                });
            }
        });
        Server { base, log, cut }
    }

    fn gets(&self, path: &str) -> Vec<Option<String>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| m == "GET" && p == path)
            .map(|(_, _, r)| r.clone())
            .collect()
    }
}

fn serve(
    mut s: TcpStream,
    root: &Path,
    log: &Log,
    cut: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock()
        .unwrap()
        .push((method.clone(), path.clone(), range.clone()));
    let file = root.join(path.trim_start_matches('/'));
    if path.contains("..") || !file.is_file() {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    let mut data = Vec::new();
    std::fs::File::open(&file)?.read_to_end(&mut data)?;
    let total = data.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, body, extra) = match start {
        Some(n) if n < total => (
            "206 Partial Content",
            &data[n..],
            format!("Content-Range: bytes {n}-{}/{total}\r\n", total - 1),
        ),
        Some(_) => (
            "416 Range Not Satisfiable",
            &data[..0],
            format!("Content-Range: bytes */{total}\r\n"),
        ),
        None => ("200 OK", &data[..], String::new()),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    let limit = cut.lock().unwrap().remove(&path);
    match limit {
        Some(n) => {
            s.write_all(&body[..n.min(body.len())])?;
            s.flush()?;
            // drop the connection mid-body
        }
        None => s.write_all(body)?,
    }
    Ok(())
}

fn orig() -> PathBuf {
    fixture("minigpt4/vicuna0_tiny_orig")
}

fn manifest(base: &str) -> Manifest {
    let spec = |path: &str, role: Option<&str>| FileSpec {
        url: format!("{base}/{path}"),
        path: path.into(),
        role: role.map(Into::into),
        size: Some(std::fs::metadata(orig().join(path)).unwrap().len()),
        sha256: Some(sha256_file(&orig().join(path)).unwrap()),
        optional: false,
        shards: false,
    };
    let mut files = vec![
        spec("eva_vit_g.pth", Some("vit")),
        spec("blip2_pretrained_flant5xxl.pth", Some("qformer")),
        spec("pretrained_minigpt4.pth", Some("minigpt4")),
        spec("vicuna/config.json", None),
        spec("vicuna/generation_config.json", None),
        spec("vicuna/tokenizer.model", None),
    ];
    let mut ix = spec("vicuna/pytorch_model.bin.index.json", None);
    ix.shards = true;
    files.push(ix);
    let mut absent = spec("vicuna/config.json", None);
    absent.url = format!("{base}/vicuna/tokenizer_config.json");
    absent.path = "vicuna/tokenizer_config.json".into();
    absent.size = None;
    absent.sha256 = None;
    absent.optional = true;
    files.push(absent);
    let vc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("minigpt4/vicuna0_tiny/vision_config.json")).unwrap(),
    )
    .unwrap();
    Manifest {
        variant: "vicuna0".into(),
        files,
        llm_dir: "vicuna".into(),
        vision_config: Some(vc),
    }
}

fn args(m: Manifest, dir: &Path) -> DownloadArgs {
    DownloadArgs {
        manifest: m,
        dir: dir.into(),
        yes: false,
        keep_downloads: false,
        llm_quant: DType::Q4,
        vision_quant: DType::F16,
    }
}

/// The converted package equals the committed smoke package (same values, same formats).
fn assert_is_smoke_package(pkg: &Path) {
    for n in [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        assert!(
            std::fs::read(pkg.join(n)).unwrap()
                == std::fs::read(fixture("minigpt4/vicuna0_tiny_pkg").join(n)).unwrap(),
            "{n} differs from the smoke package"
        );
    }
}

#[test]
fn a_clean_download_converts_into_the_package() {
    let server = Server::start(orig());
    let dir = tmp("clean");
    let mut asked = String::new();
    let pkg = download(&args(manifest(&server.base), &dir), |m| {
        asked = m.to_string();
        true
    })
    .unwrap();
    assert_eq!(pkg, dir.join("vicuna0"));
    assert_is_smoke_package(&pkg);
    // sizes were shown before the transfer, the shards found through the index
    assert!(
        asked.contains("eva_vit_g.pth") && asked.contains("KiB"),
        "{asked}"
    );
    assert!(
        asked.contains("pytorch_model-00002-of-00002.bin"),
        "{asked}"
    );
    assert_eq!(server.gets("/eva_vit_g.pth"), [None]);
    assert_eq!(
        server.gets("/vicuna/pytorch_model-00001-of-00002.bin"),
        [None]
    );
    // the originals are removed after a successful conversion
    assert!(!dir.join("downloads/vicuna0").exists());
    // a second run finds the package and fetches nothing
    let before = server.log.lock().unwrap().len();
    assert_eq!(
        download(&args(manifest(&server.base), &dir), |_| false).unwrap(),
        pkg
    );
    assert_eq!(server.log.lock().unwrap().len(), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_interrupted_transfer_resumes_with_a_range_request() {
    let server = Server::start(orig());
    server
        .cut
        .lock()
        .unwrap()
        .insert("/eva_vit_g.pth".into(), 100_000);
    let dir = tmp("resume");
    let mut a = args(manifest(&server.base), &dir);
    a.yes = true;
    let pkg = download(&a, |_| unreachable!("--yes does not ask")).unwrap();
    assert_is_smoke_package(&pkg);
    assert_eq!(
        server.gets("/eva_vit_g.pth"),
        [None, Some("bytes=100000-".to_string())]
    );

    // across runs: no retries, the .part file stays, the next run resumes from it
    server
        .cut
        .lock()
        .unwrap()
        .insert("/blip2_pretrained_flant5xxl.pth".into(), 4096);
    let spec = manifest(&server.base).files[1].clone();
    let d2 = tmp("resume2");
    let e = fetch(&spec, &d2, 0).unwrap_err().to_string();
    assert!(e.contains("run the command again to resume"), "{e}");
    assert_eq!(
        std::fs::metadata(d2.join("blip2_pretrained_flant5xxl.pth.part"))
            .unwrap()
            .len(),
        4096
    );
    assert_eq!(fetch(&spec, &d2, 0).unwrap(), Fetched::Downloaded);
    assert_eq!(
        sha256_file(&d2.join("blip2_pretrained_flant5xxl.pth")).unwrap(),
        spec.sha256.clone().unwrap()
    );
    assert_eq!(
        server
            .gets("/blip2_pretrained_flant5xxl.pth")
            .last()
            .unwrap(),
        &Some("bytes=4096-".to_string())
    );
    assert_eq!(fetch(&spec, &d2, 0).unwrap(), Fetched::AlreadyThere);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(d2);
}

#[test]
fn a_checksum_mismatch_fails_clearly_and_leaves_no_package() {
    let server = Server::start(orig());
    let dir = tmp("sha");
    let mut m = manifest(&server.base);
    m.files[2].sha256 = Some("00".repeat(32));
    let e = download(&args(m, &dir), |_| true).unwrap_err().to_string();
    assert!(
        e.contains("pretrained_minigpt4.pth") && e.contains("SHA-256 mismatch"),
        "{e}"
    );
    assert!(!dir.join("vicuna0").exists());
    assert!(!dir
        .join("downloads/vicuna0/pretrained_minigpt4.pth.part")
        .exists());
    assert!(!dir
        .join("downloads/vicuna0/pretrained_minigpt4.pth")
        .exists());

    // declining the question downloads nothing
    let server2 = Server::start(orig());
    let d2 = tmp("declined");
    let e = download(&args(manifest(&server2.base), &d2), |_| false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cancelled"), "{e}");
    assert!(server2.gets("/eva_vit_g.pth").is_empty());
    // a missing required file is an error naming the URL
    let mut m = manifest(&server2.base);
    m.files[0].url = format!("{}/nope.pth", server2.base);
    let e = download(&args(m, &d2), |_| true).unwrap_err().to_string();
    assert!(e.contains("/nope.pth") && e.contains("404"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(d2);
}

#[test]
fn the_command_line_downloads_from_a_manifest() {
    let server = Server::start(orig());
    let dir = tmp("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let mf = dir.join("manifest.json");
    std::fs::write(&mf, serde_json::to_string(&manifest(&server.base)).unwrap()).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_minigpt4"))
            .args(["download", "--manifest"])
            .arg(&mf)
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    // not a terminal and no --yes: nothing is downloaded
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--yes"), "{err}");
    let out = run(&["--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_is_smoke_package(Path::new(&path));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_builtin_manifests_name_the_public_sources() {
    let m = Manifest::builtin("vicuna0-13b").unwrap();
    assert!(m.files.iter().any(|f| f.url
        == "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"));
    let ck = m
        .files
        .iter()
        .find(|f| f.role.as_deref() == Some("minigpt4"))
        .unwrap();
    assert_eq!(ck.size, Some(47_369_169));
    assert!(m
        .files
        .iter()
        .any(|f| f.shards && f.url.contains("Vision-CAIR/vicuna/")));
    let e = Manifest::builtin("llama2-7b").unwrap_err().to_string();
    assert!(
        e.contains("Google Drive") && e.contains("minigpt4 convert"),
        "{e}"
    );
}
