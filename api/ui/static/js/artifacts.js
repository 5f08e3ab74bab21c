// A job's artifacts: size, sha256, download buttons (fetch with the Bearer header → Blob → object
// URL, the sha256 checked in the browser), the snippets that load each in transformers, vLLM and
// llama.cpp, and the manifest.

import { artifactJson, describe, downloadArtifact } from './api.js';
import { codeBlock, fmtBytes, h, replace, table } from './dom.js';

const BIG = 2 * 1024 ** 3;

function downloadButton(job, name, isDirectory, sha256) {
  const filename = name.includes('/') ? name.split('/').pop() : name;
  const saveAs = isDirectory ? `${filename}.tar` : filename;
  const button = h('button', { type: 'button', class: 'small', dataset: { download: name } }, 'Download');
  const status = h('span', { class: 'small dl-status', dataset: { status: name } });
  button.addEventListener('click', async () => {
    button.disabled = true;
    status.className = 'small dl-status';
    status.textContent = 'downloading…';
    try {
      const got = await downloadArtifact(job.id, name, saveAs, (n, total) => {
        status.textContent = total ? `downloading… ${Math.round((100 * n) / total)} %` : `downloading… ${fmtBytes(n)}`;
      });
      if (got.sha256 === null) {
        status.textContent = `saved ${fmtBytes(got.size)} (sha256 not checked: this page is not a secure context)`;
      } else if (got.sha256 === sha256) {
        status.textContent = `saved ${saveAs}, sha256 verified`;
        status.classList.add('ok');
      } else {
        status.textContent = `sha256 MISMATCH: got ${got.sha256}, listed ${sha256}`;
        status.classList.add('error');
      }
    } catch (err) {
      status.textContent = `download failed: ${describe(err)}`;
      status.classList.add('error');
    } finally {
      button.disabled = false;
    }
  });
  return h('span', { class: 'dl' }, button, status);
}

function shaCell(sha) {
  return h('code', { class: 'sha', title: sha }, `${sha.slice(0, 12)}…`);
}

function vllmNote(job) {
  const spec = job.spec;
  if (spec.target_runtime === 'vllm') return ''; // the service checked the menu and wrote the group layout
  const bits = (job.result && job.result.budgets || []).flatMap((b) => Object.values(b.bits || {}));
  const reasons = [];
  if (!spec.symmetric) reasons.push('this job is asymmetric (vLLM needs symmetric weights whose group size divides every width)');
  if (bits.some((b) => b === 2 || b === 3)) reasons.push('it has 2- or 3-bit layers (vLLM serves 4 and 8 bit)');
  return reasons.length ? `# vLLM will likely refuse this export: ${reasons.join('; ')}. Submit with "target_runtime": "vllm" for one it serves; see docs/ARTIFACTS.md.\n` : '';
}

/** Snippets for one artifact (hf directory, GGUF file), with the download commands. */
export function snippets(job, art) {
  const base = window.location.origin;
  const url = `${base}/v1/jobs/${job.id}/artifacts/${art.name}`;
  const auth = '-H "Authorization: Bearer $TAQ_API_KEY" ';
  if (art.kind === 'directory' || art.format === 'hf') {
    const dir = art.name;
    return [
      ['download', `curl -fL ${auth}-o ${dir}.tar ${url}\ntar -xf ${dir}.tar          # makes ${dir}/\n# or: TAQ_URL=${base} taq download ${job.id} ${dir}`],
      ['transformers', `# pip install transformers compressed-tensors\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\ntokenizer = AutoTokenizer.from_pretrained("${dir}")\nmodel = AutoModelForCausalLM.from_pretrained("${dir}")`],
      ['vLLM', `${vllmNote(job)}vllm serve ./${dir} --dtype float16`],
    ];
  }
  if (art.format === 'gguf') {
    return [
      ['download', `curl -fL ${auth}-o ${art.name} ${url}\n# or: TAQ_URL=${base} taq download ${job.id} ${art.name}`],
      ['llama.cpp', `llama-cli -m ${art.name} -p "The capital of France is" -n 32 --temp 0\nllama-server -m ${art.name} --port 8080`],
      ['transformers', `from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(".", gguf_file="${art.name}")   # dequantized to float on load`],
    ];
  }
  return [];
}

function snippetTabs(job, art) {
  const items = snippets(job, art);
  if (!items.length) return null;
  const panel = h('div', {});
  const tabs = h('div', { class: 'tabs', role: 'tablist' });
  items.forEach(([label, text], i) => {
    const tab = h('button', { type: 'button', role: 'tab', class: 'tab', 'aria-selected': i === 0 ? 'true' : 'false' }, label);
    tab.addEventListener('click', () => {
      for (const t of tabs.children) t.setAttribute('aria-selected', t === tab ? 'true' : 'false');
      replace(panel, codeBlock(text));
    });
    tabs.append(tab);
  });
  replace(panel, codeBlock(items[0][1]));
  return h('details', { class: 'snippets', dataset: { artifact: art.name } }, h('summary', {}, `use ${art.name}`), tabs, panel);
}

export function artifactsSection(job, artifacts) {
  const rows = table([
    { label: 'name', cell: (a) => h('span', { class: 'mono' }, a.name, a.kind === 'directory' ? ` (${a.files ? a.files.length : 0} files, .tar)` : '') },
    { label: 'format', cell: (a) => a.format },
    { label: 'size', cell: (a) => fmtBytes(a.size), class: 'num' },
    { label: 'sha256', cell: (a) => shaCell(a.sha256) },
    { label: '', cell: (a) => downloadButton(job, a.name, a.kind === 'directory', a.sha256) },
  ], artifacts, { className: 'grid artifacts', empty: 'No artifacts.' });
  const big = artifacts.filter((a) => a.size > BIG);
  const dirs = artifacts.filter((a) => a.kind === 'directory' && a.files);
  return h('section', { class: 'card', id: 'artifacts' }, h('h2', {}, 'Artifacts'), rows,
    big.length ? h('p', { class: 'warn' }, `The browser holds a download in memory until it is saved; for ${big.map((a) => a.name).join(', ')} `
      + 'prefer curl or `taq download` (resumable, sha256 checked).') : null,
    dirs.map((a) => h('details', { class: 'files' }, h('summary', {}, `files of ${a.name}`), table([
      { label: 'file', cell: (f) => h('span', { class: 'mono' }, f.name) },
      { label: 'size', cell: (f) => fmtBytes(f.size), class: 'num' },
      { label: 'sha256', cell: (f) => shaCell(f.sha256) },
      { label: '', cell: (f) => downloadButton(job, f.name, false, f.sha256) },
    ], a.files, { className: 'grid compact' }))),
    artifacts.map((a) => snippetTabs(job, a)));
}

export function manifestSection(job, signal) {
  const pre = h('pre', { id: 'manifest', class: 'small' }, 'loading…');
  const details = h('details', {}, h('summary', {}, 'manifest.json'), pre);
  let loaded = false;
  details.addEventListener('toggle', async () => {
    if (!details.open || loaded) return;
    loaded = true;
    try {
      pre.textContent = JSON.stringify(await artifactJson(job.id, 'manifest.json', signal), null, 2);
    } catch (err) {
      loaded = false;
      pre.textContent = `could not load manifest.json: ${describe(err)}`;
    }
  });
  return h('section', { class: 'card', id: 'manifest-section' }, h('h2', {}, 'Manifest'),
    h('p', { class: 'help' }, 'spec, seed, source hash, library versions, bit map, effective bits measured from the stored bytes, sha256 of every file'),
    details);
}
