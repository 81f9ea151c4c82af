// A run's event history (pages of GET …/events by after_seq, plus the events its watch brings)
// and its comments (pages of GET …/comments, plus run.comment events, plus a form to add one).
import { useEffect, useRef, useState } from 'preact/hooks';
import { page, post } from '../api.js';
import { ErrorBox } from '../components.js';
import { fmtTime, html } from '../html.js';
import { describeEvent } from './run-live.js';

const enc = encodeURIComponent;
const PAGE = 50;

/**
 * The history as far as it is known: pages loaded from seq 1 up, merged with the live events.
 * { all (by seq), head (contiguous from seq 1), tail (live events after a gap), more, loadMore,
 * busy, error, complete (every event up to the last one seen is known) }.
 */
export function useEventHistory(runId, liveEvents) {
  const [loaded, setLoaded] = useState([]);
  const [more, setMore] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const filledFrom = useRef(-1); // once per hole: a page that brings nothing is not asked again
  const currentRun = useRef(runId); // answers for a run no longer shown are dropped
  currentRun.current = runId;

  async function load(after) {
    const forRun = runId;
    setBusy(true);
    setError(null);
    try {
      const r = await page(`/v1/workflow-runs/${enc(runId)}/events`, { after_seq: after || '', limit: PAGE });
      if (currentRun.current !== forRun) return;
      setLoaded((list) => {
        const seen = new Set(list.map((e) => e.seq));
        return list.concat(r.items.filter((e) => !seen.has(e.seq)));
      });
      setMore(Boolean(r.nextPageToken));
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }

  useEffect(() => {
    setLoaded([]);
    setMore(false);
    filledFrom.current = -1;
    load(0);
  }, [runId]);

  const bySeq = new Map();
  for (const e of loaded) bySeq.set(e.seq, e);
  for (const e of liveEvents) if (e.workflow_run_id === runId || !e.workflow_run_id) bySeq.set(e.seq, e);
  const all = [...bySeq.values()].sort((a, b) => a.seq - b.seq);
  let contiguous = 0;
  for (const e of all) {
    if (e.seq === contiguous + 1) contiguous = e.seq;
    else break;
  }
  const head = all.filter((e) => e.seq <= contiguous);
  const tail = all.filter((e) => e.seq > contiguous);

  // Events that happened between the first page and the watch's snapshot: fetch them at once
  // when the pages say there is nothing more, so the list has no hole.
  useEffect(() => {
    if (!busy && !more && !error && tail.length && filledFrom.current !== contiguous) {
      filledFrom.current = contiguous;
      load(contiguous);
    }
  }, [tail.length, more, busy, contiguous]);

  return {
    all, head, tail, more: more || tail.length > 0, busy, error,
    complete: !more && !tail.length,
    loadMore: () => load(contiguous),
  };
}

function EventRow({ e }) {
  return html`<tr data-seq=${e.seq}>
    <td class="num">${e.seq}</td>
    <td class="nowrap">${fmtTime(e.at)}</td>
    <td>${describeEvent(e)}</td>
    <td>${e.message}${e.type === 'run.retried' && e.data && e.data.run_id
      ? html` <a href=${`#/runs/${enc(e.data.run_id)}`}>open</a>` : ''}</td>
    <td>${e.actor}</td>
  </tr>`;
}

export function EventHistory({ history }) {
  const { head, tail, more, busy, error, loadMore } = history;
  return html`<section aria-labelledby="events-title">
    <h2 id="events-title">Events <span class="muted">(${head.length + tail.length} shown)</span></h2>
    <${ErrorBox} error=${error} />
    <div class="table-scroll">
    <table class="events">
      <thead><tr><th class="num">Seq</th><th>At</th><th>Event</th><th>Message</th><th>Actor</th></tr></thead>
      <tbody>
        ${head.map((e) => html`<${EventRow} key=${e.seq} e=${e} />`)}
        ${more && html`<tr><td colspan="5">
          <button type="button" onClick=${loadMore} disabled=${busy}>${busy ? 'Loading…' : `Load ${PAGE} more events`}</button>
        </td></tr>`}
        ${tail.map((e) => html`<${EventRow} key=${e.seq} e=${e} />`)}
        ${!head.length && !tail.length && !busy && html`<tr><td colspan="5" class="muted">No events yet.</td></tr>`}
      </tbody>
    </table>
    </div>
  </section>`;
}

/** The run's comments: pages oldest first, the ones the watch brings, and a form to add one. */
export function Comments({ runId, liveEvents }) {
  const [items, setItems] = useState([]);
  const [next, setNext] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const [text, setText] = useState('');
  const [sending, setSending] = useState(false);
  const [sendError, setSendError] = useState(null);

  async function load(pageToken) {
    setBusy(true);
    setError(null);
    try {
      const r = await page(`/v1/workflow-runs/${enc(runId)}/comments`, { limit: PAGE, page_token: pageToken || '' });
      setItems((list) => {
        const seen = new Set(list.map((c) => c.seq));
        return list.concat(r.items.filter((c) => !seen.has(c.seq)));
      });
      setNext(r.nextPageToken);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }
  useEffect(() => { setItems([]); setNext(''); load(''); }, [runId]);

  async function add(e) {
    e.preventDefault();
    if (!text.trim()) return;
    setSending(true);
    setSendError(null);
    try {
      const c = await post(`/v1/workflow-runs/${enc(runId)}/comments`, { content: text });
      setItems((list) => (list.some((x) => x.seq === c.seq) ? list : list.concat([c])));
      setText('');
    } catch (err) {
      setSendError(err);
    } finally {
      setSending(false);
    }
  }

  // Comments the watch brought that the pages do not hold yet (shown once the pages are done).
  const seen = new Set(items.map((c) => c.seq));
  const live = next ? [] : liveEvents.filter((ev) => ev.type === 'run.comment' && !seen.has(ev.seq))
    .map((ev) => ({ seq: ev.seq, content: ev.message, created_by: ev.actor, created_at: ev.at }));
  const shown = items.concat(live).sort((a, b) => a.seq - b.seq);

  return html`<section aria-labelledby="comments-title" class="comments">
    <h2 id="comments-title">Comments</h2>
    <${ErrorBox} error=${error} />
    ${shown.length ? html`<ol class="comment-list">
      ${shown.map((c) => html`<li key=${c.seq} data-seq=${c.seq}>
        <div class="muted"><strong>${c.created_by}</strong> · ${fmtTime(c.created_at)}</div>
        <div class="comment-text">${c.content}</div>
      </li>`)}
    </ol>` : !busy && html`<p class="muted">No comments yet.</p>`}
    ${next && html`<button type="button" onClick=${() => load(next)} disabled=${busy}>${busy ? 'Loading…' : 'Load more comments'}</button>`}
    <form onSubmit=${add} class="comment-form">
      <label class="field" for="comment-text">Add a comment
        <textarea id="comment-text" rows="2" maxlength="1000" value=${text} onInput=${(e) => setText(e.target.value)}></textarea>
      </label>
      <${ErrorBox} error=${sendError} />
      <button type="submit" disabled=${sending || !text.trim()}>${sending ? 'Adding…' : 'Add comment'}</button>
    </form>
  </section>`;
}
