// Pieces every view uses: an accessible confirmation dialog, the API's errors shown plainly,
// a pager for cursor-paged lists, a JSON editor field.
import { useEffect, useRef, useState } from 'preact/hooks';
import { html, pretty } from './html.js';

/** An API error as the API said it: message, reason and HTTP status. */
export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<div class="error" role="alert">
    <strong>${error.reason || 'Error'}</strong>${error.status ? html` <span class="muted">(HTTP ${error.status})</span>` : ''}
    <div>${error.message}</div>
  </div>`;
}

/**
 * A modal dialog (the native <dialog>: focus is trapped and Escape closes it) asking to confirm
 * an operation. `children` are extra fields; `onConfirm` may throw an ApiError, shown in the
 * dialog, which then stays open.
 */
export function Confirm({ title, confirmLabel = 'Confirm', danger = false, onConfirm, onClose, children }) {
  const ref = useRef(null);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
    return () => d && d.open && d.close();
  }, []);
  async function submit(e) {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await onConfirm();
      onClose(true);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }
  return html`<dialog ref=${ref} class="dialog" aria-labelledby="dialog-title" onCancel=${(e) => { e.preventDefault(); onClose(false); }}>
    <form onSubmit=${submit}>
      <h2 id="dialog-title">${title}</h2>
      ${children}
      <${ErrorBox} error=${error} />
      <div class="actions">
        <button type="button" onClick=${() => onClose(false)}>Cancel</button>
        <button type="submit" class=${danger ? 'danger' : 'primary'} disabled=${busy}>${busy ? 'Working…' : confirmLabel}</button>
      </div>
    </form>
  </dialog>`;
}

/** Previous/next over cursor pages: `tokens` is the stack of page tokens seen so far. */
export function Pager({ tokens, next, onPage }) {
  const pageNo = tokens.length;
  return html`<nav class="pager" aria-label="Pages">
    <button disabled=${pageNo === 0} onClick=${() => onPage(tokens.slice(0, -1))}>← Previous</button>
    <span class="muted">page ${pageNo + 1}</span>
    <button disabled=${!next} onClick=${() => onPage([...tokens, next])}>Next →</button>
  </nav>`;
}

/** A JSON textarea that reports its parsed value (or a parse error) on every edit. */
export function JsonField({ label, value, onChange, rows = 6, id }) {
  const [text, setText] = useState(() => (value === undefined ? '{}' : pretty(value)));
  const [problem, setProblem] = useState('');
  function edit(e) {
    const t = e.target.value;
    setText(t);
    try {
      onChange(t.trim() ? JSON.parse(t) : undefined, null);
      setProblem('');
    } catch (err) {
      setProblem(err.message);
      onChange(undefined, err.message);
    }
  }
  return html`<label class="field" for=${id}>${label}
    <textarea id=${id} rows=${rows} spellcheck="false" value=${text} onInput=${edit} aria-invalid=${problem ? 'true' : 'false'}></textarea>
    ${problem && html`<span class="field-problem">${problem}</span>`}
  </label>`;
}

/** <pre> of a JSON value, or a muted dash. */
export function Json({ value }) {
  if (value === undefined || value === null || (typeof value === 'object' && !Object.keys(value).length)) {
    return html`<span class="muted">—</span>`;
  }
  return html`<pre class="json">${pretty(value)}</pre>`;
}
