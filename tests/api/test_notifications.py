"""Notification targets over the API (issue 8 item 6): a definition's and a trigger's, shown on
the workflow, carried through strict REST bodies; hostile ones are INVALID_ARGUMENT with field
violations and store nothing."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2

from conveyor.domain.records import Caller
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed, two_steps

HOOK = {"url": "https://hooks.example.com/conveyor", "events": ["run.completed", "run.failed"]}


async def stored(api: Api) -> tuple[list[Any], list[Any]]:
    workflows, _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(limit=1000)))
    runs, _ = await listed(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(limit=1000)))
    return workflows, runs


async def test_a_definition_shows_its_notifications_and_a_trigger_adds_its_own(api: Api) -> None:
    wf = await api.create_workflow(two_steps(notifications=[HOOK]))
    assert [(n.url, list(n.events)) for n in wf.notifications] == [(HOOK["url"], HOOK["events"])]
    other = {"url": "http://other.example.com/x", "events": ["run.failed"]}
    run = await api.trigger(wf.id, notifications=[other])
    stored_run = await api.engine.runs.get(run.id, Caller("t"))
    assert stored_run.notifications == [HOOK, other]
    # The run shows them, the workflow's first, on trigger and on every read after.
    got = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    for shown in (run, got):
        assert [(n.url, list(n.events)) for n in shown.notifications] == [
            (HOOK["url"], HOOK["events"]), (other["url"], other["events"])]


@pytest.mark.parametrize(("target", "field"), [
    ({"url": "ftp://example.com/", "events": ["run.failed"]}, "notifications[0].url"),
    ({"url": "http://exa\u0000mple.com/", "events": ["run.failed"]}, "notifications[0].url"),
    ({"url": "http://example.com/", "events": ["run.exploded"]}, "notifications[0].events[0]"),
])
async def test_hostile_targets_are_refused_and_store_nothing(api: Api, target: dict[str, Any],
                                                            field: str) -> None:
    error = await failure(api.create_workflow(two_steps(notifications=[target])))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.endswith(field) for f, _ in error.violations), error.violations
    wf = await api.create_workflow(two_steps("ok"))
    error = await failure(api.trigger(wf.id, notifications=[target]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.endswith(field) for f, _ in error.violations), error.violations
    workflows, runs = await stored(api)
    assert [w.name for w in workflows] == ["ok"] and runs == []


async def test_too_many_targets_are_refused_before_conversion(api: Api) -> None:
    error = await failure(api.create_workflow(two_steps(notifications=[HOOK] * 11)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == ["workflow.notifications"]
    assert await stored(api) == ([], [])


async def test_rest_bodies_carry_notifications_strictly(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    raw = json.dumps({"notifications": [HOOK]}).encode()
    run = await api.runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(
        workflow_id=wf.id, body=httpbody_pb2.HttpBody(content_type="application/json", data=raw)))
    assert run.id
    misspelt = json.dumps({"notifications": [{"url": HOOK["url"], "event": ["run.failed"]}]}).encode()
    error = await failure(api.runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(
        workflow_id=wf.id, body=httpbody_pb2.HttpBody(content_type="application/json", data=misspelt))))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
