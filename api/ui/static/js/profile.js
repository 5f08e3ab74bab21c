// The sensitivity profile of a job (GET /v1/jobs/{id}/profile) as an interactive chart: a metric
// per layer (importance, sensitivity or any score), the measured error at each width and the
// chosen bits of a budget; per linear when the job allocated per linear.

import { bitLegend, chartBox, profileChart } from './charts.js';
import { fmtNum, h, humanKey, replace, table } from './dom.js';

export function metricOptions(profiles) {
  const keys = ['importance', 'sensitivity'];
  for (const profile of profiles) {
    for (const layer of profile.layers) {
      for (const [k, v] of Object.entries(layer.scores || {})) {
        if (typeof v === 'number' && !keys.includes(`scores.${k}`)) keys.push(`scores.${k}`);
      }
    }
  }
  return keys.map((k) => [k, k.startsWith('scores.') ? `score: ${humanKey(k.slice(7))}` : k]);
}

export function metricValue(layer, key) {
  const v = key.startsWith('scores.') ? (layer.scores || {})[key.slice(7)] : layer[key];
  return typeof v === 'number' ? v : null;
}

/** name → bits of one budget: the job result's map, else the profile rows' own bits. */
export function bitsMap(job, profile, budgetIndex = 0) {
  const budgets = (job.result && job.result.budgets) || [];
  const chosen = budgets[budgetIndex] && budgets[budgetIndex].bits;
  if (chosen && Object.keys(chosen).length) return chosen;
  const map = {};
  for (const layer of profile.layers) {
    if (layer.bits !== null && layer.bits !== undefined) map[layer.name] = layer.bits;
    for (const lin of layer.linears || []) if (lin.bits !== null && lin.bits !== undefined) map[lin.name] = lin.bits;
  }
  return map;
}

/** A layer's bits: its own entry, or its linears' widths (one number when they agree, "4/8" when not). */
export function layerBits(layer, map) {
  if (map[layer.name] !== undefined) return map[layer.name];
  const widths = [...new Set((layer.linears || []).map((l) => map[l.name]).filter((b) => b !== undefined))];
  if (!widths.length) return null;
  return widths.length === 1 ? widths[0] : widths.sort((a, b) => a - b).join('/');
}

function widthsOf(entries) {
  const widths = new Set();
  for (const e of entries) for (const w of Object.keys(e.quant_error || {})) widths.add(Number(w));
  return [...widths].filter(Number.isFinite).sort((a, b) => a - b);
}

export function chartData(profile, map, metric, metricLabel, unit) {
  const rows = [];
  for (const layer of profile.layers) {
    if (unit === 'linear' && (layer.linears || []).length) {
      for (const lin of layer.linears) {
        rows.push({ label: `${layer.index}.${lin.name.split('.').pop()}`, name: lin.name, value: metricValue(layer, metric),
          bits: map[lin.name] !== undefined ? map[lin.name] : null, errors: lin.quant_error || {} });
      }
    } else {
      rows.push({ label: String(layer.index), name: layer.name, value: metricValue(layer, metric),
        bits: layerBits(layer, map), errors: layer.quant_error || {} });
    }
  }
  const widths = widthsOf(rows.map((r) => ({ quant_error: r.errors })));
  const errors = {};
  for (const w of widths) errors[w] = rows.map((r) => (typeof r.errors[w] === 'number' ? r.errors[w] : null));
  return { labels: rows.map((r) => r.label), names: rows.map((r) => r.name), values: rows.map((r) => r.value),
    bits: rows.map((r) => r.bits), errors, metricLabel, widths };
}

function select(id, label, options, value) {
  const el = h('select', { id }, options.map(([v, text]) => h('option', { value: v, selected: v === value }, text)));
  return { el, wrap: h('label', { class: 'inline', for: id }, `${label} `, el) };
}

/** The profile section: controls, chart, legend and the numbers as a table. */
export function profileSection(job, profile) {
  const budgets = (job.result && job.result.budgets) || [];
  const hasLinears = profile.layers.some((l) => (l.linears || []).length);
  const metrics = metricOptions([profile]);
  const metric = select('profile-metric', 'Show', metrics, 'importance');
  const unit = select('profile-unit', 'per', [['layer', 'layer'], ...(hasLinears ? [['linear', 'linear']] : [])],
    job.spec.allocation_unit === 'linear' && hasLinears ? 'linear' : 'layer');
  const budget = select('profile-budget', 'bits of budget', budgets.map((b, i) => [String(i), `${fmtNum(b.avg_bits)} (effective ${fmtNum(b.effective_bits)})`]), '0');
  if (budgets.length < 2) budget.wrap.hidden = true;
  const { box, canvas } = chartBox('profile-chart', 'sensitivity profile chart', profile.layers.length > 24);
  const legend = h('div', {});
  const tableArea = h('div', {});
  const note = h('p', { class: 'help' });

  function draw() {
    const map = bitsMap(job, profile, Number(budget.el.value || 0));
    const label = metrics.find(([k]) => k === metric.el.value)[1];
    const data = chartData(profile, map, metric.el.value, label, unit.el.value);
    profileChart(canvas, data);
    canvas.dataset.points = String(data.labels.length);
    const used = [...new Set(data.bits.filter((b) => typeof b === 'number'))].sort((a, b) => a - b);
    replace(legend, bitLegend(used.length ? used : job.spec.bit_choices, data.bits.some((b) => typeof b !== 'number')));
    note.textContent = unit.el.value === 'linear'
      ? 'Per linear: the bar is its layer\u2019s metric, its colour the linear\u2019s own width, the lines its own measured error.'
      : 'Hover a layer for its name and chosen bits; click a legend entry to hide a series.';
    replace(tableArea, h('details', {}, h('summary', {}, 'numbers'), table([
      { label: unit.el.value === 'linear' ? 'linear' : 'layer', cell: (i) => data.names[i], class: 'mono' },
      { label, cell: (i) => fmtNum(data.values[i]), class: 'num' },
      ...data.widths.map((w) => ({ label: `error @${w}`, cell: (i) => fmtNum(data.errors[w][i]), class: 'num' })),
      { label: 'bits', cell: (i) => (data.bits[i] === null ? '—' : String(data.bits[i])), class: 'num' },
    ], data.labels.map((_, i) => i), { className: 'grid compact' })));
  }

  for (const s of [metric, unit, budget]) s.el.addEventListener('change', draw);
  const section = h('section', { class: 'card', id: 'profile' }, h('h2', {}, 'Sensitivity profile'),
    h('div', { class: 'tools' }, metric.wrap, unit.wrap, budget.wrap), box, legend, note, tableArea);
  return { section, draw };
}
