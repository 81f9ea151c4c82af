// htm bound to Preact (tagged templates instead of JSX: no build step), and small formatters
// shared by every view.
import { h } from 'preact';
import htm from 'htm';

export const html = htm.bind(h);

/** "2026-11-30 01:02:03" in the browser's time zone, or "—". */
export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime()) || d.getFullYear() < 1971) return '—';
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A duration in seconds as "1h 02m", "3m 04s", "5.2s", "—" when unknown. */
export function fmtDuration(seconds) {
  if (seconds == null || Number.isNaN(seconds)) return '—';
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, '0')}m`;
  if (m) return `${m}m ${String(r).padStart(2, '0')}s`;
  return `${r}s`;
}

/** Seconds between two timestamps (the second defaults to now); null when the first is unset. */
export function secondsBetween(fromIso, toIso) {
  if (!fromIso) return null;
  const from = new Date(fromIso).getTime();
  if (from < 31536000000) return null; // unset timestamps print as 1970
  const to = toIso && new Date(toIso).getTime() > 31536000000 ? new Date(toIso).getTime() : Date.now();
  return Math.max(0, (to - from) / 1000);
}

export const FINAL_RUN = new Set(['completed', 'failed', 'canceled', 'timed_out']);
export const RUN_STATUSES = ['pending', 'running', 'paused', 'completed', 'failed', 'canceled', 'timed_out'];

/** A status as a colored badge (colors in style.css, by status). */
export function Status({ value }) {
  return html`<span class=${`status status-${value || 'unknown'}`}>${(value || 'unknown').replace('_', ' ')}</span>`;
}

/** Pretty JSON for display. */
export function pretty(value) {
  if (value === undefined || value === null) return '';
  return JSON.stringify(value, null, 2);
}
