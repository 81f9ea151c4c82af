// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function KeysView() {
  return html`<section><h1>KeysView</h1><p class="muted">Coming soon.</p></section>`;
}
