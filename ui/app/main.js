// The dashboard's shell: sign-in, navigation, and which view a route shows.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { ApiError, get, onUnauthorized, setToken, token } from './api.js';
import { ErrorBox } from './components.js';
import { html } from './html.js';
import { useRoute } from './router.js';
import { RunsView } from './views/runs.js';
import { RunView } from './views/run.js';
import { WorkflowsView } from './views/workflows.js';
import { WorkflowView } from './views/workflow.js';
import { KeysView } from './views/keys.js';
import { AuditView } from './views/audit.js';

// A first visit may carry the token in the fragment (`conveyor serve` prints such a link on
// its first start): keep it in session storage and take it out of the address bar at once.
(function takeTokenFromUrl() {
  const m = location.hash.match(/^#token=([^&]+)$/);
  if (m) {
    setToken(decodeURIComponent(m[1]));
    history.replaceState(null, '', `${location.pathname}#/runs`);
  }
})();

function SignIn({ onSignedIn, reason }) {
  const [value, setValue] = useState('');
  const [error, setError] = useState(reason || null);
  const [busy, setBusy] = useState(false);
  async function submit(e) {
    e.preventDefault();
    setBusy(true);
    setError(null);
    setToken(value);
    try {
      await get('/v1/workflows', { limit: 1 }); // every role but worker may list: the key works
      onSignedIn();
    } catch (err) {
      setToken('');
      setError(err instanceof ApiError ? err : new ApiError(0, { message: String(err) }));
    } finally {
      setBusy(false);
    }
  }
  return html`<main class="signin">
    <form onSubmit=${submit} aria-labelledby="signin-title">
      <h1 id="signin-title">Conveyor</h1>
      <p>Sign in with an API key. The first <code>make run</code> wrote an admin key to
        <code>.conveyor/admin.token</code>; <code>conveyor keys create</code> makes others.</p>
      <label class="field" for="token">API key
        <input id="token" type="password" autocomplete="off" required value=${value}
          onInput=${(e) => setValue(e.target.value)} placeholder="cvk_…" autofocus />
      </label>
      <${ErrorBox} error=${error} />
      <button type="submit" class="primary" disabled=${busy}>${busy ? 'Checking…' : 'Sign in'}</button>
      <p class="muted">The key is kept in this tab only (session storage) and sent as a Bearer header.</p>
    </form>
  </main>`;
}

const NAV = [
  ['/runs', 'Runs'],
  ['/workflows', 'Workflows'],
  ['/keys', 'Keys'],
  ['/audit', 'Audit'],
];

function Shell({ onSignOut }) {
  const route = useRoute();
  const [section, id] = route.parts;
  let view;
  if (section === 'runs' && id) view = html`<${RunView} runId=${id} route=${route} />`;
  else if (section === 'workflows' && id) view = html`<${WorkflowView} workflowId=${id} route=${route} />`;
  else if (section === 'workflows') view = html`<${WorkflowsView} route=${route} />`;
  else if (section === 'keys') view = html`<${KeysView} route=${route} />`;
  else if (section === 'audit') view = html`<${AuditView} route=${route} />`;
  else view = html`<${RunsView} route=${route} />`;
  return html`<div class="shell">
    <a class="skip" href="#main">Skip to content</a>
    <header class="topbar">
      <a class="brand" href="#/runs">Conveyor</a>
      <nav aria-label="Sections">
        ${NAV.map(([path, label]) => html`<a href=${`#${path}`}
          aria-current=${`/${section || 'runs'}` === path ? 'page' : undefined}>${label}</a>`)}
      </nav>
      <button class="link" onClick=${onSignOut}>Sign out</button>
    </header>
    <main id="main" tabindex="-1">${view}</main>
  </div>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(token()));
  const [reason, setReason] = useState(null);
  useEffect(() => onUnauthorized((err) => {
    setToken('');
    setReason(err);
    setSignedIn(false);
  }), []);
  if (!signedIn) return html`<${SignIn} reason=${reason} onSignedIn=${() => { setReason(null); setSignedIn(true); }} />`;
  return html`<${Shell} onSignOut=${() => { setToken(''); setSignedIn(false); }} />`;
}

render(html`<${App} />`, document.getElementById('app'));
