//! The browser engine (wasm-bindgen): WebGPU device, package loading fed by `fetch` streams,
//! image encoding and streamed answers. `web/worker.js` drives it from a Web Worker and
//! `web/minigpt4.js` wraps the worker in the JS API.
//!
//! Loading: `beginLoad(config, index, tokenizer)` → for each shard `beginShard(name)`,
//! `feed(chunk)`…, `endShard()` → `finishLoad()`. Each chunk goes straight into GPU buffers, so
//! the model never sits in wasm memory.

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use crate::chat::{Conversation, Finish, ModelVariant, Sampling};
use crate::gpu::{Gpu, GpuOptions, Requirements, Tensor};
use crate::model::minigpt4::MiniGpt4;
use crate::package::PackageLoader;

struct Inner {
    /// Where the kernel choices came from: "measurement" or "the tuning cache".
    tuned_from: &'static str,
    gpu: Rc<Gpu>,
    loader: Option<PackageLoader>,
    model: Option<MiniGpt4>,
    conv: Option<Conversation>,
    image: Option<Tensor>,
}

/// One MiniGPT-4 on the page's WebGPU device.
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<RefCell<Inner>>,
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// Sampling and length options from JS (`{greedy, temperature, topK, topP,
/// repetitionPenalty, seed, maxNewTokens}`); missing fields take the reference demo's values.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct AskOptions {
    greedy: Option<bool>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    max_new_tokens: Option<usize>,
}

#[wasm_bindgen]
impl Engine {
    /// Opens the browser's WebGPU adapter (f16 and subgroups used only where offered) and
    /// tunes the kernels for it. `tuning` is what [`Engine::tuning`] returned on an earlier
    /// page load (the worker keeps it in the Cache API): the choices stored there for this
    /// adapter, driver and kernel build are taken without measuring; anything else is ignored.
    pub async fn create(tuning: Option<String>) -> Result<Engine, JsError> {
        if let Some(t) = tuning {
            crate::gpu::tune::set_page_tuning(&t);
        }
        let gpu = Gpu::new(&GpuOptions::default()).await.map_err(js_err)?;
        let (_, tuned_from) = crate::gpu::tune::autotune(&gpu).await.map_err(js_err)?;
        Ok(Engine {
            inner: Rc::new(RefCell::new(Inner {
                tuned_from,
                gpu: Rc::new(gpu),
                loader: None,
                model: None,
                conv: None,
                image: None,
            })),
        })
    }

    /// The adapter as JSON: name, backend, kernel variant, the limits the runtime needs.
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> Result<String, JsError> {
        let i = self.inner.try_borrow().map_err(|_| js_err("busy"))?;
        let g = &i.gpu;
        Ok(serde_json::json!({
            "name": g.info.name,
            "backend": format!("{:?}", g.info.backend),
            "f16": g.best_variant.f16,
            "subgroups": g.best_variant.subgroups,
            "gemvLanes": g.gemv_lanes(),
            "gemmForm": g.gemm_form(),
            "gemmFormQuant": g.gemm_form_quant(),
            "tuning": i.tuned_from,
            "maxStorageBindingSize": g.limits.max_storage_buffer_binding_size,
            "maxBufferSize": g.limits.max_buffer_size,
            "maxComputeInvocationsPerWorkgroup": g.limits.max_compute_invocations_per_workgroup,
            "maxStorageBuffersPerShaderStage": g.limits.max_storage_buffers_per_shader_stage,
            "needs": format!("{:?}", Requirements::kernels()),
        })
        .to_string())
    }

    /// The tuning results as JSON, for the worker to store and pass to [`Engine::create`] on
    /// the next page load; model loading adds the small shapes it tunes.
    pub fn tuning(&self) -> String {
        crate::gpu::tune::page_tuning()
    }

    /// Compiles every kernel family in every flag set for this device's kernel variant and the
    /// portable one; resolves to a JSON list of `{file, flags, variant, message}` for each
    /// error (empty when every kernel compiles).
    #[wasm_bindgen(js_name = checkKernels)]
    pub fn check_kernels(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let gpu = inner.try_borrow().map_err(|_| busy())?.gpu.clone();
            let mut variants = vec![crate::gpu::Variant::PORTABLE];
            if gpu.best_variant != crate::gpu::Variant::PORTABLE {
                variants.push(gpu.best_variant);
            }
            let mut errors = Vec::new();
            for v in variants {
                for (file, flag_sets) in crate::gpu::shader::FAMILIES {
                    for flags in flag_sets.iter() {
                        let code =
                            crate::gpu::shader::preprocess(file, v, flags, true).map_err(to_js)?;
                        let module = crate::gpu::shader::kernel_module(&gpu.device, file, code);
                        for m in module.get_compilation_info().await.messages {
                            if m.message_type == wgpu::CompilationMessageType::Error {
                                errors.push(serde_json::json!({
                                    "file": file, "flags": flags, "variant": v.name(),
                                    "message": m.message,
                                    "line": m.location.map(|l| l.line_number),
                                }));
                            }
                        }
                    }
                }
            }
            let _ = gpu.take_error();
            Ok(JsValue::from_str(
                &serde_json::Value::from(errors).to_string(),
            ))
        })
    }

    /// Measures greedy decode on a synthetic LLaMA (random weights at the real dimensions) with
    /// the same code as `minigpt4 bench --parts decode`, for the browser-against-native ratio.
    /// `options` is the JSON of [`crate::synthetic::DecodeBench`] (`{model, layers, quant,
    /// context, steps, runs, tiny}`, each optional); resolves to the report as JSON. The weights
    /// are freed when it returns.
    #[wasm_bindgen(js_name = benchDecode)]
    pub fn bench_decode(&self, options: String) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let gpu = inner.try_borrow().map_err(|_| busy())?.gpu.clone();
            let b: crate::synthetic::DecodeBench = if options.trim().is_empty() {
                Default::default()
            } else {
                serde_json::from_str(&options)
                    .map_err(|e| to_js(format!("benchDecode options: {e}")))?
            };
            let r = crate::synthetic::decode(&gpu, &b).await.map_err(to_js)?;
            Ok(JsValue::from_str(&r.to_string()))
        })
    }

    /// Parses and checks the package's `config.json`, index and `tokenizer.json`, allocates
    /// every GPU tensor, and returns the shard file names to feed, in order.
    #[wasm_bindgen(js_name = beginLoad)]
    pub fn begin_load(
        &self,
        base: &str,
        config: &[u8],
        index: &[u8],
        tokenizer: &[u8],
        ctx: u32,
    ) -> Result<Vec<String>, JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err("busy"))?;
        i.model = None;
        i.image = None;
        i.conv = None;
        i.loader = None;
        let l = PackageLoader::new(&i.gpu, base, config, index, tokenizer, ctx as usize)
            .map_err(js_err)?;
        let shards = l.shards();
        i.loader = Some(l);
        Ok(shards)
    }

    #[wasm_bindgen(js_name = beginShard)]
    pub fn begin_shard(&self, name: &str) -> Result<(), JsError> {
        self.with_loader(|l| l.begin_shard(name))
    }

    /// The next bytes of the current shard (any chunking).
    pub fn feed(&self, bytes: &[u8]) -> Result<(), JsError> {
        self.with_loader(|l| l.feed(bytes))
    }

    #[wasm_bindgen(js_name = endShard)]
    pub fn end_shard(&self) -> Result<(), JsError> {
        self.with_loader(|l| l.end_shard())
    }

    /// Weight bytes uploaded so far and in all, as `[written, total]`.
    pub fn progress(&self) -> Vec<f64> {
        match self.inner.try_borrow().ok().and_then(|i| {
            i.loader
                .as_ref()
                .map(|l| vec![l.written as f64, l.total as f64])
        }) {
            Some(v) => v,
            None => vec![0.0, 0.0],
        }
    }

    /// Completes loading; returns `{variant, imageSize}` as JSON.
    #[wasm_bindgen(js_name = finishLoad)]
    pub fn finish_load(&self) -> Result<String, JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err("busy"))?;
        let l = i
            .loader
            .take()
            .ok_or_else(|| js_err("no package is being loaded"))?;
        let m = l.finish().map_err(js_err)?;
        let info = serde_json::json!({
            "variant": m.label,
            "imageSize": m.vit.cfg.image_size,
        })
        .to_string();
        i.model = Some(m);
        Ok(info)
    }

    // In the async methods below the RefCell borrow is held across awaits on purpose: it is
    // the busy flag, so a second request while one is running gets "busy" instead of racing.

    /// Decodes, preprocesses and encodes an image (JPEG, PNG or WebP bytes); starts a new
    /// conversation about it.
    #[wasm_bindgen(js_name = setImage)]
    #[allow(clippy::await_holding_refcell_ref)]
    pub fn set_image(&self, bytes: Vec<u8>) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut i = inner.try_borrow_mut().map_err(|_| busy())?;
            let gpu = i.gpu.clone();
            let m = i.model.as_ref().ok_or_else(not_loaded)?;
            let px =
                crate::image::preprocess(&bytes, "image", m.vit.cfg.image_size).map_err(to_js)?;
            let emb = m.encode_image(&gpu, &px).await.map_err(to_js)?;
            let mut conv = Conversation::new(m.variant);
            conv.add_image();
            i.image = Some(emb);
            i.conv = Some(conv);
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Asks about the current image. `on_token(id, text)` is called for every generated token
    /// with the text that became visible (a last call with `id` undefined flushes what was held
    /// back while it could still have been the start of `###`); returning `false` stops the
    /// answer. Resolves to the answer as
    /// JSON: `{variant, prompt_token_ids, image_tokens, token_ids, text, finish, timings}`
    /// (`timings` as llama.cpp's server reports them: `prompt_n`, `prompt_ms`,
    /// `prompt_per_second`, `predicted_n`, `predicted_ms`, `predicted_per_second`).
    #[allow(clippy::await_holding_refcell_ref)]
    pub fn ask(
        &self,
        question: String,
        options: String,
        on_token: js_sys::Function,
    ) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let i = &mut *guard;
            let gpu = i.gpu.clone();
            let o: AskOptions = if options.trim().is_empty() {
                AskOptions::default()
            } else {
                serde_json::from_str(&options).map_err(|e| to_js(format!("ask options: {e}")))?
            };
            let m = i.model.as_mut().ok_or_else(not_loaded)?;
            let (Some(conv), Some(image)) = (i.conv.as_mut(), i.image.as_ref()) else {
                return Err(to_js("choose an image first"));
            };
            let d = ModelVariant::demo_sampling(m.variant);
            let sampling = Sampling {
                greedy: o.greedy.unwrap_or(d.greedy),
                temperature: o.temperature.unwrap_or(d.temperature),
                top_k: o.top_k.unwrap_or(d.top_k),
                top_p: o.top_p.unwrap_or(d.top_p),
                repetition_penalty: o.repetition_penalty.unwrap_or(d.repetition_penalty),
                seed: o.seed.unwrap_or(d.seed),
            };
            sampling.validate().map_err(to_js)?;
            let max_new = o.max_new_tokens.unwrap_or(300);
            conv.ask(&question);
            let mut stream = crate::chat::AnswerStream::new(m.tok.clone(), &[]);
            let answer = m
                .answer(&gpu, conv, image, &sampling, max_new, |id| {
                    let piece = stream.push(id);
                    let r = on_token.call2(
                        &JsValue::NULL,
                        &JsValue::from(id),
                        &JsValue::from_str(&piece),
                    );
                    !matches!(r, Ok(v) if v == JsValue::FALSE)
                })
                .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    conv.add_answer("");
                    return Err(to_js(e));
                }
            };
            conv.add_answer(&answer.text);
            let rest = stream.finish();
            if !rest.is_empty() {
                let _ = on_token.call2(
                    &JsValue::NULL,
                    &JsValue::UNDEFINED,
                    &JsValue::from_str(&rest),
                );
            }
            Ok(JsValue::from_str(
                &serde_json::json!({
                    "variant": m.label,
                    "prompt_token_ids": answer.prompt_token_ids,
                    "image_tokens": answer.image_tokens,
                    "token_ids": answer.token_ids,
                    "text": answer.text,
                    "finish": match answer.finish {
                        Finish::Eos | Finish::StopSequence => "stop",
                        Finish::MaxTokens => "length",
                        Finish::Cancelled => "cancelled",
                    },
                    "timings": answer.timings,
                })
                .to_string(),
            ))
        })
    }

    /// Forgets the conversation (the image stays).
    pub fn reset(&self) -> Result<(), JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err("busy"))?;
        let v = i.model.as_ref().map(|m| m.variant);
        if let (Some(v), true) = (v, i.image.is_some()) {
            let mut c = Conversation::new(v);
            c.add_image();
            i.conv = Some(c);
        }
        Ok(())
    }

    /// Releases the model's GPU memory.
    pub fn unload(&self) -> Result<(), JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err("busy"))?;
        i.model = None;
        i.loader = None;
        i.image = None;
        i.conv = None;
        Ok(())
    }
}

impl Engine {
    fn with_loader(
        &self,
        f: impl FnOnce(&mut PackageLoader) -> crate::Result<()>,
    ) -> Result<(), JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err("busy"))?;
        let l = i
            .loader
            .as_mut()
            .ok_or_else(|| js_err("no package is being loaded"))?;
        match f(l) {
            Ok(()) => Ok(()),
            Err(e) => {
                // a failed load releases everything it allocated
                i.loader = None;
                Err(js_err(e))
            }
        }
    }
}

fn to_js(e: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&e.to_string()).into()
}

fn busy() -> JsValue {
    to_js("the engine is busy with another request")
}

fn not_loaded() -> JsValue {
    to_js("no model is loaded")
}
