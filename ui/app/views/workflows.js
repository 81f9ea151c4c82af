// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function WorkflowsView() {
  return html`<section><h1>WorkflowsView</h1><p class="muted">Coming soon.</p></section>`;
}
