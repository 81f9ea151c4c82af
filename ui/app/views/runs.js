// The runs list: filters held in the URL (so a view can be bookmarked and shared), one page of
// 50 at a time over the API's cursors (the stack of page tokens is in the URL too), rows kept
// current by the project watch, and multi-select with bulk cancel / replay.
import { useEffect, useRef, useState } from 'preact/hooks';
import { page, post, watch, query } from '../api.js';
import { Confirm, ErrorBox, Pager } from '../components.js';
import { FINAL_RUN, RUN_STATUSES, Status, fmtDuration, fmtTime, html, secondsBetween } from '../html.js';
import { href, navigate } from '../router.js';

const enc = encodeURIComponent;
const LIMIT = 50;
// Each watch holds one of the browser's 6 HTTP/1.1 connections to the origin: a list showing
// runs of many projects (a `*` key) watches the first two, and the rest update on refresh.
const MAX_PROJECT_WATCHES = 2;

/** The filters a route's query holds. */
export function filtersOf(q) {
  const list = (k) => q.getAll(k).flatMap((v) => v.split(',')).map((v) => v.trim()).filter(Boolean);
  return {
    project: q.get('project') || '',
    workflow: list('workflow'),
    status: q.getAll('status').filter((s) => RUN_STATUSES.includes(s)),
    initiator: q.get('initiator') || '',
    tag: list('tag'),
    started_after: q.get('started_after') || '',
    started_before: q.get('started_before') || '',
    search: q.get('search') || '',
  };
}

/** The list API's parameters for filters (and a page token). */
function apiParams(f, pageToken) {
  return {
    project_id: f.project, workflow_id: f.workflow, status: f.status, triggered_by: f.initiator,
    tag: f.tag, started_after: f.started_after, started_before: f.started_before, search: f.search,
    limit: LIMIT, page_token: pageToken || '',
  };
}

/** Whether a run (from the project watch) passes the filters, as far as the browser can tell. */
export function matches(run, f) {
  if (f.project && run.project_id !== f.project) return false;
  if (f.workflow.length && !f.workflow.includes(run.workflow_id) && !f.workflow.includes(run.workflow_name)) return false;
  if (f.status.length && !f.status.includes(run.status)) return false;
  if (f.initiator && run.triggered_by !== f.initiator) return false;
  for (const t of f.tag) {
    const i = t.indexOf(':');
    if (i < 0 || (run.tags || {})[t.slice(0, i)] !== t.slice(i + 1)) return false;
  }
  const started = run.started_at ? Date.parse(run.started_at) : NaN;
  if (f.started_after && !(started >= Date.parse(f.started_after))) return false;
  if (f.started_before && !(started < Date.parse(f.started_before))) return false;
  // The search also matches descriptions, which a run does not carry: the name is what we know.
  if (f.search && !(run.workflow_name || '').toLowerCase().includes(f.search.toLowerCase())) return false;
  return true;
}

/** An RFC 3339 time as a datetime-local input's value (local time), and back. */
function toLocalInput(iso) {
  const d = iso ? new Date(iso) : null;
  if (!d || Number.isNaN(d.getTime())) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
function fromLocalInput(value) {
  const d = value ? new Date(value) : null;
  return d && !Number.isNaN(d.getTime()) ? d.toISOString() : '';
}

/** The URL params of filters (arrays repeat; the page stack starts over). */
function routeParams(f) {
  return {
    project: f.project, workflow: f.workflow, status: f.status, initiator: f.initiator, tag: f.tag,
    started_after: f.started_after, started_before: f.started_before, search: f.search,
  };
}

function Filters({ filters }) {
  const [draft, setDraft] = useState(() => ({
    ...filters, workflow: filters.workflow.join(', '), tag: filters.tag.join(', '),
    started_after: toLocalInput(filters.started_after), started_before: toLocalInput(filters.started_before),
  }));
  const key = JSON.stringify(filters);
  useEffect(() => {
    setDraft({
      ...filters, workflow: filters.workflow.join(', '), tag: filters.tag.join(', '),
      started_after: toLocalInput(filters.started_after), started_before: toLocalInput(filters.started_before),
    });
  }, [key]);
  const set = (k) => (e) => setDraft({ ...draft, [k]: e.target.value });
  const split = (v) => v.split(',').map((x) => x.trim()).filter(Boolean);
  function apply(e, statusOverride) {
    if (e) e.preventDefault();
    navigate('/runs', routeParams({
      project: draft.project.trim(), workflow: split(draft.workflow), status: statusOverride || filters.status,
      initiator: draft.initiator.trim(), tag: split(draft.tag),
      started_after: fromLocalInput(draft.started_after), started_before: fromLocalInput(draft.started_before),
      search: draft.search.trim(),
    }));
  }
  function toggleStatus(s) {
    const next = filters.status.includes(s) ? filters.status.filter((x) => x !== s) : [...filters.status, s];
    // Statuses apply at once (the text fields wait for Apply), keeping the other filters as shown.
    navigate('/runs', routeParams({ ...filters, status: RUN_STATUSES.filter((x) => next.includes(x)) }));
  }
  const any = Object.values(filters).some((v) => (Array.isArray(v) ? v.length : v));
  return html`<form class="filters" onSubmit=${apply} aria-label="Filter runs">
    <div class="toolbar">
      <label class="field" for="f-search">Search workflows
        <input id="f-search" type="search" placeholder="name or description" value=${draft.search} onInput=${set('search')} maxlength="200" /></label>
      <label class="field" for="f-project">Project
        <input id="f-project" type="text" value=${draft.project} onInput=${set('project')} size="10" /></label>
      <label class="field" for="f-workflow">Workflow
        <input id="f-workflow" type="text" placeholder="names or ids, comma-separated" value=${draft.workflow} onInput=${set('workflow')} /></label>
      <label class="field" for="f-initiator">Triggered by
        <input id="f-initiator" type="text" value=${draft.initiator} onInput=${set('initiator')} size="12" /></label>
      <label class="field" for="f-tag">Tags
        <input id="f-tag" type="text" placeholder="key:value, …" value=${draft.tag} onInput=${set('tag')} /></label>
      <label class="field" for="f-after">Started after
        <input id="f-after" type="datetime-local" value=${draft.started_after} onInput=${set('started_after')} /></label>
      <label class="field" for="f-before">Started before
        <input id="f-before" type="datetime-local" value=${draft.started_before} onInput=${set('started_before')} /></label>
      <button type="submit" class="primary">Apply</button>
      ${any && html`<a class="clear" href="#/runs">Clear filters</a>`}
    </div>
    <fieldset class="status-filter">
      <legend>Status</legend>
      ${RUN_STATUSES.map((s) => html`<label class="check" for=${`f-status-${s}`}>
        <input type="checkbox" id=${`f-status-${s}`} name="status" value=${s} checked=${filters.status.includes(s)}
          onChange=${() => toggleStatus(s)} />
        <${Status} value=${s} /></label>`)}
    </fieldset>
  </form>`;
}

function Duration({ run }) {
  const final = FINAL_RUN.has(run.status);
  return fmtDuration(secondsBetween(run.started_at, final ? run.finished_at : null));
}

function BulkBar({ selected, onClear, onDone }) {
  const [op, setOp] = useState(null);
  const ids = [...selected];
  const n = ids.length;
  const word = `${n} run${n === 1 ? '' : 's'}`;
  const specs = {
    cancel: {
      label: 'Cancel selected', confirm: `Cancel ${word}`, danger: true,
      text: `Cancel ${word}? Their unfinished steps and child runs are canceled. Runs already finished cannot be canceled and are counted as failed.`,
      call: async () => {
        const r = await post('/v1/workflow-runs/bulk-cancel', { workflow_run_ids: ids });
        return `Bulk cancel: ${r.canceled || 0} canceled, ${r.failed || 0} failed.`;
      },
    },
    replay: {
      label: 'Replay selected', confirm: `Replay ${word}`,
      text: `Replay ${word}? Each finished run runs again in place, every step from the start. Runs not finished are counted as failed.`,
      call: async () => {
        const r = await post('/v1/workflow-runs/bulk-replay', { workflow_run_ids: ids });
        return `Bulk replay: ${r.replayed || 0} replayed, ${r.failed || 0} failed.`;
      },
    },
  };
  const spec = op && specs[op];
  return html`<div class="bulkbar" role="group" aria-label="Operations on the selected runs">
    <span><strong>${n}</strong> selected</span>
    <button type="button" class="danger-outline" disabled=${!n} onClick=${() => setOp('cancel')}>Cancel selected</button>
    <button type="button" disabled=${!n} onClick=${() => setOp('replay')}>Replay selected</button>
    <button type="button" class="link" disabled=${!n} onClick=${onClear}>Clear selection</button>
    ${spec && html`<${Confirm} title=${spec.confirm} confirmLabel=${spec.confirm} danger=${spec.danger}
      onConfirm=${async () => onDone(await spec.call())} onClose=${() => setOp(null)}>
      <p>${spec.text}</p>
      <p class="muted mono small">${ids.slice(0, 10).join(', ')}${n > 10 ? ` and ${n - 10} more` : ''}</p>
    </${Confirm}>`}
  </div>`;
}

export function RunsView({ route }) {
  const filters = filtersOf(route.query);
  const tokens = route.query.getAll('page');
  const filterKey = JSON.stringify(filters);
  const listKey = `${filterKey}|${tokens.join(',')}`;
  const [rows, setRows] = useState([]);
  const [next, setNext] = useState('');
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState(null);
  const [selected, setSelected] = useState(() => new Set());
  const [fresh, setFresh] = useState(() => new Set()); // new runs matching the filters, not shown
  const [conn, setConn] = useState('');
  const [notice, setNotice] = useState('');
  const [reload, setReload] = useState(0);
  const rowsRef = useRef(rows);
  rowsRef.current = rows;
  const loadedAt = useRef(Date.now());
  const allBox = useRef(null);

  useEffect(() => {
    let gone = false;
    setLoading(true);
    setError(null);
    loadedAt.current = Date.now();
    page('/v1/workflow-runs', apiParams(filters, tokens[tokens.length - 1]))
      .then((r) => {
        if (gone) return;
        setRows(r.items);
        setNext(r.nextPageToken);
        setFresh(new Set());
        setSelected((sel) => new Set(r.items.filter((x) => sel.has(x.id)).map((x) => x.id)));
      })
      .catch((err) => { if (!gone) { setError(err); setRows([]); setNext(''); } })
      .finally(() => { if (!gone) setLoading(false); });
    return () => { gone = true; };
  }, [listKey, reload]);

  // Live: the project watch of the filtered project, or of the projects of the runs shown.
  const projects = filters.project ? [filters.project]
    : [...new Set(rows.map((r) => r.project_id).filter(Boolean))].sort().slice(0, MAX_PROJECT_WATCHES);
  const firstPage = tokens.length === 0;
  const projectsKey = projects.join(',');
  useEffect(() => {
    if (!projects.length) { setConn(''); return undefined; }
    setConn('connecting');
    const stops = projects.map((project) => {
      let cursor = '';
      const base = `/v1/projects/${enc(project)}/workflow-runs/watch`;
      const pathOf = () => base + query({ workflow_id: filters.workflow, cursor });
      return watch(pathOf(), {
        onMessage(m) {
          if (!m.run) return;
          if (m.cursor) cursor = m.cursor;
          const run = m.run;
          if (rowsRef.current.some((r) => r.id === run.id)) {
            setRows((list) => list.map((r) => (r.id === run.id ? { ...r, ...run } : r)));
            return;
          }
          const newest = rowsRef.current.length ? Date.parse(rowsRef.current[0].created_at) : loadedAt.current - 5000;
          if (firstPage && Date.parse(run.created_at) > newest && matches(run, filters)) {
            setFresh((s) => (s.has(run.id) ? s : new Set([...s, run.id])));
          }
        },
        onState: (s) => setConn(s),
        resume: pathOf,
        finished: () => false, // a project watch never ends by itself: an end is a drop
      });
    });
    return () => stops.forEach((stop) => stop());
  }, [projectsKey, filterKey, firstPage]);

  const anyRunning = rows.some((r) => !FINAL_RUN.has(r.status) && r.started_at);
  const [, tick] = useState(0);
  useEffect(() => {
    if (!anyRunning) return undefined;
    const t = setInterval(() => tick((x) => x + 1), 1000);
    return () => clearInterval(t);
  }, [anyRunning]);

  const allOnPage = rows.length > 0 && rows.every((r) => selected.has(r.id));
  const someOnPage = rows.some((r) => selected.has(r.id));
  useEffect(() => { if (allBox.current) allBox.current.indeterminate = someOnPage && !allOnPage; });
  function toggle(id) {
    const s = new Set(selected);
    if (s.has(id)) s.delete(id); else s.add(id);
    setSelected(s);
  }
  function toggleAll() {
    setSelected(allOnPage ? new Set() : new Set(rows.map((r) => r.id)));
  }

  return html`<section class="runs-view">
    <div class="run-title">
      <h1>Runs</h1>
      ${conn && html`<span class=${`live ${conn}`} data-conn=${conn}>${conn === 'live' ? 'live' : conn}</span>`}
    </div>
    <${Filters} filters=${filters} />
    <${ErrorBox} error=${error} />
    ${notice && html`<p class="notice" role="status" data-field="bulk-result">${notice}</p>`}
    ${fresh.size > 0 && html`<p class="notice">
      <button type="button" class="link" onClick=${() => (firstPage ? setReload((x) => x + 1) : navigate('/runs', routeParams(filters)))}>
        ${fresh.size} new run${fresh.size === 1 ? '' : 's'} — refresh</button></p>`}
    <${BulkBar} selected=${selected} onClear=${() => setSelected(new Set())}
      onDone=${(message) => { setNotice(message); setSelected(new Set()); setReload((x) => x + 1); }} />
    <div class="table-scroll">
    <table class="runs" aria-busy=${loading ? 'true' : 'false'}>
      <thead><tr>
        <th class="select"><input type="checkbox" ref=${allBox} checked=${allOnPage} disabled=${!rows.length}
          onChange=${toggleAll} aria-label="Select every run on this page" /></th>
        <th>Run</th><th>Workflow</th><th>Status</th><th>Triggered by</th><th>Started</th><th>Duration</th><th>Tags</th>
      </tr></thead>
      <tbody>
        ${rows.map((r) => html`<tr key=${r.id} data-run-id=${r.id} class=${selected.has(r.id) ? 'selected' : ''}>
          <td class="select"><input type="checkbox" checked=${selected.has(r.id)} onChange=${() => toggle(r.id)}
            aria-label=${`Select run ${r.id}`} /></td>
          <td><a class="mono" href=${`#/runs/${enc(r.id)}`}>${r.id}</a></td>
          <td><a href=${`#/workflows/${enc(r.workflow_id)}`}>${r.workflow_name || r.workflow_id}</a></td>
          <td data-field="status"><${Status} value=${r.status} /></td>
          <td>${r.triggered_by}</td>
          <td class="nowrap">${r.started_at ? fmtTime(r.started_at) : html`<span class="muted">created ${fmtTime(r.created_at)}</span>`}</td>
          <td class="nowrap"><${Duration} run=${r} /></td>
          <td><span class="tags">${Object.entries(r.tags || {}).map(([k, v]) => html`<a class="tag" href=${href('/runs', { ...routeParams(filters), tag: [...filters.tag.filter((t) => t !== `${k}:${v}`), `${k}:${v}`] })}>${k}:${v}</a>`)}</span></td>
        </tr>`)}
        ${!rows.length && !loading && html`<tr><td colspan="8" class="muted">No runs match these filters.</td></tr>`}
        ${!rows.length && loading && html`<tr><td colspan="8" class="muted">Loading…</td></tr>`}
      </tbody>
    </table>
    </div>
    <${Pager} tokens=${tokens} next=${next} onPage=${(t) => navigate('/runs', { ...routeParams(filters), page: t })} />
  </section>`;
}
