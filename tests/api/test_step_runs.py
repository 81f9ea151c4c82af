"""StepRunsService through the real server: listing steps and every step operation."""

from __future__ import annotations

import grpc
from google.protobuf import json_format, struct_pb2

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, gated, listed, stream_failure, two_steps

RUN = pb.RunStatus
STEP = pb.StepStatus


def struct(data: dict[str, object]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


async def steps_of(api: Api, run_id: str) -> dict[str, pb.StepRun]:
    items, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run_id)))
    return {s.step_ref: s for s in items}


async def run_status(api: Api, run_id: str) -> int:
    run = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))
    return int(run.status)


async def waiting_run(api: Api) -> str:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id)
    await api.engine.tick()
    return str(run.id)


async def test_approve_and_input_complete_the_run(api: Api) -> None:
    run_id = await waiting_run(api)
    before = await steps_of(api, run_id)
    assert (before["gate"].status, before["answer"].status) == (STEP.waiting, STEP.waiting)

    await api.steps.ApproveStep(steps_pb.ApproveStepRequest(workflow_run_id=run_id, step_ref="gate",
                                                            comment="ship it"))
    await api.steps.SubmitStepInput(steps_pb.SubmitStepInputRequest(
        workflow_run_id=run_id, step_ref="answer", data=struct({"colour": "blue"})))
    await api.engine.tick()

    after = await steps_of(api, run_id)
    assert after["gate"].status == STEP.completed
    assert after["gate"].approved_by == "test-admin"
    assert after["answer"].status == STEP.completed
    assert json_format.MessageToDict(after["answer"].output) == {"colour": "blue"}
    assert after["ship"].status == STEP.completed
    assert await run_status(api, run_id) == RUN.completed


async def test_approving_a_step_that_is_not_waiting_is_an_invalid_transition(api: Api) -> None:
    run_id = await waiting_run(api)

    error = await failure(api.steps.ApproveStep(steps_pb.ApproveStepRequest(workflow_run_id=run_id,
                                                                            step_ref="build")))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "INVALID_TRANSITION"


async def test_unknown_step_is_not_found(api: Api) -> None:
    run_id = await waiting_run(api)

    error = await failure(api.steps.SkipStep(steps_pb.SkipStepRequest(workflow_run_id=run_id,
                                                                      step_ref="ghost")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "STEP_NOT_FOUND"


async def test_skip_and_force_complete_let_dependents_run(api: Api) -> None:
    run_id = await waiting_run(api)

    await api.steps.SkipStep(steps_pb.SkipStepRequest(workflow_run_id=run_id, step_ref="gate",
                                                      reason="not needed"))
    await api.steps.ForceCompleteStep(steps_pb.ForceCompleteStepRequest(
        workflow_run_id=run_id, step_ref="answer", result=struct({"forced": True})))
    await api.engine.tick()

    steps = await steps_of(api, run_id)
    assert steps["gate"].status == STEP.skipped
    assert steps["gate"].skip_reason == "not needed"
    assert steps["answer"].status == STEP.completed
    assert json_format.MessageToDict(steps["answer"].output) == {"forced": True}
    assert steps["ship"].status == STEP.completed
    assert await run_status(api, run_id) == RUN.completed


async def test_retry_step_reopens_a_canceled_run(api: Api) -> None:
    run_id = await waiting_run(api)
    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=run_id))
    canceled = await steps_of(api, run_id)

    response = await api.steps.RetryStep(steps_pb.RetryStepRequest(workflow_run_id=run_id, step_ref="gate"))

    assert canceled["gate"].status == STEP.canceled
    assert response.step_run.step_ref == "gate"
    assert response.step_run.workflow_run_id == run_id
    assert response.step_run.status == STEP.queued
    assert await run_status(api, run_id) == RUN.running
    await api.engine.tick()
    again = await steps_of(api, run_id)
    assert again["gate"].status == STEP.waiting
    assert again["gate"].attempt == canceled["gate"].attempt + 1


async def test_retry_of_a_completed_step_is_an_invalid_transition(api: Api) -> None:
    run_id = await waiting_run(api)

    error = await failure(api.steps.RetryStep(steps_pb.RetryStepRequest(workflow_run_id=run_id,
                                                                        step_ref="build")))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "INVALID_TRANSITION"


async def test_replay_subtree_resets_the_step_and_its_descendants(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id)
    await api.engine.tick()
    assert await run_status(api, run.id) == RUN.completed

    response = await api.steps.ReplaySubtree(steps_pb.ReplaySubtreeRequest(workflow_run_id=run.id,
                                                                           step_ref="build"))
    await api.engine.tick()

    assert response.reset_steps == 2
    assert await run_status(api, run.id) == RUN.completed
    steps = await steps_of(api, run.id)
    assert steps["build"].status == STEP.completed
    events, _ = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id=run.id,
                                                                                 limit=1000)))
    assert [e.step_ref for e in events if e.type == "step.completed"].count("build") == 2


async def test_list_steps_pages_in_definition_order(api: Api) -> None:
    run_id = await waiting_run(api)

    first, token = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(
        workflow_run_id=run_id, limit=3)))
    rest, last = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(
        workflow_run_id=run_id, limit=3, page_token=token)))

    assert [s.step_ref for s in first] == ["build", "gate", "answer"]
    assert token != ""
    assert [s.step_ref for s in rest] == ["ship"]
    assert last == ""


async def test_steps_of_an_unknown_run_are_not_found(api: Api) -> None:
    error = await stream_failure(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(
        workflow_run_id="00000000-0000-7000-8000-000000000000")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "RUN_NOT_FOUND"
