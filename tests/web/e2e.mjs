// End-to-end test of the web page in headless Chromium (WebGPU on SwiftShader: no shader-f16,
// no subgroups), run by tests/run.sh after `bash web/build.sh`:
//
//   node tests/web/e2e.mjs --bin target/debug/minigpt4 --out target/web-e2e
//
// 1. the native `minigpt4 chat --format json --greedy` answer on the smoke package and a test image;
// 2. a static server on 127.0.0.1 serves web/ and the package at /model/, counting shard requests;
// 3. the page loads the package, takes the image, answers greedily: its token ids must equal
//    the native ones; a screenshot goes to --out;
// 4. after a reload the package loads again with no shard fetched from the network (cache).
// 5. a truncated cached shard is detected (size, SHA-256), dropped and downloaded again.
// The kernel tuning is measured once, stored in the Cache API and taken from there by later
// loads; a damaged stored tuning is measured again.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const bin = path.resolve(root, arg('--bin', 'target/debug/minigpt4'));
const outDir = path.resolve(root, arg('--out', 'target/web-e2e'));
const pkgDir = path.join(root, 'tests/fixtures/minigpt4/vicuna0_tiny_pkg');
const imagePath = path.join(root, 'tests/fixtures/images/chelsea_q90.jpg');
const question = 'What is in this picture?';
const maxNew = 12;
fs.mkdirSync(outDir, { recursive: true });

function fail(msg) {
  console.error(`web e2e: FAILED: ${msg}`);
  process.exit(1);
}

// ---- 1. native reference (portable kernels, like the browser's)
const native = spawnSync(bin, [
  'chat', '--model', pkgDir, '--image', imagePath, '--prompt', question,
  '--greedy', '--max-new-tokens', String(maxNew), '--format', 'json',
], { encoding: 'utf8', env: { ...process.env, MINIGPT4_PORTABLE: '1' } });
if (native.status !== 0) fail(`native chat: ${native.stderr}`);
const want = JSON.parse(native.stdout.trim());
console.log(`native: ${JSON.stringify(want.token_ids)}`);

// ---- 2. server
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm', '.json': 'application/json' };
const shardRequests = [];
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  let file;
  if (url.pathname.startsWith('/model/')) {
    file = path.join(pkgDir, path.basename(url.pathname));
    if (file.endsWith('.safetensors')) shardRequests.push(url.pathname);
  } else {
    file = path.join(root, 'web', path.normalize(url.pathname === '/' ? '/index.html' : url.pathname));
  }
  if (!file.startsWith(root) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    res.writeHead(404).end('not found');
    return;
  }
  res.writeHead(200, {
    'content-type': types[path.extname(file)] || 'application/octet-stream',
    'content-length': fs.statSync(file).size,
  });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

// ---- 3. the page
const userData = fs.mkdtempSync(path.join(outDir, 'profile-'));
const browser = await chromium.launchPersistentContext(userData, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  ignoreDefaultArgs: ['--headless'],
  args: ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic', '--disable-dev-shm-usage'],
});
let code = 0;
const logs = [];
const page = browser.pages()[0] || await browser.newPage();
try {
  page.on('console', (m) => logs.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  page.on('worker', (w) => w.on('console', (m) => logs.push(`[worker.${m.type()}] ${m.text()}`)));
  const errorText = async () => (await page.locator('#error').isVisible()) ? await page.locator('#error').textContent() : '';

  async function loadModel() {
    await page.goto(`${base}/index.html?model=/model/`);
    await page.click('#load');
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 180_000 });
    const state = await page.evaluate(() => document.body.dataset.state);
    if (state !== 'ready') throw new Error(`load failed: ${await errorText()}`);
    console.log(`page: ${await page.locator('#load-status').textContent()}`);
  }

  async function askGreedy() {
    await page.setInputFiles('#image-input', imagePath);
    await page.evaluate(() => { document.getElementById('settings').open = true; });
    await page.check('#greedy');
    await page.fill('#max-new-tokens', String(maxNew));
    await page.fill('#question', question);
    await page.evaluate(() => { document.getElementById('result-json').textContent = ''; });
    await page.click('#ask');
    await page.waitForFunction(
      () => document.getElementById('result-json').textContent !== '' || document.getElementById('error').hidden === false,
      null, { timeout: 300_000 });
    const err = await errorText();
    if (err) throw new Error(`ask failed: ${err}`);
    return JSON.parse(await page.locator('#result-json').textContent());
  }

  // every kernel compiles in the browser's shader compiler (Tint is stricter than naga)
  await page.goto(`${base}/index.html`);
  const storedTuning = () => page.evaluate(async () => {
    const r = await (await caches.open('minigpt4-tuning-v1')).match(new URL('minigpt4-tuning.json', location.href).href);
    return r ? r.text() : null;
  });
  if (await storedTuning() !== null) throw new Error('a fresh browser profile already holds a tuning');
  const kernelErrors = await page.evaluate(async () => {
    const { MiniGPT4 } = await import('./minigpt4.js');
    return MiniGPT4.checkKernels();
  });
  if (kernelErrors.length) {
    throw new Error(`kernels that do not compile in the browser:\n${kernelErrors.map((e) => `${e.file} ${JSON.stringify(e.flags)} ${e.variant} line ${e.line}: ${e.message}`).join('\n')}`);
  }
  console.log('browser: every kernel compiles');
  // that engine measured the tuning and the worker stored it
  const tuned = JSON.parse(await storedTuning() || 'null');
  const entries = tuned ? Object.values(tuned) : [];
  if (entries.length !== 1 || !['gemv_lanes', 'gemm_form', 'fuse_norm'].every((k) => k in entries[0])) {
    throw new Error(`the tuning was not stored after the first engine: ${JSON.stringify(tuned)}`);
  }
  await loadModel();
  const tuningText = async () => (await page.locator('#load-status').textContent()).includes('tuning from cache');
  if (!await tuningText()) throw new Error('the second engine measured the tuning again instead of taking it from the cache');
  const shardsFirst = shardRequests.length;
  if (shardsFirst === 0) throw new Error('no shard was fetched on the first load');
  const got = await askGreedy();
  await page.screenshot({ path: path.join(outDir, 'web-e2e.png'), fullPage: true });
  console.log(`browser: ${JSON.stringify(got.token_ids)} "${got.text}"`);
  for (const k of ['token_ids', 'prompt_token_ids', 'image_tokens', 'variant']) {
    if (JSON.stringify(got[k]) !== JSON.stringify(want[k])) {
      throw new Error(`${k}: browser ${JSON.stringify(got[k])} != native ${JSON.stringify(want[k])}`);
    }
  }
  const streamed = await page.locator('.msg.bot').last().textContent();
  if (!streamed.includes(got.text.trim().slice(0, 8))) throw new Error(`answer not shown: "${streamed}"`);
  // the answer's timings, as llama.cpp's server reports them, under the answer
  const t = got.timings || {};
  if (t.predicted_n !== got.token_ids.length || !(t.prompt_n > 0) || !(t.prompt_ms > 0) || !(t.predicted_per_second > 0)) {
    throw new Error(`timings: ${JSON.stringify(t)}`);
  }
  const stats = await page.locator('.msg.bot .stats').last().textContent();
  if (!stats.includes(`answer ${t.predicted_n} token`) || !stats.includes('tok/s')) throw new Error(`stats not shown: "${stats}"`);
  // the first answer tuned the small model's shapes, stored with the rest
  if (!('shapes' in Object.values(JSON.parse(await storedTuning()))[0])) {
    throw new Error(`the shapes' tuning was not stored: ${await storedTuning()}`);
  }

  // ---- 4. reload: the weights come from the cache
  await loadModel();
  if (shardRequests.length !== shardsFirst) {
    throw new Error(`a reload fetched ${shardRequests.length - shardsFirst} shard(s) from the network: ${shardRequests.join(', ')}`);
  }
  const again = await askGreedy();
  if (JSON.stringify(again.token_ids) !== JSON.stringify(want.token_ids)) {
    throw new Error(`after reload: ${JSON.stringify(again.token_ids)} != ${JSON.stringify(want.token_ids)}`);
  }

  // ---- 5. a damaged cache entry (truncated, as a full disk or a killed tab could leave it) is
  // detected by its size and SHA-256, dropped, and downloaded again; never loaded as weights
  const shardUrl = base + shardRequests[0];
  await page.evaluate(async (u) => {
    const c = await caches.open('minigpt4-weights-v1');
    const full = new Uint8Array(await (await c.match(u)).arrayBuffer());
    await c.put(u, new Response(full.slice(0, full.length - 64)));
  }, shardUrl);
  const before5 = shardRequests.length;
  // and a damaged stored tuning: measured again, stored again, the same answer
  await page.evaluate(async (u) => {
    await (await caches.open('minigpt4-tuning-v1')).put(u, new Response('{"truncated'));
  }, new URL('minigpt4-tuning.json', `${base}/`).href);
  await loadModel();
  if (await tuningText()) throw new Error('a damaged stored tuning was used');
  JSON.parse(await storedTuning());
  if (shardRequests.length !== before5 + 1) {
    throw new Error(`a damaged cached shard: expected one new download, got ${shardRequests.length - before5}`);
  }
  const repaired = await askGreedy();
  if (JSON.stringify(repaired.token_ids) !== JSON.stringify(want.token_ids)) {
    throw new Error(`after repair: ${JSON.stringify(repaired.token_ids)} != ${JSON.stringify(want.token_ids)}`);
  }
  const cachedLen = await page.evaluate(async (u) => {
    const r = await (await caches.open('minigpt4-weights-v1')).match(u);
    return r ? (await r.arrayBuffer()).byteLength : -1;
  }, shardUrl);
  const realLen = fs.statSync(path.join(pkgDir, path.basename(shardRequests[0]))).size;
  if (cachedLen !== realLen) throw new Error(`the cache holds ${cachedLen} bytes of the shard, not ${realLen}`);
  console.log('browser: a truncated cached shard was detected, dropped and downloaded again');
  await page.screenshot({ path: path.join(outDir, 'web-e2e-reload.png'), fullPage: true });

  // Stop: a long sampled answer, stopped once it has started streaming
  await page.uncheck('#greedy');
  await page.fill('#max-new-tokens', '150');
  await page.evaluate(() => { document.getElementById('result-json').textContent = ''; });
  const before = await page.locator('.msg.bot').count();
  await page.click('#ask');
  await page.waitForFunction((n) => {
    const m = document.querySelectorAll('.msg.bot');
    return (m.length > n && m[m.length - 1].textContent.length > 0)
      || document.getElementById('result-json').textContent !== ''
      || !document.getElementById('error').hidden;
  }, before, { timeout: 120_000 });
  if (await errorText()) throw new Error(`stop: ${await errorText()}`);
  await page.click('#stop');
  await page.waitForFunction(() => document.getElementById('result-json').textContent !== '', null, { timeout: 120_000 });
  const stopped = JSON.parse(await page.locator('#result-json').textContent());
  if (stopped.finish !== 'cancelled' || stopped.token_ids.length >= 150) {
    console.log(JSON.stringify(stopped));
    throw new Error(`stop: finish ${stopped.finish} after ${stopped.token_ids.length} tokens`);
  }
  console.log(`browser: stopped after ${stopped.token_ids.length} tokens`);
  console.log(`web e2e: ok (${shardsFirst} shard request(s) on the first load, none after reload; screenshots in ${outDir})`);
} catch (e) {
  code = 1;
  console.error(`web e2e: FAILED: ${e.message}`);
  try {
    await page.screenshot({ path: path.join(outDir, 'web-e2e-failure.png'), fullPage: true });
  } catch { /* ignore */ }
} finally {
  fs.writeFileSync(path.join(outDir, 'console.log'), logs.join('\n') + '\n');
  await browser.close();
  server.close();
  fs.rmSync(userData, { recursive: true, force: true });
}
process.exit(code);
