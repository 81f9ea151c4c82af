"""`conveyor events` against a real server: send (with a payload, a key and an id; again with
the same id; with another body) starts the listening workflow's run once, list filters by name
and key newest first, and refusals say why with their exit codes."""

from __future__ import annotations

from tests.cli.conftest import Cli


def test_send_starts_the_listening_workflow_once_and_list_shows_it(cli: Cli, name: str) -> None:
    event = f"{name}.paid"
    cli.apply({"name": name, "steps": [{"ref": "a", "kind": "noop"}],
               "on_events": [{"name": event, "when": "event.payload.total > 1"}]})
    sent = cli.ok("events", "send", event, "-k", "cust-1", "--payload", '{"total": 5}', "--id", f"{name}-1",
                  "-o", "json").json()
    got = (sent["id"], sent["key"], sent["started"], sent["payload"])
    assert got == (f"{name}-1", "cust-1", 1, {"total": 5})
    again = cli.ok("events", "send", event, "-k", "cust-1", "--payload", '{"total": 5}', "--id", f"{name}-1",
                   "-o", "json").json()
    assert again == sent
    table = cli.ok("events", "send", event, "--payload", '{"total": 0}')
    assert table.rows()[0]["NAME"] == event and table.rows()[0]["STARTED"] == "0"

    runs = cli.ok("runs", "list", "--workflow", name, "-o", "json").json()
    assert [(r["triggered_by"], r["entity_id"]) for r in runs] == [("event", "cust-1")]

    listed = cli.ok("events", "list", "--name", event, "-o", "json").json()
    assert [e.get("key", "") for e in listed] == ["", "cust-1"]
    keyed = cli.ok("events", "list", "--name", event, "-k", "cust-1", "-o", "name")
    assert keyed.out.split() == [f"{name}-1"]


def test_refusals_say_why(cli: Cli, name: str) -> None:
    reused = cli.run("events", "send", f"{name}.x", "--id", f"{name}-r")
    assert reused.code == 0
    conflict = cli.run("events", "send", f"{name}.x", "-k", "other", "--id", f"{name}-r")
    assert conflict.code == 1 and "IDEMPOTENCY_KEY_REUSED" in conflict.err
    bad = cli.run("events", "send", "has space")
    assert bad.code == 1 and "INVALID_EVENT" in bad.err
    not_object = cli.run("events", "send", f"{name}.x", "--payload", "[1]")
    assert not_object.code == 2
