// The dashboard shell: sign-in, hash routes (#/jobs, #/new, #/job/<id>, #/compare), one view at a
// time. Each view gets an AbortSignal that fires when the person navigates away, so its streams
// and polls stop.

import { ApiError, describe, getKey, onUnauthorized, request, setKey } from './api.js';
import { h, replace } from './dom.js';
import { jobsView } from './jobs.js';
import { newJobView } from './newjob.js';
import { jobView } from './job.js';
import { compareView } from './compare.js';

const view = document.getElementById('view');
const banner = document.getElementById('banner');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const whoLabel = document.getElementById('who-label');

const state = { signedIn: false, keyless: false, controller: null, loginMessage: '', afterLogin: '#/jobs' };

export function showBanner(text, kind = 'error') {
  if (!text) { banner.hidden = true; banner.textContent = ''; return; }
  banner.hidden = false;
  banner.className = `banner banner-${kind}`;
  banner.textContent = text;
}

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || '') };
}

function setSignedIn(signedIn, keyless) {
  state.signedIn = signedIn;
  state.keyless = keyless;
  nav.hidden = !signedIn;
  who.hidden = !signedIn;
  const key = getKey();
  whoLabel.textContent = keyless ? 'keyless service' : key ? `key …${key.slice(-4)}` : '';
}

function markNav(route) {
  for (const link of nav.querySelectorAll('a')) {
    if (link.dataset.route === route) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function loginView(container) {
  const input = h('input', { type: 'password', id: 'api-key', name: 'api-key', autocomplete: 'off',
    placeholder: 'taq_…', 'aria-describedby': 'login-help' });
  const message = h('p', { class: 'error', id: 'login-error', role: 'alert' }, state.loginMessage || '');
  message.hidden = !state.loginMessage;
  const submit = h('button', { type: 'submit', id: 'sign-in' }, 'Sign in');
  const form = h('form', { class: 'card login', id: 'login-form' },
    h('h1', {}, 'Sign in'),
    h('label', { for: 'api-key' }, 'API key'), input,
    h('p', { class: 'muted small', id: 'login-help' },
      'The key stays in this browser tab (sessionStorage) and is sent as an Authorization: Bearer header to this '
      + 'service only. Keys come from TAQ_API_KEYS or `taq admin create-key`. A service running keyless on '
      + 'loopback needs none: leave it empty.'),
    h('div', { class: 'actions' }, submit), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    submit.disabled = true;
    message.hidden = true;
    const key = input.value.trim();
    setKey(key);
    try {
      await request('/v1/models', { quiet401: true });
      state.loginMessage = '';
      setSignedIn(true, !key);
      const target = state.afterLogin && !state.afterLogin.startsWith('#/login') ? state.afterLogin : '#/jobs';
      if (window.location.hash === target) route(); else window.location.hash = target;
    } catch (err) {
      setKey('');
      message.textContent = err instanceof ApiError && err.status === 401
        ? `The service refused this key — ${describe(err)}` : describe(err);
      message.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  replace(container, form);
  input.focus();
}

function signOut(message = '') {
  setKey('');
  setSignedIn(false, false);
  state.loginMessage = message;
  window.location.hash = '#/login';
}

onUnauthorized((err) => {
  if (!state.signedIn) return;
  state.afterLogin = window.location.hash || '#/jobs';
  signOut(`Signed out: ${describe(err)}`);
});

async function route() {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  showBanner('');
  const { parts, params } = parseHash();
  const name = parts[0] || 'jobs';
  if (!state.signedIn || name === 'login') {
    if (state.signedIn && name === 'login') signOut('');
    markNav('');
    loginView(view);
    return;
  }
  markNav(name === 'job' ? 'jobs' : name);
  replace(view, h('p', { class: 'muted' }, 'Loading…'));
  const ctx = { signal: controller.signal, params, showBanner, keyless: state.keyless };
  try {
    if (name === 'jobs') await jobsView(view, ctx);
    else if (name === 'new') await newJobView(view, ctx);
    else if (name === 'job' && parts[1]) await jobView(view, parts[1], ctx);
    else if (name === 'compare') await compareView(view, ctx);
    else replace(view, h('section', { class: 'card' }, h('h1', {}, 'Not found'),
      h('p', {}, `There is no page “${parts.join('/')}”. `, h('a', { href: '#/jobs' }, 'Back to the jobs.'))));
  } catch (err) {
    if (err && err.name === 'AbortError') return;
    if (controller.signal.aborted) return;
    console.error(err);
    replace(view, h('section', { class: 'card' }, h('h1', {}, 'Could not load this page'),
      h('p', { class: 'error', role: 'alert' }, describe(err)),
      h('p', {}, h('a', { href: '#/jobs' }, 'Back to the jobs'))));
  }
}

async function boot() {
  document.getElementById('sign-out').addEventListener('click', () => signOut(''));
  window.addEventListener('hashchange', route);
  if (!window.location.hash || window.location.hash === '#') history.replaceState(null, '', '#/jobs');
  state.afterLogin = window.location.hash;
  try {
    await request('/v1/models', { quiet401: true });
    setSignedIn(true, !getKey());
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) {
      replace(view, h('section', { class: 'card' }, h('h1', {}, 'The service did not answer'),
        h('p', { class: 'error', role: 'alert' }, describe(err)),
        h('p', {}, h('button', { type: 'button', onclick: () => window.location.reload() }, 'Try again'))));
      return;
    }
    setKey('');
    state.loginMessage = getKeyMessage(err);
  }
  route();
}

function getKeyMessage(err) {
  // no key in this tab and the service needs one: no message, just the form
  return err.message && err.message.includes('needs an API key') ? '' : describe(err);
}

boot();
