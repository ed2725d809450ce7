// Browser decode against native decode on the same driver: the issue's "browser ≥ 80 % of
// native on SwiftShader". Both sides run the same Rust code (src/synthetic.rs) on the same
// synthetic LLaMA: the page through `MiniGPT4.benchDecode` in a worker (Chromium's WebGPU on
// its SwiftShader), natively through `minigpt4 bench --parts decode` with Vulkan pointed at
// Chromium's SwiftShader ICD, portable kernels and the GEMV lanes the page chose.
//
//   node tests/web/bench.mjs --bin target/release/minigpt4 [--model vicuna0-7b] [--layers 1]
//        [--context 128] [--steps 8] [--runs 3] [--quant q4] [--tiny] [--out FILE.json]
//
// Prints both rates and the ratio; no threshold is checked (not a timed test). Needs
// `bash web/build.sh` first (release for real numbers).
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
const bin = path.resolve(root, arg('--bin', 'target/release/minigpt4'));
const tiny = process.argv.includes('--tiny');
const opts = {
  model: arg('--model', 'vicuna0-7b'),
  layers: Number(arg('--layers', '1')),
  quant: arg('--quant', 'q4'),
  context: Number(arg('--context', '128')),
  steps: Number(arg('--steps', tiny ? '2' : '8')),
  runs: Number(arg('--runs', tiny ? '1' : '3')),
  tiny,
};
const out = arg('--out', '');
const swiftshader = process.env.SWIFTSHADER_ICD || '/usr/lib/chromium/vk_swiftshader_icd.json';

function fail(msg) {
  console.error(`web bench: FAILED: ${msg}`);
  process.exit(1);
}
if (!fs.existsSync(path.join(root, 'web/pkg/minigpt4_bg.wasm'))) fail('web/pkg is not built (bash web/build.sh)');
if (!fs.existsSync(swiftshader)) fail(`no SwiftShader ICD at ${swiftshader} (set SWIFTSHADER_ICD)`);

// ---- the page, served from web/
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm' };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const file = path.join(root, 'web', path.normalize(url.pathname === '/' ? '/index.html' : url.pathname));
  if (!file.startsWith(path.join(root, 'web')) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    res.writeHead(404).end('not found');
    return;
  }
  res.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream' });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;
const userData = fs.mkdtempSync(path.join(root, 'target', 'bench-profile-'));
const browser = await chromium.launchPersistentContext(userData, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  ignoreDefaultArgs: ['--headless'],
  args: ['--headless=new', '--no-sandbox', '--enable-unsafe-webgpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
});
let web;
let pageError;
try {
  const page = browser.pages()[0] || await browser.newPage();
  await page.goto(`${base}/index.html`);
  web = await page.evaluate(async (o) => {
    const { MiniGPT4 } = await import('./minigpt4.js');
    return MiniGPT4.benchDecode(o);
  }, opts);
} catch (e) {
  pageError = e;
} finally {
  await browser.close().catch(() => {});
  server.close();
  fs.rmSync(userData, { recursive: true, force: true });
}

if (pageError) fail(`page: ${pageError.message}`);

// ---- native, on the same SwiftShader, with the lanes the page chose
const args = ['bench', '--parts', 'decode', '--synthetic', opts.model, '--layers', String(opts.layers),
  '--quant', opts.quant, '--runs', String(opts.runs), '--json'];
if (tiny) args.push('--tiny');
const nat = spawnSync(bin, args, {
  encoding: 'utf8',
  env: {
    ...process.env, VK_ICD_FILENAMES: swiftshader, WGPU_BACKEND: 'vulkan', MINIGPT4_PORTABLE: '1',
    MINIGPT4_GEMV_LANES: String(web.gemv_lanes),
  },
});
if (nat.status !== 0) fail(`native bench: ${nat.stderr}`);
const native = JSON.parse(nat.stdout).decode;
for (const [who, r] of [['browser', web], ['native', native]]) {
  for (const k of ['decode_tok_per_s', 'decode_tok_per_s_waiting', 'decode_tok_per_s_sampled', 'decode_tok_per_s_sampled_waiting']) {
    if (!(r[k] > 0)) fail(`${who}: no ${k} in ${JSON.stringify(r)}`);
  }
}
const ratio = web.decode_tok_per_s / native.decode_tok_per_s;
const line = (who, r) => `  ${who.padEnd(8)} ${r.decode_tok_per_s.toFixed(2).padStart(8)} tok/s  (${r.adapter || 'name hidden by the browser'}, ${r.kernel_variant} kernels, ${r.gemv_lanes} GEMV lanes, per token ${(r.per_token.min_s * 1e3).toFixed(1)}–${(r.per_token.max_s * 1e3).toFixed(1)} ms)`;
console.log(`decode, synthetic ${web.model}, ${web.layers} layer(s), ${web.quant}, context ${web.context}${tiny ? ' (tiny: proves it runs, measures nothing)' : ''}:`);
console.log(line('browser', web));
console.log(line('native', native));
console.log(`  browser / native: ${(100 * ratio).toFixed(0)} %`);
// each token read back before the next is submitted (what chat did before tokens were
// submitted ahead): the host's round trip per token, on each side
for (const [who, r] of [['browser', web], ['native', native]]) {
  console.log(`  ${who.padEnd(8)} ${r.decode_tok_per_s_waiting.toFixed(2).padStart(8)} tok/s reading each token back before submitting the next (${(100 * r.decode_tok_per_s / r.decode_tok_per_s_waiting).toFixed(0)} % for submitting ahead)`);
}
// chat's default, the reference demo's sampling (top-k 50, top-p 0.9), sampled on the GPU
for (const [who, r] of [['browser', web], ['native', native]]) {
  console.log(`  ${who.padEnd(8)} ${r.decode_tok_per_s_sampled.toFixed(2).padStart(8)} tok/s sampled, ${r.decode_tok_per_s_sampled_waiting.toFixed(2)} reading each token back (${(100 * r.decode_tok_per_s_sampled / r.decode_tok_per_s_sampled_waiting).toFixed(0)} % for submitting ahead)`);
}
if (out) fs.writeFileSync(out, JSON.stringify({ options: opts, browser: web, native, browser_over_native: ratio }, null, 2) + '\n');
