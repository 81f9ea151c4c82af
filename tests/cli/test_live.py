"""The live views' reducer without a server: DAG order, and how each kind of RunEvent changes a
run and its steps (and when the view must re-fetch the step list instead)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from conveyor.cli.live import ProjectView, RunView, dag_order
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb


def test_dag_order_is_topological_with_ties_in_listed_order() -> None:
    deps = {"ship": ["gate"], "gate": ["test", "lint"], "test": ["build"], "lint": ["build"], "build": []}
    listed = ["ship", "gate", "test", "build", "lint"]
    assert dag_order(listed, deps) == ["build", "test", "lint", "gate", "ship"]
    # Unknown dependencies are ignored; of the steps ready at once, the one listed first goes first.
    assert dag_order(["b", "a", "extra"], {"b": ["a", "gone"]}) == ["a", "b", "extra"]
    # A cycle cannot be ordered: its steps follow the others, as listed.
    assert dag_order(["x", "y", "z"], {"x": ["y"], "y": ["x"]}) == ["z", "x", "y"]


def _snapshot() -> Any:
    return json_format.ParseDict({
        "run": {"id": "r1", "workflow_name": "deploy", "status": "running",
                "started_at": "2026-01-01T00:00:00Z"},
        "steps": [
            {"step_ref": "build", "kind": "noop", "status": "completed", "attempt": 1,
             "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"},
            {"step_ref": "work", "kind": "task", "status": "queued", "attempt": 0},
            {"step_ref": "gate", "kind": "approval", "status": "pending"},
        ],
        "seq": 3,
    }, runs_pb.RunSnapshot())


def _event(seq: int, type_: str, step_ref: str = "", status: str = "", message: str = "",
           data: dict[str, Any] | None = None) -> Any:
    return json_format.ParseDict({"seq": seq, "type": type_, "step_ref": step_ref, "status": status,
                                  "message": message, "data": data or {}, "at": "2026-01-01T00:00:05Z"},
                                 pb.RunEvent())


def test_events_change_the_steps_and_the_run() -> None:
    view = RunView(_snapshot(), {"work": ["build"], "gate": ["work"]})
    assert view.order == ["build", "work", "gate"]

    assert view.apply(_event(4, "step.running", "work", "running", data={"attempt": 1, "worker_id": "w1"}))
    work = view.steps["work"]
    assert (work.status, work.attempt, work.worker_id) == (pb.StepStatus.running, 1, "w1")
    assert work.started_at.ToJsonString() == "2026-01-01T00:00:05Z" and not work.HasField("finished_at")

    # A failed attempt that will be retried goes back to the queue, then runs as attempt 2.
    assert view.apply(_event(5, "step.queued", "work", "queued", "retry in 1s",
                             data={"attempt": 1, "error": "boom"}))
    assert view.steps["work"].status == pb.StepStatus.queued
    assert view.apply(_event(6, "step.failed", "work", "failed", data={"attempt": 2, "error": "boom again"}))
    work = view.steps["work"]
    assert (work.status, work.attempt, work.error) == (pb.StepStatus.failed, 2, "boom again")
    assert work.HasField("finished_at")

    assert view.apply(_event(7, "run.comment", message="looking"))
    assert view.run.status == pb.RunStatus.running
    assert view.apply(_event(8, "run.failed", status="failed", message="step 'work' failed"))
    assert view.finished and not view.completed
    assert view.run.error == "step 'work' failed" and view.run.HasField("finished_at")
    assert view.seq == 8 and view.last_event == "run.failed step 'work' failed"


def test_an_event_that_lacks_what_the_view_needs_asks_for_a_refetch() -> None:
    view = RunView(_snapshot())
    # An attempt started, but the event does not say which: the attempt shown would be stale.
    assert not view.apply(_event(4, "step.running", "work", "running"))
    # A replay resets several steps and says none of their statuses.
    assert not view.apply(_event(5, "step.replayed", "work", message="replayed by admin"))
    # A step the view never saw.
    assert not view.apply(_event(6, "step.completed", "other", "completed", data={"attempt": 1}))
    # Skipping needs no attempt.
    assert view.apply(_event(7, "step.skipped", "gate", "skipped", "not needed"))
    assert view.steps["gate"].skip_reason == "not needed"

    listed = [pb.StepRun(step_ref="work", status=pb.StepStatus.running, attempt=3)]
    view.replace_steps(listed)
    assert list(view.steps) == ["work"] and view.steps["work"].attempt == 3


def test_plain_lines() -> None:
    view = RunView(_snapshot(), {"work": ["build"], "gate": ["work"]})
    lines = view.snapshot_lines()
    assert lines[0].startswith("run r1 (deploy): running ")
    assert lines[1:] == ["  step build: completed attempt 1 0ms", "  step work: queued attempt 0 needs build",
                         "  step gate: pending attempt 0 needs work"]
    event = _event(4, "step.completed", "gate", "completed", "approved by ann", data={"comment": ""})
    view.apply(event)
    assert view.event_line(event).endswith("step gate: completed attempt 0 0ms - approved by ann")


def test_project_view_keeps_the_runs_its_filters_match() -> None:
    view = ProjectView("p", ["deploy"], ["running"])
    run = pb.WorkflowRun(id="a", workflow_name="deploy", status=pb.RunStatus.running)
    assert view.update(run) and not view.update(run)  # the same state again changes nothing
    assert not view.update(pb.WorkflowRun(id="b", workflow_name="other", status=pb.RunStatus.running))
    # Leaving the statuses shown takes the run off the table.
    assert view.update(pb.WorkflowRun(id="a", workflow_name="deploy", status=pb.RunStatus.completed))
    assert view.newest() == []
