// The public /v1 API from the browser: the key lives in sessionStorage (this tab only) and goes
// out as `Authorization: Bearer`; no cookies. Errors become ApiError with the envelope's words.

const KEY_NAME = 'taq.apiKey';

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || '';
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, code, message, details = null, requestId = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
  }
}

let unauthorizedHandler = null;

/** Called with the ApiError of any 401 (unless the request opted out): the app shows the login. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const key = getKey();
  if (key) headers.set('Authorization', `Bearer ${key}`);
  return headers;
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  const e = body && body.error;
  const retry = response.headers.get('Retry-After');
  if (e && typeof e === 'object') return new ApiError(response.status, e.code, e.message, e.details, e.request_id, retry);
  return new ApiError(response.status, `http_${response.status}`, `HTTP ${response.status} ${response.statusText || ''}`.trim(),
    null, response.headers.get('X-Request-ID'), retry);
}

/**
 * One call. `json` sends a JSON body, `body` anything fetch takes (FormData). Returns the parsed
 * JSON (null for 204) or, with `raw`, the Response. Throws ApiError (status 0: no answer).
 */
export async function request(path, { method = 'GET', json, body, headers, signal, raw = false, quiet401 = false } = {}) {
  const init = { method, headers: authHeaders(headers), signal, cache: 'no-store', credentials: 'omit' };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers.set('Content-Type', 'application/json');
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (exc) {
    if (exc && exc.name === 'AbortError') throw exc;
    throw new ApiError(0, 'network_error', `the service at ${window.location.origin} did not answer (${exc && exc.message ? exc.message : 'network error'})`);
  }
  if (!response.ok) {
    const err = await errorFrom(response);
    if (err.status === 401 && !quiet401 && unauthorizedHandler) unauthorizedHandler(err);
    throw err;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** The error in words, as the API put it, with what to do for the common cases. */
export function describe(err) {
  if (!(err instanceof ApiError)) return `unexpected error in the page: ${err && err.message ? err.message : err}`;
  const rid = err.requestId ? ` (request id ${err.requestId})` : '';
  if (err.status === 0) return `Cannot reach the service: ${err.message}. Is it running? Check the address and your network, then reload.`;
  if (err.status === 401) return `401 unauthorized: ${err.message}. Sign in with a valid API key.${rid}`;
  if (err.status === 404) return `404 not found (${err.code}): ${err.message}${rid}`;
  const retry = err.retryAfter ? ` Retry after ${err.retryAfter} s.` : '';
  return `${err.status} ${err.code}: ${err.message}${retry}${rid}`;
}

export const enc = encodeURIComponent;

export function artifactUrl(jobId, name) {
  return `/v1/jobs/${enc(jobId)}/artifacts/${name.split('/').map(enc).join('/')}`;
}

export async function getJson(path, opts) {
  return request(path, opts);
}

/** An artifact's JSON (eval.json, manifest.json), read through the API. */
export async function artifactJson(jobId, name, signal) {
  const response = await request(artifactUrl(jobId, name), { raw: true, signal, headers: { Range: 'bytes=0-' } });
  return response.json();
}

function parseBlock(block) {
  const event = { event: 'message', data: [], id: null };
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event.event = value;
    else if (field === 'data') event.data.push(value);
    else if (field === 'id') event.id = value;
  }
  return event.data.length ? { ...event, data: event.data.join('\n') } : null;
}

/**
 * Follow a job's server-sent events with fetch (EventSource cannot send the Authorization
 * header). Calls onEvent(event) for each job event; resolves {outcome: 'end'|'timeout'|'closed',
 * last} when the stream ends. Throws ApiError when the stream is refused (429 too_many_streams).
 */
export async function followEvents(jobId, after, onEvent, signal) {
  const response = await request(`/v1/jobs/${enc(jobId)}/events?after=${after}`,
    { raw: true, signal, headers: { Accept: 'text/event-stream' } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let last = after;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return { outcome: 'closed', last };
      buffer += value.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = parseBlock(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!block) continue;
        if (block.event === 'end' || block.event === 'timeout') return { outcome: block.event, last };
        if (block.id) last = Number(block.id);
        try { onEvent(JSON.parse(block.data)); } catch (exc) { console.error('bad event', exc); }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export async function sha256Hex(blob) {
  if (!(window.crypto && window.crypto.subtle)) return null; // not a secure context (plain http, not loopback)
  const digest = await window.crypto.subtle.digest('SHA-256', await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Download an artifact with the Bearer header: fetch → Blob → object URL → a click. Always sends
 * `Range: bytes=0-`, so the API serves the bytes itself (a presigned S3 redirect would leave this
 * origin, which the page's Content-Security-Policy forbids). Resolves {size, sha256}.
 */
export async function downloadArtifact(jobId, name, filename, onProgress) {
  const response = await request(artifactUrl(jobId, name), { raw: true, headers: { Range: 'bytes=0-' } });
  const total = Number(response.headers.get('Content-Length')) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (onProgress) onProgress(received, total);
  }
  const blob = new Blob(chunks, { type: 'application/octet-stream' });
  const sha256 = await sha256Hex(blob);
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  link.rel = 'noopener';
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return { size: blob.size, sha256 };
}
