// The page: model URL + load progress, image chooser, streamed answers, stop, new chat,
// sampling settings. All model work happens in the worker behind web/minigpt4.js.
import { MiniGPT4 } from './minigpt4.js';

const $ = (id) => document.getElementById(id);
let chat = null;
let image = null;
let controller = null;

function setState(s) {
  document.body.dataset.state = s;
  const ready = s === 'ready';
  $('ask').disabled = !ready || !image;
  $('new-chat').disabled = !ready;
  $('stop').disabled = s !== 'answering';
  $('load').disabled = s === 'loading' || s === 'answering';
}

function showError(msg) {
  const e = $('error');
  e.textContent = msg;
  e.hidden = !msg;
}

function fmtBytes(n) {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / 1024).toFixed(0)} KiB`;
}

async function checkWebGpu() {
  const s = $('gpu-status');
  if (!navigator.gpu) {
    s.textContent = 'This browser has no WebGPU, so the model cannot run here. Use a recent Chrome, Edge or Safari (or enable WebGPU in the browser settings).';
    s.className = '';
    return;
  }
  const a = await navigator.gpu.requestAdapter();
  if (!a) {
    s.textContent = 'WebGPU is present but no GPU adapter is available (blocked or unsupported hardware).';
    return;
  }
  const l = a.limits;
  const info = a.info || {};
  s.textContent = `WebGPU adapter: ${info.vendor || ''} ${info.architecture || ''} ${info.description || ''}`.trim()
    + ` — storage binding ${fmtBytes(l.maxStorageBufferBindingSize)}, ${l.maxComputeInvocationsPerWorkgroup} invocations, `
    + `${l.maxStorageBuffersPerShaderStage} storage buffers per stage, shader-f16 ${a.features.has('shader-f16') ? 'yes' : 'no'}`;
}

async function load() {
  showError('');
  const url = $('model-url').value.trim();
  if (!url) {
    showError('Enter the URL of a model package (a directory made by `minigpt4 convert`).');
    return;
  }
  if (chat) chat.unload();
  chat = null;
  setState('loading');
  const bar = $('load-progress');
  bar.hidden = false;
  bar.value = 0;
  $('load-status').textContent = 'Starting the engine…';
  try {
    chat = await MiniGPT4.load(url, {
      onProgress: (p) => {
        if (p.stage === 'weights' && p.total > 0) {
          bar.value = p.written / p.total;
          const rate = p.seconds > 0 ? p.downloaded / p.seconds : 0;
          $('load-status').textContent = `Weights ${fmtBytes(p.written)} / ${fmtBytes(p.total)} · shard ${Math.min(p.shard + 1, p.shards)} of ${p.shards}`
            + (p.downloaded > 0 ? ` · downloaded ${fmtBytes(p.downloaded)} at ${fmtBytes(rate)}/s` : ' · from cache');
        } else if (p.stage === 'tuning') {
          $('load-status').textContent = 'Tuning the kernels for this GPU (first load only)…';
        } else if (p.stage === 'warning') {
          $('load-status').textContent = p.message;
        }
      },
    });
    const i = chat.info;
    bar.value = 1;
    $('load-status').textContent = `Loaded ${i.variant} (${i.shards} shard${i.shards === 1 ? '' : 's'}, `
      + (i.downloaded > 0 ? `${fmtBytes(i.downloaded)} downloaded` : 'all from cache') + `) on ${i.adapter.name || 'the WebGPU adapter'}`
      + ` (${i.adapter.f16 ? 'f16' : 'f32'} kernels, `
      + `${i.adapter.tuning === 'the tuning cache' ? 'tuning from cache' : 'tuned now'}).`;
    image = null;
    $('log').textContent = '';
    setState('ready');
    if ($('image-input').files.length) setImage($('image-input').files[0]);
  } catch (e) {
    setState('error');
    $('load-status').textContent = '';
    showError(`Could not load the model: ${e.message}`);
  }
}

function setImage(file) {
  if (!file) return;
  image = file;
  const t = $('thumb');
  t.src = URL.createObjectURL(file);
  t.hidden = false;
  $('drop-hint').textContent = file.name || 'image';
  $('log').textContent = '';
  if (document.body.dataset.state === 'ready') setState('ready');
}

function options() {
  const num = (id) => Number($(id).value);
  return {
    greedy: $('greedy').checked,
    temperature: num('temperature'),
    topK: num('top-k'),
    topP: num('top-p'),
    repetitionPenalty: num('repetition-penalty'),
    maxNewTokens: num('max-new-tokens'),
    seed: num('seed'),
  };
}

function addMsg(cls, text) {
  const d = document.createElement('div');
  d.className = `msg ${cls}`;
  d.textContent = text;
  $('log').appendChild(d);
  return d;
}

async function ask(ev) {
  ev.preventDefault();
  const q = $('question').value.trim();
  if (!chat || !image || !q) return;
  showError('');
  addMsg('user', q);
  const out = addMsg('bot', '');
  controller = new AbortController();
  setState('answering');
  try {
    const a = await chat.ask(image, q, {
      ...options(),
      signal: controller.signal,
      onToken: (text) => { out.textContent += text; },
    });
    out.textContent = a.text + (a.finish === 'cancelled' ? ' [stopped]' : '');
    const t = a.timings;
    if (t) {
      const rate = (r) => (r ? ` (${r.toFixed(1)} tok/s)` : '');
      const stats = document.createElement('div');
      stats.className = 'stats';
      const tokens = (n) => `${n} token${n === 1 ? '' : 's'}`;
      stats.textContent = `prompt ${tokens(t.prompt_n)} in ${(t.prompt_ms / 1e3).toFixed(2)} s${rate(t.prompt_per_second)}, `
        + `answer ${tokens(t.predicted_n)} in ${(t.predicted_ms / 1e3).toFixed(2)} s${rate(t.predicted_per_second)}`;
      out.appendChild(stats);
    }
    $('result-json').textContent = JSON.stringify(a);
    setState('ready');
  } catch (e) {
    setState('ready');
    showError(e.message);
  }
}

$('load').onclick = load;
$('ask-form').onsubmit = ask;
$('stop').onclick = () => controller && controller.abort();
$('new-chat').onclick = async () => {
  if (!chat) return;
  await chat.reset();
  $('log').textContent = '';
};
$('clear-cache').onclick = async () => {
  const ok = await MiniGPT4.clearCache();
  $('load-status').textContent = ok ? 'Cached weights and kernel tuning deleted.' : 'Nothing was cached.';
};
$('image-input').onchange = (e) => setImage(e.target.files[0]);
const drop = $('drop');
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  setImage(e.dataTransfer.files[0]);
};

const params = new URLSearchParams(location.search);
$('model-url').value = params.get('model') || localStorage.getItem('minigpt4-model-url') || '';
$('model-url').onchange = () => localStorage.setItem('minigpt4-model-url', $('model-url').value);
setState('idle');
checkWebGpu().catch((e) => { $('gpu-status').textContent = `WebGPU check failed: ${e.message}`; });
