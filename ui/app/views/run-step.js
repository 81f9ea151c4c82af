// The step drawer of a run: a step's input (its definition's config), output, error, attempts,
// timings (pending, queued, waiting, running), worker, and the operations its state allows
// (approve, input, skip, force-complete, retry, replay subtree), each behind a confirmation.
import { useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, page, post } from '../api.js';
import { Confirm, Json, JsonField } from '../components.js';
import { Status, fmtDuration, fmtTime, html, secondsBetween } from '../html.js';
import { FINAL_STEP } from './run-live.js';

const enc = encodeURIComponent;
const stepPath = (runId, ref) => `/v1/workflow-runs/${enc(runId)}/steps/${enc(ref)}`;
const ms = (iso) => {
  const t = iso ? Date.parse(iso) : NaN;
  return Number.isNaN(t) || t < 31536000000 ? null : t;
};

/**
 * Time the step spent in each status. From its events when they are all known (each event
 * starts a status that lasts until the step's next one), else from its timestamps.
 */
export function stepTimings(step, events, complete) {
  const created = ms(step.created_at);
  const withStatus = events.filter((e) => e.status && e.step_ref === step.step_ref);
  if (complete && created != null && withStatus.length) {
    const totals = {};
    let status = 'pending';
    let from = created;
    for (const e of withStatus) {
      const at = ms(e.at);
      if (at == null) continue;
      totals[status] = (totals[status] || 0) + Math.max(0, at - from);
      status = e.status;
      from = at;
    }
    if (!FINAL_STEP.has(status)) totals[status] = (totals[status] || 0) + Math.max(0, Date.now() - from);
    const out = {};
    for (const k of ['pending', 'queued', 'waiting', 'running']) if (totals[k] != null) out[k] = totals[k] / 1000;
    return { source: 'events', ...out };
  }
  const started = ms(step.started_at);
  const out = { source: 'timestamps' };
  if (created != null && started != null) out['before start'] = Math.max(0, started - created) / 1000;
  if (started != null) {
    const inAttempt = secondsBetween(step.started_at, FINAL_STEP.has(step.status) ? step.finished_at : null);
    out[['approval', 'input', 'delay', 'workflow'].includes(step.kind) ? 'waiting' : 'running'] = inAttempt;
  }
  return out;
}

/** Each attempt the step's events tell of: { attempt, at, status, error }. */
export function attemptsOf(events) {
  const byAttempt = new Map();
  for (const e of events) {
    const data = e.data || {};
    const change = data.change || {};
    const n = change.attempt ?? data.attempt;
    if (!n) continue;
    const rec = byAttempt.get(n) || { attempt: n, at: e.at, status: '', error: '' };
    // Back to pending or queued after the attempt began: it failed (a retry is scheduled, the
    // event carries its error) or was reset, and a reset keeps the attempt's outcome.
    const requeued = rec.status && ['pending', 'queued'].includes(e.status);
    if (requeued && ['running', 'waiting'].includes(rec.status) && (change.error || data.error)) rec.status = 'failed';
    else if (e.status && !requeued) rec.status = e.status;
    rec.error = change.error || data.error || (e.status === 'failed' || e.status === 'timed_out' ? e.message : '') || rec.error;
    byAttempt.set(n, rec);
  }
  return [...byAttempt.values()].sort((a, b) => a.attempt - b.attempt);
}

function objectOrThrow(value, problem, what) {
  if (problem) throw new ApiError(0, { message: `${what} is not valid JSON: ${problem}` });
  if (value === undefined) return {};
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new ApiError(0, { message: `${what} must be a JSON object, e.g. {"approved": true}` });
  }
  return value;
}

/** The step operations its state (and its run's) allows: name → spec. */
function stepOps(run, step) {
  const s = step.status;
  const r = run.status;
  const ops = [];
  if (s === 'waiting' && step.kind === 'approval' && ['running', 'paused'].includes(r)) ops.push('approve');
  if (s === 'waiting' && step.kind === 'input' && ['running', 'paused'].includes(r)) ops.push('input');
  if (['failed', 'timed_out', 'canceled'].includes(s) && r !== 'pending') ops.push('retry');
  if (s !== 'completed' && r !== 'completed') ops.push('force-complete');
  if (s !== 'completed' && s !== 'skipped' && r !== 'completed') ops.push('skip');
  if (r !== 'pending' && s !== 'pending') ops.push('replay-subtree');
  return ops;
}

const LABELS = {
  approve: 'Approve', input: 'Submit input', skip: 'Skip', 'force-complete': 'Force-complete',
  retry: 'Retry step', 'replay-subtree': 'Replay subtree',
};

function StepOpDialog({ op, run, step, onClose, onDone }) {
  const [comment, setComment] = useState('');
  const [reason, setReason] = useState('');
  const [json, setJson] = useState({ value: {}, problem: null });
  const path = `${stepPath(run.id, step.step_ref)}/${op}`;
  const ref = step.step_ref;
  let body;
  let fields = null;
  let text = '';
  let danger = false;
  let confirm;
  if (op === 'approve') {
    text = `Approve step ${ref}? Its dependents start.`;
    fields = html`<label class="field" for="op-comment">Comment (kept in the step's output and the event)
      <textarea id="op-comment" rows="2" maxlength="1000" value=${comment} onInput=${(e) => setComment(e.target.value)}></textarea></label>`;
    confirm = async () => { body = { comment }; await post(path, body); return `Step ${ref} approved.`; };
  } else if (op === 'input') {
    text = `Answer input step ${ref}: the JSON object becomes its output.`;
    fields = html`<${JsonField} id="op-data" label="Data (a JSON object)" value=${{}} onChange=${(value, problem) => setJson({ value, problem })} />`;
    confirm = async () => { await post(path, { data: objectOrThrow(json.value, json.problem, 'Data') }); return `Input submitted to step ${ref}.`; };
  } else if (op === 'skip') {
    text = `Skip step ${ref}? Its dependents run as if it were done.`;
    danger = true;
    fields = html`<label class="field" for="op-reason">Reason
      <input id="op-reason" type="text" maxlength="1000" value=${reason} onInput=${(e) => setReason(e.target.value)} /></label>`;
    confirm = async () => { await post(path, { reason }); return `Step ${ref} skipped.`; };
  } else if (op === 'force-complete') {
    text = `Complete step ${ref} without running it: the JSON object becomes its output.`;
    danger = true;
    fields = html`<${JsonField} id="op-result" label="Result (a JSON object)" value=${{}} onChange=${(value, problem) => setJson({ value, problem })} />`;
    confirm = async () => { await post(path, { result: objectOrThrow(json.value, json.problem, 'Result') }); return `Step ${ref} force-completed.`; };
  } else if (op === 'retry') {
    text = `Run step ${ref} again (attempt ${(step.attempt || 0) + 1})?`;
    confirm = async () => { await post(path, {}); return `Step ${ref} queued again.`; };
  } else {
    text = `Reset step ${ref} and every step that depends on it, so they run again?`;
    danger = true;
    confirm = async () => {
      const r = await post(path, {});
      const n = (r && r.reset_steps) || 0;
      return `${n} step${n === 1 ? '' : 's'} reset.`;
    };
  }
  return html`<${Confirm} title=${`${LABELS[op]}: ${ref}`} confirmLabel=${LABELS[op]} danger=${danger}
    onConfirm=${async () => onDone(await confirm())} onClose=${onClose}>
    <p>${text}</p>
    ${fields}
  </${Confirm}>`;
}

export function StepDrawer({ run, step, definition, dependsOn, events, eventsComplete, onClose, onDone }) {
  const [op, setOp] = useState(null);
  const [fetchedOutput, setFetchedOutput] = useState(undefined);
  const heading = useRef(null);
  const ref = step.step_ref;
  useEffect(() => { if (heading.current) heading.current.focus(); }, []);
  useEffect(() => {
    const onKey = (e) => {
      if (e.key === 'Escape' && !document.querySelector('dialog[open]') && !e.defaultPrevented) onClose();
    };
    addEventListener('keydown', onKey);
    return () => removeEventListener('keydown', onKey);
  }, [onClose]);
  // An output the live events did not carry: read it from the step list once.
  const needsOutput = step.output === undefined && (step.output_pending || step.status === 'completed');
  useEffect(() => {
    if (!needsOutput) return undefined;
    let gone = false;
    page(`/v1/workflow-runs/${enc(run.id)}/steps`, { limit: 1000 })
      .then(({ items }) => { const s = items.find((x) => x.step_ref === ref); if (!gone && s) setFetchedOutput(s.output); })
      .catch(() => {});
    return () => { gone = true; };
  }, [needsOutput, step.finished_at]);
  const output = step.output !== undefined ? step.output : fetchedOutput;
  const timings = stepTimings(step, events, eventsComplete);
  const attempts = attemptsOf(events);
  const maxAttempts = definition && definition.retry && definition.retry.max_attempts;
  const ops = stepOps(run, step);

  return html`<aside class="drawer panel" aria-labelledby="drawer-title">
    <div class="drawer-head">
      <h2 id="drawer-title" tabindex="-1" ref=${heading}>Step <span class="mono">${ref}</span></h2>
      <span data-field="step-status"><${Status} value=${step.status} /></span>
      <button type="button" class="close" onClick=${onClose} aria-label="Close the step's details">✕</button>
    </div>
    ${ops.length > 0 && html`<div class="step-actions" role="group" aria-label="Step operations">
      ${ops.map((o) => html`<button type="button" onClick=${() => setOp(o)}>${LABELS[o]}</button>`)}
    </div>`}
    <dl class="facts compact">
      <div><dt>Kind</dt><dd>${step.kind || '—'}${step.queue ? html` <span class="muted">queue ${step.queue}</span>` : ''}</dd></div>
      <div><dt>Attempt</dt><dd>${step.attempt || 0}${maxAttempts && step.attempt <= maxAttempts ? ` of ${maxAttempts}` : ''}</dd></div>
      <div><dt>Worker</dt><dd class="mono">${step.worker_id || '—'}</dd></div>
      <div><dt>Dependencies</dt><dd>${dependsOn.length ? `${dependsOn.join(', ')} (${step.deps_completed || 0}/${step.deps_required ?? dependsOn.length} done)` : 'none'}</dd></div>
      <div><dt>Created</dt><dd>${fmtTime(step.created_at)}</dd></div>
      <div><dt>Started</dt><dd>${fmtTime(step.started_at)}</dd></div>
      <div><dt>Finished</dt><dd>${fmtTime(step.finished_at)}</dd></div>
      ${step.job_run_id && step.kind === 'workflow' && html`<div><dt>Child run</dt><dd><a class="mono" href=${`#/runs/${enc(step.job_run_id)}`}>${step.job_run_id}</a></dd></div>`}
      ${step.approved_by && html`<div><dt>Approved by</dt><dd>${step.approved_by}</dd></div>`}
      ${step.skip_reason && html`<div><dt>Skip reason</dt><dd>${step.skip_reason}</dd></div>`}
    </dl>
    <h3>Timings <span class="muted">(${timings.source === 'events' ? 'from its events' : 'from its timestamps'})</span></h3>
    <dl class="facts compact timings">
      ${Object.entries(timings).filter(([k]) => k !== 'source').map(([k, v]) => html`<div><dt>${k}</dt><dd>${fmtDuration(v)}</dd></div>`)}
    </dl>
    ${step.error && html`<h3>Error</h3><pre class="json step-error">${step.error}</pre>`}
    <h3>Output</h3>
    ${output === undefined ? html`<span class="muted">${needsOutput ? 'loading…' : '—'}</span>` : html`<${Json} value=${output} />`}
    <h3>Input <span class="muted">(the definition's config; templates resolve when the step runs)</span></h3>
    <${Json} value=${definition && definition.config} />
    ${definition && definition.when && html`<p class="muted">when <code>${definition.when}</code></p>`}
    ${attempts.length > 0 && html`<h3>Attempts</h3>
      <table class="compact"><thead><tr><th>#</th><th>From</th><th>Status</th><th>Error</th></tr></thead>
      <tbody>${attempts.map((a) => html`<tr><td>${a.attempt}</td><td>${fmtTime(a.at)}</td><td><${Status} value=${a.status} /></td><td>${a.error}</td></tr>`)}</tbody></table>`}
    ${op && html`<${StepOpDialog} op=${op} run=${run} step=${step} onClose=${() => setOp(null)} onDone=${onDone} />`}
  </aside>`;
}
