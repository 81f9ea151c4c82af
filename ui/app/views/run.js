// One run: its header, the DAG of its steps kept live from the run watch (snapshot, then events
// applied in seq order, resumed with after_seq after a drop), a drawer for the chosen step, the
// event history, comments and the operator buttons the run's state allows.
import { useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, del, get, page, post, watch } from '../api.js';
import { Confirm, ErrorBox } from '../components.js';
import { Dag } from '../dag.js';
import { FINAL_RUN, Status, fmtDuration, fmtTime, html, secondsBetween } from '../html.js';
import { href, navigate } from '../router.js';
import { applyEvent, dagOrder, fromSnapshot, withSteps } from './run-live.js';
import { Comments, EventHistory, useEventHistory } from './run-history.js';
import { StepDrawer } from './run-step.js';

const enc = encodeURIComponent;
export const runPath = (id) => `/v1/workflow-runs/${enc(id)}`;
const LIVE_EVENTS_KEPT = 1000;

/** Re-render every second while `active` (running durations tick). */
export function useTicker(active) {
  const [, setNow] = useState(0);
  useEffect(() => {
    if (!active) return undefined;
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, [active]);
}

/**
 * The run as its watch keeps it: { live: {run, steps, order, seq} | null, conn, error,
 * events (those received live, oldest first), restart() }. restart() opens the watch again
 * from the last seq seen (after an operation reopened a run whose watch had ended).
 */
function useRunWatch(runId) {
  const [live, setLive] = useState(null);
  const [conn, setConn] = useState('connecting');
  const [error, setError] = useState(null);
  const [events, setEvents] = useState([]);
  const [generation, setGeneration] = useState(0);
  const current = useRef(null);

  useEffect(() => {
    if (current.current && current.current.run.id !== runId) current.current = null;
    if (!current.current) {
      setLive(null);
      setEvents([]);
    }
    setError(null);
    setConn('connecting');
    const base = `${runPath(runId)}/watch`;
    const from = () => (current.current ? `${base}?after_seq=${current.current.seq}` : base);
    let refetching = null;
    let stopped = false;
    function refetchSteps() {
      if (refetching) return;
      refetching = page(`${runPath(runId)}/steps`, { limit: 1000 }).then(({ items }) => {
        if (stopped || !current.current) return;
        current.current = withSteps(current.current, items);
        setLive(current.current);
      }).catch(() => {}).finally(() => { refetching = null; });
    }
    const stop = watch(from(), {
      onMessage(m) {
        if (m.snapshot) {
          current.current = fromSnapshot(m.snapshot);
          setLive(current.current);
        } else if (m.event) {
          if (!current.current || m.event.seq <= current.current.seq) return;
          const { state, complete } = applyEvent(current.current, m.event);
          current.current = state;
          setLive(state);
          setEvents((list) => (list.length >= LIVE_EVENTS_KEPT ? list.slice(-LIVE_EVENTS_KEPT + 1) : list).concat([m.event]));
          if (!complete) refetchSteps();
        } else if (m.error) {
          setError(new ApiError(0, { message: m.error.message, details: [{ reason: m.error.reason }] }));
        }
      },
      onState(state, err) {
        setConn(state);
        if (err) setError(err);
      },
      resume: from,
      // The end of the stream is the end of the watch once the run is final, whatever event
      // came last (a comment, a retry, a notification's outcome may follow the final one).
      finished: () => Boolean(current.current && FINAL_RUN.has(current.current.run.status)),
    });
    return () => { stopped = true; stop(); };
  }, [runId, generation]);

  return { live, conn, error, events, restart: () => setGeneration((g) => g + 1) };
}

/** The workflow's steps' depends_on (ref → refs), of the version the run started on when known. */
function useDefinition(workflowId, version) {
  const [def, setDef] = useState(null);
  useEffect(() => {
    if (!workflowId) return undefined;
    let gone = false;
    const path = `/v1/workflows/${enc(workflowId)}`;
    // The current definition; an older one only when the run started on another version.
    get(path)
      .then((wf) => (version && wf.version && wf.version !== version ? get(path, { version }).catch(() => wf) : wf))
      .then((wf) => { if (!gone) setDef(wf); })
      .catch(() => { if (!gone) setDef({ steps: [] }); });
    return () => { gone = true; };
  }, [workflowId, version]);
  return def;
}

function Facts({ items }) {
  return html`<dl class="facts">
    ${items.filter(Boolean).map(([k, v]) => html`<div><dt>${k}</dt><dd>${v}</dd></div>`)}
  </dl>`;
}

function Tags({ tags }) {
  const entries = Object.entries(tags || {});
  if (!entries.length) return html`<span class="muted">—</span>`;
  return html`<span class="tags">${entries.map(([k, v]) => html`<a class="tag" href=${href('/runs', { tag: `${k}:${v}` })}>${k}:${v}</a>`)}</span>`;
}

function RunHeader({ run, steps, retriedAs }) {
  const final = FINAL_RUN.has(run.status);
  useTicker(!final && Boolean(run.started_at));
  const children = Object.values(steps).filter((s) => s.job_run_id && s.kind === 'workflow');
  const wf = run.workflow_name || run.workflow_id;
  return html`<${Facts} items=${[
    ['Workflow', html`<a href=${`#/workflows/${enc(run.workflow_id)}`}>${wf}</a>${run.workflow_version ? html` <span class="muted">v${run.workflow_version}</span>` : ''}`],
    ['Project', run.project_id],
    ['Triggered by', html`<span data-field="triggered_by">${run.triggered_by || '—'}</span>${run.created_by && run.created_by !== run.triggered_by ? html` <span class="muted">(key ${run.created_by})</span>` : ''}`],
    ['Created', fmtTime(run.created_at)],
    ['Started', fmtTime(run.started_at)],
    ['Finished', html`<span data-field="finished_at">${fmtTime(run.finished_at)}</span>`],
    ['Duration', html`<span data-field="duration">${fmtDuration(secondsBetween(run.started_at, final ? run.finished_at : null))}</span>`],
    run.expires_at && fmtTime(run.expires_at) !== '—' && ['Deadline', fmtTime(run.expires_at)],
    ['Tags', html`<${Tags} tags=${run.tags} />`],
    run.entity_id && ['Entity', run.entity_id],
    run.parent_workflow_run_id && ['Parent run', html`<a href=${`#/runs/${enc(run.parent_workflow_run_id)}`} class="mono">${run.parent_workflow_run_id}</a>`],
    run.retry_of_run_id && ['Retry of', html`<a href=${`#/runs/${enc(run.retry_of_run_id)}`} class="mono">${run.retry_of_run_id}</a>`],
    retriedAs.length && ['Retried as', html`${retriedAs.map((id) => html`<a href=${`#/runs/${enc(id)}`} class="mono">${id}</a> `)}`],
    children.length && ['Child runs', html`${children.map((s) => html`<span class="child"><a href=${`#/runs/${enc(s.job_run_id)}`} class="mono">${s.job_run_id}</a> <span class="muted">(${s.step_ref})</span></span> `)}`],
  ]} />
  ${(run.error || run.status_message) && html`<p class=${run.error ? 'run-error' : 'muted'} data-field="run-message">${run.error || run.status_message}</p>`}`;
}

const RUN_OPS = {
  cancel: {
    label: 'Cancel run', when: ['pending', 'running', 'paused'], danger: true,
    text: 'Cancel this run? Its unfinished steps and its child runs are canceled with it.',
    call: (run) => del(runPath(run.id)),
  },
  pause: {
    label: 'Pause', when: ['pending', 'running'],
    text: 'Pause this run? Steps already running finish; no new step starts until it is resumed.',
    call: (run) => post(`${runPath(run.id)}/pause`, {}),
  },
  resume: {
    label: 'Resume', when: ['paused'],
    text: 'Resume this run? Its steps start again as their dependencies allow.',
    call: (run) => post(`${runPath(run.id)}/resume`, {}),
  },
  retry: {
    label: 'Retry run', when: ['failed', 'timed_out', 'canceled'],
    text: 'Retry this run? A new run is created; completed steps are copied with their outputs.',
    call: (run) => post(`${runPath(run.id)}/retry`, {}),
  },
};

function RunActions({ run, onDone }) {
  const [open, setOpen] = useState(null);
  const ops = Object.entries(RUN_OPS).filter(([, op]) => op.when.includes(run.status));
  if (!ops.length) return null;
  const op = open && RUN_OPS[open];
  return html`<div class="run-actions" role="group" aria-label="Run operations">
    ${ops.map(([name, o]) => html`<button type="button" class=${o.danger ? 'danger-outline' : ''} onClick=${() => setOpen(name)}>${o.label}</button>`)}
    ${op && html`<${Confirm} title=${`${op.label}: ${run.id}`} confirmLabel=${op.label} danger=${op.danger}
      onConfirm=${async () => {
        const result = await op.call(run);
        onDone(open, result);
      }}
      onClose=${() => setOpen(null)}>
      <p>${op.text}</p>
    </${Confirm}>`}
  </div>`;
}

function ConnState({ conn }) {
  const text = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', ended: 'final: no more changes', error: 'not live' }[conn] || conn;
  return html`<span class=${`live ${conn}`} aria-live="polite" data-conn=${conn}>${text}</span>`;
}

export function RunView({ runId, route }) {
  const { live, conn, error, events, restart } = useRunWatch(runId);
  const history = useEventHistory(runId, events);
  const [notice, setNotice] = useState('');
  const def = useDefinition(live && live.run.workflow_id, live && live.run.workflow_version);
  const selected = route.query.get('step') || '';
  const lastFocus = useRef('');

  useEffect(() => { setNotice(''); }, [runId]);

  if (!live) {
    return html`<section>
      <h1>Run <span class="mono">${runId}</span></h1>
      ${error ? html`<${ErrorBox} error=${error} />` : html`<p class="muted" aria-busy="true">Loading…</p>`}
    </section>`;
  }
  const { run, steps } = live;
  const dependsOn = {};
  const defSteps = {};
  for (const s of (def && def.steps) || []) {
    dependsOn[s.ref] = s.depends_on || [];
    defSteps[s.ref] = s;
  }
  const refs = dagOrder(live.order, dependsOn);
  const retriedAs = [...new Set(history.all.filter((e) => e.type === 'run.retried' && e.data && e.data.run_id).map((e) => e.data.run_id))];

  function openStep(ref) {
    lastFocus.current = ref;
    navigate(`/runs/${runId}`, { step: ref === selected ? '' : ref }, { replace: true });
  }
  function closeStep() {
    navigate(`/runs/${runId}`, {}, { replace: true });
    const ref = lastFocus.current || selected;
    setTimeout(() => {
      const node = document.querySelector(`.dag-node[data-ref="${CSS.escape(ref)}"]`);
      if (node) node.focus();
    }, 0);
  }
  function done(message, reopened) {
    setNotice(message);
    if (reopened && conn !== 'live' && conn !== 'connecting') restart();
  }
  function runDone(op, result) {
    if (op === 'retry' && result && result.id) {
      navigate(`/runs/${result.id}`);
      return;
    }
    done({ cancel: 'The run was canceled.', pause: 'The run was paused.', resume: 'The run was resumed.' }[op] || 'Done.', true);
  }

  return html`<section class="run-view">
    <div class="run-title">
      <h1>Run <span class="mono" data-field="run-id">${run.id}</span></h1>
      <span data-field="run-status"><${Status} value=${run.status} /></span>
      <${ConnState} conn=${conn} />
    </div>
    <${ErrorBox} error=${error} />
    <${RunHeader} run=${run} steps=${steps} retriedAs=${retriedAs} />
    <${RunActions} run=${run} onDone=${runDone} />
    ${notice && html`<p class="notice" role="status">${notice}</p>`}
    <div class=${`run-body${selected && steps[selected] ? ' with-drawer' : ''}`}>
      <section class="dag-panel" aria-labelledby="dag-title">
        <h2 id="dag-title">Steps <span class="muted">(${refs.length}; choose one for its details)</span></h2>
        ${def ? html`<${Dag} refs=${refs} dependsOn=${dependsOn} steps=${steps} selected=${selected} onOpen=${openStep} />`
          : html`<p class="muted">Loading the definition…</p>`}
      </section>
      ${selected && steps[selected] && html`<${StepDrawer} key=${selected} run=${run} step=${steps[selected]}
        definition=${defSteps[selected]} dependsOn=${dependsOn[selected] || []}
        events=${history.all.filter((e) => e.step_ref === selected)} eventsComplete=${history.complete}
        onClose=${closeStep} onDone=${(message) => done(message, true)} />`}
    </div>
    <${EventHistory} history=${history} />
    <${Comments} runId=${runId} liveEvents=${events} />
  </section>`;
}
