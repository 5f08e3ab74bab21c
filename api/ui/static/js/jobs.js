// Jobs: the caller's jobs newest first, a status filter, live updates (polled every 2 s while the
// page is open), cancel, "load more" with the API's cursor.

import { describe, enc, request } from './api.js';
import { FINISHED, STATUSES, badge, budgetText, fmtTime, h, progressBar, replace, shortId, sleep } from './dom.js';

const POLL_MS = 2000;

/** A cancel button that asks once more before it calls the API (no modal dialog). */
export function cancelButton(job, onDone, showError) {
  const button = h('button', { type: 'button', class: 'small danger', dataset: { action: 'cancel', job: job.id } }, 'Cancel');
  let armed = false;
  let timer = null;
  button.addEventListener('click', async () => {
    if (!armed) {
      armed = true;
      button.textContent = 'Confirm cancel';
      button.classList.add('armed');
      timer = setTimeout(() => { armed = false; button.textContent = 'Cancel'; button.classList.remove('armed'); }, 5000);
      return;
    }
    clearTimeout(timer);
    button.disabled = true;
    button.textContent = 'Cancelling…';
    try {
      const updated = await request(`/v1/jobs/${enc(job.id)}/cancel`, { method: 'POST' });
      onDone(updated);
    } catch (err) {
      button.disabled = false;
      armed = false;
      button.textContent = 'Cancel';
      showError(`Could not cancel ${job.id}: ${describe(err)}`);
    }
  });
  return button;
}

function row(job, refresh, showError) {
  const active = !FINISHED.has(job.status);
  const stage = job.stage ? job.stage : '—';
  return h('tr', { dataset: { job: job.id, status: job.status } },
    h('td', { dataset: { label: 'Job' } }, h('a', { href: `#/job/${enc(job.id)}`, class: 'mono', title: job.id }, shortId(job.id))),
    h('td', { dataset: { label: 'Status' } }, badge(job.status), job.cancel_requested && active ? h('span', { class: 'muted small' }, ' cancel requested') : null),
    h('td', { dataset: { label: 'Stage' } }, stage),
    h('td', { dataset: { label: 'Progress' } }, progressBar(job.progress, `progress of ${job.id}`)),
    h('td', { dataset: { label: 'Model' } }, job.spec.model),
    h('td', { dataset: { label: 'Method' } }, job.spec.method),
    h('td', { dataset: { label: 'Budget(s)' } }, budgetText(job.spec)),
    h('td', { dataset: { label: 'Created' } }, fmtTime(job.created_at)),
    h('td', { dataset: { label: 'Finished' } }, fmtTime(job.finished_at)),
    h('td', { dataset: { label: '' }, class: 'row-actions' }, active ? cancelButton(job, refresh, showError) : null));
}

export async function jobsView(container, ctx) {
  const selected = ctx.params.getAll('status').filter((s) => STATUSES.includes(s));
  const filter = h('select', { id: 'status-filter', 'aria-label': 'filter by status' },
    h('option', { value: '' }, 'all statuses'),
    STATUSES.map((s) => h('option', { value: s, selected: selected.length === 1 && selected[0] === s }, s)));
  filter.addEventListener('change', () => {
    window.location.hash = filter.value ? `#/jobs?status=${enc(filter.value)}` : '#/jobs';
  });
  const body = h('tbody', { id: 'jobs-body' });
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load more');
  const status = h('p', { class: 'muted small', id: 'jobs-status', 'aria-live': 'polite' });
  const errorBox = h('p', { class: 'error', role: 'alert', hidden: true });
  const showError = (text) => { errorBox.textContent = text; errorBox.hidden = !text; };
  const tableEl = h('div', { class: 'table-wrap' }, h('table', { class: 'grid jobs' },
    h('thead', {}, h('tr', {}, ['Job', 'Status', 'Stage', 'Progress', 'Model', 'Method', 'Budget(s)', 'Created', 'Finished', '']
      .map((label) => h('th', { scope: 'col' }, label)))), body));
  const empty = h('p', { class: 'muted', hidden: true }, 'No jobs yet. ', h('a', { href: '#/new' }, 'Submit one.'));
  replace(container, h('section', { class: 'card' },
    h('div', { class: 'title-row' }, h('h1', {}, 'Jobs'),
      h('div', { class: 'tools' }, h('label', { for: 'status-filter', class: 'small' }, 'Status '), filter,
        h('a', { href: '#/new', class: 'button' }, 'New job'))),
    errorBox, tableEl, empty, h('div', { class: 'actions' }, more), status));

  let count = 20;
  let nextCursor = null;
  const query = (limit, cursor) => {
    const q = new URLSearchParams();
    for (const s of selected) q.append('status', s);
    q.set('limit', String(limit));
    if (cursor) q.set('cursor', cursor);
    return `/v1/jobs?${q}`;
  };

  // rows are rebuilt only when their job changed, so a half-confirmed cancel or focus survives a poll
  let rendered = new Map();
  async function refresh() {
    const page = await request(query(Math.min(count, 100)), { signal: ctx.signal });
    const next = new Map();
    for (const job of page.items) {
      const key = JSON.stringify([job.status, job.cancel_requested, job.finished_at, job.spec]);
      const old = rendered.get(job.id);
      if (old && old.key === key) {
        replace(old.tr.querySelector('td[data-label="Stage"]'), job.stage || '—');
        replace(old.tr.querySelector('td[data-label="Progress"]'), progressBar(job.progress, `progress of ${job.id}`));
        next.set(job.id, old);
      } else {
        next.set(job.id, { key, tr: row(job, () => refresh().catch(() => {}), showError) });
      }
    }
    rendered = next;
    replace(body, [...next.values()].map((r) => r.tr));
    nextCursor = page.next_cursor;
    more.hidden = !nextCursor;
    empty.hidden = page.items.length > 0;
    tableEl.hidden = page.items.length === 0;
    status.textContent = `${page.items.length} job${page.items.length === 1 ? '' : 's'} shown · updated ${new Date().toLocaleTimeString()}`;
    return page;
  }

  more.addEventListener('click', async () => {
    if (count >= 100) {
      // beyond one page of 100, append pages with the cursor (they are not refreshed live)
      const page = await request(query(100, nextCursor), { signal: ctx.signal });
      body.append(...page.items.map((job) => row(job, () => {}, showError)));
      nextCursor = page.next_cursor;
      more.hidden = !nextCursor;
      return;
    }
    count += 20;
    await refresh();
  });

  await refresh();
  (async () => {
    while (!ctx.signal.aborted) {
      await sleep(POLL_MS, ctx.signal);
      if (ctx.signal.aborted) return;
      if (document.hidden) continue;
      try {
        await refresh();
        showError('');
      } catch (err) {
        if (err && err.name === 'AbortError') return;
        showError(`Live update failed: ${describe(err)}`);
      }
    }
  })();
}
