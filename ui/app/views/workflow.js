// One workflow: its definition (the DAG, the steps, the variables, the schedule with its next
// fire time), a trigger form generated from the declared variables, its versions with a line
// diff between any two, and the operations on it (pause/resume the schedule, archive), each
// behind a confirmation that shows the API's answer plainly. The tab, the version shown and the
// versions compared are in the URL, so each view can be bookmarked.
import { useEffect, useState } from 'preact/hooks';
import { del, get, page, post } from '../api.js';
import { Confirm, ErrorBox, Json, JsonField, Pager } from '../components.js';
import { diffLines, hunks } from '../diff.js';
import { fmtDuration, fmtTime, html } from '../html.js';
import { href, navigate } from '../router.js';
import { WorkflowDag } from '../dag.js';

const enc = encodeURIComponent;
const LIMIT = 50;
const TABS = [['definition', 'Definition'], ['trigger', 'Trigger a run'], ['versions', 'Versions']];

/** The definition's own fields, in a fixed order, as the JSON people write (server fields left out). */
export function definitionOf(wf) {
  const keys = ['name', 'description', 'max_parallel_steps', 'max_concurrent_runs', 'timeout_seconds',
    'condition', 'schedule', 'variables', 'steps', 'notifications'];
  const out = {};
  for (const k of keys) if (wf[k] !== undefined) out[k] = wf[k];
  return out;
}

const definitionLines = (wf) => JSON.stringify(definitionOf(wf), null, 2).split('\n');

function useLoad(load, deps) {
  const [state, setState] = useState({ value: null, error: null, loading: true });
  useEffect(() => {
    let gone = false;
    setState((s) => ({ ...s, loading: true, error: null }));
    load()
      .then((value) => { if (!gone) setState({ value, error: null, loading: false }); })
      .catch((error) => { if (!gone) setState({ value: null, error, loading: false }); });
    return () => { gone = true; };
  }, deps);
  return state;
}

function Facts({ items }) {
  return html`<dl class="facts">${items.filter(Boolean).map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>`;
}

// -- the definition ------------------------------------------------------------------------

function retryText(r) {
  if (!r || !(r.max_attempts > 1)) return '—';
  const first = r.initial_interval_seconds || 1;
  const factor = r.backoff_coefficient || 2;
  const cap = r.max_interval_seconds || first * 100;
  return `${r.max_attempts} attempts, ${fmtDuration(first)} ×${factor} ≤ ${fmtDuration(cap)}`;
}

function StepsTable({ steps, picked, onPick }) {
  return html`<div class="table-scroll"><table class="compact wf-steps">
    <caption class="visually-hidden">Steps</caption>
    <thead><tr><th scope="col">Ref</th><th scope="col">Kind</th><th scope="col">Depends on</th><th scope="col">When</th>
      <th scope="col">Retry</th><th scope="col">Timeout</th><th scope="col">Queue</th><th scope="col">Config</th></tr></thead>
    <tbody>${steps.map((s) => html`<tr key=${s.ref} id=${`step-${s.ref}`} class=${picked === s.ref ? 'selected' : ''}>
      <th scope="row" class="rowhead"><button type="button" class="link mono" aria-pressed=${picked === s.ref ? 'true' : 'false'}
        onClick=${() => onPick(picked === s.ref ? '' : s.ref)}>${s.ref}</button>
        ${s.description && html`<div class="muted small">${s.description}</div>`}</th>
      <td>${s.kind}</td>
      <td class="mono">${(s.depends_on || []).join(', ') || '—'}</td>
      <td class="mono">${s.when || '—'}</td>
      <td class="small">${retryText(s.retry)}</td>
      <td>${s.timeout_seconds ? fmtDuration(s.timeout_seconds) : '—'}</td>
      <td class="mono">${s.queue || '—'}</td>
      <td>${s.config && Object.keys(s.config).length
        ? html`<details><summary>config</summary><${Json} value=${s.config} /></details>` : '—'}</td>
    </tr>`)}</tbody>
  </table></div>`;
}

function VariablesTable({ variables }) {
  if (!variables || !variables.length) {
    return html`<p class="muted">No variables declared: runs accept any payload.</p>`;
  }
  return html`<table class="compact">
    <thead><tr><th scope="col">Name</th><th scope="col">Required</th><th scope="col">Default</th><th scope="col">Description</th></tr></thead>
    <tbody>${variables.map((v) => html`<tr key=${v.name}>
      <th scope="row" class="rowhead mono">${v.name}</th>
      <td>${v.required ? 'required' : 'optional'}</td>
      <td class="mono">${v.default === undefined ? '—' : JSON.stringify(v.default)}</td>
      <td>${v.description || ''}</td>
    </tr>`)}</tbody>
  </table>`;
}

/** "in 3h 05m" for a time to come, "" otherwise. */
function fromNow(iso) {
  const seconds = iso ? (Date.parse(iso) - Date.now()) / 1000 : NaN;
  return seconds > 0 ? `in ${fmtDuration(seconds)}` : '';
}

function Schedule({ wf, current, onOp }) {
  if (!wf.schedule || !wf.schedule.cron) return html`<p class="muted">No schedule: runs start when triggered.</p>`;
  const live = current && !wf.archived;
  let state = 'active';
  if (wf.archived) state = 'archived: never fires';
  else if (!current) state = 'as written in this version';
  else if (wf.schedule_paused) state = 'paused';
  return html`<div class="panel wf-schedule">
    <${Facts} items=${[
      ['Cron', html`<code>${wf.schedule.cron}</code>`],
      ['Time zone', wf.schedule.timezone || 'UTC'],
      ['State', state],
      live && ['Next fire', wf.schedule_paused ? '— (paused)'
        : html`<span class="next-fire">${fmtTime(wf.next_fire_at)}</span> <span class="muted small">${fromNow(wf.next_fire_at)}</span>`],
    ]} />
    ${live && html`<div class="run-actions">
      ${wf.schedule_paused
        ? html`<button type="button" onClick=${() => onOp('resume')}>Resume schedule</button>`
        : html`<button type="button" onClick=${() => onOp('pause')}>Pause schedule</button>`}
    </div>`}
  </div>`;
}

function Definition({ wf, current, onOp }) {
  const [picked, setPicked] = useState('');
  const steps = wf.steps || [];
  function pick(ref) {
    setPicked(ref);
    const row = ref && document.getElementById(`step-${ref}`);
    if (row) row.scrollIntoView({ block: 'nearest' });
  }
  return html`<div>
    <h2>DAG</h2>
    <${WorkflowDag} steps=${steps} selected=${picked} onPick=${pick} label=${`Steps of ${wf.name}`} />
    <h2>Steps <span class="muted small">(${steps.length})</span></h2>
    <${StepsTable} steps=${steps} picked=${picked} onPick=${pick} />
    <h2>Variables</h2>
    <${VariablesTable} variables=${wf.variables} />
    <h2>Schedule</h2>
    <${Schedule} wf=${wf} current=${current} onOp=${onOp} />
    ${Boolean(wf.condition || (wf.notifications || []).length) && html`<h2>More</h2>
      <${Facts} items=${[
        wf.condition && ['Trigger condition', html`<code>${wf.condition}</code>`],
        (wf.notifications || []).length && ['Notifications',
          html`<ul class="plain">${wf.notifications.map((n) => html`<li><span class="mono">${n.url}</span>
            <span class="muted"> ${(n.events || []).join(', ')}</span></li>`)}</ul>`],
      ]} />`}
  </div>`;
}

// -- the trigger form ----------------------------------------------------------------------

const TYPES = [['string', 'text'], ['number', 'number'], ['boolean', 'true / false'], ['json', 'JSON']];
const TYPE_LABEL = Object.fromEntries(TYPES);

/** The input type a variable's default implies (undefined: no default, the person picks). */
export function typeOfDefault(value) {
  if (value === undefined) return undefined;
  if (typeof value === 'boolean') return 'boolean';
  if (typeof value === 'number') return 'number';
  if (typeof value === 'string') return 'string';
  return 'json';
}

function initialField(v) {
  const type = typeOfDefault(v.default) || 'string';
  if (type === 'boolean') return { type, fixed: true, checked: v.default === true };
  const raw = v.default === undefined ? '' : type === 'json' ? JSON.stringify(v.default, null, 2) : String(v.default);
  return { type, fixed: v.default !== undefined, raw, checked: false };
}

/** The payload value of a field, `undefined` to leave the key out; throws a message when invalid. */
function valueOf(v, f) {
  if (f.type === 'boolean') return f.checked;
  const raw = f.raw.trim();
  if (!raw) {
    if (v.required) throw new Error(`${v.name} is required`);
    return undefined;
  }
  if (f.type === 'number') {
    const n = Number(raw);
    if (!Number.isFinite(n)) throw new Error(`${v.name}: not a number`);
    return n;
  }
  if (f.type === 'json') {
    try { return JSON.parse(raw); } catch (e) { throw new Error(`${v.name}: ${e.message}`); }
  }
  return f.raw;
}

/** "team=web, env=prod" (or key:value) → {team: "web", env: "prod"}; throws on a part without a key. */
export function parseTags(text) {
  const tags = {};
  for (const part of text.split(/[,\n]/).map((p) => p.trim()).filter(Boolean)) {
    const m = part.match(/^([^=:]+)[=:](.*)$/);
    if (!m || !m[1].trim()) throw new Error(`tag “${part}” is not key=value`);
    tags[m[1].trim()] = m[2].trim();
  }
  return tags;
}

function VariableInput({ v, field, onChange }) {
  const id = `var-${v.name}`;
  const set = (patch) => onChange({ ...field, ...patch });
  const label = html`<span>${v.name}${v.required && html`<abbr class="required" title="required" aria-hidden="true"> *</abbr>`}
    <span class="muted small">${field.fixed ? ` (${TYPE_LABEL[field.type]})` : ' (no default: pick its type)'}</span></span>`;
  const hint = v.description && html`<span class="muted small" id=${`${id}-hint`}>${v.description}</span>`;
  const described = v.description ? `${id}-hint` : undefined;
  const typePicker = !field.fixed && html`<select aria-label=${`Type of ${v.name}`} value=${field.type}
      onChange=${(e) => set({ type: e.target.value })}>
    ${TYPES.map(([t, l]) => html`<option value=${t}>${l}</option>`)}</select>`;
  if (field.type === 'boolean') {
    return html`<div class="field var-field">
      <label class="check" for=${id}><input id=${id} type="checkbox" checked=${field.checked} aria-describedby=${described}
        onChange=${(e) => set({ checked: e.target.checked })} /> ${label}</label>
      ${typePicker}${hint}</div>`;
  }
  const common = { id, required: v.required, 'aria-required': v.required ? 'true' : 'false', 'aria-describedby': described };
  const input = field.type === 'json'
    ? html`<textarea ...${common} rows="4" spellcheck="false" value=${field.raw} onInput=${(e) => set({ raw: e.target.value })}></textarea>`
    : html`<input ...${common} type=${field.type === 'number' ? 'number' : 'text'} step=${field.type === 'number' ? 'any' : undefined}
        value=${field.raw} onInput=${(e) => set({ raw: e.target.value })} />`;
  return html`<div class="field var-field">
    <label for=${id}>${label}</label>
    <div class="var-input">${input}${typePicker}</div>
    ${hint}</div>`;
}

function TriggerForm({ wf }) {
  const variables = wf.variables || [];
  const [fields, setFields] = useState(() => Object.fromEntries(variables.map((v) => [v.name, initialField(v)])));
  const [payload, setPayload] = useState({});
  const [payloadProblem, setPayloadProblem] = useState(null);
  const [tags, setTags] = useState('');
  const [idem, setIdem] = useState('');
  const [problem, setProblem] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  async function submit(e) {
    e.preventDefault();
    setProblem('');
    setError(null);
    let body;
    try {
      let data = {};
      if (variables.length) {
        for (const v of variables) {
          const value = valueOf(v, fields[v.name]);
          if (value !== undefined) data[v.name] = value;
        }
      } else {
        if (payloadProblem) throw new Error(`payload: ${payloadProblem}`);
        data = payload || {};
        if (typeof data !== 'object' || Array.isArray(data)) throw new Error('the payload must be a JSON object');
      }
      body = { payload: data };
      const parsedTags = parseTags(tags);
      if (Object.keys(parsedTags).length) body.tags = parsedTags;
      if (idem.trim()) body.idempotency_key = idem.trim();
    } catch (err) {
      setProblem(err.message);
      return;
    }
    setBusy(true);
    try {
      const run = await post(`/v1/workflows/${enc(wf.id)}/runs`, body);
      navigate(`/runs/${enc(run.id)}`);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }

  return html`<form class="trigger-form" aria-labelledby="trigger-title" onSubmit=${submit}>
    <h2 id="trigger-title">Trigger a run of ${wf.name}</h2>
    ${wf.archived && html`<p class="notice">This workflow is archived: it starts no new runs.</p>`}
    ${variables.length
      ? html`<fieldset class="vars"><legend>Variables</legend>
          <p class="muted small">Fields marked <abbr class="required" title="required">*</abbr> are required; an empty optional field is left out (the workflow's default applies).</p>
          ${variables.map((v) => html`<${VariableInput} key=${v.name} v=${v} field=${fields[v.name]}
            onChange=${(f) => setFields({ ...fields, [v.name]: f })} />`)}</fieldset>`
      : html`<${JsonField} id="trigger-payload" label="Payload (JSON object; this workflow declares no variables)" value=${{}}
          onChange=${(value, err) => { setPayload(value); setPayloadProblem(err); }} />`}
    <div class="toolbar">
      <label class="field" for="trigger-tags">Tags <span class="muted small">key=value, comma-separated</span>
        <input id="trigger-tags" type="text" value=${tags} onInput=${(e) => setTags(e.target.value)} placeholder="team=web, env=prod" /></label>
      <label class="field" for="trigger-idem">Idempotency key <span class="muted small">optional</span>
        <input id="trigger-idem" type="text" value=${idem} maxlength="200" onInput=${(e) => setIdem(e.target.value)} /></label>
    </div>
    ${problem && html`<p class="field-problem" role="alert">${problem}</p>`}
    <${ErrorBox} error=${error} />
    <button type="submit" class="primary" disabled=${busy || wf.archived}>${busy ? 'Starting…' : 'Start run'}</button>
  </form>`;
}

// -- versions ------------------------------------------------------------------------------

function Diff({ wf, from, to }) {
  const both = useLoad(() => Promise.all([from, to].map((n) => get(`/v1/workflows/${enc(wf.id)}`, { version: n }))),
    [wf.id, from, to]);
  if (both.loading) return html`<p class="muted" aria-busy="true">Loading versions ${from} and ${to}…</p>`;
  if (both.error) return html`<${ErrorBox} error=${both.error} />`;
  const [a, b] = both.value;
  const script = diffLines(definitionLines(a), definitionLines(b));
  const added = script.filter((e) => e.op === '+').length;
  const removed = script.filter((e) => e.op === '-').length;
  const shown = hunks(script, 3);
  return html`<section class="diff-box" aria-labelledby="diff-title">
    <h3 id="diff-title">Version ${from} → version ${to}
      <span class="diff-count"> <span class="diff-add-text">+${added}</span> <span class="diff-del-text">−${removed}</span></span></h3>
    ${!added && !removed
      ? html`<p class="muted" role="status">The two definitions are identical.</p>`
      : html`<div class="table-scroll"><table class="diff" aria-label=${`Changes from version ${from} to version ${to}: ${added} lines added, ${removed} removed`}>
        <thead><tr><th scope="col" class="num">v${from}</th><th scope="col" class="num">v${to}</th><th scope="col"><span class="visually-hidden">change</span></th><th scope="col">Line</th></tr></thead>
        <tbody>${shown.map((e, i) => (e.skipped
          ? html`<tr key=${i} class="diff-gap"><td colspan="4">⋯ ${e.skipped} unchanged line${e.skipped === 1 ? '' : 's'}</td></tr>`
          : html`<tr key=${i} class=${e.op === '+' ? 'diff-add' : e.op === '-' ? 'diff-del' : ''}>
              <td class="num muted">${e.a || ''}</td><td class="num muted">${e.b || ''}</td>
              <td class="diff-op">${e.op === '+' ? '+' : e.op === '-' ? '−' : ''}</td>
              <td><code>${e.text}</code></td></tr>`))}</tbody>
      </table></div>`}
  </section>`;
}

function Versions({ wf, route }) {
  const q = route.query;
  const tokens = q.getAll('vpage');
  const from = Number(q.get('from')) || 0;
  const to = Number(q.get('to')) || 0;
  const [draft, setDraft] = useState({ from: from || Math.max(1, wf.version - 1), to: to || wf.version });
  useEffect(() => setDraft({ from: from || Math.max(1, wf.version - 1), to: to || wf.version }), [from, to, wf.version]);
  const list = useLoad(() => page(`/v1/workflows/${enc(wf.id)}/versions`, { limit: LIMIT, page_token: tokens[tokens.length - 1] || '' }),
    [wf.id, wf.version, tokens.join(',')]);
  const params = (over) => ({ tab: 'versions', vpage: tokens, from: from || '', to: to || '', ...over });
  const base = `/workflows/${enc(wf.id)}`;
  function compare(e) {
    e.preventDefault();
    navigate(base, params({ from: draft.from, to: draft.to }));
  }
  const rows = list.value ? list.value.items : [];
  return html`<div>
    <h2>Versions</h2>
    <form class="toolbar" aria-label="Compare two versions" onSubmit=${compare}>
      <label class="field" for="diff-from">From version
        <input id="diff-from" type="number" min="1" max=${wf.version} required value=${draft.from}
          onInput=${(e) => setDraft({ ...draft, from: e.target.value })} /></label>
      <label class="field" for="diff-to">To version
        <input id="diff-to" type="number" min="1" max=${wf.version} required value=${draft.to}
          onInput=${(e) => setDraft({ ...draft, to: e.target.value })} /></label>
      <button type="submit" class="primary">Compare</button>
    </form>
    ${from > 0 && to > 0 && html`<${Diff} wf=${wf} from=${from} to=${to} />`}
    <${ErrorBox} error=${list.error} />
    <div class="table-scroll"><table class="compact" aria-busy=${list.loading ? 'true' : 'false'}>
      <thead><tr><th scope="col" class="num">Version</th><th scope="col">Written</th><th scope="col">Description</th>
        <th scope="col" class="num">Steps</th><th scope="col">Actions</th></tr></thead>
      <tbody>${rows.map((v) => html`<tr key=${v.version}>
        <td class="num">${v.version}${v.version === wf.version && html` <span class="muted small">(current)</span>`}</td>
        <td class="nowrap">${fmtTime(v.updated_at)}</td>
        <td>${v.description || ''}</td>
        <td class="num">${(v.steps || []).length}</td>
        <td class="row-actions">
          <a href=${href(base, { tab: 'definition', version: v.version === wf.version ? '' : v.version })}>View</a>
          ${v.version > 1 && html`<a href=${href(base, params({ from: v.version - 1, to: v.version }))}
            aria-label=${`Compare version ${v.version} with version ${v.version - 1}`}>Diff with v${v.version - 1}</a>`}
          ${v.version !== wf.version && html`<a href=${href(base, params({ from: v.version, to: wf.version }))}
            aria-label=${`Compare version ${v.version} with the current version`}>Diff with current</a>`}
        </td>
      </tr>`)}</tbody>
    </table></div>
    <${Pager} tokens=${tokens} next=${list.value ? list.value.nextPageToken : ''}
      onPage=${(t) => navigate(base, params({ vpage: t }))} />
  </div>`;
}

// -- the view ------------------------------------------------------------------------------

function Operation({ op, wf, onClose, onDone }) {
  const path = `/v1/workflows/${enc(wf.id)}`;
  const specs = {
    archive: {
      title: `Archive ${wf.name}?`, label: 'Archive', danger: true,
      text: 'No new runs start: triggers, the schedule and the webhook are refused. Runs already started continue. There is no un-archive.',
      call: () => del(path),
    },
    pause: {
      title: `Pause the schedule of ${wf.name}?`, label: 'Pause schedule',
      text: 'The schedule stops firing until resumed; the definition stays as it is. Ticks while paused never fire.',
      call: () => post(`${path}/schedule/pause`),
    },
    resume: {
      title: `Resume the schedule of ${wf.name}?`, label: 'Resume schedule',
      text: 'The schedule fires again from its next tick after now (missed ticks are not made up).',
      call: () => post(`${path}/schedule/resume`),
    },
  };
  const spec = specs[op];
  return html`<${Confirm} title=${spec.title} confirmLabel=${spec.label} danger=${spec.danger}
    onConfirm=${async () => { await spec.call(); onDone(); }} onClose=${onClose}>
    <p>${spec.text}</p>
  </${Confirm}>`;
}

export function WorkflowView({ workflowId, route }) {
  const tab = TABS.some(([t]) => t === route.query.get('tab')) ? route.query.get('tab') : 'definition';
  const version = Number(route.query.get('version')) || 0;
  const [reload, setReload] = useState(0);
  const [op, setOp] = useState(null);
  const path = `/v1/workflows/${enc(workflowId)}`;
  const current = useLoad(() => get(path), [workflowId, reload]);
  const wf = current.value;
  const older = useLoad(() => (version && wf && version !== wf.version ? get(path, { version }) : Promise.resolve(null)),
    [workflowId, version, wf && wf.version]);

  if (current.loading && !wf) return html`<p class="muted" aria-busy="true">Loading workflow…</p>`;
  if (!wf) {
    return html`<section><h1>Workflow ${workflowId}</h1><${ErrorBox} error=${current.error} />
      <p><a href="#/workflows">All workflows</a></p></section>`;
  }
  const base = `/workflows/${enc(wf.id)}`;
  const shown = version && version !== wf.version ? older.value : wf;
  return html`<section aria-labelledby="wf-title">
    <p class="small"><a href="#/workflows">Workflows</a> /</p>
    <div class="run-title">
      <h1 id="wf-title">${wf.name}</h1>
      <span class="muted">v${wf.version}</span>
      ${wf.archived && html`<span class="status status-canceled">archived</span>`}
    </div>
    ${wf.description && html`<p>${wf.description}</p>`}
    <${Facts} items=${[
      ['Id', html`<span class="mono">${wf.id}</span>`],
      ['Project', wf.project_id],
      ['Created', `${fmtTime(wf.created_at)}${wf.created_by ? ` by ${wf.created_by}` : ''}`],
      ['Current version written', fmtTime(wf.updated_at)],
      ['Parallel steps per run', wf.max_parallel_steps || 'no cap'],
      ['Concurrent runs', wf.max_concurrent_runs || 'no cap'],
      ['Run timeout', wf.timeout_seconds ? fmtDuration(wf.timeout_seconds) : 'none'],
      ['Webhook', wf.webhook_enabled ? html`<span class="mono">${wf.webhook_url_hint}</span>` : 'disabled'],
    ]} />
    <div class="run-actions">
      <a class="button" href=${href(`/runs`, { workflow: wf.id })}>Runs of this workflow</a>
      ${!wf.archived && html`<button type="button" class="danger-outline" onClick=${() => setOp('archive')}>Archive…</button>`}
    </div>
    <nav class="tabs" aria-label="Workflow sections">
      ${TABS.map(([t, label]) => html`<a href=${href(base, { tab: t === 'definition' ? '' : t })}
        aria-current=${tab === t ? 'page' : undefined}>${label}</a>`)}
    </nav>
    ${tab === 'definition' && html`<div>
      ${version > 0 && version !== wf.version && html`<p class="notice" role="status">
        ${`Showing version ${version} (the current version is ${wf.version}). `}
        <a href=${href(base, {})}>Show the current version</a></p>`}
      ${version > 0 && version !== wf.version && older.error && html`<${ErrorBox} error=${older.error} />`}
      ${shown ? html`<${Definition} key=${shown.version} wf=${shown} current=${shown === wf} onOp=${setOp} />`
        : !older.error && html`<p class="muted" aria-busy="true">Loading version ${version}…</p>`}
    </div>`}
    ${tab === 'trigger' && html`<${TriggerForm} key=${`${wf.id}@${wf.version}`} wf=${wf} />`}
    ${tab === 'versions' && html`<${Versions} wf=${wf} route=${route} />`}
    ${op && html`<${Operation} op=${op} wf=${wf} onClose=${() => setOp(null)} onDone=${() => setReload((n) => n + 1)} />`}
  </section>`;
}
