"""Child runs over gRPC (a real server on port 0, ManualClock): WORKFLOW_LOOP is
FAILED_PRECONDITION with its reason, a child run shows its parent ids, the parent's step shows
its child run id and attempt, and canceling the parent cancels the child."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed


def call(target: str) -> dict[str, Any]:
    return {"ref": "c", "kind": "workflow", "config": {"workflow_id": target, "payload": {"n": 1}}}


async def settle(api: Api) -> None:
    for _ in range(10):
        await api.engine.tick()


async def test_a_loop_is_failed_precondition_workflow_loop(api: Api) -> None:
    error = await failure(api.create_workflow({"name": "self", "steps": [call("self")]}))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "WORKFLOW_LOOP"

    await api.create_workflow({"name": "b", "steps": [{"ref": "n", "kind": "noop"}]})
    await api.create_workflow({"name": "a", "steps": [call("b")]})
    looped = json_format.ParseDict({"name": "b", "steps": [call("a")]}, pb.Workflow())
    error = await failure(api.workflows.UpdateWorkflow(
        wf_pb.UpdateWorkflowRequest(workflow_id="b", workflow=looped)))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "WORKFLOW_LOOP"
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="b"))
    assert got.version == 1


async def test_a_child_run_shows_its_parent_and_the_step_its_child(api: Api) -> None:
    await api.create_workflow({"name": "held", "steps": [{"ref": "gate", "kind": "approval"}]})
    await api.create_workflow({"name": "holder", "steps": [call("held")]})
    parent = await api.trigger("holder")
    await settle(api)

    steps, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=parent.id)))
    (step,) = steps
    assert step.kind == "workflow" and step.attempt == 1 and step.job_run_id
    assert step.status == pb.StepStatus.running
    child = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=step.job_run_id))
    assert child.parent_workflow_run_id == parent.id and child.parent_step_run_id == step.id
    assert child.workflow_name == "held" and child.status == pb.RunStatus.running
    assert dict(child.payload) == {"n": 1}

    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=parent.id))
    await settle(api)
    child = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=child.id))
    assert child.status == pb.RunStatus.canceled
    assert child.status_message == "parent step no longer waits for this run"
