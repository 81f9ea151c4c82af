// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function RunView() {
  return html`<section><h1>RunView</h1><p class="muted">Coming soon.</p></section>`;
}
