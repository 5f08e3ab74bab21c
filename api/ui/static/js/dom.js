// Small DOM and formatting helpers. Every text goes in as a text node (never innerHTML), so
// nothing the API returns can become markup.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

export const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
export const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);

export function badge(status) {
  return h('span', { class: `badge badge-${status || 'none'}`, dataset: { status: status || '' } }, status || '—');
}

export function progressBar(fraction, label) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  const bar = h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
    'aria-valuenow': pct, 'aria-label': label || 'progress' }, h('div', { class: 'progress-fill' }),
  h('span', { class: 'progress-text' }, `${pct}%`));
  bar.firstChild.style.width = `${pct}%`;
  return bar;
}

export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return i === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const pad = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  const s = Number(seconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A number with about 4 significant digits; integers stay integers. */
export function fmtNum(v) {
  if (v === null || v === undefined) return '—';
  if (typeof v !== 'number') return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a === 0) return '0';
  const text = a >= 100 ? v.toFixed(1) : a >= 1 ? v.toFixed(3) : v.toPrecision(3);
  return text.includes('e') ? text : text.replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
}

export function isInterval(v) {
  return v !== null && typeof v === 'object' && typeof v.mean === 'number';
}

/** "mean [low, high]" for a bootstrap interval object; a plain number as it is. */
export function fmtInterval(v, signed = false) {
  if (v === null || v === undefined) return '—';
  if (!isInterval(v)) return typeof v === 'object' ? JSON.stringify(v) : fmtNum(v);
  const f = (x) => (signed && x > 0 ? '+' : '') + fmtNum(x);
  const hasBounds = typeof v.low === 'number' && typeof v.high === 'number';
  return hasBounds ? `${f(v.mean)} [${f(v.low)}, ${f(v.high)}]` : f(v.mean);
}

export function budgetsOf(spec) {
  const b = spec && spec.bit_budget ? spec.bit_budget.avg_bits : null;
  if (b === null || b === undefined) return [];
  return Array.isArray(b) ? b : [b];
}

export function budgetText(spec) {
  const b = budgetsOf(spec);
  return b.length ? b.map((x) => fmtNum(x)).join(' · ') : (spec && spec.allocation === 'paper' ? 'paper rule' : '—');
}

export function shortId(id) {
  return id && id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id;
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h('textarea', { class: 'offscreen', readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch { ok = false; }
    area.remove();
    return ok;
  }
}

export function copyButton(text, label = 'Copy') {
  const button = h('button', { type: 'button', class: 'small secondary' }, label);
  button.addEventListener('click', async () => {
    const ok = await copyText(typeof text === 'function' ? text() : text);
    button.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}

export function codeBlock(text) {
  return h('div', { class: 'code' }, h('pre', {}, h('code', {}, text)), copyButton(text));
}

/** A table from column definitions [{label, cell: (row) => node|text, class}] and rows. */
export function table(columns, rows, { className = 'grid', empty = 'nothing to show' } = {}) {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  return h('div', { class: 'table-wrap' }, h('table', { class: className },
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.class }, c.label)))),
    h('tbody', {}, rows.map((row) => h('tr', {}, columns.map((c) => {
      const value = c.cell(row);
      return h('td', { class: c.class, dataset: { label: c.label } }, value);
    }))))));
}

export function keyValues(pairs) {
  return h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => h('div', { class: 'kv-item' },
    h('dt', {}, k), h('dd', {}, v === null ? '—' : v))));
}

export function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', {}, title), children);
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

export function humanKey(key) {
  return String(key).replace(/_/g, ' ');
}
