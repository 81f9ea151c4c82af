// The dashboard's one way to reach Conveyor: the public REST API and its SSE watches, with the
// Bearer key kept in this tab's session storage (never in the URL, never in local storage).

const TOKEN_KEY = 'conveyor.token';

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value.trim());
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error the API answered: HTTP status, gRPC code, ErrorInfo reason and the message. */
export class ApiError extends Error {
  constructor(status, body) {
    const message = (body && body.message) || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = body && body.code;
    const info = ((body && body.details) || []).find((d) => d && d.reason) || {};
    this.reason = info.reason || '';
    this.metadata = info.metadata || {};
  }
}

function headers(extra) {
  const h = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

/** Listeners told when the API answers 401 (the key is missing, wrong, revoked or expired). */
const unauthorized = new Set();
export function onUnauthorized(fn) {
  unauthorized.add(fn);
  return () => unauthorized.delete(fn);
}

/**
 * Query string from an object; arrays repeat the key, empty values are left out. Values are
 * percent-encoded with encodeURIComponent, not URLSearchParams: Envoy's transcoder reads "+" as
 * a plus sign, not a space (README "Dashboard").
 */
export function query(params) {
  const parts = [];
  for (const [k, v] of Object.entries(params || {})) {
    const values = Array.isArray(v) ? v : [v];
    for (const x of values) {
      if (x !== '' && x != null) parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(x)}`);
    }
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

/** One call: resolves to { body, nextPageToken } or rejects with ApiError. */
export async function call(method, path, body, extraHeaders) {
  const init = { method, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { message: `the server could not be reached (${e.message})` });
  }
  const text = await response.text();
  let parsed = null;
  if (text) {
    try { parsed = JSON.parse(text); } catch { parsed = { message: text.slice(0, 300) }; }
  }
  if (!response.ok) {
    const err = new ApiError(response.status, parsed);
    if (response.status === 401) unauthorized.forEach((fn) => fn(err));
    throw err;
  }
  return { body: parsed, nextPageToken: response.headers.get('x-next-page-token') || '' };
}

export const get = (path, params) => call('GET', path + query(params)).then((r) => r.body);
export const post = (path, body, extraHeaders) => call('POST', path, body ?? {}, extraHeaders).then((r) => r.body);
export const del = (path) => call('DELETE', path).then((r) => r.body);

/** One page of a list endpoint: { items, nextPageToken }. */
export async function page(path, params) {
  const r = await call('GET', path + query(params));
  return { items: Array.isArray(r.body) ? r.body : [], nextPageToken: r.nextPageToken };
}

/**
 * Follow an SSE watch with fetch() streaming (EventSource cannot send an Authorization header).
 * `onMessage(msg)` gets each parsed message; after a dropped connection it reconnects with
 * `resume()` (the path to reopen, e.g. with after_seq of the last event seen), backing off up
 * to 10 s. A StreamError message is handed to onMessage; WATCHER_TOO_SLOW resumes at once.
 * A stream that ends by itself is over only when `finished()` says so (a run watch: its run is
 * final, judged by the run's status as the messages left it); otherwise it was cut short (a
 * server going away) and is resumed like a drop. Returns a function that stops it.
 */
export function watch(initialPath, { onMessage, onState, resume, finished }) {
  const controller = new AbortController();
  let stopped = false;
  let delay = 500;
  let path = initialPath;

  async function once() {
    const response = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal: controller.signal });
    if (!response.ok) {
      const text = await response.text();
      let parsed = null;
      try { parsed = JSON.parse(text); } catch { parsed = { message: text.slice(0, 300) }; }
      throw new ApiError(response.status, parsed);
    }
    onState && onState('live');
    delay = 500;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return 'ended';
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('');
        if (!data) continue;
        let msg;
        try { msg = JSON.parse(data); } catch { continue; }
        // A list of messages is how some proxies frame a stream: take each.
        for (const m of Array.isArray(msg) ? msg : [msg]) {
          if (m.error && m.error.reason === 'WATCHER_TOO_SLOW') return 'resume';
          onMessage(m);
          if (m.error) return 'failed';
        }
      }
    }
  }

  (async () => {
    while (!stopped) {
      let outcome;
      try {
        outcome = await once();
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status && e.status < 500 && e.status !== 429) {
          onState && onState('error', e);
          return;
        }
        outcome = 'dropped';
      }
      if (outcome === 'ended' && !finished()) outcome = 'dropped';
      if (stopped || outcome === 'ended' || outcome === 'failed') {
        onState && onState(outcome === 'failed' ? 'error' : 'ended');
        return;
      }
      onState && onState('reconnecting');
      if (outcome !== 'resume') {
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 10000);
      }
      path = resume ? resume() : path;
    }
  })();

  return () => { stopped = true; controller.abort(); };
}
