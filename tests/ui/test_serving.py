"""The dashboard served by Envoy under /ui/ (gateway/ui.py): the repository's ui/ folder through a
real `conveyor serve` (headers, the four vendor URLs, 404s, the REST API beside it, the page in
Chromium with no console errors), and any folder's files through a real Envoy (generic serving:
nested, binary, empty and large files; hidden and npm files never served; no folder, no routes)."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from conveyor.gateway.envoy import EnvoyGateway
from conveyor.gateway.ui import VENDOR_FILES
from conveyor.settings import DEFAULT_UI_DIR, Settings
from tests.ui.conftest import UiServer

VENDOR_URLS = ["/ui/vendor/preact.mjs", "/ui/vendor/preact-hooks.mjs", "/ui/vendor/htm.mjs",
               "/ui/vendor/dagre.js"]
# Nothing here depends on the database backend (the served Conveyor is SQLite either way).
pytestmark = pytest.mark.client_only

IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.DOTALL)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _assert_security_headers(response: httpx.Response, script_hashes: list[str]) -> None:
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    directives = response.headers["content-security-policy"].split(";")
    policy = dict(part.strip().split(" ", 1) for part in directives)
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == " ".join(["'self'", *(f"'sha256-{h}'" for h in script_hashes)])
    assert policy["style-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert "unsafe" not in response.headers["content-security-policy"]


def test_the_repositorys_dashboard_is_served_beside_the_api(ui_server: UiServer) -> None:
    index = (DEFAULT_UI_DIR / "index.html").read_text()
    maps = IMPORT_MAP.findall(index)
    with httpx.Client(base_url=ui_server.base_url) as client:
        for url in ("/ui/", "/ui", "/ui/index.html"):
            response = client.get(url)
            assert response.status_code == 200, url
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert response.text == index
            _assert_security_headers(response, [_sha256(m) for m in maps])

        for url in VENDOR_URLS:
            response = client.get(url)
            assert response.status_code == 200, url
            assert response.headers["content-type"] == "text/javascript; charset=utf-8"
            source = DEFAULT_UI_DIR / "node_modules" / VENDOR_FILES[url.rsplit("/", 1)[1]]
            assert response.content == source.read_bytes()

        for url in ("/ui/x", "/ui/vendor/x.js", "/ui/package.json", "/ui/package-lock.json",
                    "/ui/node_modules/preact/package.json", "/ui/node_modules/preact/dist/preact.mjs"):
            assert client.get(url).status_code == 404, url

        # The API beside it: transcoded, authenticated, JSON.
        assert client.get("/v1/workflows").status_code == 401
        workflows = client.get("/v1/workflows", headers=ui_server.headers)
        assert workflows.status_code == 200 and isinstance(workflows.json(), list)


def test_the_dashboard_loads_in_chromium_without_errors(page: Page) -> None:
    response = page.goto("/ui/")
    assert response is not None and response.ok
    # The app rendered (its modules and the import map resolved, under the CSP) and dagre's
    # classic script defined its global.
    page.wait_for_function("document.querySelector('#app')?.children.length > 0")
    assert page.evaluate("typeof window.dagre.layout") == "function"
    assert page.title() == "Conveyor"


def test_the_first_start_prints_a_dashboard_link_that_signs_in(ui_server: UiServer, page: Page) -> None:
    """`conveyor serve` prints where the dashboard is. Its output here is a file, not a terminal,
    so the link carries no token (on a terminal, the first start's link has the new admin token
    in its fragment: tests/system/test_printed_secrets.py); a link that does signs the browser
    in: the token goes to session storage and out of the address bar."""
    assert f"conveyor: dashboard on {ui_server.base_url}/ui/\n" in ui_server.log()
    assert ui_server.token not in ui_server.log()
    link = f"{ui_server.base_url}/ui/#token={ui_server.token}"
    page.goto(link)
    page.get_by_role("link", name="Sign out").or_(page.get_by_role("button", name="Sign out")).wait_for()
    assert ui_server.token not in page.url
    assert page.evaluate("sessionStorage.getItem('conveyor.token')") == ui_server.token


# --- any folder, through a real Envoy -----------------------------------------------------------

def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ui_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ui"
    files: dict[str, bytes] = {
        "index.html": b'<!doctype html><script type="importmap">{"imports": {"a": "/ui/a.js"}}</script>'
                      b'<script type=importmap>{"imports":{}}</script><script src="/ui/a.js"></script>',
        "a.js": b"export const a = 1;\n",
        "app/views/deep.mjs": b"export default 100;  // 100% literal\n",
        "app/style.css": b"body{}\n",
        "img/logo.png": bytes(range(256)) * 4,
        "empty.txt": b"",
        "big.js": b"//" + b"x" * 300_000 + b"\n",
        "with space.json": b"{}",
        ".hidden": b"secret",
        ".git/config": b"secret",
        "package.json": b"{}",
        "package-lock.json": b"{}",
        "node_modules/other/index.js": b"not served",
        **{f"node_modules/{path}": f"// {name}\n".encode() for name, path in VENDOR_FILES.items()},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


async def _serve(tmp_path: Path, ui_dir: Path | None) -> EnvoyGateway:
    settings = Settings(data_dir=tmp_path / "data", http_port=0, envoy_admin_port=0, ui_dir=ui_dir)
    gateway = EnvoyGateway(settings, _unused_port())  # no gRPC server: files need none
    await gateway.start()
    return gateway


async def test_every_file_of_the_folder_is_served_and_nothing_else(tmp_path: Path, ui_dir: Path) -> None:
    gateway = await _serve(tmp_path, ui_dir)
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            expected = {
                "/ui/a.js": "text/javascript; charset=utf-8",
                "/ui/app/views/deep.mjs": "text/javascript; charset=utf-8",
                "/ui/app/style.css": "text/css; charset=utf-8",
                "/ui/img/logo.png": "image/png",
                "/ui/big.js": "text/javascript; charset=utf-8",
                "/ui/with%20space.json": "application/json",
                "/ui/index.html": "text/html; charset=utf-8",
            }
            hashes = [_sha256('{"imports": {"a": "/ui/a.js"}}'), _sha256('{"imports":{}}')]
            for url, content_type in expected.items():
                response = await client.get(url)
                assert response.status_code == 200, url
                assert response.headers["content-type"] == content_type, url
                assert response.content == (ui_dir / url[4:].replace("%20", " ")).read_bytes(), url
                _assert_security_headers(response, hashes)
            # An empty file is an empty 200 (Envoy drops the content type of an empty local reply).
            empty = await client.get("/ui/empty.txt")
            assert empty.status_code == 200 and empty.content == b""
            assert (await client.get("/ui/")).content == (ui_dir / "index.html").read_bytes()
            head = await client.head("/ui/big.js")
            assert head.status_code == 200 and head.content == b""
            for name in VENDOR_FILES:
                vendor = await client.get(f"/ui/vendor/{name}")
                assert vendor.status_code == 200 and vendor.text == f"// {name}\n"
            for url in ("/ui/.hidden", "/ui/.git/config", "/ui/package.json", "/ui/package-lock.json",
                        "/ui/node_modules/other/index.js", "/ui/nope", "/ui/app/", "/ui/../ui/.hidden"):
                response = await client.get(url)
                assert response.status_code == 404, url
            # The filters still see API paths: an unknown one is the transcoder's 404, JSON.
            unknown = await client.get("/v1/nope")
            assert unknown.status_code == 404 and unknown.json()["details"][0]["reason"] == "UNKNOWN_PATH"
    finally:
        await gateway.stop()


async def test_without_a_folder_there_are_no_dashboard_routes(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor.gateway.ui")
    gateway = await _serve(tmp_path, tmp_path / "missing")
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            response = await client.get("/ui/")
            # No route: the transcoder finds no method for the path.
            assert response.status_code == 404
            assert response.json()["details"][0]["reason"] == "UNKNOWN_PATH"
    finally:
        await gateway.stop()
    assert any("not served" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def test_page_errors_are_collected_for_the_test_to_fail_on(page: Page, console_errors: list[str]) -> None:
    page.goto("/ui/")
    page.evaluate("console.error('boom'); setTimeout(() => { throw new Error('late'); })")
    for _ in range(200):  # events reach Python as the page's event loop runs: up to 2 s
        if len(console_errors) >= 2:
            break
        page.wait_for_timeout(10)
    assert console_errors[0].startswith("console: boom")
    assert console_errors[1] == "uncaught: late"
    console_errors.clear()  # expected here: the test passes


def test_the_ui_folder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CONVEYOR_UI_DIR", raising=False)
    assert Settings.from_env().ui_dir == DEFAULT_UI_DIR == Path(__file__).resolve().parents[2] / "ui"
    monkeypatch.setenv("CONVEYOR_UI_DIR", str(tmp_path))
    assert Settings.from_env().ui_dir == tmp_path
    monkeypatch.setenv("CONVEYOR_UI_DIR", "")
    assert Settings.from_env().ui_dir is None
