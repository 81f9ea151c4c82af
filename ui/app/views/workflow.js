// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function WorkflowView() {
  return html`<section><h1>WorkflowView</h1><p class="muted">Coming soon.</p></section>`;
}
