// API refusals as the API words them: code and message, then the details (per-line dataset
// problems, spec fields, the memory estimate's breakdown) as a table.

import { ApiError, describe } from './api.js';
import { fmtBytes, h, humanKey, table } from './dom.js';

function detailRowsTable(rows) {
  const keys = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!keys.includes(k)) keys.push(k);
  const cell = (value) => (value === null || value === undefined ? '—'
    : Array.isArray(value) ? value.join('.') : typeof value === 'object' ? JSON.stringify(value) : String(value));
  return table(keys.map((k) => ({ label: humanKey(k), cell: (r) => cell(r[k]) })), rows, { className: 'grid details' });
}

function validationRows(details) {
  // FastAPI's [{loc, msg, type}] with the leading "body" dropped
  return details.map((d) => ({ field: (d.loc || []).filter((x) => x !== 'body').join('.') || '(body)', problem: d.msg || d.type }));
}

function bytesTable(title, obj, keyLabel) {
  const rows = Object.entries(obj).filter(([, v]) => typeof v === 'number');
  if (!rows.length) return null;
  return h('div', {}, h('h4', {}, title), table([
    { label: keyLabel, cell: (r) => humanKey(r[0]) },
    { label: 'bytes', cell: (r) => `${fmtBytes(r[1])} (${r[1].toLocaleString()})`, class: 'num' }], rows,
  { className: 'grid details' }));
}

/** The error's words and its details, for a form's error area. */
export function errorBlock(err, prefix = '') {
  const box = h('div', { class: 'error-block', role: 'alert', dataset: { code: err && err.code ? err.code : '' } });
  box.append(h('p', { class: 'error' }, prefix + describe(err)));
  if (!(err instanceof ApiError) || err.details === null || err.details === undefined) return box;
  const d = err.details;
  if (Array.isArray(d) && d.length && typeof d[0] === 'object') {
    const rows = err.code === 'validation_error' && 'loc' in d[0] ? validationRows(d) : d;
    box.append(detailRowsTable(rows));
  } else if (d && typeof d === 'object' && !Array.isArray(d)) {
    const scalars = Object.entries(d).filter(([, v]) => v === null || typeof v !== 'object');
    if (scalars.length) {
      box.append(h('dl', { class: 'kv' }, scalars.map(([k, v]) => [h('dt', {}, humanKey(k)),
        h('dd', {}, /_bytes$/.test(k) && typeof v === 'number' ? `${fmtBytes(v)} (${v.toLocaleString()})` : typeof v === 'number' ? v.toLocaleString() : String(v))])));
    }
    if (d.breakdown && typeof d.breakdown === 'object') box.append(bytesTable('memory estimate, by part', d.breakdown, 'part'));
    if (d.phases && typeof d.phases === 'object') box.append(bytesTable('memory estimate, by phase', d.phases, 'phase'));
    const rest = Object.entries(d).filter(([k, v]) => v !== null && typeof v === 'object' && !['breakdown', 'phases'].includes(k));
    if (rest.length) {
      box.append(h('details', {}, h('summary', {}, 'more details'),
        h('pre', {}, JSON.stringify(Object.fromEntries(rest), null, 2))));
    }
  } else {
    box.append(h('pre', {}, JSON.stringify(d, null, 2)));
  }
  return box;
}
