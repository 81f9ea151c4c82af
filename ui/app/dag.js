// DAGs drawn as SVG, the one drawing for a run's steps and a definition's: dagre (loaded as a UMD
// script, the global `dagre`) lays the steps out by their depends_on edges; each node is
// focusable and chosen on click, Enter or Space. A run's nodes are colored by status (the --s-*
// variables of style.css); a definition's are outlined by kind. The layout is computed once per
// shape (refs, edges, kinds), so live status changes only recolor nodes.
import { useMemo } from 'preact/hooks';
import { html } from './html.js';

const NODE_H = 44;
const CHAR_W = 7.4;

// Wide enough for the ref with an attempt mark ("#12") and for the longest status with the kind.
function nodeWidth(ref, kind) {
  return Math.max(96, Math.ceil(Math.max(ref.length * CHAR_W + 30, (12 + (kind || '').length) * 6.2)) + 24);
}

/** The layout of `refs` with `dependsOn` (ref → refs): { width, height, nodes: {ref: {x, y, w, h}}, edges: [{from, to, points}] }. */
export function layout(refs, dependsOn, kinds = {}) {
  const known = new Set(refs);
  const g = new window.dagre.graphlib.Graph();
  g.setGraph({ rankdir: 'LR', nodesep: 18, ranksep: 56, marginx: 8, marginy: 8 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const ref of refs) g.setNode(ref, { width: nodeWidth(ref, kinds[ref]), height: NODE_H });
  for (const ref of refs) {
    for (const dep of dependsOn[ref] || []) if (known.has(dep) && dep !== ref) g.setEdge(dep, ref);
  }
  window.dagre.layout(g);
  const nodes = {};
  for (const ref of refs) {
    const n = g.node(ref);
    nodes[ref] = { x: n.x - n.width / 2, y: n.y - n.height / 2, w: n.width, h: n.height };
  }
  const edges = g.edges().map((e) => ({ from: e.v, to: e.w, points: g.edge(e).points }));
  const { width, height } = g.graph();
  return { width: Math.max(width || 0, 120), height: Math.max(height || 0, NODE_H + 16), nodes, edges };
}

function pathOf(points) {
  return points.map((p, i) => `${i ? 'L' : 'M'}${p.x.toFixed(1)},${p.y.toFixed(1)}`).join(' ');
}

/**
 * The drawing. `refs` in display order, `dependsOn` ref → refs, `kinds` ref → kind (sizes the
 * nodes), `describe(ref)` → { cls, sub, aria, mark } (the node's extra class, second line,
 * accessible label and corner mark), `selected` the chosen ref, `onOpen(ref)` when one is chosen.
 */
function DagSvg({ refs, dependsOn, kinds, describe, selected, onOpen, label, variant }) {
  const shapeKey = refs.map((r) => `${r}<${(dependsOn[r] || []).join(',')}:${kinds[r]}`).join('|');
  const lay = useMemo(() => (window.dagre ? layout(refs, dependsOn, kinds) : null), [shapeKey]);
  if (!refs.length) return html`<p class="muted">No steps.</p>`;
  if (!lay) return html`<p class="error" role="alert">The DAG layout library (dagre) did not load.</p>`;
  function key(e, ref) {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      onOpen(ref);
    }
  }
  return html`<div class=${`dag-scroll ${variant}`}>
    <svg class="dag" role="group" aria-label=${label} width=${lay.width} height=${lay.height}
      viewBox=${`0 0 ${lay.width} ${lay.height}`}>
      <defs>
        <marker id=${`${variant}-arrow`} viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
          <path d="M0,0 L10,5 L0,10 z" class="dag-arrow" />
        </marker>
      </defs>
      ${lay.edges.map((e) => html`<path key=${`${e.from}>${e.to}`} class="dag-edge" d=${pathOf(e.points)} marker-end=${`url(#${variant}-arrow)`} />`)}
      ${refs.map((ref) => {
        const n = lay.nodes[ref];
        const d = describe(ref);
        return html`<g key=${ref} class=${`dag-node ${d.cls}${selected === ref ? ' selected' : ''}`}
            transform=${`translate(${n.x},${n.y})`} tabindex="0" role="button" data-ref=${ref} data-status=${d.status}
            aria-label=${d.aria} aria-pressed=${selected === ref ? 'true' : 'false'}
            onClick=${() => onOpen(ref)} onKeyDown=${(e) => key(e, ref)}>
          <rect width=${n.w} height=${n.h} rx="7" />
          <text x="12" y="18" class="dag-ref">${ref}</text>
          <text x="12" y="35" class="dag-sub">${d.sub}</text>
          ${d.mark && html`<text x=${n.w - 8} y="18" class="dag-attempt" text-anchor="end" font-size="11" font-weight="600">${d.mark}</text>`}
        </g>`;
      })}
    </svg>
  </div>`;
}

/**
 * A run's DAG. `refs` in display order, `dependsOn` ref → refs, `steps` ref → StepRun (status,
 * kind, attempt), `selected` the open step's ref, `onOpen(ref)` when a node is chosen.
 */
export function Dag({ refs, dependsOn, steps, selected, onOpen, label = 'Steps of the run' }) {
  const kinds = {};
  for (const ref of refs) kinds[ref] = steps[ref] ? steps[ref].kind : '';
  const describe = (ref) => {
    const s = steps[ref] || {};
    const status = s.status || 'pending';
    const shown = status.replace('_', ' ');
    return {
      cls: `dag-${status}`,
      status,
      sub: `${shown}${s.kind ? ` · ${s.kind}` : ''}`,
      aria: `Step ${ref}: ${shown}${s.kind ? `, ${s.kind}` : ''}${s.attempt > 1 ? `, attempt ${s.attempt}` : ''}`,
      mark: s.attempt > 1 ? `#${s.attempt}` : '',
    };
  };
  return html`<${DagSvg} refs=${refs} dependsOn=${dependsOn} kinds=${kinds} describe=${describe}
    selected=${selected} onOpen=${onOpen} label=${label} variant="dag-run" />`;
}

/** A definition's DAG (no statuses: outlined by kind); `selected` the picked ref, `onPick(ref)` picks one. */
export function WorkflowDag({ steps, selected, onPick, label = 'Steps of the workflow' }) {
  const refs = steps.map((s) => s.ref);
  const byRef = Object.fromEntries(steps.map((s) => [s.ref, s]));
  const dependsOn = Object.fromEntries(steps.map((s) => [s.ref, s.depends_on || []]));
  // The kind sizes a node; " · when" makes room for the mark.
  const kinds = Object.fromEntries(steps.map((s) => [s.ref, `${s.kind}${s.when ? ' · when' : ''}`]));
  const describe = (ref) => {
    const s = byRef[ref];
    const deps = (s.depends_on || []).length ? `, after ${s.depends_on.join(', ')}` : '';
    return {
      cls: `dag-kind-${s.kind}`,
      status: '',
      sub: kinds[ref],
      aria: `Step ${ref}: ${s.kind}${s.when ? ', conditional' : ''}${deps}`,
      mark: '',
    };
  };
  return html`<${DagSvg} refs=${refs} dependsOn=${dependsOn} kinds=${kinds} describe=${describe}
    selected=${selected} onOpen=${onPick} label=${label} variant="dag-definition" />`;
}
