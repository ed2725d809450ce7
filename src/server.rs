//! `minigpt4 serve`: an OpenAI-compatible chat server (axum + tokio).
//!
//! One GPU, many clients: the model lives on one worker thread and takes requests from a
//! bounded queue in arrival order (a full queue answers 429 with `Retry-After`). Tokens go back
//! to the request's handler through an unbounded channel, so a slow client never holds the
//! model; a client that goes away drops its receiver, which stops its generation at the next
//! token. `/health` and `/v1/models` never touch the model.

// Handlers return ready-made HTTP error responses as their `Err` values (axum's idiom).
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc as tmpsc;

use crate::chat::{Conversation, Finish, ModelVariant, Sampling};
use crate::gpu::Gpu;
use crate::model::minigpt4::MiniGpt4;

/// Largest request body (JSON with a base64 image).
pub const MAX_BODY: usize = 32 << 20;
/// Largest decoded image.
pub const MAX_IMAGE: usize = 20 << 20;

pub struct ServeArgs {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub max_queue: usize,
    pub cors: Option<String>,
    pub allow_remote_images: bool,
    pub ctx: usize,
}

/// An OpenAI-style error response.
fn error(status: StatusCode, kind: &str, msg: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": msg.into(), "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

fn bad(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", msg)
}

/// A parsed chat request, ready for the model.
struct Job {
    image: Vec<u8>,
    /// (role 0 = user / 1 = assistant, text); the first user turn carries the image.
    turns: Vec<(usize, String)>,
    sampling: Sampling,
    max_tokens: usize,
    stop: Vec<String>,
    events: tmpsc::UnboundedSender<Msg>,
}

enum Msg {
    Token(String),
    Done {
        text: String,
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// llama.cpp's server's `timings` object.
        timings: Value,
    },
    Failed(String),
}

struct AppState {
    jobs: mpsc::SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    /// Tokens generated since start (for /health).
    generated: Arc<AtomicUsize>,
    max_queue: usize,
    api_key: Option<String>,
    model_id: String,
    variant: ModelVariant,
    allow_remote_images: bool,
}

/// Runs the model worker: one job at a time, in arrival order.
fn worker(
    mut gpu: Gpu,
    mut model: MiniGpt4,
    reload: (PathBuf, usize),
    jobs: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    generated: Arc<AtomicUsize>,
) {
    let mut cached: Option<(Vec<u8>, crate::gpu::Tensor)> = None;
    while let Ok(job) = jobs.recv() {
        queued.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            continue; // the client left while queued
        }
        let r = run_job(&gpu, &mut model, &job, &mut cached, &generated);
        if let Err(e) = r {
            let _ = job.events.send(Msg::Failed(e.to_string()));
        }
        if gpu.is_lost() {
            // that request has failed with the reason; open the device again and reload the
            // model so that the next ones run (if this fails too, they fail with its reason)
            eprintln!("serve: the GPU device was lost; reopening it and reloading the model");
            cached = None;
            let fresh = pollster::block_on(gpu.reopen()).and_then(|g| {
                let m = crate::package::load(&g, &reload.0, reload.1)?;
                Ok((g, m))
            });
            match fresh {
                Ok((g, m)) => {
                    gpu = g;
                    model = m;
                    eprintln!("serve: model reloaded");
                }
                Err(e) => eprintln!("serve: reload failed: {e}"),
            }
        }
    }
}

fn run_job(
    gpu: &Gpu,
    model: &mut MiniGpt4,
    job: &Job,
    cached: &mut Option<(Vec<u8>, crate::gpu::Tensor)>,
    generated: &AtomicUsize,
) -> crate::Result<()> {
    // the image's embeddings are kept for the next request about the same image
    if cached.as_ref().is_none_or(|(b, _)| *b != job.image) {
        *cached = None;
        let px = crate::image::preprocess(&job.image, "image", model.vit.cfg.image_size)?;
        let emb = pollster::block_on(model.encode_image(gpu, &px))?;
        *cached = Some((job.image.clone(), emb));
    }
    let image = &cached.as_ref().expect("image set").1;
    let mut conv = Conversation::new(model.variant);
    conv.add_image();
    for (role, text) in &job.turns {
        if *role == 0 {
            conv.ask(text);
        } else {
            conv.add_answer(text);
        }
    }
    let mut stream = crate::chat::AnswerStream::new(model.tok.clone(), &job.stop);
    let answer =
        pollster::block_on(
            model.answer(gpu, &conv, image, &job.sampling, job.max_tokens, |id| {
                generated.fetch_add(1, Ordering::Relaxed);
                let piece = stream.push(id);
                if !piece.is_empty() && job.events.send(Msg::Token(piece)).is_err() {
                    return false; // the client is gone
                }
                !stream.stopped_by_string && !job.events.is_closed()
            }),
        )?;
    let mut text = answer.text.clone();
    for s in &job.stop {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
        }
    }
    // whatever was held back and belongs to the answer
    let rest = stream.finish();
    if !rest.is_empty() {
        let _ = job.events.send(Msg::Token(rest));
    }
    let stopped_by_string = stream.stopped_by_string;
    let finish = match answer.finish {
        Finish::MaxTokens if !stopped_by_string => "length",
        _ => "stop",
    };
    let _ = job.events.send(Msg::Done {
        text,
        finish,
        prompt_tokens: answer
            .prompt_token_ids
            .iter()
            .map(|s| s.len())
            .sum::<usize>()
            + answer.image_tokens,
        completion_tokens: answer.token_ids.len(),
        timings: json!(answer.timings),
    });
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The image bytes of an `image_url` part: a `data:` URL, or (when allowed) an http(s) URL.
fn image_bytes(url: &str, allow_remote: bool) -> Result<Vec<u8>, Response> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("image_url: a data URL needs a ',' before its data"))?;
        if !meta.ends_with(";base64") {
            return Err(bad("image_url: only base64 data URLs are supported"));
        }
        if data.len() / 4 * 3 > MAX_IMAGE {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("image larger than {} MiB", MAX_IMAGE >> 20),
            ));
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| bad(format!("image_url: invalid base64: {e}")));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        if !allow_remote {
            return Err(bad(
                "image_url: remote images are not fetched (start the server with --allow-remote-images); send a data: URL",
            ));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        let mut r = agent
            .get(url)
            .call()
            .map_err(|e| bad(format!("image_url: could not fetch {url}: {e}")))?;
        let mut out = Vec::new();
        use std::io::Read;
        r.body_mut()
            .as_reader()
            .take(MAX_IMAGE as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("image_url: reading {url}: {e}")))?;
        if out.len() > MAX_IMAGE {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("image larger than {} MiB", MAX_IMAGE >> 20),
            ));
        }
        return Ok(out);
    }
    Err(bad("image_url: expected a data: URL"))
}

/// Text and images of a message's `content` (a string or a list of parts).
fn content_parts(c: &Value, allow_remote: bool) -> Result<(String, Vec<Vec<u8>>), Response> {
    match c {
        Value::String(s) => Ok((s.clone(), vec![])),
        Value::Array(parts) => {
            let (mut text, mut images) = (Vec::new(), Vec::new());
            for p in parts {
                match p.get("type").and_then(|t| t.as_str()) {
                    Some("text") => text.push(
                        p.get("text")
                            .and_then(|t| t.as_str())
                            .ok_or_else(|| bad("a text part needs a `text` string"))?
                            .to_string(),
                    ),
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(|u| u.as_str())
                            .ok_or_else(|| bad("an image_url part needs `image_url.url`"))?;
                        images.push(image_bytes(url, allow_remote)?);
                    }
                    other => {
                        return Err(bad(format!(
                            "unsupported content part type {other:?} (expected text or image_url)"
                        )))
                    }
                }
            }
            Ok((text.join("\n"), images))
        }
        Value::Null => Ok((String::new(), vec![])),
        _ => Err(bad("`content` must be a string or a list of parts")),
    }
}

/// Builds a job from an OpenAI chat request body.
fn parse_request(
    st: &AppState,
    body: &Value,
    events: tmpsc::UnboundedSender<Msg>,
) -> Result<(Job, bool), Response> {
    let messages = body
        .get("messages")
        .and_then(|m| m.as_array())
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("`messages` must be a non-empty list"))?;
    let mut image = None;
    let mut turns = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
        let (text, images) = content_parts(
            m.get("content").unwrap_or(&Value::Null),
            st.allow_remote_images,
        )?;
        match role {
            // MiniGPT-4's templates have a fixed system prompt
            "system" | "developer" => continue,
            "user" => {
                for img in images {
                    if image.is_some() {
                        return Err(bad("only one image per conversation is supported (MiniGPT-4 answers about one image)"));
                    }
                    image = Some(img);
                }
                turns.push((0, text));
            }
            "assistant" => {
                if !images.is_empty() {
                    return Err(bad("assistant messages cannot carry images"));
                }
                turns.push((1, text));
            }
            r => return Err(bad(format!("unsupported role {r:?}"))),
        }
    }
    if turns.last().map(|t| t.0) != Some(0) {
        return Err(bad("the last message must be the user's"));
    }
    let image = image.ok_or_else(|| {
        bad("MiniGPT-4 needs an image: add an image_url part (data: URL) to the first user message")
    })?;
    let num = |k: &str| body.get(k).filter(|v| !v.is_null());
    let f = |k: &str| -> Result<Option<f32>, Response> {
        num(k)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| bad(format!("`{k}` must be a number")))
            })
            .transpose()
    };
    let u = |k: &str| -> Result<Option<u64>, Response> {
        num(k)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad(format!("`{k}` must be a non-negative integer")))
            })
            .transpose()
    };
    let d = st.variant.demo_sampling();
    let temperature = f("temperature")?.unwrap_or(d.temperature);
    let sampling = Sampling {
        greedy: temperature == 0.0,
        temperature: if temperature == 0.0 { 1.0 } else { temperature },
        top_k: u("top_k")?.map(|x| x as usize).unwrap_or(d.top_k),
        top_p: f("top_p")?.unwrap_or(d.top_p),
        repetition_penalty: f("repetition_penalty")?.unwrap_or(d.repetition_penalty),
        seed: u("seed")?.unwrap_or(d.seed),
    };
    sampling.validate().map_err(|e| bad(e.to_string()))?;
    let max_tokens = u("max_tokens")?
        .or(u("max_completion_tokens")?)
        .map(|x| x as usize)
        .unwrap_or(300);
    if max_tokens == 0 {
        return Err(bad("`max_tokens` must be at least 1"));
    }
    let stop = match num("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(String::from)
                    .ok_or_else(|| bad("`stop` must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    let stream = body
        .get("stream")
        .and_then(|s| s.as_bool())
        .unwrap_or(false);
    Ok((
        Job {
            image,
            turns,
            sampling,
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            events,
        },
        stream,
    ))
}

fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    match &st.api_key {
        None => true,
        Some(k) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| v == k),
    }
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body exceeds {} MiB", MAX_BODY >> 20),
            )
        }
        Err(e) => return bad(format!("could not read the request body: {e}")),
    };
    if !authorized(&st, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key (Authorization: Bearer KEY)",
        );
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body is not valid JSON: {e}")),
    };
    let (tx, mut rx) = tmpsc::unbounded_channel();
    let (job, stream) = match parse_request(&st, &body, tx) {
        Ok(x) => x,
        Err(r) => return r,
    };
    // admission: at most max_queue requests waiting or running
    if st.queued.fetch_add(1, Ordering::SeqCst) >= st.max_queue {
        st.queued.fetch_sub(1, Ordering::SeqCst);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the queue is full ({} requests); retry later", st.max_queue),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return r;
    }
    if st.jobs.try_send(job).is_err() {
        st.queued.fetch_sub(1, Ordering::SeqCst);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model worker has stopped",
        );
    }
    let id = format!("chatcmpl-{:x}{:04x}", unix_now(), rand_suffix());
    let created = unix_now();
    let model = st.model_id.clone();
    if stream {
        let s = async_stream(rx, id, created, model);
        return Sse::new(s)
            .keep_alive(axum::response::sse::KeepAlive::default())
            .into_response();
    }
    while let Some(m) = rx.recv().await {
        match m {
            Msg::Token(_) => {}
            Msg::Failed(e) => return bad(e),
            Msg::Done {
                text,
                finish,
                prompt_tokens,
                completion_tokens,
                timings,
            } => {
                return Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                    "timings": timings,
                }))
                .into_response();
            }
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the generation ended without an answer",
    )
}

fn rand_suffix() -> u32 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) as u32 & 0xffff
}

type SseItem = Result<Event, std::convert::Infallible>;

fn async_stream(
    rx: tmpsc::UnboundedReceiver<Msg>,
    id: String,
    created: u64,
    model: String,
) -> impl futures_util::Stream<Item = SseItem> {
    let chunk = move |delta: Value, finish: Option<&str>, end: Option<(Value, Value)>| {
        let mut v = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some((usage, timings)) = end {
            v["usage"] = usage;
            v["timings"] = timings;
        }
        Event::default().data(v.to_string())
    };
    // state: (receiver, sent the role yet, finished)
    futures_util::stream::unfold((rx, false, false), move |(mut rx, started, done)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            if !started {
                let e = chunk(json!({"role": "assistant", "content": ""}), None, None);
                return Some((Ok(e), (rx, true, false)));
            }
            match rx.recv().await {
                Some(Msg::Token(t)) => Some((Ok(chunk(json!({"content": t}), None, None)), (rx, true, false))),
                Some(Msg::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    timings,
                    ..
                }) => {
                    let e = chunk(
                        json!({}),
                        Some(finish),
                        Some((
                            json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}),
                            timings,
                        )),
                    );
                    Some((Ok(e), (rx, true, true)))
                }
                Some(Msg::Failed(e)) => Some((
                    Ok(Event::default().data(json!({"error": {"message": e, "type": "server_error"}}).to_string())),
                    (rx, true, true),
                )),
                None => None,
            }
        }
    })
    .chain(futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(Event::default().data("[DONE]"))
    }))
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorized(&st, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key",
        );
    }
    Json(json!({"object": "list", "data": [{"id": st.model_id, "object": "model", "created": 0, "owned_by": "minigpt4-wgpu"}]})).into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "status": "ok",
        "model": st.model_id,
        "queued": st.queued.load(Ordering::SeqCst),
        "generated_tokens": st.generated.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// Loads the model and serves until the process ends. `on_listening` gets the bound address.
pub fn serve(a: ServeArgs, gpu: Gpu, on_listening: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let model = crate::package::load(&gpu, &a.model, a.ctx)?;
    let model_id = format!("minigpt4-{}", model.label);
    let variant = model.variant;
    let max_queue = a.max_queue.max(1);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(max_queue);
    let queued = Arc::new(AtomicUsize::new(0));
    let generated = Arc::new(AtomicUsize::new(0));
    {
        let (queued, generated) = (queued.clone(), generated.clone());
        std::thread::Builder::new().name("model".into()).spawn({
            let reload = (a.model.clone(), a.ctx);
            move || worker(gpu, model, reload, jobs_rx, queued, generated)
        })?;
    }
    let st = Arc::new(AppState {
        jobs: jobs_tx,
        queued,
        generated,
        max_queue,
        api_key: a.api_key.clone(),
        model_id,
        variant,
        allow_remote_images: a.allow_remote_images,
    });
    let mut app = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat_completions).options(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(st);
    if let Some(origin) = &a.cors {
        let origin = HeaderValue::from_str(origin)?;
        app = app.layer(axum::middleware::map_response(move |mut r: Response| {
            let origin = origin.clone();
            async move {
                let h = r.headers_mut();
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("authorization, content-type"),
                );
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, POST, OPTIONS"),
                );
                r
            }
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await?;
        on_listening(listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}
