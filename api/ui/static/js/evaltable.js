// eval.json, rendered generically: one row per variant found in the report (full_precision,
// quantized, then the others in their order), one column per metric present, intervals as
// "mean [low, high]"; `variants` and `comparisons` when the report has them. For a sweep
// ({"budgets": [...]}) one tab per budget and the Pareto plot of task score against bits.

import { chartBox, paretoChart } from './charts.js';
import { fmtInterval, fmtNum, h, humanKey, isInterval, keyValues, replace, table } from './dom.js';

const LABELS = {
  gold_nll: 'gold NLL ↓', mean_kl: 'KL vs full precision ↓', top1_agreement: 'top-1 agreement ↑', n_tokens: 'tokens',
  exact_match: 'exact match ↑', f1: 'F1 ↑', contains: 'contains ↑', effective_bits: 'effective bits',
};
const SKIP = new Set(['items', 'n', 'max_new_tokens', 'alpha']);
const KNOWN = new Set(['dataset', 'n_items', 'teacher_forced', 'metrics', 'fidelity', 'delta_vs_full_precision', 'variants',
  'comparisons', 'generation', 'meta']);
const obj = (x) => (x && typeof x === 'object' && !Array.isArray(x) ? x : {});

export function reportsOf(evalJson) {
  if (evalJson && Array.isArray(evalJson.budgets)) return evalJson.budgets.filter((r) => r && typeof r === 'object');
  return evalJson && typeof evalJson === 'object' ? [evalJson] : [];
}

export function variantNames(report) {
  const names = [];
  const sources = [report.teacher_forced, report.metrics, report.variants, report.fidelity, report.delta_vs_full_precision];
  for (const first of ['full_precision', 'quantized']) {
    if (sources.some((s) => Object.prototype.hasOwnProperty.call(obj(s), first))) names.push(first);
  }
  for (const s of sources) for (const name of Object.keys(obj(s))) if (!names.includes(name)) names.push(name);
  return names;
}

/** The effective bits of a variant: the `variants` map, else meta (quantized, uniform). */
export function effectiveBits(report, name) {
  const v = obj(obj(report.variants)[name]);
  if (typeof v.effective_bits === 'number') return v.effective_bits;
  const meta = obj(report.meta);
  if (name === 'quantized' && typeof meta.effective_bits === 'number') return meta.effective_bits;
  if (typeof meta[`${name}_effective_bits`] === 'number') return meta[`${name}_effective_bits`];
  return null;
}

function columnsFor(report, names) {
  const cols = [{ key: 'bits', label: LABELS.effective_bits, get: (n) => effectiveBits(report, n) }];
  const seen = new Set();
  const add = (group, key, get, label) => {
    const id = `${group}:${key}`;
    if (seen.has(id)) return;
    seen.add(id);
    cols.push({ key: id, label, get });
  };
  const tf = obj(report.teacher_forced);
  const fid = obj(report.fidelity);
  for (const n of names) {
    for (const [k, v] of Object.entries(obj(tf[n]))) {
      if (!SKIP.has(k) && (v === null || typeof v !== 'object' || isInterval(v))) add('tf', k, (m) => obj(tf[m])[k] ?? obj(fid[m])[k], LABELS[k] || humanKey(k));
    }
  }
  for (const n of names) {
    for (const k of Object.keys(obj(fid[n]))) if (!seen.has(`tf:${k}`)) add('tf', k, (m) => obj(fid[m])[k], LABELS[k] || humanKey(k));
  }
  const gen = obj(report.metrics);
  for (const n of names) {
    for (const [k, v] of Object.entries(obj(gen[n]))) {
      if (!SKIP.has(k) && (typeof v === 'number' || isInterval(v))) add('gen', k, (m) => obj(gen[m])[k], LABELS[k] || humanKey(k));
    }
  }
  // any other per-variant map the report carries ({variant: interval | number}, or {variant:
  // {metric: interval}}, e.g. "retained"): its own columns, so new fields show without a change here
  for (const [key, value] of Object.entries(report)) {
    if (KNOWN.has(key) || !value || typeof value !== 'object' || Array.isArray(value)) continue;
    const entries = Object.entries(value);
    if (!entries.length || !entries.every(([n]) => names.includes(n))) continue;
    for (const [, v] of entries) {
      if (v === null || typeof v === 'number' || isInterval(v)) add(key, '', (m) => value[m], humanKey(key));
      else if (typeof v === 'object') {
        for (const [k, x] of Object.entries(v)) {
          if (x === null || typeof x === 'number' || isInterval(x)) add(key, k, (m) => obj(value[m])[k], `${humanKey(key)}: ${LABELS[k] || humanKey(k)}`);
        }
      }
    }
  }
  const delta = obj(report.delta_vs_full_precision);
  for (const n of names) {
    for (const [k, v] of Object.entries(obj(delta[n]))) {
      if (v === null || isInterval(v) || typeof v === 'number') add('delta', k, (m) => obj(delta[m])[k], `Δ ${LABELS[k] || humanKey(k)}`);
    }
  }
  return cols;
}

function cellText(key, v) {
  if (v === undefined || v === null) return '—';
  if (isInterval(v) || typeof v === 'number') return fmtInterval(v, /delta|difference/.test(key));
  if (typeof v === 'object' && !Array.isArray(v) && Object.values(v).every((x) => typeof x === 'number')) {
    return Object.entries(v).map(([k, x]) => `${k}: ${fmtNum(x)}`).join(' · '); // e.g. a bits histogram
  }
  return typeof v === 'object' ? JSON.stringify(v) : humanKey(String(v));
}

// the columns a reader looks for first; any others follow in the report's order
const FIRST = ['variant', 'a', 'baseline', 'b', 'metric', 'difference', 'verdict', 'rule', 'effective_bits', 'budget'];

function genericList(title, rows, id) {
  if (!rows.length) return null;
  const keys = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!keys.includes(k) && !SKIP.has(k)) keys.push(k);
  const rank = (k) => (FIRST.includes(k) ? FIRST.indexOf(k) : FIRST.length);
  keys.sort((x, y) => rank(x) - rank(y));
  return h('div', { id }, h('h3', {}, title), table(keys.map((k) => ({ label: humanKey(k), cell: (r) => cellText(k, r[k]),
    class: typeof rows[0][k] === 'number' || isInterval(rows[0][k]) ? 'num' : '' })), rows, { className: 'grid compact' }));
}

function comparisonRows(list) {
  // {variant|a, baseline|b, metric, difference: {mean, low, high} | mean, low, high, ...}
  return list.filter((c) => c && typeof c === 'object').map((c) => {
    const { mean, low, high, alpha, ...rest } = c;
    const out = { ...rest };
    if (typeof mean === 'number') out.difference = { mean, low, high };
    const level = typeof alpha === 'number' ? alpha : isInterval(c.difference) ? c.difference.alpha : undefined;
    if (typeof level === 'number') out.level = `${Math.round((1 - level) * 100)} %`;
    return out;
  });
}

/** One budget's report: the variant table, then the extras it carries. */
export function reportView(report) {
  const names = variantNames(report);
  const cols = columnsFor(report, names);
  const scoreCols = cols.filter((c) => !c.key.startsWith('delta:'));
  const order = (c) => {
    const i = scoreCols.findIndex((s) => s.key.split(':')[1] === c.key.split(':')[1]);
    return i < 0 ? scoreCols.length : i;
  };
  const deltaCols = cols.filter((c) => c.key.startsWith('delta:')).sort((a, b) => order(a) - order(b));
  const deltaNames = names.filter((n) => deltaCols.some((c) => c.get(n) !== undefined));
  const variantTable = (id, columns, rows) => h('div', { class: 'table-wrap' }, h('table', { class: 'grid eval', id },
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'variant'), columns.map((c) => h('th', { scope: 'col', class: 'num' }, c.label)))),
    h('tbody', {}, rows.map((n) => h('tr', { dataset: { variant: n } }, h('th', { scope: 'row' }, humanKey(n)),
      columns.map((c) => h('td', { class: 'num', dataset: { label: c.label } }, fmtInterval(c.get(n), c.key.startsWith('delta:')))))))));
  const meta = obj(report.meta);
  const gen = obj(report.generation);
  const parts = [
    keyValues([['dataset', report.dataset ?? '—'], ['items', report.n_items ?? '—'],
      ...Object.entries(meta).filter(([, v]) => v === null || typeof v !== 'object').map(([k, v]) => [humanKey(k), fmtNum(v)])]),
    gen.ran === false ? h('p', { class: 'warn' }, `Greedy generation did not run: ${gen.skipped_reason || 'no reason given'}. `
      + 'Teacher-forced metrics are still reported.') : null,
    variantTable('eval-table', scoreCols, names),
    deltaCols.length && deltaNames.length ? [h('h3', {}, 'Difference against full precision'),
      variantTable('eval-delta-table', deltaCols, deltaNames)] : null,
    h('p', { class: 'help' }, 'Intervals are bootstrap intervals: mean [low, high]; differences are paired, on the same items.'),
  ];
  const variants = obj(report.variants);
  if (Object.keys(variants).length) {
    const at = (name) => (names.includes(name) ? names.indexOf(name) : names.length);
    const rows = Object.entries(variants).sort(([x], [y]) => at(x) - at(y)).map(([name, v]) => ({ variant: name, ...obj(v) }));
    parts.push(genericList('Variants', rows, 'eval-variants'));
  }
  if (Array.isArray(report.comparisons) && report.comparisons.length) {
    parts.push(genericList('Comparisons', comparisonRows(report.comparisons), 'eval-comparisons'));
  }
  return h('div', { class: 'report' }, parts);
}

const PARETO_METRICS = [['tf:gold_nll', 'gold NLL (lower is better)'], ['gen:contains', 'contains (higher is better)'],
  ['gen:exact_match', 'exact match'], ['gen:f1', 'F1'], ['tf:mean_kl', 'KL vs full precision'], ['tf:top1_agreement', 'top-1 agreement']];

function metricOf(report, name, key) {
  const [group, k] = key.split(':');
  const src = group === 'tf' ? { ...obj(obj(report.fidelity)[name]), ...obj(obj(report.teacher_forced)[name]) } : obj(obj(report.metrics)[name]);
  const v = src[k];
  if (isInterval(v)) return v;
  return typeof v === 'number' ? { mean: v } : null;
}

export function paretoData(reports, key, label) {
  const names = [];
  for (const r of reports) for (const n of variantNames(r)) if (n !== 'full_precision' && !names.includes(n)) names.push(n);
  const series = names.map((name) => ({ label: humanKey(name), points: reports.map((r) => {
    const x = effectiveBits(r, name);
    const m = metricOf(r, name, key);
    return x === null || !m ? null : { x, y: m.mean, low: m.low, high: m.high, budget: obj(r.meta).avg_bits };
  }).filter(Boolean).sort((a, b) => a.x - b.x) })).filter((s) => s.points.length);
  const fp = reports.map((r) => metricOf(r, 'full_precision', key)).find(Boolean);
  return { metricLabel: label, series, reference: fp ? { label: 'full precision', y: fp.mean } : null };
}

/** The evaluation section for eval.json (one report or a sweep). */
export function evalSection(evalJson) {
  const reports = reportsOf(evalJson);
  const body = h('div', { id: 'eval-body' });
  const section = h('section', { class: 'card', id: 'evaluation' }, h('h2', {}, 'Evaluation'));
  const after = [];
  if (!reports.length) {
    section.append(h('p', { class: 'muted' }, 'eval.json has no report.'));
    return { section, after: () => {} };
  }
  if (reports.length > 1) {
    const tabs = h('div', { class: 'tabs', role: 'tablist' });
    reports.forEach((r, i) => {
      const tab = h('button', { type: 'button', role: 'tab', class: 'tab', 'aria-selected': i === 0 ? 'true' : 'false', dataset: { budget: String(i) } },
        `budget ${fmtNum(obj(r.meta).avg_bits ?? i + 1)}`);
      tab.addEventListener('click', () => {
        for (const t of tabs.children) t.setAttribute('aria-selected', t === tab ? 'true' : 'false');
        replace(body, reportView(r));
      });
      tabs.append(tab);
    });
    section.append(tabs);
  }
  replace(body, reportView(reports[0]));
  section.append(body);
  if (reports.length > 1) {
    const available = PARETO_METRICS.filter(([k]) => reports.some((r) => metricOf(r, 'quantized', k)));
    if (available.length) {
      const pick = h('select', { id: 'pareto-metric' }, available.map(([k, l]) => h('option', { value: k }, l)));
      const { box, canvas } = chartBox('pareto-chart', 'task score against effective bits');
      section.append(h('h3', {}, 'Task score against effective bits'),
        h('label', { class: 'inline', for: 'pareto-metric' }, 'Score ', pick), box,
        h('p', { class: 'help' }, 'One point per budget and variant, with its bootstrap interval; the dashed line is full precision.'));
      const draw = () => paretoChart(canvas, paretoData(reports, pick.value, available.find(([k]) => k === pick.value)[1]));
      pick.addEventListener('change', draw);
      after.push(draw);
    }
  }
  return { section, after: () => after.forEach((f) => f()) };
}
