"""The dashboard at scale: page loads in Debian's Chromium over 1,000,000 runs, and screenshots.

A fresh SQLite database is migrated and filled by bench/list.py's bulk loader (1,000,000 runs of
50 workflows in 10 projects), plus a few real runs made through the REST API (a workflow with an
approval that waits, one that completed, one that failed) so the run view has steps and events.
Then one `conveyor serve` with its Envoy serves the dashboard, and Playwright drives
/usr/bin/chromium (headless) through fresh browser contexts, the API key put in session storage
before the page loads (as the sign-in form would).

Each view is loaded `--samples` times, each time in a new context (nothing cached): the time is
from the start of the navigation to the view's content on screen (the list's first row, the
run's DAG, the workflow's steps). Printed: median and max next to the target, < 1 s.

Views: the runs list (newest first over all 1,000,000), the runs list filtered by project and
status, a run (DAG, header, events), a workflow (DAG, steps, versions), the keys and audit views.

`--screenshots DIR` also writes a PNG of each main view (light; the run view also dark) for the
README (docs/ holds the committed ones).

Run: .venv/bin/python bench/ui.py [--runs 1000000] [--samples 5] [--screenshots docs]
Exits 0 whether or not the target is met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import common
import httpx
from playwright.sync_api import Browser, Page, sync_playwright

from conveyor.storage.db import normalize_url
from conveyor.storage.migrate import migrate

list_bench = importlib.import_module("list")  # bench/list.py: its bulk loader

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TARGET_SECONDS = 1.0
VIEWPORT = {"width": 1360, "height": 860}

DEPLOY = {
    "name": "deploy-service",
    "description": "Build, check, wait for a person's approval, then ship",
    "variables": [{"name": "env", "default": "staging", "description": "where to ship"},
                  {"name": "version", "required": True, "description": "release to ship"}],
    "steps": [
        {"ref": "build", "kind": "noop", "config": {"output": {"sha": "3fa9c1e"}}},
        {"ref": "unit_tests", "kind": "noop", "depends_on": ["build"]},
        {"ref": "lint", "kind": "noop", "depends_on": ["build"]},
        {"ref": "approve", "kind": "approval", "depends_on": ["unit_tests", "lint"]},
        {"ref": "ship", "kind": "noop", "depends_on": ["approve"]},
        {"ref": "announce", "kind": "noop", "depends_on": ["ship"]},
    ],
}
NIGHTLY = {
    "name": "nightly-report",
    "description": "Collect the day's numbers and post them",
    "schedule": {"cron": "0 2 * * *", "timezone": "UTC"},
    "steps": [
        {"ref": "collect", "kind": "noop"},
        {"ref": "post", "kind": "http", "depends_on": ["collect"],
         "config": {"url": "http://127.0.0.1:9/report", "method": "POST"}},
    ],
}


def seed(base_url: str, headers: dict[str, str]) -> dict[str, str]:
    """Real workflows and runs for the run and workflow views: returns their ids by role."""
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        ids: dict[str, str] = {}
        for definition in (DEPLOY, NIGHTLY):
            response = http.post("/v1/workflows", json=definition)
            if response.status_code != 200:
                raise RuntimeError(f"creating {definition['name']}: {response.text}")
            ids[definition["name"]] = response.json()["id"]
        for name in ("waiting", "approved", "to-cancel"):
            run = http.post("/v1/workflows/deploy-service/runs",
                            json={"payload": {"env": "prod", "version": "2.4.1"},
                                  "tags": {"team": "web", "case": name}})
            run.raise_for_status()
            ids[name] = run.json()["id"]
        http.post("/v1/workflows/nightly-report/runs", json={}).raise_for_status()
        deadline = time.monotonic() + 20
        while http.get(f"/v1/workflow-runs/{ids['approved']}/steps").json()[3]["status"] != "waiting":
            if time.monotonic() > deadline:
                raise RuntimeError("the seeded run did not reach its approval")
            time.sleep(0.1)
        http.post(f"/v1/workflow-runs/{ids['approved']}/steps/approve/approve",
                  json={"comment": "looks good"}).raise_for_status()
        http.delete(f"/v1/workflow-runs/{ids['to-cancel']}").raise_for_status()
        http.post(f"/v1/workflow-runs/{ids['waiting']}/comments",
                  json={"content": "waiting for the release manager"}).raise_for_status()
        http.post("/v1/api-keys", json={"name": "ci-deployer", "project_id": "default",
                                        "role": "operator"}).raise_for_status()
        return ids


def open_view(browser: Browser, base_url: str, token: str, fragment: str, ready: str,
              dark: bool = False) -> tuple[Page, float]:
    """A fresh context signed in (the key in session storage before any script runs), the view
    loaded; returns the page and the seconds from navigation start to `ready` visible."""
    context = browser.new_context(base_url=base_url, viewport=VIEWPORT,
                                  color_scheme="dark" if dark else "light")
    context.add_init_script(f"sessionStorage.setItem('conveyor.token', {token!r});")
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    started = time.perf_counter()
    page.goto(f"/ui/#{fragment}")
    page.locator(ready).first.wait_for(state="visible", timeout=15_000)
    took = time.perf_counter() - started
    if errors:
        print(f"  page errors on {fragment}: {errors[:3]}")
    return page, took


VIEWS: list[tuple[str, str, str]] = [
    # (label, fragment, what shows that the view is loaded)
    ("runs list, all 1M runs, newest first", "/runs", "main table tbody tr"),
    ("runs list, project p3 + status failed", "/runs?project=p3&status=failed", "main table tbody tr"),
    ("run view (DAG, header, events)", "/runs/{waiting}", "main svg g"),
    ("workflow view (DAG, steps, versions)", "/workflows/{deploy-service}", "main svg g"),
    ("keys", "/keys", "main table tbody tr"),
    ("audit log", "/audit", "main table tbody tr"),
]
SHOTS: list[tuple[str, str, str, bool]] = [
    # (file, fragment, ready, dark)
    ("ui-runs.png", "/runs", "main table tbody tr", False),
    ("ui-run.png", "/runs/{waiting}", "main svg g", False),
    ("ui-run-dark.png", "/runs/{approved}", "main svg g", True),
    ("ui-workflow.png", "/workflows/{deploy-service}", "main svg g", False),
    ("ui-keys.png", "/keys", "main table tbody tr", False),
    ("ui-audit.png", "/audit", "main table tbody tr", False),
]


def drive(base_url: str, token: str, ids: dict[str, str], samples: int, shots: Path | None) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            print(f"page loads, {samples} each, every one in a new browser context "
                  f"(navigation start -> content visible):")
            worst = 0.0
            for label, fragment, ready in VIEWS:
                times = []
                for _ in range(samples):
                    page, took = open_view(browser, base_url, token, fragment.format(**ids), ready)
                    page.context.close()
                    times.append(took)
                worst = max(worst, max(times))
                print(f"  {label}: median {statistics.median(times) * 1000:.0f} ms, "
                      f"max {max(times) * 1000:.0f} ms (target < {TARGET_SECONDS * 1000:.0f} ms)")
            print(f"every load under {TARGET_SECONDS:g} s: {'yes' if worst < TARGET_SECONDS else 'NO'}")
            if shots is not None:
                shots.mkdir(parents=True, exist_ok=True)
                for name, fragment, ready, dark in SHOTS:
                    page, _ = open_view(browser, base_url, token, fragment.format(**ids), ready, dark)
                    page.wait_for_timeout(300)  # fonts and the DAG's layout settle
                    page.screenshot(path=str(shots / name))
                    page.context.close()
                print(f"screenshots: {', '.join(s[0] for s in SHOTS)} in {shots}")
        finally:
            browser.close()


async def main(runs: int, samples: int, shots: Path | None) -> None:
    common.cancel_on_sigterm()
    base = (datetime.now(UTC) - timedelta(days=list_bench.DAYS)).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-ui-") as tmp:
        data_dir = Path(tmp)
        url = f"sqlite+aiosqlite:///{data_dir / 'conveyor.db'}"
        await migrate(url)
        t0 = time.perf_counter()
        await asyncio.to_thread(list_bench.load_sqlite, Path(normalize_url(url).database or ""), runs, base)
        print(f"ui bench: loaded {runs:,} runs in {time.perf_counter() - t0:.0f} s (SQLite)")
        async with common.spawn_server_on(url, data_dir, envoy=True) as served:
            token = (data_dir / "admin.token").read_text().strip()
            headers = {"authorization": f"Bearer {token}"}
            ids: dict[str, Any] = await asyncio.to_thread(seed, served.rest_url, headers)
            await asyncio.to_thread(drive, served.rest_url, token, ids, samples, shots)
        common.print_server_problems(data_dir / "server.log")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, default=None, help="write the README's PNGs here")
    args = parser.parse_args()
    sys.exit(common.run_bench(main(args.runs, args.samples, args.screenshots)))
