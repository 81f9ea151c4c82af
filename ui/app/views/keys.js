// API keys (admins): the list (50 a page, filters in the URL), creating a key — its token shown
// once, in a dialog with a copy button and a warning — and revoking one behind a confirmation.
// A key that may not manage keys sees the API's answer (403, ROLE_TOO_LOW) as it is.
import { useEffect, useRef, useState } from 'preact/hooks';
import { page, post } from '../api.js';
import { Confirm, ErrorBox, Pager } from '../components.js';
import { fmtTime, html } from '../html.js';
import { href, navigate } from '../router.js';

const LIMIT = 50;
// worker: only leases and reports tasks of its project (what `conveyor worker` needs), nothing else.
const ROLES = ['viewer', 'operator', 'admin', 'worker'];
const EXPIRIES = [['', 'never'], ['1', '1 day'], ['7', '7 days'], ['30', '30 days'], ['90', '90 days'], ['365', '1 year']];

function routeParams(project, revoked, tokens) {
  return { project, revoked: revoked ? '1' : '', page: tokens };
}

function keyState(k) {
  if (k.revoked_at) return html`<span class="status status-failed">revoked</span> <span class="muted small">${fmtTime(k.revoked_at)}</span>`;
  if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return html`<span class="status status-canceled">expired</span>`;
  return html`<span class="status status-completed">active</span>`;
}

function CreateKey({ onClose, onCreated }) {
  const [form, setForm] = useState({ name: '', project: '', role: 'viewer', expiry: '', rate: '' });
  const set = (k) => (e) => setForm({ ...form, [k]: e.target.value });
  async function create() {
    const body = { name: form.name.trim(), project_id: form.project.trim(), role: form.role };
    if (form.expiry) body.expires_at = new Date(Date.now() + Number(form.expiry) * 86400000).toISOString();
    if (form.rate) body.rate_limit = Number(form.rate);
    onCreated(await post('/v1/api-keys', body));
  }
  return html`<${Confirm} title="Create an API key" confirmLabel="Create key" onConfirm=${create} onClose=${onClose}>
    <label class="field" for="key-name">Name <span class="muted small">unique; recorded as the actor of what the key does</span>
      <input id="key-name" type="text" required maxlength="200" value=${form.name} onInput=${set('name')} autofocus /></label>
    <label class="field" for="key-project">Project <span class="muted small">“*” for every project; empty: your key's project (“default” for a key of every project)</span>
      <input id="key-project" type="text" maxlength="128" value=${form.project} onInput=${set('project')} /></label>
    <label class="field" for="key-role">Role
      <select id="key-role" value=${form.role} onChange=${set('role')}>
        ${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}</select></label>
    <label class="field" for="key-expiry">Expires
      <select id="key-expiry" value=${form.expiry} onChange=${set('expiry')}>
        ${EXPIRIES.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select></label>
    <label class="field" for="key-rate">Rate limit <span class="muted small">requests per second; empty: the server's default</span>
      <input id="key-rate" type="number" min="0" step="1" value=${form.rate} onInput=${set('rate')} /></label>
  </${Confirm}>`;
}

function TokenOnce({ created, onClose }) {
  const [copied, setCopied] = useState('');
  const field = useRef(null);
  async function copy() {
    try {
      await navigator.clipboard.writeText(created.token);
      setCopied('Copied to the clipboard.');
    } catch {
      field.current.select();
      setCopied('The browser refused the clipboard: the token is selected, copy it with Ctrl+C.');
    }
  }
  return html`<${Confirm} title=${`Key “${created.key.name}” created`} confirmLabel="I have stored the token"
      onConfirm=${async () => {}} onClose=${onClose}>
    <p class="notice" role="alert"><strong>This token is shown once.</strong> Conveyor keeps only its hash:
      copy it now and store it safely; if it is lost, revoke the key and create another.</p>
    <label class="field" for="new-token">Token (${created.key.role} of ${created.key.project_id})
      <input id="new-token" ref=${field} class="mono token" type="text" readonly value=${created.token}
        onFocus=${(e) => e.target.select()} /></label>
    <div class="run-actions">
      <button type="button" onClick=${copy}>Copy token</button>
      <span role="status" class="muted small">${copied}</span>
    </div>
  </${Confirm}>`;
}

export function KeysView({ route }) {
  const q = route.query;
  const project = q.get('project') || '';
  const revoked = q.get('revoked') === '1';
  const tokens = q.getAll('page');
  const [rows, setRows] = useState([]);
  const [next, setNext] = useState('');
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState(null);
  const [draft, setDraft] = useState(project);
  const [dialog, setDialog] = useState(null); // 'create' | {created} | {revoke: key}
  const [reload, setReload] = useState(0);
  const listKey = `${project}|${revoked}|${tokens.join(',')}|${reload}`;

  useEffect(() => setDraft(project), [project]);
  useEffect(() => {
    let gone = false;
    setLoading(true);
    setError(null);
    page('/v1/api-keys', { project_id: project, include_revoked: revoked ? 'true' : '', limit: LIMIT,
      page_token: tokens[tokens.length - 1] || '' })
      .then((r) => { if (!gone) { setRows(r.items); setNext(r.nextPageToken); } })
      .catch((e) => { if (!gone) { setRows([]); setNext(''); setError(e); } })
      .finally(() => { if (!gone) setLoading(false); });
    return () => { gone = true; };
  }, [listKey]);

  const go = (over) => navigate('/keys', routeParams(over.project ?? project, over.revoked ?? revoked, over.tokens ?? tokens));
  const refresh = () => setReload((n) => n + 1);

  return html`<section aria-labelledby="keys-title">
    <div class="run-title">
      <h1 id="keys-title">API keys</h1>
      <button type="button" class="primary" onClick=${() => setDialog('create')}>Create key…</button>
    </div>
    <form class="toolbar" aria-label="Filter keys" onSubmit=${(e) => { e.preventDefault(); go({ project: draft.trim(), tokens: [] }); }}>
      <label class="field" for="keys-project">Project <span class="muted small">“*”: keys of every project</span>
        <input id="keys-project" type="text" value=${draft} maxlength="128" onInput=${(e) => setDraft(e.target.value)} /></label>
      <button type="submit">Apply</button>
      <label class="check" for="keys-revoked">
        <input id="keys-revoked" type="checkbox" checked=${revoked} onChange=${(e) => go({ revoked: e.target.checked, tokens: [] })} />
        Include revoked</label>
      ${(project || revoked) && html`<a href=${href('/keys', {})}>Clear filters</a>`}
    </form>
    <${ErrorBox} error=${error} />
    <div class="table-scroll"><table aria-busy=${loading ? 'true' : 'false'}>
      <thead><tr><th scope="col">Name</th><th scope="col">Project</th><th scope="col">Role</th><th scope="col">Token prefix</th>
        <th scope="col">Created</th><th scope="col">Expires</th><th scope="col">Last used</th><th scope="col">State</th>
        <th scope="col"><span class="visually-hidden">Actions</span></th></tr></thead>
      <tbody>${rows.map((k) => html`<tr key=${k.id} data-key=${k.name}>
        <th scope="row" class="rowhead">${k.name}<div class="muted small mono">${k.id}</div></th>
        <td>${k.project_id}</td>
        <td>${k.role}</td>
        <td class="mono">${k.token_prefix}…</td>
        <td class="nowrap">${fmtTime(k.created_at)}${k.created_by && html`<div class="muted small">by ${k.created_by}</div>`}</td>
        <td class="nowrap">${k.expires_at ? fmtTime(k.expires_at) : 'never'}</td>
        <td class="nowrap">${fmtTime(k.last_used_at)}</td>
        <td>${keyState(k)}${k.rate_limit ? html`<div class="muted small">${k.rate_limit}/s</div>` : ''}</td>
        <td>${!k.revoked_at && html`<button type="button" class="danger-outline"
          aria-label=${`Revoke ${k.name}`} onClick=${() => setDialog({ revoke: k })}>Revoke…</button>`}</td>
      </tr>`)}
      ${!loading && !error && !rows.length && html`<tr><td colspan="9" class="muted">No keys.</td></tr>`}</tbody>
    </table></div>
    <${Pager} tokens=${tokens} next=${next} onPage=${(t) => go({ tokens: t })} />
    ${dialog === 'create' && html`<${CreateKey} onClose=${(done) => { if (!done) setDialog(null); }}
      onCreated=${(created) => { setDialog({ created }); refresh(); }} />`}
    ${dialog && dialog.created && html`<${TokenOnce} created=${dialog.created} onClose=${() => setDialog(null)} />`}
    ${dialog && dialog.revoke && html`<${Confirm} title=${`Revoke ${dialog.revoke.name}?`} confirmLabel="Revoke" danger
        onConfirm=${async () => { await post(`/v1/api-keys/${encodeURIComponent(dialog.revoke.id)}:revoke`, {}); refresh(); }}
        onClose=${() => setDialog(null)}>
      <p>The key stops working at once on this server (within 5 seconds on other replicas). It stays listed, marked revoked; this cannot be undone.</p>
      <p class="muted small">${dialog.revoke.role} of ${dialog.revoke.project_id}, token ${dialog.revoke.token_prefix}…</p>
    </${Confirm}>`}
  </section>`;
}
