// One job: its stages as a timeline kept live by the event stream (fetch + a stream reader, since
// EventSource cannot send the Authorization header; polling when the stream is refused), then the
// profile chart, the evaluation, the artifacts and the manifest.

import { ApiError, artifactJson, describe, enc, followEvents, request } from './api.js';
import { artifactsSection, manifestSection } from './artifacts.js';
import { FINISHED, badge, budgetText, fmtBytes, fmtDuration, fmtNum, fmtTime, h, keyValues, progressBar, replace, sleep, table } from './dom.js';
import { evalSection } from './evaltable.js';
import { cancelButton } from './jobs.js';
import { profileSection } from './profile.js';

export const STAGES = ['load', 'calibrate', 'score', 'allocate', 'quantize', 'export', 'evaluate', 'publish'];
const MAX_EVENTS = 300;

export function stageStates(job, events) {
  const started = new Set();
  const skipped = new Map();
  for (const e of events) {
    if (e.kind === 'stage' && e.stage) {
      started.add(e.stage);
      if (/skipped/i.test(e.message || '')) skipped.set(e.stage, e.message);
    }
  }
  const timings = (job.result && job.result.timings) || {};
  const at = STAGES.indexOf(job.stage);
  return STAGES.map((stage, i) => {
    let state = 'pending';
    if (skipped.has(stage)) state = 'skipped';
    else if (job.status === 'succeeded') state = started.has(stage) || stage in timings ? 'done' : 'not run';
    else if (stage === job.stage && job.status === 'running') state = 'current';
    else if (stage === job.stage && (job.status === 'failed' || job.status === 'cancelled')) state = job.status;
    else if (started.has(stage) || (at >= 0 && i < at)) state = 'done';
    return { stage, state, seconds: timings[stage], note: skipped.get(stage) };
  });
}

function timelineView(job, events) {
  const last = [...events].reverse().find((e) => e.message);
  return h('div', {},
    h('ol', { class: 'timeline', id: 'timeline' }, stageStates(job, events).map((s) => h('li', {
      class: `step step-${s.state.replace(' ', '-')}`, dataset: { stage: s.stage, state: s.state }, title: s.note || s.state },
    h('span', { class: 'step-dot', 'aria-hidden': 'true' }), h('span', { class: 'step-name' }, s.stage),
    h('span', { class: 'step-meta small' }, s.state === 'current' ? 'running'
      : s.state === 'done' && s.seconds !== undefined ? fmtDuration(s.seconds) : s.state)))),
    progressBar(job.progress, 'job progress'),
    h('p', { class: 'small muted', id: 'last-event' }, last ? `${fmtTime(last.created_at)} · ${last.message}` : 'no events yet'));
}

function eventsTable(events) {
  return h('details', { class: 'events' }, h('summary', {}, `events (${events.length})`), table([
    { label: 'id', cell: (e) => String(e.id), class: 'num' }, { label: 'time', cell: (e) => fmtTime(e.created_at) },
    { label: 'kind', cell: (e) => e.kind }, { label: 'stage', cell: (e) => e.stage || '—' },
    { label: 'progress', cell: (e) => (typeof e.progress === 'number' ? `${Math.round(e.progress * 100)}%` : '—'), class: 'num' },
    { label: 'message', cell: (e) => e.message || '' },
  ], [...events].reverse().slice(0, 100), { className: 'grid compact' }));
}

function headerView(job, onCancelled, showError) {
  const active = !FINISHED.has(job.status);
  const budgets = (job.result && job.result.budgets) || [];
  return h('div', {},
    h('div', { class: 'title-row' }, h('h1', { class: 'mono job-id' }, job.id),
      h('div', { class: 'tools' }, h('span', { id: 'job-status' }, badge(job.status)),
        active ? cancelButton(job, onCancelled, showError) : null,
        job.status === 'succeeded' ? h('a', { class: 'button secondary', href: `#/compare?a=${enc(job.id)}` }, 'Compare…') : null)),
    keyValues([['model', job.spec.model], ['method', job.spec.method], ['budget(s)', budgetText(job.spec)],
      ['effective bits', budgets.length ? budgets.map((b) => fmtNum(b.effective_bits)).join(' · ') : '—'],
      ['bit choices', job.spec.bit_choices.join(', ')], ['group size', String(job.spec.group_size)],
      ['quantizer', job.spec.quantizer], ['allocation', `${job.spec.allocation} per ${job.spec.allocation_unit}`],
      ['exports', job.spec.exports.join(', ') || '—'], ['worker class', job.worker_class || '—'],
      ['created', fmtTime(job.created_at)], ['started', fmtTime(job.started_at)], ['finished', fmtTime(job.finished_at)],
      ['attempts', String(job.attempts)],
      ...(job.cancel_requested && active ? [['cancel', 'requested: it stops between layers']] : [])]),
    job.error ? h('div', { class: 'error-block', role: 'alert', id: 'job-error' },
      h('p', { class: 'error' }, `${job.status}: ${job.error.code}: ${job.error.message}`),
      job.error.details ? h('pre', { class: 'small' }, JSON.stringify(job.error.details, null, 2)) : null) : null);
}

function budgetsTable(job) {
  const budgets = (job.result && job.result.budgets) || [];
  if (!budgets.length) return null;
  const res = job.result.resources || {};
  return h('section', { class: 'card', id: 'budgets' }, h('h2', {}, budgets.length > 1 ? 'Budgets' : 'Result'), table([
    { label: 'budget', cell: (b) => fmtNum(b.avg_bits), class: 'num' },
    { label: 'effective bits', cell: (b) => fmtNum(b.effective_bits), class: 'num' },
    { label: 'rule', cell: (b) => b.rule || '—' }, { label: 'solver', cell: (b) => b.solver || '—' },
    { label: 'artifacts', cell: (b) => (b.artifacts || []).join(', ') },
  ], budgets, { className: 'grid compact' }),
  keyValues([['device', job.result.device || '—'], ['peak worker memory', res.peak_rss_bytes ? fmtBytes(res.peak_rss_bytes) : '—'],
    ['total stage time', fmtDuration(Object.values(job.result.timings || {}).reduce((a, b) => a + b, 0))]]));
}

export async function jobView(container, jobId, ctx) {
  const { signal } = ctx;
  let job = await request(`/v1/jobs/${enc(jobId)}`, { signal });
  let events = await request(`/v1/jobs/${enc(jobId)}/events?after=0`, { signal });
  const header = h('section', { class: 'card', id: 'job-header' });
  const timeline = h('section', { class: 'card', id: 'job-timeline' }, h('h2', {}, 'Stages'));
  const timelineBody = h('div', {});
  const eventsBox = h('div', {});
  const liveNote = h('p', { class: 'small muted', id: 'live-note', 'aria-live': 'polite' });
  const results = h('div', { id: 'results' });
  timeline.append(timelineBody, liveNote, eventsBox);
  replace(container, header, timeline, results);
  const showError = (text) => ctx.showBanner(text);
  let pending = false;

  function render() {
    pending = false;
    document.title = `${job.status} · ${job.id} · TAQ`;
    replace(header, headerView(job, (updated) => { job = updated; render(); }, showError));
    replace(timelineBody, timelineView(job, events));
    replace(eventsBox, eventsTable(events));
  }
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(render); }
  }
  function onEvent(e) {
    if (events.some((x) => x.id === e.id)) return;
    events.push(e);
    if (events.length > MAX_EVENTS) events = events.slice(-MAX_EVENTS);
    if (e.status) job.status = e.status;
    if (e.stage) job.stage = e.stage;
    if (typeof e.progress === 'number') job.progress = e.progress;
    schedule();
  }
  render();

  async function follow() {
    let after = events.length ? events[events.length - 1].id : 0;
    let polling = false;
    while (!signal.aborted && !FINISHED.has(job.status)) {
      try {
        if (polling) {
          for (const e of await request(`/v1/jobs/${enc(jobId)}/events?after=${after}`, { signal })) { onEvent(e); after = e.id; }
          job = await request(`/v1/jobs/${enc(jobId)}`, { signal });
          schedule();
          await sleep(2000, signal);
          continue;
        }
        liveNote.textContent = 'live: following the event stream';
        const outcome = await followEvents(jobId, after, (e) => { onEvent(e); after = e.id; }, signal);
        after = outcome.last;
        if (outcome.outcome === 'end') break;
        // 'timeout' (TAQ_SSE_MAX_SECONDS) or a dropped stream: reconnect from the last event
        job = await request(`/v1/jobs/${enc(jobId)}`, { signal });
        schedule();
        if (outcome.outcome === 'closed') await sleep(1000, signal);
      } catch (err) {
        if (signal.aborted || (err && err.name === 'AbortError')) return;
        if (err instanceof ApiError && err.status === 429) {
          polling = true;
          liveNote.textContent = `live: polling every 2 s (${err.message})`;
          continue;
        }
        if (err instanceof ApiError && err.status === 401) return;
        liveNote.textContent = `live updates interrupted: ${describe(err)}; retrying in 3 s`;
        await sleep(3000, signal);
      }
    }
    if (signal.aborted) return;
    job = await request(`/v1/jobs/${enc(jobId)}`, { signal });
    liveNote.textContent = `finished: ${job.status}`;
    render();
    await showResults();
  }

  async function showResults() {
    const artifacts = await request(`/v1/jobs/${enc(jobId)}/artifacts`, { signal }).catch(() => []);
    const parts = [budgetsTable(job)];
    let profile = null;
    try {
      profile = await request(`/v1/jobs/${enc(jobId)}/profile`, { signal });
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) parts.push(h('p', { class: 'error' }, `profile: ${describe(err)}`));
    }
    const prof = profile && profile.layers.length ? profileSection(job, profile) : null;
    if (prof) parts.push(prof.section);
    let evaluation = null;
    if (artifacts.some((a) => a.name === 'eval.json')) {
      try {
        evaluation = evalSection(await artifactJson(jobId, 'eval.json', signal));
        parts.push(evaluation.section);
      } catch (err) {
        if (signal.aborted) return;
        parts.push(h('section', { class: 'card' }, h('h2', {}, 'Evaluation'), h('p', { class: 'error' }, `eval.json: ${describe(err)}`)));
      }
    }
    if (artifacts.length) parts.push(artifactsSection(job, artifacts));
    if (artifacts.some((a) => a.name === 'manifest.json')) parts.push(manifestSection(job, signal));
    if (signal.aborted) return;
    replace(results, parts);
    if (prof) prof.draw();
    if (evaluation) evaluation.after();
  }

  if (FINISHED.has(job.status)) {
    liveNote.textContent = `finished: ${job.status}`;
    await showResults();
  } else {
    follow().catch((err) => { if (!signal.aborted) showError(describe(err)); });
  }
}
