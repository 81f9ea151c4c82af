"""The dashboard's static files as Envoy routes (README "Dashboard").

Envoy serves the files itself: each becomes a ``direct_response`` route whose body is the file
(read by Envoy when it starts, so a changed or new file is served after the server restarts).
The routes are generated at start from what the UI folder (``settings.ui_dir``) holds:

- every regular file under it, at ``/ui/<its path>``, except ``node_modules/``, the npm package
  files and hidden names (``.*``); ``/ui`` and ``/ui/`` serve ``index.html``;
- the vendored JavaScript, at the four fixed URLs of ``VENDOR_FILES``, each mapped to one file of
  ``node_modules`` (installed by ``make install``: ``npm ci`` of ``ui/package-lock.json``);
  nothing else of ``node_modules`` is reachable;
- any other ``/ui/...`` path: 404.

Every file is sent with its content type and the headers of ``security_headers``: ``no-cache``
(the files change with releases; the browser revalidates instead of running a stale app),
``nosniff``, ``no-referrer``, and a Content-Security-Policy that lets in scripts, styles and
connections from this origin only. The one inline script the policy allows is the import map of
``index.html`` (``<script type="importmap">``, which maps ``preact`` for ``preact/hooks``): by its
SHA-256, computed from the file at start, so an edited import map is allowed after a restart and
no other inline script ever runs.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

logger = logging.getLogger(__name__)

# The URL prefix of the dashboard.
UI_PREFIX = "/ui"
# The vendored files: URL name under /ui/vendor/ -> path under <ui_dir>/node_modules. The app
# imports exactly these URLs (its import map names the first three).
VENDOR_FILES: dict[str, str] = {
    "preact.mjs": "preact/dist/preact.mjs",
    "preact-hooks.mjs": "preact/hooks/dist/hooks.mjs",
    "htm.mjs": "htm/dist/htm.mjs",
    "dagre.js": "@dagrejs/dagre/dist/dagre.min.js",
}
# Never served from the UI folder: npm's files (node_modules only through VENDOR_FILES).
SKIPPED_NAMES = frozenset({"node_modules", "package.json", "package-lock.json"})
# A file larger than this is not served (Envoy holds every body in memory): a warning says so.
MAX_FILE_BYTES = 8 * 1024 * 1024

_TEXT = "; charset=utf-8"
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html" + _TEXT,
    ".js": "text/javascript" + _TEXT,
    ".mjs": "text/javascript" + _TEXT,
    ".css": "text/css" + _TEXT,
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain" + _TEXT,
    ".md": "text/markdown" + _TEXT,
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# The filters that must not touch a static file: the transcoder (with reject_unknown_method it
# would answer 404 for a path that maps to no gRPC method) and the request buffer.
_BYPASSED_FILTERS = ("envoy.filters.http.buffer", "envoy.filters.http.grpc_json_transcoder")
_DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


@dataclass(frozen=True)
class UiFile:
    """One file served: its URL path, where it is, and its content type."""

    url: str
    path: Path
    content_type: str


@dataclass(frozen=True)
class UiRoutes:
    """What the Envoy template needs: the routes, and the largest body among them (the route
    config's max_direct_response_body_size_bytes, whose default is 4 KiB)."""

    routes: list[dict[str, Any]]
    max_body_bytes: int
    files: list[UiFile]


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), DEFAULT_CONTENT_TYPE)


def ui_files(ui_dir: Path) -> list[UiFile]:
    """Every file to serve from `ui_dir` (resolved), app files first, then the vendored ones;
    sorted by URL within each. Missing vendor files are left out with a warning."""
    found: list[UiFile] = []
    for root, dirs, names in os.walk(ui_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_NAMES and not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name in SKIPPED_NAMES or name.startswith(".") or not path.is_file():
                continue
            if _too_large(path):
                continue
            relative = path.relative_to(ui_dir).as_posix()
            found.append(UiFile(f"{UI_PREFIX}/{quote(relative)}", path, content_type(path)))
    missing = []
    for url_name, module_path in VENDOR_FILES.items():
        path = ui_dir / "node_modules" / module_path
        if not path.is_file():
            missing.append(module_path)
            continue
        found.append(UiFile(f"{UI_PREFIX}/vendor/{url_name}", path, content_type(Path(url_name))))
    if missing:
        logger.warning("dashboard: %s missing under %s (run `make install`); /ui/vendor/ is incomplete",
                       ", ".join(missing), ui_dir / "node_modules")
    return found


def _too_large(path: Path) -> bool:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        logger.warning("dashboard: %s is not served: %d bytes, more than %d", path, size, MAX_FILE_BYTES)
        return True
    return False


class _ImportMaps(HTMLParser):
    """The text of every <script type="importmap"> of a document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.maps: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and (dict(attrs).get("type") or "").strip().lower() == "importmap":
            self._inside = True
            self.maps.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.maps[-1] += data


def import_map_hashes(index_html: Path) -> list[str]:
    """CSP source expressions ('sha256-…') of the import maps in `index_html` (none if absent)."""
    try:
        text = index_html.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    parser = _ImportMaps()
    parser.feed(text)
    parser.close()
    return [f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'" for m in parser.maps]


def content_security_policy(script_hashes: list[str]) -> str:
    """Scripts, styles, fonts and connections (the REST API, its SSE streams) from this origin
    only; images also as data: URLs; the import maps by hash; no plugins, frames or <base>."""
    scripts = " ".join(["'self'", *script_hashes])
    return ("default-src 'none'; "
            f"script-src {scripts}; "
            "style-src 'self'; "
            "img-src 'self' data:; "
            "font-src 'self'; "
            "connect-src 'self'; "
            "manifest-src 'self'; "
            "base-uri 'none'; "
            "form-action 'none'; "
            "frame-ancestors 'none'")


def security_headers(script_hashes: list[str]) -> dict[str, str]:
    """The headers every dashboard file is sent with, besides its content type."""
    return {
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "content-security-policy": content_security_policy(script_hashes),
    }


def ui_routes(ui_dir: Path | None) -> UiRoutes:
    """The routes serving `ui_dir`; none (and a log line saying why) when it is not set or not
    a folder."""
    if ui_dir is None:
        logger.info("dashboard: not served (CONVEYOR_UI_DIR is empty)")
        return UiRoutes([], 0, [])
    ui_dir = ui_dir.resolve()
    if not ui_dir.is_dir():
        logger.warning("dashboard: not served: %s is not a folder (CONVEYOR_UI_DIR names another)", ui_dir)
        return UiRoutes([], 0, [])
    files = ui_files(ui_dir)
    index = ui_dir / "index.html"
    headers = security_headers(import_map_hashes(index))
    routes: list[dict[str, Any]] = []
    index_file = next((f for f in files if f.path == index), None)
    if index_file is not None:
        routes += [_file_route({"path": url}, index_file, headers) for url in (UI_PREFIX, UI_PREFIX + "/")]
    else:
        logger.warning("dashboard: %s has no index.html; /ui/ answers 404", ui_dir)
    routes += [_file_route({"path": f.url}, f, headers) for f in files]
    # Anything else under /ui/ (and /ui/ itself without an index.html) is not found.
    routes.append({"match": {"prefix": UI_PREFIX + "/"},
                   "direct_response": {"status": 404, "body": {"inline_string": "no such dashboard file"}},
                   "typed_per_filter_config": dict.fromkeys(_BYPASSED_FILTERS, _DISABLED)})
    largest = max((f.path.stat().st_size for f in files), default=0)
    return UiRoutes(routes, largest, files)


def _file_route(match: dict[str, str], file: UiFile, headers: dict[str, str]) -> dict[str, Any]:
    added = [{"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
             for key, value in {"content-type": file.content_type, **headers}.items()]
    return {
        "match": match,
        "direct_response": {"status": 200, "body": {"filename": str(file.path)}},
        "response_headers_to_add": added,
        "typed_per_filter_config": dict.fromkeys(_BYPASSED_FILTERS, _DISABLED),
    }
