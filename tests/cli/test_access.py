"""`conveyor keys`, `conveyor audit`, run comments and webhooks against a real server: keys made
in the database work (and stop working) over the API at once, the audit log shows refusals,
and every command says what went wrong with the documented exit code."""

from __future__ import annotations

import time
from typing import Any

from tests.cli.conftest import Cli, Result
from tests.cli.test_runs import gated

# A key revoked in the database stops working once the server's 5 s token cache has passed.
REVOKE_DEADLINE = 30.0


def keys(cli: Cli, *args: str) -> Result:
    return cli.raw("keys", *args, "--db-url", cli.db_url)


def new_key(cli: Cli, name: str, project: str, role: str, *extra: str) -> str:
    created = keys(cli, "create", "--name", name, "--project", project, "--role", role, *extra)
    assert created.code == 0, created.err
    token = created.out.splitlines()[-1]
    assert token.startswith("cvk_") and len(token) > 40
    return token


def as_key(cli: Cli, token: str, *args: str) -> Result:
    return cli.raw("--address", cli.address, "--token", token, *args)


def test_a_key_created_in_the_database_acts_with_its_role_and_project(cli: Cli, name: str) -> None:
    cli.apply({**gated(name), "project_id": "cli-web"})
    viewer = new_key(cli, f"{name}-viewer", "cli-web", "viewer")
    operator = new_key(cli, f"{name}-op", "cli-web", "operator")
    stranger = new_key(cli, f"{name}-other", "cli-other", "admin")

    listed = as_key(cli, viewer, "workflows", "list", "-o", "name")
    assert listed.code == 0, listed.err
    refused = as_key(cli, viewer, "runs", "trigger", name, "-p", "cli-web")
    assert refused.code == 4 and "ROLE_TOO_LOW" in refused.err
    run = as_key(cli, operator, "runs", "trigger", name, "-p", "cli-web", "-o", "json")
    assert run.code == 0, run.err
    run_id = run.json()["id"]
    assert run.json()["triggered_by"] == f"{name}-op"
    # A worker key of the project works tasks and reads nothing, not even the run.
    worker = new_key(cli, f"{name}-worker", "cli-web", "worker")
    unread = as_key(cli, worker, "runs", "get", run_id)
    assert unread.code == 4 and "ROLE_TOO_LOW" in unread.err
    # Another project's admin: the run is not there for it.
    hidden = as_key(cli, stranger, "runs", "get", run_id)
    assert hidden.code == 5 and "RUN_NOT_FOUND" in hidden.err
    assert run_id not in as_key(cli, stranger, "runs", "list", "-o", "name").out


def test_keys_list_never_shows_a_token_and_revoke_stops_the_key(cli: Cli, name: str) -> None:
    token = new_key(cli, name, "*", "viewer", "--expires-in", "30d")
    rows = {row["NAME"]: row for row in keys(cli, "list").rows()}
    assert rows[name]["ROLE"] == "viewer" and rows[name]["PROJECT"] == "*"
    assert rows[name]["TOKEN"] == token[:8] + "…" and rows[name]["EXPIRES"]
    assert token not in keys(cli, "list", "-o", "json").out
    assert as_key(cli, token, "workflows", "list").code == 0

    revoked = keys(cli, "revoke", name, "-o", "json")
    assert revoked.code == 0 and revoked.json()["revoked_at"]
    assert name not in {row["NAME"] for row in keys(cli, "list").rows()}
    assert name in {row["NAME"] for row in keys(cli, "list", "--all").rows()}
    # Revoked in the database, not through this server: it stops within the cache's 5 s.
    deadline = time.monotonic() + REVOKE_DEADLINE
    while (answer := as_key(cli, token, "workflows", "list")).code == 0:
        assert time.monotonic() < deadline, "a revoked key kept working"
        time.sleep(0.5)
    assert answer.code == 4 and "INVALID_TOKEN" in answer.err


def test_keys_commands_refuse_bad_input_with_its_exit_code(cli: Cli, name: str) -> None:
    new_key(cli, name, "web", "viewer")
    again = keys(cli, "create", "--name", name, "--project", "web", "--role", "viewer")
    assert again.code == 1 and "KEY_ALREADY_EXISTS" in again.err
    assert keys(cli, "create", "--name", "x", "--project", "web", "--role", "root").code == 2
    assert keys(cli, "create", "--name", "x", "--project", "web", "--role", "viewer",
                "--expires-in", "soon").code == 2
    bad_name = keys(cli, "create", "--name", "no spaces", "--project", "web", "--role", "viewer")
    assert bad_name.code == 2 and "INVALID_KEY_NAME" in bad_name.err
    missing = keys(cli, "revoke", f"{name}-nope")
    assert missing.code == 5 and "KEY_NOT_FOUND" in missing.err
    assert not [r for r in keys(cli, "list", "--all").rows() if r["NAME"] in ("x", "no spaces")]


def test_audit_lists_writes_and_refusals_for_admins_only(cli: Cli, name: str) -> None:
    cli.apply(gated(name))
    viewer = new_key(cli, f"{name}-v", "*", "viewer")
    assert as_key(cli, viewer, "runs", "trigger", name).code == 4
    assert cli.run("runs", "trigger", f"{name}-missing").code == 5

    failures = cli.ok("audit", "--failures", "-n", "0", "-o", "json").json()
    mine = [e for e in failures if e["actor"] == f"{name}-v"]
    assert mine and mine[0]["code"] == "PERMISSION_DENIED" and mine[0]["reason"] == "ROLE_TOO_LOW"
    assert mine[0]["method"] == "WorkflowRunsService/TriggerWorkflowRun"
    assert any(e["resource_id"] == f"{name}-missing" and e["code"] == "NOT_FOUND" for e in failures)
    by_actor = cli.ok("audit", "--actor", f"{name}-v", "-n", "0").rows()
    assert by_actor and {r["ACTOR"] for r in by_actor} == {f"{name}-v"}
    refused = as_key(cli, viewer, "audit")
    assert refused.code == 4 and "ROLE_TOO_LOW" in refused.err


def test_comments_on_a_run(cli: Cli, name: str) -> None:
    cli.apply(gated(name))
    run = cli.trigger(name)
    added = cli.ok("runs", "comment", run["id"], "waiting on QA", "-o", "json").json()
    assert added["content"] == "waiting on QA" and added["seq"] > 0
    cli.ok("runs", "comment", run["id"], "QA done")
    listed: list[dict[str, Any]] = cli.ok("runs", "comments", run["id"], "-o", "json").json()
    assert [c["content"] for c in listed] == ["waiting on QA", "QA done"]
    events = cli.ok("runs", "events", run["id"], "-o", "json").json()
    assert [e["message"] for e in events if e["type"] == "run.comment"] == ["waiting on QA", "QA done"]
    empty = cli.run("runs", "comment", run["id"], "  ")
    assert empty.code == 1 and "content" in empty.err and "INVALID_ARGUMENT" in empty.err
    assert cli.run("runs", "comment", "no-such-run", "hi").code == 5


def test_webhook_rotate_prints_the_url_once_and_disable_turns_it_off(cli: Cli, name: str) -> None:
    cli.apply(gated(name))
    rotated = cli.ok("workflows", "webhook", "rotate", name)
    url = rotated.out.strip()
    assert "/v1/webhooks/whk_" in url
    shown = cli.ok("workflows", "get", name, "-o", "json").json()
    assert shown["webhook_enabled"] is True
    secret = url.rsplit("/", 1)[1]
    assert shown["webhook_url_hint"].endswith("…") and secret not in cli.ok(
        "workflows", "get", name, "-o", "json").out
    again = cli.ok("workflows", "webhook", "rotate", name).out.strip()
    assert again != url
    cli.ok("workflows", "webhook", "disable", name)
    assert "webhook_enabled" not in cli.ok("workflows", "get", name, "-o", "json").json()  # false
