// The engine's Web Worker: loads the wasm module, streams a model package into WebGPU buffers
// (caching each shard with the Cache API), encodes images and streams answers back. The page
// talks to it only through web/minigpt4.js.
import init, { Engine } from './pkg/minigpt4.js';

const CACHE = 'minigpt4-weights-v1';
// The kernel tuning (GEMV lanes, GEMM form, norm fusion; a few seconds of measuring on a slow
// adapter), keyed inside by adapter, driver and kernel build, kept from one page load to the next.
const TUNING_CACHE = 'minigpt4-tuning-v1';
const TUNING_URL = new URL('minigpt4-tuning.json', self.location.href).href;
let tuningStored = null; // the stored tuning's text once read ('' when none)
let engine = null;
let stopRequested = false;

function post(msg) {
  self.postMessage(msg);
}

async function getEngine() {
  if (engine) return engine;
  if (!self.navigator.gpu) {
    throw new Error('This browser has no WebGPU (navigator.gpu is missing): use a recent Chrome, Edge or Safari, or enable WebGPU in the browser settings.');
  }
  await init();
  if (tuningStored === null) tuningStored = await readTuning();
  engine = await Engine.create(tuningStored || undefined);
  await saveTuning();
  return engine;
}

async function readTuning() {
  try {
    const c = self.caches ? await self.caches.open(TUNING_CACHE) : null;
    const r = c ? await c.match(TUNING_URL) : undefined;
    return r ? await r.text() : '';
  } catch {
    return ''; // no storage: tune at every load
  }
}

// Stores the engine's tuning when it changed (the first load, or a model with new shapes).
async function saveTuning() {
  const now = engine.tuning();
  if (!now || now === tuningStored) return;
  try {
    if (!self.caches) return;
    const c = await self.caches.open(TUNING_CACHE);
    await c.put(TUNING_URL, new Response(now, { headers: { 'content-type': 'application/json' } }));
    tuningStored = now;
  } catch {
    // best effort: the next load measures again
  }
}

async function fetchOk(url, init) {
  let r;
  try {
    r = await fetch(url, init);
  } catch (e) {
    throw new Error(`${url}: ${e.message}`);
  }
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${r.statusText}`);
  return r;
}

async function openCache() {
  try {
    return self.caches ? await self.caches.open(CACHE) : null;
  } catch {
    return null; // e.g. storage disabled: load without caching
  }
}

async function load(id, base, ctx, retried = false) {
  if (!engine) {
    tuningStored = await readTuning();
    if (!tuningStored) post({ id, type: 'progress', stage: 'tuning' });
  }
  const e = await getEngine();
  const adapter = JSON.parse(e.adapterInfo());
  post({ id, type: 'progress', stage: 'adapter', adapter });
  if (!base.endsWith('/')) base += '/';
  const small = await Promise.all(
    ['config.json', 'model.safetensors.index.json', 'tokenizer.json'].map(async (n) =>
      new Uint8Array(await (await fetchOk(base + n, { cache: 'no-cache' })).arrayBuffer())),
  );
  const shards = e.beginLoad(base, small[0], small[1], small[2], ctx);
  const cache = await openCache();
  const t0 = performance.now();
  let downloaded = 0;
  let lastPost = 0;
  for (let k = 0; k < shards.length; k++) {
    const url = base + shards[k];
    let resp = cache ? await cache.match(url) : undefined;
    const cached = !!resp;
    let put = null;
    if (!resp) {
      resp = await fetchOk(url, { cache: 'no-store' });
      if (cache && resp.body) {
        // one stream to the GPU, its twin to the cache; a shard is cached only when complete
        const [a, b] = resp.body.tee();
        put = cache.put(url, new Response(b, { headers: resp.headers })).catch((err) => {
          post({ id, type: 'progress', stage: 'warning', message: `could not cache ${shards[k]}: ${err.message}` });
        });
        resp = new Response(a, { headers: resp.headers });
      }
    }
    try {
      e.beginShard(shards[k]);
      const reader = resp.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        e.feed(value);
        if (!cached) downloaded += value.length;
        const now = performance.now();
        if (now - lastPost > 100) {
          lastPost = now;
          const [written, total] = e.progress();
          post({
            id, type: 'progress', stage: 'weights', written, total, shard: k, shards: shards.length,
            downloaded, seconds: (now - t0) / 1000, cached,
          });
        }
      }
      // size and SHA-256 against the index (and every tensor's bytes against the header)
      e.endShard();
    } catch (err) {
      // a shard that fails its checks never stays in the cache; a cached one is fetched again
      if (put) await put;
      if (cache) await cache.delete(url).catch(() => false);
      if (cached && !retried) {
        post({ id, type: 'progress', stage: 'warning', message: `cached ${shards[k]} is damaged (${err.message}); downloading it again` });
        return load(id, base, ctx, true);
      }
      throw err;
    }
    if (put) await put;
  }
  const [written, total] = e.progress();
  post({ id, type: 'progress', stage: 'weights', written, total, shard: shards.length, shards: shards.length, downloaded, seconds: (performance.now() - t0) / 1000 });
  const info = JSON.parse(e.finishLoad());
  return { ...info, adapter, downloaded, shards: shards.length };
}

async function ask(id, question, options) {
  const e = await getEngine();
  stopRequested = false;
  const json = await e.ask(question, JSON.stringify(options || {}), (tokenId, text) => {
    post({ id, type: 'token', tokenId, text });
    return !stopRequested;
  });
  await saveTuning(); // the first answer tunes a small model's shapes
  return JSON.parse(json);
}

self.onmessage = async (ev) => {
  const m = ev.data;
  if (m.type === 'stop') {
    stopRequested = true;
    return;
  }
  try {
    let result;
    switch (m.type) {
      case 'load': result = await load(m.id, m.base, m.ctx || 2048); break;
      case 'image': await (await getEngine()).setImage(new Uint8Array(m.bytes)); break;
      case 'ask': result = await ask(m.id, m.question, m.options); break;
      case 'checkKernels': result = JSON.parse(await (await getEngine()).checkKernels()); break;
      case 'benchDecode': result = JSON.parse(await (await getEngine()).benchDecode(JSON.stringify(m.options || {}))); break;
      case 'reset': (await getEngine()).reset(); break;
      case 'unload': if (engine) engine.unload(); break;
      case 'clearCache':
        result = self.caches ? await self.caches.delete(CACHE) : false;
        if (self.caches) await self.caches.delete(TUNING_CACHE);
        break;
      default: throw new Error(`unknown request ${m.type}`);
    }
    post({ id: m.id, type: 'done', result });
  } catch (err) {
    post({ id: m.id, type: 'error', message: err && err.message ? err.message : String(err) });
  }
};
