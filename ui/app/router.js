// Hash routing: "#/runs?status=failed" → { path: "/runs", parts: ["runs"], query: URLSearchParams }.
// Filters live in the URL, so a view can be bookmarked, shared and reloaded as it is.
import { useEffect, useState } from 'preact/hooks';

export function current() {
  const raw = location.hash.replace(/^#/, '') || '/runs';
  const [path, search = ''] = raw.split('?');
  return { path, parts: path.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(search) };
}

/** The route, re-rendering on every hash change. */
export function useRoute() {
  const [route, setRoute] = useState(current);
  useEffect(() => {
    const changed = () => setRoute(current());
    addEventListener('hashchange', changed);
    return () => removeEventListener('hashchange', changed);
  }, []);
  return route;
}

/** An href for a path and query params (arrays repeat, empty values are left out). */
export function href(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (Array.isArray(v)) v.filter(Boolean).forEach((x) => q.append(k, x));
    else if (v !== '' && v != null) q.append(k, v);
  }
  const s = q.toString();
  return `#${path}${s ? `?${s}` : ''}`;
}

export function navigate(path, params, { replace = false } = {}) {
  const target = href(path, params);
  if (replace) history.replaceState(null, '', target);
  else location.hash = target.slice(1);
  if (replace) dispatchEvent(new HashChangeEvent('hashchange'));
}
