// Placeholder: replaced by the view's owner.
import { html } from '../html.js';

export function AuditView() {
  return html`<section><h1>AuditView</h1><p class="muted">Coming soon.</p></section>`;
}
