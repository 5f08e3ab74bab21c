// Compare two jobs' profiles (e.g. one model calibrated on two tasks): both on one chart, with
// their chosen bits, normalised if asked, and the rank correlation of the two profiles.

import { describe, enc, request } from './api.js';
import { chartBox, compareChart } from './charts.js';
import { fmtNum, h, replace, shortId, table } from './dom.js';
import { bitsMap, layerBits, metricOptions, metricValue } from './profile.js';

function ranks(values) {
  const order = values.map((v, i) => [v, i]).sort((a, b) => a[0] - b[0]);
  const out = new Array(values.length);
  for (let i = 0; i < order.length;) {
    let j = i;
    while (j + 1 < order.length && order[j + 1][0] === order[i][0]) j += 1;
    for (let k = i; k <= j; k += 1) out[order[k][1]] = (i + j) / 2; // ties share their mean rank
    i = j + 1;
  }
  return out;
}

/** Spearman's rank correlation of two equally long lists (null when undefined). */
export function spearman(a, b) {
  const pairs = a.map((x, i) => [x, b[i]]).filter(([x, y]) => typeof x === 'number' && typeof y === 'number');
  if (pairs.length < 3) return null;
  const ra = ranks(pairs.map((p) => p[0]));
  const rb = ranks(pairs.map((p) => p[1]));
  const mean = (xs) => xs.reduce((s, x) => s + x, 0) / xs.length;
  const ma = mean(ra);
  const mb = mean(rb);
  let num = 0; let da = 0; let db = 0;
  for (let i = 0; i < ra.length; i += 1) {
    num += (ra[i] - ma) * (rb[i] - mb); da += (ra[i] - ma) ** 2; db += (rb[i] - mb) ** 2;
  }
  return da && db ? num / Math.sqrt(da * db) : null;
}

function normalise(values, how) {
  const xs = values.filter((v) => typeof v === 'number');
  if (how === 'raw' || !xs.length) return values;
  if (how === 'max') {
    const m = Math.max(...xs.map(Math.abs)) || 1;
    return values.map((v) => (typeof v === 'number' ? v / m : null));
  }
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
  const sd = Math.sqrt(xs.reduce((s, x) => s + (x - mean) ** 2, 0) / xs.length) || 1;
  return values.map((v) => (typeof v === 'number' ? (v - mean) / sd : null));
}

function jobLabel(job) {
  const cal = job.spec.calibration_dataset_id ? ` · ${shortId(job.spec.calibration_dataset_id)}` : '';
  return `${shortId(job.id)} · ${job.spec.model} · ${job.spec.method}${cal}`;
}

export async function compareView(container, ctx) {
  const page = await request('/v1/jobs?status=succeeded&limit=100', { signal: ctx.signal });
  const jobs = page.items;
  const pickA = ctx.params.get('a') || (jobs[1] && jobs[1].id) || (jobs[0] && jobs[0].id) || '';
  const pickB = ctx.params.get('b') || (jobs[0] && jobs[0].id !== pickA ? jobs[0].id : (jobs[1] && jobs[1].id)) || '';
  const options = (picked) => {
    const list = jobs.map((j) => h('option', { value: j.id, selected: j.id === picked }, jobLabel(j)));
    if (picked && !jobs.some((j) => j.id === picked)) list.unshift(h('option', { value: picked, selected: true }, picked));
    return list;
  };
  const selA = h('select', { id: 'compare-a' }, options(pickA));
  const selB = h('select', { id: 'compare-b' }, options(pickB));
  const metricSel = h('select', { id: 'compare-metric' });
  const normSel = h('select', { id: 'compare-norm' }, [['raw', 'as reported'], ['z', 'z-score per job'], ['max', 'share of the job\u2019s largest']]
    .map(([v, t]) => h('option', { value: v, selected: v === 'z' }, t)));
  const result = h('div', { id: 'compare-result' });
  replace(container, h('section', { class: 'card' }, h('h1', {}, 'Compare profiles'),
    h('p', { class: 'help' }, 'Two succeeded jobs, e.g. the same model calibrated on two tasks: which layers each task leans on.'),
    jobs.length < 1 ? h('p', { class: 'muted' }, 'No succeeded jobs yet.') : null,
    h('div', { class: 'form-grid' },
      h('div', { class: 'field' }, h('label', { for: 'compare-a' }, 'Job A'), selA),
      h('div', { class: 'field' }, h('label', { for: 'compare-b' }, 'Job B'), selB),
      h('div', { class: 'field' }, h('label', { for: 'compare-metric' }, 'Metric'), metricSel),
      h('div', { class: 'field' }, h('label', { for: 'compare-norm' }, 'Scale'), normSel)), result));

  let loaded = null;
  async function load() {
    const ids = [selA.value, selB.value];
    history.replaceState(null, '', `#/compare?a=${enc(ids[0])}&b=${enc(ids[1])}`);
    if (!ids[0] || !ids[1]) { replace(result, h('p', { class: 'muted' }, 'Pick two jobs.')); return; }
    replace(result, h('p', { class: 'muted' }, 'Loading…'));
    try {
      const [jobA, jobB, profA, profB] = await Promise.all([
        request(`/v1/jobs/${enc(ids[0])}`, { signal: ctx.signal }), request(`/v1/jobs/${enc(ids[1])}`, { signal: ctx.signal }),
        request(`/v1/jobs/${enc(ids[0])}/profile`, { signal: ctx.signal }), request(`/v1/jobs/${enc(ids[1])}/profile`, { signal: ctx.signal })]);
      loaded = { jobs: [jobA, jobB], profiles: [profA, profB] };
      const metrics = metricOptions(loaded.profiles);
      const keep = metricSel.value || 'importance';
      replace(metricSel, metrics.map(([v, t]) => h('option', { value: v, selected: v === keep }, t)));
      draw();
    } catch (err) {
      if (ctx.signal.aborted) return;
      loaded = null;
      replace(result, h('p', { class: 'error', role: 'alert' }, describe(err)));
    }
  }

  function draw() {
    if (!loaded) return;
    const { jobs: [jobA, jobB], profiles } = loaded;
    const metric = metricSel.value;
    const n = Math.max(...profiles.map((p) => p.layers.length));
    const labels = Array.from({ length: n }, (_, i) => String(i));
    const series = loaded.jobs.map((job, k) => {
      const byIndex = new Map(profiles[k].layers.map((l) => [l.index, l]));
      const map = bitsMap(job, profiles[k], 0);
      const raw = labels.map((_, i) => (byIndex.has(i) ? metricValue(byIndex.get(i), metric) : null));
      const bits = labels.map((_, i) => {
        const b = byIndex.has(i) ? layerBits(byIndex.get(i), map) : null;
        return typeof b === 'number' ? b : null;
      });
      return { label: `${k === 0 ? 'A' : 'B'}: ${shortId(job.id)} (${job.spec.method})`, raw, values: normalise(raw, normSel.value), bits };
    });
    const label = metricSel.selectedOptions[0] ? metricSel.selectedOptions[0].textContent : metric;
    const rho = spearman(series[0].raw, series[1].raw);
    const { box, canvas } = chartBox('compare-chart', 'two sensitivity profiles', n > 24);
    replace(result,
      profiles[0].layers.length !== profiles[1].layers.length
        ? h('p', { class: 'warn' }, `The jobs have ${profiles[0].layers.length} and ${profiles[1].layers.length} layers (different models?).`) : null,
      jobA.spec.model !== jobB.spec.model ? h('p', { class: 'warn' }, `Different models: ${jobA.spec.model} and ${jobB.spec.model}.`) : null,
      h('p', { id: 'compare-summary' }, `Spearman rank correlation of the two profiles (${label}): `,
        h('strong', {}, rho === null ? '—' : rho.toFixed(3)), '. Dashed lines: each job\u2019s chosen bits (first budget).'),
      box,
      h('details', {}, h('summary', {}, 'numbers'), table([
        { label: 'layer', cell: (i) => labels[i], class: 'num' },
        { label: `A ${label}`, cell: (i) => fmtNum(series[0].raw[i]), class: 'num' },
        { label: `B ${label}`, cell: (i) => fmtNum(series[1].raw[i]), class: 'num' },
        { label: 'A bits', cell: (i) => (series[0].bits[i] ?? '—'), class: 'num' },
        { label: 'B bits', cell: (i) => (series[1].bits[i] ?? '—'), class: 'num' },
      ], labels.map((_, i) => i), { className: 'grid compact' })),
      h('p', { class: 'small' }, h('a', { href: `#/job/${enc(jobA.id)}` }, 'open A'), ' · ', h('a', { href: `#/job/${enc(jobB.id)}` }, 'open B')));
    compareChart(canvas, { labels, metricLabel: normSel.value === 'raw' ? label : `${label} (${normSel.selectedOptions[0].textContent})`, series });
    canvas.dataset.series = '2';
  }

  selA.addEventListener('change', load);
  selB.addEventListener('change', load);
  metricSel.addEventListener('change', draw);
  normSel.addEventListener('change', draw);
  if (jobs.length || pickA) await load();
}
