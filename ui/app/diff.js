// A line diff (Myers' O(ND) algorithm: the shortest edit script) and its grouping into hunks
// with context, for comparing two pretty-printed workflow definitions. Small on purpose: a
// dependency for ~60 lines is not worth its weight, and nothing here needs a build.

/**
 * The edit script turning lines `a` into lines `b`: [{op: ' ' | '-' | '+', text, a, b}] where
 * `a`/`b` are 1-based line numbers in each side (0 where the line is not on that side). Common
 * leading and trailing lines are matched first, so a small change in a large definition costs
 * little (memory grows with the square of the differences). Beyond `maxEdits` differences it gives up on finding the shortest script and answers
 * the middle as removed then added (still a correct diff, just not a minimal one).
 */
export function diffLines(a, b, maxEdits = 2000) {
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) { endA--; endB--; }
  const out = [];
  for (let i = 0; i < start; i++) out.push({ op: ' ', text: a[i], a: i + 1, b: i + 1 });
  const middle = myers(a.slice(start, endA), b.slice(start, endB), maxEdits);
  for (const e of middle) {
    out.push({ op: e.op, text: e.text, a: e.a ? e.a + start : 0, b: e.b ? e.b + start : 0 });
  }
  for (let i = endA, j = endB; i < a.length; i++, j++) out.push({ op: ' ', text: a[i], a: i + 1, b: j + 1 });
  return out;
}

function myers(a, b, maxEdits) {
  const n = a.length;
  const m = b.length;
  const max = Math.min(n + m, maxEdits);
  const offset = max + 1;
  const v = new Int32Array(2 * max + 3);
  const trace = [];
  let found = n === 0 && m === 0 ? 0 : -1;
  for (let d = 0; d <= max && found < 0; d++) {
    trace.push(v.slice(offset - d - 1, offset + d + 2)); // what step d reads: k in [-d-1, d+1]
    for (let k = -d; k <= d; k += 2) {
      let x = k === -d || (k !== d && v[offset + k - 1] < v[offset + k + 1]) ? v[offset + k + 1] : v[offset + k - 1] + 1;
      let y = x - k;
      while (x < n && y < m && a[x] === b[y]) { x++; y++; }
      v[offset + k] = x;
      if (x >= n && y >= m) { found = d; break; }
    }
  }
  if (found < 0) {
    return [...a.map((text, i) => ({ op: '-', text, a: i + 1, b: 0 })),
      ...b.map((text, j) => ({ op: '+', text, a: 0, b: j + 1 }))];
  }
  // Walk the trace back from (n, m), one edit per d, the matched diagonals between them.
  const edits = [];
  let x = n;
  let y = m;
  for (let d = found; d > 0; d--) {
    const seen = trace[d];
    const at = (k) => seen[k + d + 1];
    const k = x - y;
    const prevK = k === -d || (k !== d && at(k - 1) < at(k + 1)) ? k + 1 : k - 1;
    const prevX = at(prevK);
    const prevY = prevX - prevK;
    while (x > prevX && y > prevY) { x--; y--; edits.push({ op: ' ', text: a[x], a: x + 1, b: y + 1 }); }
    if (x === prevX) { y--; edits.push({ op: '+', text: b[y], a: 0, b: y + 1 }); }
    else { x--; edits.push({ op: '-', text: a[x], a: x + 1, b: 0 }); }
  }
  while (x > 0 && y > 0) { x--; y--; edits.push({ op: ' ', text: a[x], a: x + 1, b: y + 1 }); }
  return edits.reverse();
}

/** The script's changes with `context` unchanged lines around each, as hunks of lines; a gap
 * between hunks is a {skipped: n} entry. */
export function hunks(script, context = 3) {
  const keep = new Uint8Array(script.length);
  script.forEach((e, i) => {
    if (e.op === ' ') return;
    for (let j = Math.max(0, i - context); j <= Math.min(script.length - 1, i + context); j++) keep[j] = 1;
  });
  const out = [];
  let skipped = 0;
  script.forEach((e, i) => {
    if (keep[i]) {
      if (skipped) out.push({ skipped });
      skipped = 0;
      out.push(e);
    } else skipped++;
  });
  if (skipped && out.length) out.push({ skipped });
  return out;
}
