// A run and its steps kept current from its watch: the snapshot, then each event applied in seq
// order. Mirrors the CLI's reducer (src/conveyor/cli/live.py): every event's data.change holds
// the fields of its step (or of the run, when step_ref is "") as the change left them, so the
// view needs no re-fetch; an event without a change falls back to what its type and status say.
// Pure functions returning new objects (Preact compares by identity).

export const FINAL_STEP = new Set(['completed', 'failed', 'timed_out', 'canceled', 'skipped']);
const NOT_STARTED = new Set(['pending', 'queued']);
const STEP_STATUSES = new Set(['pending', 'queued', 'running', 'waiting', 'completed', 'failed', 'timed_out', 'canceled', 'skipped']);
const RUN_STATUS_SET = new Set(['pending', 'running', 'paused', 'completed', 'failed', 'canceled', 'timed_out']);
const FINAL_RUN_SET = new Set(['completed', 'failed', 'canceled', 'timed_out']);
// Fields of a change (or, without one, of the event's data) copied onto the step or run.
const STEP_FIELDS = ['attempt', 'error', 'worker_id', 'job_run_id', 'deps_completed', 'deps_required',
  'skip_reason', 'approved_by', 'started_at', 'finished_at'];
const RUN_FIELDS = ['error', 'status_message', 'started_at', 'finished_at', 'workflow_version'];

/** The state a snapshot message starts: { run, steps: {ref: step}, order: [refs], seq }. */
export function fromSnapshot(snapshot) {
  const steps = {};
  const order = [];
  for (const s of snapshot.steps || []) {
    steps[s.step_ref] = s;
    order.push(s.step_ref);
  }
  return { run: snapshot.run || {}, steps, order, seq: snapshot.seq || 0 };
}

/** The state with a freshly listed step list (after an event that did not say enough). */
export function withSteps(state, list) {
  const steps = {};
  const order = [];
  for (const s of list) {
    steps[s.step_ref] = { ...s, output: s.output ?? state.steps[s.step_ref]?.output };
    order.push(s.step_ref);
  }
  return { ...state, steps, order };
}

function merge(target, data, fields) {
  for (const k of fields) {
    if (!(k in data)) continue;
    if (data[k] === null || data[k] === undefined) delete target[k];
    else target[k] = data[k];
  }
}

/**
 * One event applied: { state, complete } where complete is false when the event lacks what the
 * view needs (an unknown step, a step reset with no status, an attempt started without its
 * number): the caller then re-lists the steps.
 */
export function applyEvent(state, ev) {
  const seq = Math.max(state.seq || 0, ev.seq || 0);
  const data = ev.data || {};
  const change = data.change && typeof data.change === 'object' ? data.change : null;
  if (!ev.step_ref && ev.type && ev.type.startsWith('run.')) {
    return { state: { ...state, seq, run: applyRun(state.run, ev, data, change) }, complete: true };
  }
  if (ev.type && ev.type.startsWith('step.')) {
    const step = state.steps[ev.step_ref];
    const status = (change && change.status) || ev.status;
    if (!step || !STEP_STATUSES.has(status)) return { state: { ...state, seq }, complete: false };
    const next = applyStep(step, ev, data, change, status);
    const started = NOT_STARTED.has(step.status) && !NOT_STARTED.has(status)
      && status !== 'skipped' && status !== 'canceled';
    const complete = !(started && !('attempt' in (change || data)));
    return { state: { ...state, seq, steps: { ...state.steps, [ev.step_ref]: next } }, complete };
  }
  return { state: { ...state, seq }, complete: true };
}

function applyRun(run, ev, data, change) {
  const r = { ...run, updated_at: ev.at || run.updated_at };
  if (change) {
    // The run's fields as the change left them: the truth, whatever the event's type.
    if (RUN_STATUS_SET.has(change.status)) r.status = change.status;
    if ('message' in change) r.status_message = change.message || '';
    merge(r, change, RUN_FIELDS);
    if (r.status === 'running' && ev.type === 'run.running' && !r.started_at) r.started_at = ev.at;
    return r;
  }
  const status = ev.status;
  if (!RUN_STATUS_SET.has(status) || ev.type === 'run.comment') return run; // nothing drawn changes
  r.status = status;
  r.status_message = ev.message || '';
  if (status === 'running' && !r.started_at) r.started_at = ev.at;
  if (FINAL_RUN_SET.has(status)) {
    r.finished_at = ev.at;
    if (status !== 'completed' && !r.error) r.error = ev.message || '';
  } else {
    delete r.finished_at;
    r.error = '';
  }
  merge(r, data, RUN_FIELDS);
  return r;
}

function applyStep(step, ev, data, change, status) {
  const s = { ...step, status };
  if (change) {
    merge(s, change, STEP_FIELDS);
    if (change.has_output === false) delete s.output;
    else if (change.has_output && data.output !== undefined) s.output = data.output;
    else if (change.has_output && s.output === undefined) s.output_pending = true; // fetched when shown
    if (status === 'skipped' && !s.skip_reason) s.skip_reason = ev.message || '';
    if (status !== 'skipped') delete s.skip_reason; // a reset or retry clears why it was skipped
    if (NOT_STARTED.has(status)) delete s.approved_by;
    if (status === 'completed' && ev.type === 'step.completed' && data.comment !== undefined && !s.approved_by) {
      s.approved_by = ev.actor || '';
    }
    return s;
  }
  if (NOT_STARTED.has(status)) {
    delete s.finished_at;
    s.error = '';
  } else {
    if (NOT_STARTED.has(step.status)) {
      s.started_at = ev.at;
      delete s.finished_at;
    }
    if (FINAL_STEP.has(status)) s.finished_at = ev.at;
    if (status === 'failed' || status === 'timed_out') s.error = String(data.error || ev.message || '');
    if (status === 'skipped') s.skip_reason = ev.message || '';
  }
  if (data.output !== undefined) s.output = data.output;
  merge(s, data, STEP_FIELDS);
  return s;
}

/**
 * Refs in topological order of their dependencies; among steps ready at once the one listed
 * first goes first (the CLI's dag_order). Dependencies outside `refs` are ignored.
 */
export function dagOrder(refs, dependsOn) {
  const position = new Map(refs.map((r, i) => [r, i]));
  const waiting = new Map(refs.map((r) => [r, new Set((dependsOn[r] || []).filter((d) => position.has(d) && d !== r))]));
  const dependents = new Map(refs.map((r) => [r, []]));
  for (const [r, deps] of waiting) for (const d of deps) dependents.get(d).push(r);
  const ready = refs.filter((r) => !waiting.get(r).size);
  const order = [];
  while (ready.length) {
    ready.sort((a, b) => position.get(a) - position.get(b));
    const r = ready.shift();
    order.push(r);
    for (const later of dependents.get(r)) {
      waiting.get(later).delete(r);
      if (!waiting.get(later).size) ready.push(later);
    }
  }
  const placed = new Set(order);
  return order.concat(refs.filter((r) => !placed.has(r)));
}

/** An event in a few words: its type, step, status when the type does not say it. */
export function describeEvent(ev) {
  const parts = [ev.type, ev.step_ref, ev.type && ev.type.endsWith(`.${ev.status}`) ? '' : ev.status];
  if (ev.type === 'run.comment') return 'comment';
  return parts.filter(Boolean).join(' ');
}
