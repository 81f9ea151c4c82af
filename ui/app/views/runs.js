// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function RunsView() {
  return html`<section><h1>RunsView</h1><p class="muted">Coming soon.</p></section>`;
}
