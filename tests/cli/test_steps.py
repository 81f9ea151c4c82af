"""`conveyor steps ...` against a real server: approve, input, skip, force-complete, retry,
replay and list, each with the fields its RPC takes."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.cli.conftest import Cli


def waiting(name: str) -> dict[str, Any]:
    """build, then an approval gate and an input step side by side, then ship."""
    return {"name": name, "steps": [
        {"ref": "build", "kind": "noop"},
        {"ref": "gate", "kind": "approval", "depends_on": ["build"]},
        {"ref": "answer", "kind": "input", "depends_on": ["build"]},
        {"ref": "ship", "kind": "noop", "depends_on": ["gate", "answer"]}]}


def test_approve_and_input_complete_the_run(cli: Cli, name: str) -> None:
    cli.apply(waiting(name))
    run = cli.trigger(name)["id"]

    approved = cli.run("steps", "approve", run, "gate", "--comment", "looks good")
    assert approved.code == 0, approved.err
    gate = cli.steps(run)["gate"]
    assert gate["status"] == "completed" and gate["output"]["comment"] == "looks good"
    assert cli.run("steps", "approve", run, "gate").code == 3  # not waiting any more

    data = cli.home / "answer.json"
    data.write_text(json.dumps({"version": 7, "region": "eu"}))
    cli.ok("steps", "input", run, "answer", "--data", f"@{data}")
    steps = cli.steps(run)
    assert steps["answer"]["output"] == {"version": 7, "region": "eu"}
    assert steps["ship"]["status"] == "completed"
    assert cli.get_run(run)["status"] == "completed"


def test_input_needs_a_json_object(cli: Cli, name: str) -> None:
    cli.apply(waiting(name))
    run = cli.trigger(name)["id"]
    assert cli.run("steps", "input", run, "answer").code == 2  # --data is required
    assert cli.run("steps", "input", run, "answer", "--data", "3").code == 2
    assert cli.steps(run)["answer"]["status"] == "waiting"


def test_skip_with_reason_and_force_complete_with_result(cli: Cli, name: str) -> None:
    cli.apply(waiting(name))
    run = cli.trigger(name)["id"]

    cli.ok("steps", "skip", run, "gate", "--reason", "not needed today")
    gate = cli.steps(run)["gate"]
    assert gate["status"] == "skipped" and gate["skip_reason"] == "not needed today"

    cli.ok("steps", "force-complete", run, "answer", "--result", '{"version": 8}')
    answer = cli.steps(run)["answer"]
    assert answer["status"] == "completed" and answer["output"] == {"version": 8}
    assert cli.run("steps", "force-complete", run, "answer").code == 3  # already completed


def test_retry_a_failed_step_resumes_its_run(cli: Cli, name: str) -> None:
    target = f"{name}-child"
    cli.apply({"name": name, "steps": [
        {"ref": "child", "kind": "workflow", "config": {"workflow_id": target}},
        {"ref": "after", "kind": "noop", "depends_on": ["child"]}]})
    failed = cli.run("runs", "trigger", name, "--wait", "-o", "json")
    assert failed.code == 1
    run = failed.json()["id"]
    assert cli.steps(run)["child"]["status"] == "failed"

    cli.apply({"name": target, "steps": [{"ref": "a", "kind": "noop"}]})
    retried = cli.run("steps", "retry", run, "child", "-o", "json")
    assert retried.code == 0, retried.err
    step = retried.json()
    assert step["step_ref"] == "child" and step["status"] == "queued"
    assert cli.run("steps", "retry", run, "after").code == 3  # never failed

    deadline = time.monotonic() + 15
    while cli.get_run(run)["status"] != "completed":
        assert time.monotonic() < deadline, cli.steps(run)
        time.sleep(0.2)
    assert cli.steps(run)["child"]["attempt"] == 2


def test_replay_resets_the_step_and_those_after_it(cli: Cli, name: str) -> None:
    cli.apply({"name": name, "steps": [
        {"ref": "a", "kind": "noop"},
        {"ref": "b", "kind": "noop", "depends_on": ["a"]},
        {"ref": "gate", "kind": "approval", "depends_on": ["b"]}]})
    run = cli.trigger(name)["id"]

    result = cli.run("steps", "replay", run, "a")
    assert result.code == 0, result.err
    assert "3 steps reset" in result.out
    assert cli.steps(run)["gate"]["status"] == "waiting"  # a and b ran again, the gate waits again


def test_steps_of_a_missing_run_or_step_are_not_found(cli: Cli, name: str) -> None:
    cli.apply(waiting(name))
    run = cli.trigger(name)["id"]
    assert cli.run("steps", "approve", "no-such-run", "gate").code == 5
    missing = cli.run("steps", "approve", run, "no-such-step")
    assert missing.code == 5 and missing.err.startswith("error: ")
    assert cli.run("steps", "list", "no-such-run").code == 5


def test_list_steps(cli: Cli, name: str) -> None:
    cli.apply(waiting(name))
    run = cli.trigger(name)["id"]
    rows = {r["STEP"]: r for r in cli.ok("steps", "list", run).rows()}
    assert rows["build"]["STATUS"] == "completed" and rows["gate"]["STATUS"] == "waiting"
    assert rows["gate"]["KIND"] == "approval"
    names = cli.ok("steps", "list", run, "-o", "name").out.split()
    assert sorted(names) == ["answer", "build", "gate", "ship"]
