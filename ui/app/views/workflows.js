// The workflows list: one page of 50 at a time over the API's cursors (the stack of page
// tokens in the URL, like the runs list), archived ones on request, and a filter over the page
// shown (the list API has no text filter: this filters what was fetched, never the whole table).
import { useEffect, useState } from 'preact/hooks';
import { page } from '../api.js';
import { ErrorBox, Pager } from '../components.js';
import { fmtTime, html } from '../html.js';
import { href, navigate } from '../router.js';

const LIMIT = 50;
const enc = encodeURIComponent;

function routeParams(archived, filter, tokens) {
  return { archived: archived ? '1' : '', filter, page: tokens };
}

/** "0 9 * * 1-5 (UTC) · next 2026-…", "paused", or a dash. */
export function scheduleText(wf) {
  if (!wf.schedule || !wf.schedule.cron) return '—';
  const zone = wf.schedule.timezone || 'UTC';
  if (wf.archived) return `${wf.schedule.cron} (${zone}) · archived`;
  if (wf.schedule_paused) return `${wf.schedule.cron} (${zone}) · paused`;
  return `${wf.schedule.cron} (${zone}) · next ${fmtTime(wf.next_fire_at)}`;
}

export function WorkflowsView({ route }) {
  const q = route.query;
  const archived = q.get('archived') === '1';
  const filter = q.get('filter') || '';
  const tokens = q.getAll('page');
  const [rows, setRows] = useState([]);
  const [next, setNext] = useState('');
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState(null);
  const [draft, setDraft] = useState(filter);
  const listKey = `${archived}|${tokens.join(',')}`;

  useEffect(() => setDraft(filter), [filter]);
  useEffect(() => {
    let gone = false;
    setLoading(true);
    setError(null);
    page('/v1/workflows', { limit: LIMIT, include_archived: archived ? 'true' : '', page_token: tokens[tokens.length - 1] || '' })
      .then((r) => { if (!gone) { setRows(r.items); setNext(r.nextPageToken); } })
      .catch((e) => { if (!gone) { setRows([]); setNext(''); setError(e); } })
      .finally(() => { if (!gone) setLoading(false); });
    return () => { gone = true; };
  }, [listKey]);

  const needle = filter.toLowerCase();
  const shown = needle
    ? rows.filter((w) => `${w.name}\n${w.description || ''}`.toLowerCase().includes(needle))
    : rows;
  const go = (over) => navigate('/workflows', routeParams(over.archived ?? archived, over.filter ?? filter,
    over.tokens ?? tokens), { replace: over.replace });

  return html`<section aria-labelledby="wfs-title">
    <h1 id="wfs-title">Workflows</h1>
    <form class="toolbar" aria-label="Filter workflows" onSubmit=${(e) => { e.preventDefault(); go({ filter: draft.trim() }); }}>
      <label class="field" for="wf-filter">Filter this page by name or description
        <input id="wf-filter" type="search" value=${draft} maxlength="200" onInput=${(e) => setDraft(e.target.value)} /></label>
      <button type="submit">Filter</button>
      <label class="check" for="wf-archived">
        <input id="wf-archived" type="checkbox" checked=${archived}
          onChange=${(e) => go({ archived: e.target.checked, tokens: [] })} />
        Include archived</label>
      ${filter && html`<a href=${href('/workflows', routeParams(archived, '', tokens))}>Clear filter</a>`}
    </form>
    <${ErrorBox} error=${error} />
    ${filter && !loading && html`<p class="muted small" role="status">${shown.length} of the ${rows.length} workflows on this page match “${filter}”.</p>`}
    <div class="table-scroll">
      <table aria-busy=${loading ? 'true' : 'false'}>
        <thead><tr>
          <th scope="col">Name</th><th scope="col">Project</th><th scope="col" class="num">Version</th>
          <th scope="col" class="num">Steps</th><th scope="col">Schedule</th><th scope="col">Updated</th>
        </tr></thead>
        <tbody>
          ${shown.map((w) => html`<tr key=${w.id}>
            <td>
              <a href=${`#/workflows/${enc(w.id)}`}>${w.name}</a>
              ${w.archived && html` <span class="status status-canceled">archived</span>`}
              ${w.description && html`<div class="muted small">${w.description}</div>`}
            </td>
            <td>${w.project_id}</td>
            <td class="num">${w.version}</td>
            <td class="num">${(w.steps || []).length}</td>
            <td class="small">${scheduleText(w)}</td>
            <td class="nowrap">${fmtTime(w.updated_at)}</td>
          </tr>`)}
          ${!loading && !error && !shown.length && html`<tr><td colspan="6" class="muted">
            ${rows.length ? 'No workflow on this page matches the filter.' : 'No workflows.'}</td></tr>`}
        </tbody>
      </table>
    </div>
    <${Pager} tokens=${tokens} next=${next} onPage=${(t) => go({ tokens: t })} />
  </section>`;
}
