// New job: upload calibration / eval JSONL (POST /v1/datasets; per-line problems shown as the API
// lists them), pick a model from /v1/models, method, budget(s), bits, group size, quantizer,
// exports; POST /v1/jobs with an Idempotency-Key, refusals shown with their details.

import { enc, request } from './api.js';
import { errorBlock } from './errors.js';
import { fmtTime, h, replace } from './dom.js';

const METHODS = [
  ['taq', 'taq', 'TAQ: matrix entropy and update variance of each layer on the task\u2019s tokens (one forward pass)'],
  ['taq_kl', 'taq_kl', 'TAQ-KL: next-token KL at the end of the prompt when only that layer is quantized'],
  ['taqo', 'taqo', 'TAQO: rise of the answer tokens\u2019 NLL when only that layer is quantized (teacher-forced oracle)'],
  ['taqo_gen', 'taqo_gen', 'TAQO as the paper: drop of 0.5\u00b7(EM+F1) of greedy answers when only that layer is quantized (one generation per layer)'],
  ['taq_grad', 'taq_grad', 'TAQ-Grad: predicted task-loss increase of every format (one backward pass)'],
  ['uniform', 'uniform', 'one precision for every layer (baseline, needs no calibration)'],
];
const BITS = [2, 3, 4, 5, 6, 7, 8, 16];

function newKey() {
  if (window.crypto && typeof window.crypto.randomUUID === 'function') return `ui-${window.crypto.randomUUID()}`;
  return `ui-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function field(label, control, help) {
  const id = control.id;
  return h('div', { class: 'field' }, h('label', { for: id }, label), control, help ? h('p', { class: 'help' }, help) : null);
}

function select(id, options, value) {
  return h('select', { id, name: id }, options.map(([v, text]) => h('option', { value: v, selected: v === value }, text)));
}

function checkboxes(name, values, checked, legend) {
  return h('fieldset', { class: 'checks', id: name }, h('legend', {}, legend),
    values.map((v) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name, value: String(v), checked: checked.includes(v) }), ` ${v}`)));
}

/** A dataset chooser: upload a JSONL file or pick one uploaded before. */
function datasetPicker(role, datasets, signal) {
  const file = h('input', { type: 'file', id: `${role}-file`, accept: '.jsonl,.json,.txt,application/jsonl,application/x-ndjson' });
  const choose = h('select', { id: `${role}-dataset` }, h('option', { value: '' }, '— none —'),
    datasets.map((d) => h('option', { value: d.id }, `${d.filename || d.id} · ${d.rows} rows · ${fmtTime(d.created_at)}`)));
  const status = h('div', { class: 'upload-status', id: `${role}-status`, 'aria-live': 'polite' });
  file.addEventListener('change', async () => {
    const picked = file.files && file.files[0];
    if (!picked) return;
    replace(status, h('p', { class: 'muted' }, `uploading ${picked.name}…`));
    const form = new FormData();
    form.append('file', picked, picked.name);
    try {
      const ds = await request('/v1/datasets', { method: 'POST', body: form, signal });
      choose.append(h('option', { value: ds.id }, `${ds.filename || ds.id} · ${ds.rows} rows · just uploaded`));
      choose.value = ds.id;
      choose.dispatchEvent(new Event('change', { bubbles: true }));
      replace(status, h('p', { class: 'ok', dataset: { dataset: ds.id } },
        `uploaded ${ds.id}: ${ds.rows} rows, ${ds.has_answers ? 'with' : 'without'} gold answers`));
    } catch (err) {
      if (err && err.name === 'AbortError') return;
      replace(status, errorBlock(err, `${picked.name} was refused — `));
    } finally {
      file.value = '';
    }
  });
  return { file, choose, status };
}

function parseBudgets(text) {
  const parts = text.split(/[\s,;]+/).filter(Boolean);
  const values = parts.map(Number);
  if (values.some((v) => !Number.isFinite(v))) throw new Error(`budget “${text}” is not a number or a list of numbers`);
  return values;
}

// "8=128, 4=32" -> {"8": 128, "4": 32} (group_size_by_bits); blank -> null
function parseGroupSizes(text) {
  const parts = text.split(/[\s,;]+/).filter(Boolean);
  if (!parts.length) return null;
  const out = {};
  for (const part of parts) {
    const m = /^(\d+)=(\d+)$/.exec(part);
    if (!m) throw new Error(`group size per width “${part}” is not BITS=SIZE, e.g. 8=128`);
    out[m[1]] = Number(m[2]);
  }
  return out;
}

export async function newJobView(container, ctx) {
  const [models, datasetPage] = await Promise.all([
    request('/v1/models', { signal: ctx.signal }),
    request('/v1/datasets?limit=100', { signal: ctx.signal }).catch(() => ({ items: [] })),
  ]);
  const datasets = datasetPage.items || [];
  const modelSel = select('model', models.map((m) => [m.id, `${m.id}${m.weights_format ? ` (${m.weights_format})` : ''}`]), models[0] && models[0].id);
  const methodSel = select('method', METHODS.map(([v, label]) => [v, label]), 'taq');
  const methodHelp = h('p', { class: 'help' });
  const cal = datasetPicker('calibration', datasets, ctx.signal);
  const ev = datasetPicker('eval', datasets, ctx.signal);
  const evalMode = select('eval-mode', [['none', 'no evaluation'], ['fraction', 'hold out part of the calibration rows'],
    ['dataset', 'an eval dataset']], 'none');
  const evalFraction = h('input', { id: 'eval-fraction', type: 'number', min: '0.01', max: '0.99', step: '0.01', value: '0.2' });
  const budgets = h('input', { id: 'budgets', type: 'text', value: '4.5', inputmode: 'decimal', autocomplete: 'off' });
  const bits = checkboxes('bit-choices', BITS, [4, 8, 16], 'Bit choices');
  const exportsBox = checkboxes('exports', ['hf', 'gguf'], ['hf'], 'Exports');
  const group = h('input', { id: 'group-size', type: 'number', min: '8', max: '4096', step: '1', value: '128' });
  const quantizer = select('quantizer', [['rtn', 'rtn (round to nearest)'], ['gptq', 'gptq (error-compensating, needs calibration)']], 'rtn');
  const allocation = select('allocation', [['budget', 'budget (exact knapsack)'], ['paper', 'paper (fixed rules; taq / taqo)'],
    ['error_only', 'error_only (control: every sensitivity 1)'], ['random', 'random (control: seeded random layers)']], 'budget');
  const unit = select('allocation-unit', [['layer', 'layer'], ['linear', 'linear (each projection its own bits)']], 'layer');
  const runtime = select('target-runtime', [['', 'any (no restriction)'], ['vllm', 'vllm (hf, group layout, 4/8-bit)'],
    ['llama.cpp', 'llama.cpp (gguf, 4/8-bit)'], ['transformers', 'transformers (hf)']], '');
  const num = (id, value, min, max) => h('input', { id, type: 'number', value: String(value), min: String(min), max: String(max), step: '1' });
  const adv = {
    symmetric: h('input', { id: 'symmetric', type: 'checkbox' }),
    groupSizes: h('input', { id: 'group-size-by-bits', type: 'text', placeholder: 'e.g. 8=128 (the rest: group size)', autocomplete: 'off' }),
    zeroPoint: select('zero-point', [['integer', 'integer (every export)'], ['float', 'float offset (≤ 5 bits; gguf Q4_1/Q5_1 only)']], 'integer'),
    kQuants: h('input', { id: 'k-quants', type: 'checkbox' }),
    clip: h('input', { id: 'clip-search', type: 'checkbox' }),
    controls: h('input', { id: 'eval-controls', type: 'checkbox', checked: true }),
    closedLoop: h('input', { id: 'closed-loop', type: 'checkbox' }),
    inputs: select('calibration-inputs', [['fp', 'fp (full-precision activations)'], ['quantized', 'quantized (sequential)']], 'fp'),
    rows: num('max-calibration-rows', 256, 1, 4096),
    tokens: num('max-tokens', 256, 8, 8192),
    reservoir: num('reservoir-size', 256, 8, 4096),
    seed: num('seed', 0, 0, 2147483647),
    workerClass: h('input', { id: 'worker-class', type: 'text', placeholder: 'any (the smallest that fits)', autocomplete: 'off' }),
    profileFrom: h('input', { id: 'profile-from', type: 'text', placeholder: 'job id whose profile to reuse', autocomplete: 'off' }),
  };
  const preview = h('pre', { id: 'spec-preview', class: 'small' });
  const errorArea = h('div', { id: 'submit-error' });
  const submit = h('button', { type: 'submit', id: 'submit-job' }, 'Submit job');
  let idempotencyKey = newKey();
  let lastBody = '';

  function checked(name) {
    return [...container.querySelectorAll(`input[name="${name}"]:checked`)].map((x) => x.value);
  }

  function buildSpec() {
    const spec = { model: modelSel.value, method: methodSel.value };
    if (cal.choose.value) spec.calibration_dataset_id = cal.choose.value;
    if (evalMode.value === 'fraction') spec.eval_fraction = Number(evalFraction.value);
    if (evalMode.value === 'dataset' && ev.choose.value) spec.eval_dataset_id = ev.choose.value;
    const values = budgets.value.trim() ? parseBudgets(budgets.value) : [];
    if (values.length) spec.bit_budget = { avg_bits: values.length === 1 ? values[0] : values };
    spec.bit_choices = checked('bit-choices').map(Number);
    spec.group_size = Number(group.value);
    spec.quantizer = quantizer.value;
    spec.allocation = allocation.value;
    spec.allocation_unit = unit.value;
    spec.exports = checked('exports');
    if (runtime.value) spec.target_runtime = runtime.value;
    spec.symmetric = adv.symmetric.checked;
    const groupSizes = parseGroupSizes(adv.groupSizes.value);
    if (groupSizes) spec.group_size_by_bits = groupSizes;
    if (adv.zeroPoint.value !== 'integer') spec.zero_point = adv.zeroPoint.value;
    if (adv.kQuants.checked) spec.k_quants = true;
    spec.clip_search = adv.clip.checked;
    if (!adv.controls.checked) spec.eval_controls = false; // the API's default is true
    if (adv.closedLoop.checked) spec.closed_loop = true;
    spec.calibration_inputs = adv.inputs.value;
    spec.max_calibration_rows = Number(adv.rows.value);
    spec.max_tokens = Number(adv.tokens.value);
    spec.reservoir_size = Number(adv.reservoir.value);
    spec.seed = Number(adv.seed.value);
    if (adv.workerClass.value.trim()) spec.worker_class = adv.workerClass.value.trim();
    if (adv.profileFrom.value.trim()) spec.profile_from_job_id = adv.profileFrom.value.trim();
    return spec;
  }

  function update() {
    const method = METHODS.find(([m]) => m === methodSel.value);
    methodHelp.textContent = method ? method[2] : '';
    evalFraction.closest('.field').hidden = evalMode.value !== 'fraction';
    ev.file.closest('.field').hidden = evalMode.value !== 'dataset';
    try {
      const body = JSON.stringify(buildSpec(), null, 2);
      preview.textContent = body;
      if (body !== lastBody) { lastBody = body; idempotencyKey = newKey(); } // a changed form is a new job
    } catch (err) {
      preview.textContent = err.message;
    }
  }

  const form = h('form', { class: 'card form', id: 'new-job-form', novalidate: true },
    h('h1', {}, 'New job'),
    h('div', { class: 'form-grid' },
      field('Model', modelSel, 'from GET /v1/models: the packaged models and TAQ_MODEL_ROOTS'),
      h('div', { class: 'field' }, h('label', { for: 'method' }, 'Method'), methodSel, methodHelp),
      h('div', { class: 'field wide' }, h('label', { for: 'calibration-file' }, 'Calibration data (JSONL)'), cal.file,
        h('label', { for: 'calibration-dataset', class: 'small' }, 'or an uploaded dataset'), cal.choose, cal.status,
        h('p', { class: 'help' }, 'one row a line: {"prompt": …} or {"messages": [...]}, optional "answers": [...]')),
      field('Evaluation', evalMode, 'eval.json: gold-answer NLL, KL and top-1 against full precision, generation metrics'),
      field('Held-out fraction', evalFraction),
      h('div', { class: 'field wide' }, h('label', { for: 'eval-file' }, 'Eval data (JSONL)'), ev.file,
        h('label', { for: 'eval-dataset', class: 'small' }, 'or an uploaded dataset'), ev.choose, ev.status),
      field('Budget(s), average bits', budgets, 'one number, or several separated by commas for a sweep (at most 8)'),
      field('Group size', group),
      bits, exportsBox,
      field('Quantizer', quantizer), field('Allocation', allocation), field('Allocation unit', unit),
      field('Target runtime', runtime, 'the service refuses a menu this runtime cannot load and writes the layout it reads')),
    h('details', { class: 'advanced' }, h('summary', {}, 'Advanced'),
      h('div', { class: 'form-grid' },
        h('label', { class: 'check' }, adv.symmetric, ' symmetric'), h('label', { class: 'check' }, adv.clip, ' clip search'),
        field('Zero point (asymmetric)', adv.zeroPoint),
        h('label', { class: 'check', title: 'groups of 32, linears whose input dim is a multiple of 256: 4/5-bit as GGUF Q4_K/Q5_K (4.5/5.5 bits) with a float zero point, 6-bit as Q6_K (6.56 bits) when symmetric' },
          adv.kQuants, ' K-quant super-blocks'),
        field('Group size per width', adv.groupSizes, 'widths stored in groups of their own size: BITS=SIZE, comma-separated'),
        h('label', { class: 'check', title: 'uniform at equal bits, error_only and random next to the method in eval.json' },
          adv.controls, ' evaluate the controls'),
        h('label', { class: 'check', title: 'hold back a quarter of the rows with answers; ship whichever of the allocation, uniform and error_only measures best on them' },
          adv.closedLoop, ' closed loop'),
        field('Calibration inputs', adv.inputs), field('Calibration rows used', adv.rows),
        field('Tokens per prompt', adv.tokens), field('Reservoir size (taq)', adv.reservoir), field('Seed', adv.seed),
        field('Worker class', adv.workerClass), field('Reuse profile of job', adv.profileFrom))),
    h('details', {}, h('summary', {}, 'Request body (POST /v1/jobs)'), preview),
    h('p', { class: 'help' }, 'At submit the service checks the spec, the checkpoint\u2019s headers and the job\u2019s memory '
      + 'estimate; a refusal is shown here as the API words it.'),
    h('div', { class: 'actions' }, submit), errorArea);

  form.addEventListener('input', update);
  form.addEventListener('change', update);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    replace(errorArea);
    let spec;
    try { spec = buildSpec(); } catch (err) { replace(errorArea, h('p', { class: 'error', role: 'alert' }, err.message)); return; }
    submit.disabled = true;
    submit.textContent = 'Submitting…';
    try {
      const job = await request('/v1/jobs', { method: 'POST', json: spec, headers: { 'Idempotency-Key': idempotencyKey }, signal: ctx.signal });
      window.location.hash = `#/job/${enc(job.id)}`;
    } catch (err) {
      if (err && err.name === 'AbortError') return;
      replace(errorArea, errorBlock(err, 'The service refused the job — '));
      errorArea.scrollIntoView({ block: 'nearest' });
    } finally {
      submit.disabled = false;
      submit.textContent = 'Submit job';
    }
  });
  replace(container, form);
  if (!models.length) replace(errorArea, h('p', { class: 'error' }, 'The service lists no models (GET /v1/models is empty).'));
  update();
}
