"""Fixtures for the dashboard's browser tests: one `conveyor serve` with its Envoy for the whole
session, Debian's Chromium driven by Playwright (sync API), and a fresh browser context per test
that fails the test when the page logs a console error or throws.

- `ui_server` (session): the served Conveyor — `base_url` (the dashboard at `base_url + "/ui/"`,
  the REST API beside it), `token` (its admin key), `headers`, `data_dir`, `log()`. One SQLite
  database for every test of the session: tests name what they create uniquely.
- `browser` (tests/ui): Chromium from /usr/bin/chromium, headless (Playwright never downloads a
  browser here: `.ci/run` installs Debian's `chromium` package when it is missing); stopped
  when the folder's tests end, so no test elsewhere runs beside Playwright's event loop.
- `page` (per test): a page in a new context (no cookies or session storage shared with other
  tests) whose relative URLs resolve against `ui_server.base_url` (`page.goto("/ui/")`).
- `console_errors` (per test): what the page logged as errors (console errors, uncaught
  exceptions, failed resource loads, CSP refusals). The test fails if it is not empty when the
  test body ends; a test that provokes an error on purpose asserts on it, then clears the list.

Every test that uses `browser` or `page` is marked `browser` (the PostgreSQL pass deselects
them: the dashboard does not depend on the backend, and the server here is SQLite anyway).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.auth import FirstStartAdmin
from tests.ui.support import Rest

CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium as root on a closed network: no sandbox (root), no GPU, and none of the
# background connections (QUIC, component updates, sync) that the network would refuse.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A cold start (migrations, Envoy) takes about a second; leave room for a loaded CI machine.
START_TIMEOUT = 30.0
# Playwright's wait for an element or a navigation, unless a call says otherwise.
DEFAULT_TIMEOUT_MS = 10_000


@dataclass
class UiServer(FirstStartAdmin):
    """A running `conveyor serve` (with Envoy) serving the repository's ui/ folder."""

    proc: subprocess.Popen[bytes]
    base_url: str  # http://127.0.0.1:PORT: the dashboard under /ui/, the REST API under /v1/
    data_dir: Path
    log_path: Path


    def log(self) -> str:
        """What the server wrote on stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    root = tmp_path_factory.mktemp("ui_server")
    data_dir, log_path = root / "data", root / "server.log"
    args = [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", "0", "--http-port", "0",
            "--db-url", f"sqlite:///{data_dir / 'conveyor.db'}", "--data-dir", str(data_dir)]
    # The output goes to a file (a pipe nobody reads after the start could fill up and block it).
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (m := re.search(r"REST on (\S+)", log_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"conveyor serve did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield UiServer(proc, m.group(1), data_dir, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does), "
                    "or deselect these tests with -m 'not browser'")
    playwright = sync_playwright().start()
    loop = asyncio._get_running_loop()  # Playwright's, see _LOOP_ASIDE below
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=CHROMIUM_ARGS)
        yield chromium
    finally:
        # This teardown may run at the end of a test that set Playwright's loop aside.
        asyncio._set_running_loop(loop)
        playwright.stop()  # closes the browser too
        asyncio._set_running_loop(None)


@pytest.fixture
def console_errors() -> list[str]:
    return []


@pytest.fixture
def page(browser: Browser, ui_server: UiServer, console_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context(base_url=ui_server.base_url)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    tab = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url", "")
            console_errors.append(f"console: {message.text}" + (f" ({where})" if where else ""))

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: console_errors.append(f"uncaught: {error}"))
    try:
        yield tab
    finally:
        context.close()


# Playwright's sync API keeps its event loop marked as the thread's running loop between calls
# (playwright/_impl/_greenlets.py: its dispatcher resumes inside that loop). While the browser
# lives, an async test could then not start its own loop; so around every other test of this
# folder the mark is set aside, and put back for the browser's next call.
_LOOP_ASIDE = pytest.StashKey["asyncio.AbstractEventLoop | None"]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if "browser" not in getattr(item, "fixturenames", ()):
        item.stash[_LOOP_ASIDE] = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        loop = item.stash.get(_LOOP_ASIDE, None)
        if loop is not None and not loop.is_closed():  # closed: the browser was stopped
            asyncio._set_running_loop(loop)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A browser test whose page logged errors fails; the errors are in its report either way."""
    found = getattr(item, "funcargs", {}).get("console_errors")
    errors: list[str] = found if found is not None else []
    try:
        result = yield
    finally:
        if errors:
            item.add_report_section("call", "page errors", "\n".join(errors))
    if errors:
        pytest.fail("the page logged errors:\n" + "\n".join(errors), pytrace=False)
    return result


@pytest.fixture
def rest(ui_server: UiServer) -> Rest:
    """The served REST API with the admin token."""
    return Rest(ui_server.base_url, ui_server.token)
