//! `minigpt4 serve` on an ephemeral loopback port with the smoke package: answers equal
//! `minigpt4 chat --format json`, streaming and not; concurrency; every error status; a bounded
//! load run with flat memory; the official `openai` Python client.

mod common;

use common::fixture;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;

fn pkg() -> String {
    fixture("minigpt4/vicuna0_tiny_pkg").display().to_string()
}

fn image_path() -> PathBuf {
    fixture("images/chelsea_q90.jpg")
}

fn data_url() -> String {
    let b = std::fs::read(image_path()).unwrap();
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b)
    )
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
            .args(["serve", "--model", &pkg(), "--port", "0", "--ctx", "256"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let base = loop {
            line.clear();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("the server exited before listening");
            }
            if let Some(a) = line.trim().strip_prefix("listening on ") {
                break a.to_string();
            }
        };
        // keep draining stderr so the server never blocks on it
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = err.read_to_string(&mut sink);
        });
        Server { child, base }
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// (status, body)
fn post(base: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut req = agent()
        .post(format!("{base}/v1/chat/completions"))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut r = req.send(body).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, text)
}

fn request(question: &str, max_tokens: usize, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "minigpt4",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_url()}}
        ]}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// The native answer for the same greedy request.
fn native(question: &str, max_tokens: usize) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_minigpt4"))
        .args(["chat", "--model", &pkg(), "--image"])
        .arg(image_path())
        .args(["--prompt", question, "--greedy", "--format", "json"])
        .args(["--max-new-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

fn content(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn answers_equal_the_native_chat_streaming_or_not() {
    let s = Server::start(&[]);
    let q = "What is in this picture?";
    let want = native(q, 12);
    let (status, body) = post(&s.base, &request(q, 12, false).to_string(), None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(content(&v), want["text"].as_str().unwrap());
    let n = want["token_ids"].as_array().unwrap().len();
    assert_eq!(v["usage"]["completion_tokens"], n);
    let prompt: usize = want["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().len())
        .sum::<usize>()
        + want["image_tokens"].as_u64().unwrap() as usize;
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(
        v["choices"][0]["finish_reason"],
        if n == 12 { "length" } else { "stop" }
    );
    // and llama.cpp's `timings` beside the usage
    assert_eq!(v["timings"]["prompt_n"], prompt, "{v}");
    assert_eq!(v["timings"]["predicted_n"], n, "{v}");
    assert!(
        v["timings"]["prompt_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{v}"
    );

    // streamed: server-sent events whose deltas concatenate to the same text, then [DONE]
    let (status, body) = post(&s.base, &request(q, 12, true).to_string(), None);
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut text = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
            // the last chunk carries the usage and the timings
            assert_eq!(v["usage"]["completion_tokens"], n, "{v}");
            assert_eq!(v["timings"]["predicted_n"], n, "{v}");
        }
    }
    assert_eq!(text.trim(), want["text"].as_str().unwrap());
    assert!(finish.is_some());

    // a second turn about the same image
    let mut two = request(q, 6, false);
    two["messages"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"role": "assistant", "content": content(&v)}));
    two["messages"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"role": "user", "content": "And the colours?"}));
    let (status, body) = post(&s.base, &two.to_string(), None);
    assert_eq!(status, 200, "{body}");

    // models and health
    let mut r = agent().get(format!("{}/v1/models", s.base)).call().unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(m["data"][0]["id"], "minigpt4-vicuna0");
    let mut r = agent().get(format!("{}/health", s.base)).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.body_mut().read_to_string().unwrap().contains("ok"));
}

#[test]
fn sixteen_concurrent_requests_are_all_answered() {
    let s = Server::start(&["--max-queue", "32"]);
    let q = "What is in this picture?";
    let want = native(q, 6)["text"].as_str().unwrap().to_string();
    let body = request(q, 6, false).to_string();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (b, base) = (body.clone(), s.base.clone());
            std::thread::spawn(move || post(&base, &b, None))
        })
        .collect();
    for h in handles {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(content(&v), want);
    }
}

#[test]
fn bad_requests_get_their_status_codes() {
    let s = Server::start(&["--api-key", "sekrit", "--max-queue", "1"]);
    let ok = request("hi", 4, false).to_string();
    // wrong or missing key
    assert_eq!(post(&s.base, &ok, None).0, 401);
    assert_eq!(post(&s.base, &ok, Some("nope")).0, 401);
    assert_eq!(post(&s.base, &ok, Some("sekrit")).0, 200);
    // malformed JSON, an OpenAI-style error object
    let (status, body) = post(&s.base, "{\"messages\": [", Some("sekrit"));
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("JSON"),
        "{body}"
    );
    // no image, an undecodable image, two images
    let text_only =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (status, body) = post(&s.base, &text_only, Some("sekrit"));
    assert!(status == 400 && body.contains("image"), "{body}");
    let mut broken = request("hi", 4, false);
    broken["messages"][0]["content"][1]["image_url"]["url"] =
        "data:image/png;base64,aGVsbG8gd29ybGQ=".into();
    let (status, body) = post(&s.base, &broken.to_string(), Some("sekrit"));
    assert!(status == 400 && body.contains("PNG"), "{status} {body}");
    let mut two = request("hi", 4, false);
    let img = two["messages"][0]["content"][1].clone();
    two["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(img);
    let (status, body) = post(&s.base, &two.to_string(), Some("sekrit"));
    assert!(status == 400 && body.contains("one image"), "{body}");
    // a remote image without --allow-remote-images
    let mut remote = request("hi", 4, false);
    remote["messages"][0]["content"][1]["image_url"]["url"] = "http://127.0.0.1:9/cat.jpg".into();
    let (status, body) = post(&s.base, &remote.to_string(), Some("sekrit"));
    assert!(
        status == 400 && body.contains("allow-remote-images"),
        "{body}"
    );
    // an oversized body (written from another thread: the server answers before reading it all)
    {
        use std::io::Write;
        let addr = s.base.strip_prefix("http://").unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = c.try_clone().unwrap();
        let len = 40usize << 20;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(head.as_bytes());
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..40 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut resp = String::new();
        let _ = BufReader::new(c).read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 413 "), "{resp}");
        assert!(resp.contains("\"error\"") && resp.contains("MiB"), "{resp}");
        let _ = writer.join();
    }
    // a full queue (one request at most): of 8 simultaneous requests, those arriving while one
    // runs are refused with 429 and Retry-After, the others answered
    let long = request("Describe this image in detail.", 60, false).to_string();
    let results: Vec<(u16, bool)> = (0..8)
        .map(|_| {
            let (b, base) = (long.clone(), s.base.clone());
            std::thread::spawn(move || {
                let mut r = agent()
                    .post(format!("{base}/v1/chat/completions"))
                    .header("Authorization", "Bearer sekrit")
                    .send(&b)
                    .unwrap();
                let retry = r.headers().get("retry-after").is_some();
                let _ = r.body_mut().read_to_string();
                (r.status().as_u16(), retry)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(results.contains(&(429, true)), "{results:?}");
    assert!(results.iter().any(|r| r.0 == 200), "{results:?}");
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 429),
        "{results:?}"
    );
    let base = s.base.clone();
    let l2 = long.clone();
    let first = std::thread::spawn(move || post(&base, &l2, Some("sekrit")));
    std::thread::sleep(Duration::from_millis(100));
    // /health answers while the model is busy
    let t = std::time::Instant::now();
    let h = agent().get(format!("{}/health", s.base)).call().unwrap();
    assert_eq!(h.status().as_u16(), 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(first.join().unwrap().0, 200);
}

#[cfg(target_os = "linux")]
#[test]
fn a_load_run_keeps_memory_flat() {
    let s = Server::start(&["--max-queue", "64"]);
    let body = request("hi", 2, false).to_string();
    let run = |n: usize| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (b, base) = (body.clone(), s.base.clone());
                std::thread::spawn(move || {
                    for _ in 0..n / 4 {
                        let (status, text) = post(&base, &b, None);
                        assert_eq!(status, 200, "{text}");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    };
    run(40);
    let before = s.rss_kib();
    run(200);
    let after = s.rss_kib();
    eprintln!("server RSS {before} KiB after 40 requests, {after} KiB after 240");
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

/// The official OpenAI Python client against the server (tests/run.sh installs `openai`).
#[test]
fn the_openai_python_client_works() {
    let s = Server::start(&[]);
    let script = format!(
        r#"
import base64, sys
from openai import OpenAI
c = OpenAI(base_url="{base}/v1", api_key="unused")
img = "data:image/jpeg;base64," + base64.b64encode(open(sys.argv[1], "rb").read()).decode()
msgs = [{{"role": "user", "content": [{{"type": "text", "text": "What is in this picture?"}},
        {{"type": "image_url", "image_url": {{"url": img}}}}]}}]
r = c.chat.completions.create(model="minigpt4", messages=msgs, temperature=0, max_tokens=12)
print(r.choices[0].message.content)
parts = []
for ch in c.chat.completions.create(model="minigpt4", messages=msgs, temperature=0, max_tokens=12, stream=True):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
print("".join(parts).strip())
print(c.models.list().data[0].id)
"#,
        base = s.base
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(image_path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the openai client failed (pip install openai): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let want = native("What is in this picture?", 12)["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        lines,
        [want.as_str(), want.as_str(), "minigpt4-vicuna0"],
        "{text}"
    );
}

fn generated_tokens(base: &str) -> u64 {
    let mut r = agent().get(format!("{base}/health")).call().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    v["generated_tokens"].as_u64().unwrap()
}

/// A streaming client that goes away stops its generation at the next token.
#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    use std::io::Write;
    let s = Server::start(&[]);
    // how long the full answer takes, for comparison
    let full = request("Describe this image in detail.", 180, false).to_string();
    let t = std::time::Instant::now();
    let (status, body) = post(&s.base, &full, None);
    assert_eq!(status, 200, "{body}");
    let full_time = t.elapsed();
    let full_tokens = generated_tokens(&s.base);
    assert_eq!(
        full_tokens, 180,
        "the comparison answer must run to its length: {body}"
    );

    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let body = request("Describe this image in detail.", 180, true).to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    // wait for the first content event, then hang up
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0);
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            break;
        }
    }
    drop(r);
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    std::thread::sleep(full_time + Duration::from_millis(500));
    let after = generated_tokens(&s.base) - full_tokens;
    assert!(after < 180, "the abandoned answer ran to {after} tokens");
    eprintln!("abandoned answer stopped after {after} of 180 tokens (full answer: {full_time:?})");
}

/// With --allow-remote-images an http image URL is fetched (here from a one-shot server on
/// 127.0.0.1) and answered like the same image sent as a data URL.
#[test]
fn remote_images_are_fetched_only_when_allowed() {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cat.jpg", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let bytes = std::fs::read(image_path()).unwrap();
        for mut s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = s.write_all(&bytes);
        }
    });
    let s = Server::start(&["--allow-remote-images"]);
    let mut req = request("What is in this picture?", 8, false);
    let (status, body) = post(&s.base, &req.to_string(), None);
    assert_eq!(status, 200, "{body}");
    let want: serde_json::Value = serde_json::from_str(&body).unwrap();
    req["messages"][0]["content"][1]["image_url"]["url"] = url.into();
    let (status, body) = post(&s.base, &req.to_string(), None);
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(content(&got), content(&want));
}
