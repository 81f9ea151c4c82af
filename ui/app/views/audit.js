// The audit log (admins): every write call, accepted or refused, newest first, 50 a page; the
// filters (failures only, actor, project) and the page stack live in the URL.
import { useEffect, useState } from 'preact/hooks';
import { page } from '../api.js';
import { ErrorBox, Pager } from '../components.js';
import { fmtTime, html } from '../html.js';
import { href, navigate } from '../router.js';

const LIMIT = 50;

function routeParams(f, tokens) {
  return { failures: f.failures ? '1' : '', actor: f.actor, project: f.project, page: tokens };
}

/** Where an entry's resource can be opened, when the dashboard has a view of it. */
function resourceLink(e) {
  const id = e.resource_id;
  if (!id) return '—';
  const service = (e.method || '').split('/')[0];
  const enc = encodeURIComponent(id);
  if (service === 'WorkflowsService') return html`<a class="mono" href=${`#/workflows/${enc}`}>${id}</a>`;
  if (service === 'WorkflowRunsService' || service === 'StepRunsService') {
    return html`<a class="mono" href=${`#/runs/${enc}`}>${id}</a>`;
  }
  return html`<span class="mono">${id}</span>`;
}

export function AuditView({ route }) {
  const q = route.query;
  const filters = { failures: q.get('failures') === '1', actor: q.get('actor') || '', project: q.get('project') || '' };
  const tokens = q.getAll('page');
  const [rows, setRows] = useState([]);
  const [next, setNext] = useState('');
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState(null);
  const [draft, setDraft] = useState(filters);
  const filterKey = JSON.stringify(filters);
  const listKey = `${filterKey}|${tokens.join(',')}`;

  useEffect(() => setDraft(filters), [filterKey]);
  useEffect(() => {
    let gone = false;
    setLoading(true);
    setError(null);
    page('/v1/audit-entries', { project_id: filters.project, actor: filters.actor,
      failures_only: filters.failures ? 'true' : '', limit: LIMIT, page_token: tokens[tokens.length - 1] || '' })
      .then((r) => { if (!gone) { setRows(r.items); setNext(r.nextPageToken); } })
      .catch((e) => { if (!gone) { setRows([]); setNext(''); setError(e); } })
      .finally(() => { if (!gone) setLoading(false); });
    return () => { gone = true; };
  }, [listKey]);

  // The checkbox applies at once, with the text fields as shown (typed, not yet applied, too).
  const apply = (f) => navigate('/audit', routeParams(f, []));
  const trimmed = (d) => ({ ...d, actor: d.actor.trim(), project: d.project.trim() });
  const any = filters.failures || filters.actor || filters.project;
  return html`<section aria-labelledby="audit-title">
    <h1 id="audit-title">Audit log</h1>
    <form class="toolbar" aria-label="Filter the audit log"
      onSubmit=${(e) => { e.preventDefault(); apply(trimmed(draft)); }}>
      <label class="field" for="audit-actor">Actor <span class="muted small">a key's name</span>
        <input id="audit-actor" type="text" maxlength="200" value=${draft.actor} onInput=${(e) => setDraft({ ...draft, actor: e.target.value })} /></label>
      <label class="field" for="audit-project">Project
        <input id="audit-project" type="text" maxlength="128" value=${draft.project} onInput=${(e) => setDraft({ ...draft, project: e.target.value })} /></label>
      <button type="submit" class="primary">Apply</button>
      <label class="check" for="audit-failures">
        <input id="audit-failures" type="checkbox" checked=${filters.failures}
          onChange=${(e) => apply({ ...trimmed(draft), failures: e.target.checked })} />
        Failures only</label>
      ${any && html`<a href=${href('/audit', {})}>Clear filters</a>`}
    </form>
    <${ErrorBox} error=${error} />
    <div class="table-scroll"><table class="compact" aria-busy=${loading ? 'true' : 'false'}>
      <thead><tr><th scope="col">At</th><th scope="col">Actor</th><th scope="col">Project</th><th scope="col">Method</th>
        <th scope="col">Resource</th><th scope="col">Outcome</th><th scope="col">Reason and message</th></tr></thead>
      <tbody>${rows.map((e) => html`<tr key=${e.id} data-method=${e.method}>
        <td class="nowrap">${fmtTime(e.at)}</td>
        <td>${e.actor ? html`<a href=${href('/audit', routeParams({ ...filters, actor: e.actor }, []))}>${e.actor}</a>`
          : html`<span class="muted">(no valid key)</span>`}</td>
        <td>${e.project_id || '—'}</td>
        <td class="mono">${e.method}</td>
        <td>${resourceLink(e)}</td>
        <td>${e.code === 'OK' ? html`<span class="status status-completed">OK</span>`
          : html`<span class="status status-failed">${e.code}</span>`}</td>
        <td>${e.reason && html`<span class="mono">${e.reason}</span>`}${e.message && html`<div class="small">${e.message}</div>`}</td>
      </tr>`)}
      ${!loading && !error && !rows.length && html`<tr><td colspan="7" class="muted">No entries${any ? ' match the filters' : ''}.</td></tr>`}</tbody>
    </table></div>
    <${Pager} tokens=${tokens} next=${next} onPage=${(t) => navigate('/audit', routeParams(filters, t))} />
  </section>`;
}
