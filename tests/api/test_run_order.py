"""Priority, delayed start and per-key concurrency through the API (SPEC §3): the trigger's
`priority` and `start_at` reach the run and its order, the run shows them and its rendered
`concurrency_key`, the workflow shows its `concurrency`; refused values change nothing."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, gated, listed

RUN = pb.RunStatus


def _rfc3339(api: Api, seconds: float) -> str:
    return (api.clock.now() + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def _runs(api: Api) -> list[pb.WorkflowRun]:
    runs, _ = await listed(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(limit=100)))
    return runs


async def test_a_delayed_run_waits_pending_and_shows_when_it_starts(api: Api) -> None:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id, priority=7, start_at=_rfc3339(api, 3600))

    assert run.status == RUN.pending and run.priority == 7
    assert run.start_at.ToDatetime().isoformat() == _rfc3339(api, 3600)[:-1]
    api.clock.advance(3599)
    await api.engine.tick()
    assert (await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))).status \
        == RUN.pending
    api.clock.advance(1)
    await api.engine.tick()
    started = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    assert started.status == RUN.running and started.priority == 7


async def test_a_delayed_run_can_be_canceled_before_it_starts(api: Api) -> None:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id, start_at=_rfc3339(api, 60))
    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=run.id))
    api.clock.advance(61)
    await api.engine.tick()
    ended = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    assert ended.status == RUN.canceled and not ended.HasField("started_at")


async def test_slot_waiters_start_by_priority_then_first_come(api: Api) -> None:
    wf = await api.create_workflow({**gated("capped"), "max_concurrent_runs": 1})
    first = await api.trigger(wf.id)
    await api.engine.tick()  # `first` holds the one slot
    low = await api.trigger(wf.id, priority=-5)
    normal = await api.trigger(wf.id)
    high = await api.trigger(wf.id, priority=50)
    order = []
    for _ in range(3):
        await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(
            workflow_run_id=first.id if not order else order[-1]))
        await api.engine.tick()
        running = [r.id for r in await _runs(api) if r.status == RUN.running]
        assert len(running) == 1
        order.append(running[0])
    assert order == [high.id, normal.id, low.id]


async def test_the_workflow_shows_its_concurrency_and_runs_their_rendered_key(api: Api) -> None:
    wf = await api.create_workflow({**gated("per-customer"),
                                    "concurrency": {"key": "{{ payload.customer }}", "max_runs": 1}})
    assert json_format.MessageToDict(wf.concurrency) == {"key": "{{ payload.customer }}", "maxRuns": 1}
    a1 = await api.trigger(wf.id, payload={"customer": "a"})
    a2 = await api.trigger(wf.id, payload={"customer": "a"})
    b1 = await api.trigger(wf.id, payload={"customer": "b"})
    await api.engine.tick()
    by_id = {r.id: r for r in await _runs(api)}
    assert [by_id[r.id].concurrency_key for r in (a1, a2, b1)] == ["a", "a", "b"]
    assert [by_id[r.id].status for r in (a1, a2, b1)] == [RUN.running, RUN.pending, RUN.running]


@pytest.mark.parametrize(("fields", "reason"), [
    ({"priority": 101}, "INVALID_PRIORITY"),
    ({"priority": -101}, "INVALID_PRIORITY"),
    ({"start_at": "2099-01-01T00:00:00Z"}, "INVALID_START_AT"),
])
async def test_refused_order_fields_change_nothing(api: Api, fields: dict[str, object], reason: str) -> None:
    wf = await api.create_workflow(gated())
    error = await failure(api.trigger(wf.id, **fields))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == reason
    assert await _runs(api) == []


async def test_a_key_that_does_not_render_is_refused_and_changes_nothing(api: Api) -> None:
    wf = await api.create_workflow({**gated("keyed"), "concurrency": {"key": "{{ payload.customer }}",
                                                                      "max_runs": 1}})
    error = await failure(api.trigger(wf.id, payload={}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "INVALID_CONCURRENCY_KEY"
    assert await _runs(api) == []
