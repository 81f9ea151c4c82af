"""The workflows views in a real browser (Playwright driving Debian's Chromium): open a workflow
from the list and see its DAG, steps and schedule with its next fire time (pause it from the
page), trigger a run from the form generated from its variables (the run gets the typed
payload, checked through REST), diff two versions, archive behind the confirmation."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Page, expect

from tests.ui.support import TIMEOUT_MS, Rest, sign_in

pytestmark = pytest.mark.browser


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def release(name: str, **extra: Any) -> dict[str, Any]:
    """build -> (check, soak) -> done; the kinds are instant so its runs finish at once."""
    return {"name": name, "description": "build, check, ship", "steps": [
        {"ref": "build", "kind": "noop", "config": {"output": {"sha": "abc"}}},
        {"ref": "check", "kind": "condition", "depends_on": ["build"], "config": {"expression": "true"}},
        {"ref": "soak", "kind": "noop", "depends_on": ["build"]},
        {"ref": "done", "kind": "noop", "depends_on": ["check", "soak"], "when": "true"},
    ], **extra}


def test_open_a_workflow_see_its_dag_and_schedule_and_pause_it(page: Page, ui_server: Any,
                                                               rest: Rest) -> None:
    name = unique("ui_sched")
    wf = rest.call("POST", "/v1/workflows", release(name, schedule={"cron": "0 0 1 1 *", "timezone": "UTC"}))

    sign_in(page, ui_server, "#/workflows")
    page.get_by_role("link", name=name, exact=True).click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible(timeout=TIMEOUT_MS)

    # The DAG: one node per step, one edge per dependency.
    dag = page.get_by_role("group", name=f"Steps of {name}")
    expect(dag.locator("g.dag-node")).to_have_count(4)
    expect(dag.locator("path.dag-edge")).to_have_count(4)
    expect(dag.locator('g[data-ref="check"]')).to_have_attribute("aria-label",
                                                                 "Step check: condition, after build")
    # A node is reachable by keyboard and picks its row in the steps table.
    dag.locator('g[data-ref="soak"]').focus()
    page.keyboard.press("Enter")
    expect(page.locator("tr#step-soak")).to_have_class("selected")
    expect(page.locator("tr#step-done td").nth(1)).to_have_text("check, soak")
    expect(page.locator("tr#step-done td").nth(2)).to_have_text("true")

    # The schedule and its next fire time, in the browser's time zone.
    zone = page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone")
    fire = datetime.fromisoformat(wf["next_fire_at"].replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    expect(page.locator(".wf-schedule")).to_contain_text("0 0 1 1 *")
    expect(page.locator(".next-fire")).to_have_text(fire.strftime("%Y-%m-%d %H:%M:%S"))

    page.get_by_role("button", name="Pause schedule").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Pause the schedule")
    dialog.get_by_role("button", name="Pause schedule").click()
    expect(page.get_by_role("button", name="Resume schedule")).to_be_visible(timeout=TIMEOUT_MS)
    got = rest.call("GET", f"/v1/workflows/{wf['id']}")
    assert got["schedule_paused"] is True and "next_fire_at" not in got


def test_trigger_a_run_from_the_generated_form(page: Page, ui_server: Any, rest: Rest) -> None:
    name = unique("ui_trigger")
    rest.call("POST", "/v1/workflows", release(name, variables=[
        {"name": "service", "required": True, "description": "what to ship"},
        {"name": "replicas", "default": 3},
        {"name": "canary", "default": False},
        {"name": "env", "default": "prod"},
        {"name": "extra", "default": {"a": 1}},
        {"name": "note"},  # optional, no default: the person picks its type
        {"name": "unused"},
    ]))

    sign_in(page, ui_server, f"#/workflows/{name}?tab=trigger")
    form = page.locator("form.trigger-form")
    service = form.get_by_role("textbox", name=re.compile(r"^service"))
    expect(service).to_have_attribute("required", "")
    replicas = form.get_by_role("spinbutton", name=re.compile(r"^replicas"))
    expect(replicas).to_have_value("3")
    canary = form.get_by_role("checkbox", name=re.compile(r"^canary"))
    expect(canary).not_to_be_checked()
    expect(form.get_by_role("textbox", name=re.compile(r"^env"))).to_have_value("prod")

    # The browser will not submit without the required variable.
    form.get_by_role("button", name="Start run").click()
    assert service.evaluate("e => e.validity.valueMissing") is True
    page.wait_for_timeout(200)
    assert page.url.endswith("?tab=trigger")
    service.fill("api")
    replicas.fill("5")
    canary.check()
    form.get_by_role("textbox", name=re.compile(r"^extra")).fill('{"b": [1, 2]}')
    form.get_by_label("Type of note").select_option("number")
    form.get_by_role("spinbutton", name=re.compile(r"^note")).fill("7.5")
    form.get_by_label("Tags").fill("team=web, ticket:42")
    form.get_by_label("Idempotency key").fill(unique("idem"))
    form.get_by_role("button", name="Start run").click()

    page.wait_for_url(re.compile(r"#/runs/[^/?]+$"), timeout=TIMEOUT_MS)
    run_id = page.url.rsplit("/", 1)[1]
    run = rest.call("GET", f"/v1/workflow-runs/{run_id}")
    assert run["payload"] == {"service": "api", "replicas": 5, "canary": True, "env": "prod",
                              "extra": {"b": [1, 2]}, "note": 7.5}
    assert run["tags"] == {"team": "web", "ticket": "42"}


def test_diff_two_versions(page: Page, ui_server: Any, rest: Rest) -> None:
    name = unique("ui_versions")
    v1 = rest.call("POST", "/v1/workflows", release(name))
    second = release(name)
    second["steps"][0]["config"]["output"]["sha"] = "def"
    second["steps"].append({"ref": "announce", "kind": "noop", "depends_on": ["done"]})
    rest.call("PUT", f"/v1/workflows/{v1['id']}", second)
    rest.call("PUT", f"/v1/workflows/{v1['id']}", {**second, "description": "third"})

    sign_in(page, ui_server, f"#/workflows/{v1['id']}?tab=versions")
    rows = page.locator("table.compact tbody tr")
    expect(rows).to_have_count(3, timeout=TIMEOUT_MS)
    expect(rows.locator("td:first-child")).to_have_text([re.compile(r"^3"), "2", "1"])

    page.get_by_role("link", name="Compare version 2 with version 1").click()
    expect(page).to_have_url(re.compile(r"from=1&to=2"))
    diff = page.get_by_role("table", name=re.compile(r"Changes from version 1 to version 2"))
    expect(diff.locator("tr.diff-del")).to_contain_text(['"sha": "abc"'])
    expect(diff.locator("tr.diff-add").filter(has_text='"sha": "def"')).to_have_count(1)
    expect(diff.locator("tr.diff-add").filter(has_text='"ref": "announce"')).to_have_count(1)
    expect(diff.locator("tr.diff-del").filter(has_text="announce")).to_have_count(0)

    # Any two versions by number; the same one twice is identical.
    page.get_by_role("spinbutton", name="From version").fill("2")
    page.get_by_role("spinbutton", name="To version").fill("3")
    page.get_by_role("button", name="Compare").click()
    diff = page.get_by_role("table", name=re.compile(r"Changes from version 2 to version 3"))
    expect(diff.locator("tr.diff-del")).to_have_text([re.compile('"description": "build, check, ship"')])
    expect(diff.locator("tr.diff-add")).to_have_text([re.compile('"description": "third"')])
    page.get_by_role("spinbutton", name="From version").fill("3")
    page.get_by_role("button", name="Compare").click()
    expect(page.get_by_role("status").filter(has_text="identical")).to_be_visible()

    # An older version's definition is viewable: its DAG lacks the step added later.
    page.get_by_role("row").filter(has=page.get_by_role("cell", name="1", exact=True)).get_by_role(
        "link", name="View").click()
    expect(page.get_by_text("Showing version 1")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("g.dag-node")).to_have_count(4)


def test_archive_behind_the_confirmation(page: Page, ui_server: Any, rest: Rest) -> None:
    name = unique("ui_archive")
    wf = rest.call("POST", "/v1/workflows", release(name))

    sign_in(page, ui_server, f"#/workflows/{wf['id']}")
    page.get_by_role("button", name="Archive…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("No new runs start")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert rest.call("GET", f"/v1/workflows/{wf['id']}")["archived"] is False

    page.get_by_role("button", name="Archive…").click()
    page.get_by_role("dialog").get_by_role("button", name="Archive").click()
    expect(page.locator(".run-title .status")).to_have_text("archived", timeout=TIMEOUT_MS)
    assert rest.call("GET", f"/v1/workflows/{wf['id']}")["archived"] is True
    page.get_by_role("link", name="Trigger a run").click()
    expect(page.get_by_role("button", name="Start run")).to_be_disabled()
