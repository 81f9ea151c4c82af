"""The runs views in a real browser (Playwright driving Debian's Chromium): sign in, filter the
runs list by status (the URL holds the filter), open a run and approve its waiting step through
the UI (the DAG node and the header turn completed without a reload), bulk-cancel two runs from
the list (the counts the API returned are shown). Each checks the DOM and the API's state."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.ui.support import TIMEOUT_MS, Rest, sign_in

pytestmark = pytest.mark.browser


def gated_workflow(rest: Rest) -> str:
    """A workflow whose runs wait on an approval step `ok` after a noop `build`."""
    name = f"ui_gated_{uuid.uuid4().hex[:8]}"
    rest.call("POST", "/v1/workflows", {"name": name, "description": "waits for a person", "steps": [
        {"ref": "build", "kind": "noop"},
        {"ref": "ok", "kind": "approval", "depends_on": ["build"]},
        {"ref": "ship", "kind": "noop", "depends_on": ["ok"]},
    ]})
    return name


def row(page: Page, run_id: str) -> Any:
    return page.locator(f'tr[data-run-id="{run_id}"]')


def test_filter_runs_by_status_in_the_url(page: Page, ui_server: Any, rest: Rest) -> None:
    gated = gated_workflow(rest)
    waiting = rest.trigger(gated)
    done = rest.trigger(gated)
    rest.call("DELETE", f"/v1/workflow-runs/{done['id']}")

    sign_in(page, ui_server, f"#/runs?workflow={gated}")
    expect(row(page, waiting["id"])).to_be_visible(timeout=TIMEOUT_MS)
    expect(row(page, done["id"])).to_be_visible()

    page.get_by_role("checkbox", name="running", exact=True).check()
    expect(page).to_have_url(re.compile(r"status=running"), timeout=TIMEOUT_MS)
    expect(row(page, done["id"])).to_have_count(0, timeout=TIMEOUT_MS)
    expect(row(page, waiting["id"]).locator('[data-field="status"]')).to_have_text("running")

    # The filter lives in the URL: a reload (or a shared link) shows the same list.
    page.reload()
    expect(page.get_by_role("checkbox", name="running", exact=True)).to_be_checked(timeout=TIMEOUT_MS)
    expect(row(page, waiting["id"])).to_be_visible(timeout=TIMEOUT_MS)
    expect(row(page, done["id"])).to_have_count(0)
    assert "workflow=" + gated in page.url


def test_open_a_run_and_approve_it_live(page: Page, ui_server: Any, rest: Rest) -> None:
    gated = gated_workflow(rest)
    run = rest.trigger(gated, tags={"team": "web"})
    sign_in(page, ui_server, f"#/runs?workflow={gated}")
    page.get_by_role("link", name=run["id"]).click()

    node = page.locator('.dag-node[data-ref="ok"]')
    expect(node).to_have_attribute("data-status", "waiting", timeout=TIMEOUT_MS)
    expect(page.locator('[data-field="run-status"]')).to_have_text("running")
    page.evaluate("window.__notReloaded = true")

    node.focus()
    page.keyboard.press("Enter")  # the node opens the step drawer from the keyboard
    drawer = page.get_by_role("complementary", name=re.compile("Step ok"))
    expect(drawer).to_be_visible()
    drawer.get_by_role("button", name="Approve").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label(re.compile("Comment")).fill("looks good")
    dialog.get_by_role("button", name="Approve").click()
    expect(dialog).to_have_count(0, timeout=TIMEOUT_MS)

    # The watch brings the change: node, drawer and header turn completed with no reload.
    expect(node).to_have_attribute("data-status", "completed", timeout=TIMEOUT_MS)
    expect(page.locator('.dag-node[data-ref="ship"]')).to_have_attribute("data-status", "completed")
    expect(page.locator('[data-field="run-status"]')).to_have_text("completed", timeout=TIMEOUT_MS)
    expect(page.locator('[data-conn="ended"]')).to_be_visible(timeout=TIMEOUT_MS)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("table.events")).to_contain_text("step.completed ok")

    after = rest.run(run["id"])
    assert after["status"] == "completed"
    assert after["output"]["ok"]["comment"] == "looks good"
    assert after["output"]["ok"]["approved_by"]


def test_bulk_cancel_two_waiting_runs(page: Page, ui_server: Any, rest: Rest) -> None:
    gated = gated_workflow(rest)
    first, second = rest.trigger(gated), rest.trigger(gated)
    untouched = rest.trigger(gated)
    sign_in(page, ui_server, f"#/runs?workflow={gated}")
    for r in (first, second):
        row(page, r["id"]).get_by_role("checkbox").check()
    page.get_by_role("button", name="Cancel selected").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Cancel 2 runs")
    dialog.get_by_role("button", name="Cancel 2 runs").click()

    expect(page.locator('[data-field="bulk-result"]')).to_have_text(
        "Bulk cancel: 2 canceled, 0 failed.", timeout=TIMEOUT_MS)
    for r in (first, second):
        status = row(page, r["id"]).locator('[data-field="status"]')
        expect(status).to_have_text("canceled", timeout=TIMEOUT_MS)
        assert rest.run(r["id"])["status"] == "canceled"
    assert rest.run(untouched["id"])["status"] == "running"
    expect(row(page, untouched["id"]).locator('[data-field="status"]')).to_have_text("running")


def _first_frame(rest: Rest, run_id: str) -> str:
    """The first SSE frame of the run's watch as served now (its snapshot), as sent."""
    request = urllib.request.Request(f"{rest.base_url}/v1/workflow-runs/{run_id}/watch", headers={
        "Authorization": f"Bearer {rest.token}", "Accept": "text/event-stream"})
    with urllib.request.urlopen(request, timeout=10) as response:
        frame = ""
        while not frame.endswith("\n\n"):
            frame += response.readline().decode()
        return frame


def test_a_watch_cut_short_before_the_final_event_resumes_and_ends_though_a_comment_follows(
        page: Page, ui_server: Any, rest: Rest) -> None:
    """The page's first watch ends cleanly after a snapshot of the run still waiting (as a server
    going away would end it); by then the run completed and got a comment. The dashboard does
    not take that end for the run's: the run is not final, so it resumes after the snapshot's
    seq, gets the final event and the comment, and then shows the run final and the watch over."""
    gated = gated_workflow(rest)
    run = rest.trigger(gated)
    stale = _first_frame(rest, run["id"])  # running, `ok` waiting
    assert '"waiting"' in stale
    rest.call("POST", f"/v1/workflow-runs/{run['id']}/steps/ok/approve", {})
    for _ in range(100):
        if rest.run(run["id"])["status"] == "completed":
            break
        time.sleep(0.1)
    rest.call("POST", f"/v1/workflow-runs/{run['id']}/comments", {"content": "after the end"})

    cut = []

    def first_watch_cut_short(route: Any) -> None:
        if "after_seq" in route.request.url:
            route.continue_()
            return
        cut.append(route.request.url)
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=stale)

    page.route(re.compile(r".*/v1/workflow-runs/[^/]+/watch.*"), first_watch_cut_short)
    sign_in(page, ui_server, f"#/runs/{run['id']}")
    expect(page.locator('[data-field="run-status"]')).to_have_text("completed", timeout=TIMEOUT_MS)
    expect(page.locator('.dag-node[data-ref="ok"]')).to_have_attribute("data-status", "completed")
    expect(page.locator('[data-conn="ended"]')).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("table.events")).to_contain_text("after the end", timeout=TIMEOUT_MS)
    assert len(cut) == 1
