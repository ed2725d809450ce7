// The JS API: MiniGPT-4 in a Web Worker, so the page never freezes.
//
//   const chat = await MiniGPT4.load('https://example.org/minigpt4-7b/', { onProgress });
//   const answer = await chat.ask(imageBlobOrBitmap, 'Describe this image.', { onToken, signal, greedy: true });
//   chat.reset(); chat.unload(); await MiniGPT4.clearCache();
//
// `answer` is {variant, prompt_token_ids, image_tokens, token_ids, text, finish}. Sampling
// options: greedy, temperature, topK, topP, repetitionPenalty, seed, maxNewTokens (defaults: the
// reference demo's). Weights are streamed shard by shard into GPU buffers and cached.

export class MiniGPT4 {
  constructor(worker) {
    this.worker = worker;
    this.pending = new Map();
    this.nextId = 1;
    this.image = null;
    this.info = null;
    worker.onmessage = (ev) => this._onMessage(ev.data);
    worker.onerror = (ev) => {
      const err = new Error(`worker failed: ${ev.message || 'could not start (is web/pkg built?)'}`);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
  }

  static worker(workerUrl) {
    return new Worker(workerUrl || new URL('./worker.js', import.meta.url), { type: 'module' });
  }

  /**
   * Loads the model package at `baseUrl` (a directory URL). `onProgress` gets
   * {stage: 'tuning'} when the kernels are being tuned (the first load on this adapter),
   * {stage: 'adapter', adapter}, {stage: 'weights', written, total, shard, shards, downloaded,
   * seconds, cached} and {stage: 'warning', message}.
   */
  static async load(baseUrl, { onProgress, ctx = 2048, workerUrl } = {}) {
    const chat = new MiniGPT4(MiniGPT4.worker(workerUrl));
    const base = new URL(baseUrl, globalThis.location ? globalThis.location.href : undefined).href;
    try {
      chat.info = await chat._call({ type: 'load', base, ctx }, { onProgress });
    } catch (e) {
      chat.worker.terminate();
      throw e;
    }
    return chat;
  }

  /** Asks about `image` (Blob, File or ImageBitmap; `null` keeps the current one). */
  async ask(image, question, { onToken, signal, ...options } = {}) {
    if (image && image !== this.image) {
      const bytes = await imageBytes(image);
      await this._call({ type: 'image', bytes }, {}, [bytes]);
      this.image = image;
    }
    const stop = () => this.worker.postMessage({ type: 'stop' });
    if (signal) {
      if (signal.aborted) throw new DOMException('aborted', 'AbortError');
      signal.addEventListener('abort', stop);
    }
    try {
      return await this._call({ type: 'ask', question, options }, { onToken });
    } finally {
      if (signal) signal.removeEventListener('abort', stop);
    }
  }

  /** Compiles every kernel on this device; resolves to the list of errors (empty = all good). */
  static async checkKernels({ workerUrl } = {}) {
    const chat = new MiniGPT4(MiniGPT4.worker(workerUrl));
    try {
      return await chat._call({ type: 'checkKernels' });
    } finally {
      chat.worker.terminate();
    }
  }

  /**
   * Decode speed on a synthetic LLaMA (random weights at real dimensions), measured in a
   * worker with the same code as `minigpt4 bench --parts decode`. Options: model
   * ('vicuna0-7b'), layers (1), quant ('q4'), context (128), steps (8), runs (3), tiny.
   * Resolves to the report ({decode_tok_per_s, per_token, gemv_lanes, adapter, ...}).
   */
  static async benchDecode(options = {}, { workerUrl } = {}) {
    const chat = new MiniGPT4(MiniGPT4.worker(workerUrl));
    try {
      return await chat._call({ type: 'benchDecode', options });
    } finally {
      chat.worker.terminate();
    }
  }

  /** A new conversation about the same image. */
  reset() {
    return this._call({ type: 'reset' });
  }

  /** Frees the GPU memory and stops the worker. */
  unload() {
    this.worker.postMessage({ type: 'unload' });
    this.worker.terminate();
    for (const p of this.pending.values()) p.reject(new Error('unloaded'));
    this.pending.clear();
  }

  /** Deletes every cached weight shard and the cached kernel tuning. */
  static async clearCache() {
    if (!globalThis.caches) return false;
    await globalThis.caches.delete('minigpt4-tuning-v1');
    return globalThis.caches.delete('minigpt4-weights-v1');
  }

  _call(msg, handlers = {}, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, ...handlers });
      this.worker.postMessage({ ...msg, id }, transfer);
    });
  }

  _onMessage(m) {
    const p = this.pending.get(m.id);
    if (!p) return;
    if (m.type === 'progress') {
      if (p.onProgress) p.onProgress(m);
    } else if (m.type === 'token') {
      if (p.onToken) p.onToken(m.text, m.tokenId);
    } else if (m.type === 'done') {
      this.pending.delete(m.id);
      p.resolve(m.result);
    } else if (m.type === 'error') {
      this.pending.delete(m.id);
      p.reject(new Error(m.message));
    }
  }
}

async function imageBytes(image) {
  if (typeof Blob !== 'undefined' && image instanceof Blob) return image.arrayBuffer();
  if (typeof ImageBitmap !== 'undefined' && image instanceof ImageBitmap) {
    const c = new OffscreenCanvas(image.width, image.height);
    c.getContext('2d').drawImage(image, 0, 0);
    return (await c.convertToBlob({ type: 'image/png' })).arrayBuffer();
  }
  throw new TypeError('image must be a Blob, File or ImageBitmap');
}
