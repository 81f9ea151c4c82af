// A workflow definition's DAG drawn as SVG, laid out by dag.js's `layout` (dagre, left to right
// by depends_on) like a run's. A definition has no statuses: each node shows the step's ref and
// kind (outlined by kind, marked when it has a `when`), is focusable, and picks the step on
// click, Enter or Space.
import { useMemo } from 'preact/hooks';
import { layout } from './dag.js';
import { html } from './html.js';

const pathOf = (points) => points.map((p, i) => `${i ? 'L' : 'M'}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(' ');

/** The definition's DAG; `selected` is the picked step's ref, `onPick(ref)` picks one. */
export function WorkflowDag({ steps, selected, onPick, label = 'Steps of the workflow' }) {
  const shape = steps.map((s) => `${s.ref}<${(s.depends_on || []).join(',')}:${s.kind}:${s.when ? 1 : 0}`).join('|');
  const lay = useMemo(() => {
    if (!window.dagre || !steps.length) return null;
    const refs = steps.map((s) => s.ref);
    const deps = Object.fromEntries(steps.map((s) => [s.ref, s.depends_on || []]));
    // The kind sizes a node; " · when" makes room for the mark.
    const kinds = Object.fromEntries(steps.map((s) => [s.ref, `${s.kind}${s.when ? ' · when' : ''}`]));
    return layout(refs, deps, kinds);
  }, [shape]);
  if (!steps.length) return html`<p class="muted">No steps.</p>`;
  if (!lay) return html`<p class="error" role="alert">The DAG layout library (dagre) did not load.</p>`;
  const keyDown = (e, ref) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      onPick(ref);
    }
  };
  return html`<div class="wf-dag-scroll">
    <svg class="wf-dag" role="group" aria-label=${label} width=${lay.width} height=${lay.height}
      viewBox=${`0 0 ${lay.width} ${lay.height}`}>
      <defs>
        <marker id="wf-dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
          <path d="M0,0 L10,5 L0,10 z" class="wf-dag-arrow" />
        </marker>
      </defs>
      ${lay.edges.map((e) => html`<path key=${`${e.from}>${e.to}`} class="wf-dag-edge" d=${pathOf(e.points)} marker-end="url(#wf-dag-arrow)" />`)}
      ${steps.map((s) => {
        const n = lay.nodes[s.ref];
        const deps = (s.depends_on || []).length ? `, after ${s.depends_on.join(', ')}` : '';
        return html`<g key=${s.ref} class=${`wf-dag-node wf-kind-${s.kind}${selected === s.ref ? ' selected' : ''}`}
            transform=${`translate(${n.x},${n.y})`} tabindex="0" role="button" data-ref=${s.ref}
            aria-label=${`Step ${s.ref}: ${s.kind}${s.when ? ', conditional' : ''}${deps}`}
            aria-pressed=${selected === s.ref ? 'true' : 'false'}
            onClick=${() => onPick(s.ref)} onKeyDown=${(e) => keyDown(e, s.ref)}>
          <rect width=${n.w} height=${n.h} rx="7" />
          <text x="12" y="18" class="wf-dag-ref">${s.ref}</text>
          <text x="12" y="35" class="wf-dag-sub">${s.kind}${s.when ? ' · when' : ''}</text>
        </g>`;
      })}
    </svg>
  </div>`;
}
