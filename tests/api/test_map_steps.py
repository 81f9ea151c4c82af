"""Map steps through the real server (SPEC §2.1): a map's progress on its step run, its items
listed by `parent_ref`, one item steered by its ref `ref[i]`."""

from __future__ import annotations

import asyncio

import grpc

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, listed

STEP = pb.StepStatus


def review_each(n: int) -> dict[str, object]:
    """A map of `n` approval items, then a noop that waits for the map."""
    return {"name": "review-each", "steps": [
        {"ref": "each", "kind": "map",
         "config": {"items": list(range(n)), "max_parallel": 2,
                    "step": {"kind": "approval", "config": {"message": "item {{ index }}: {{ item }}?"}}}},
        {"ref": "done", "kind": "noop", "depends_on": ["each"]}]}


async def listing(api: Api, run_id: str, parent_ref: str = "") -> list[pb.StepRun]:
    items, _ = await listed(api.steps.ListStepRuns(
        steps_pb.ListStepRunsRequest(workflow_run_id=run_id, parent_ref=parent_ref)))
    return items


async def test_a_maps_items_are_listed_by_parent_ref_and_its_progress_counts_them(api: Api) -> None:
    wf = await api.create_workflow(review_each(3))
    run = await api.trigger(wf.id)
    await api.engine.tick()

    steps = {s.step_ref: s for s in await listing(api, run.id)}
    assert set(steps) == {"each", "done", "each[0]", "each[1]", "each[2]"}
    each = steps["each"]
    assert each.status == STEP.running and not each.HasField("map_index") and each.parent_ref == ""
    assert (each.progress.total, each.progress.completed, each.progress.failed, each.progress.running) == (
        3, 0, 0, 2)  # max_parallel 2: the third waits for a slot
    assert not steps["done"].HasField("progress")

    items = await listing(api, run.id, parent_ref="each")
    assert [(s.step_ref, s.parent_ref, s.map_index, s.kind) for s in items] == [
        (f"each[{i}]", "each", i, "approval") for i in range(3)]
    assert await listing(api, run.id, parent_ref="done") == []  # a step with no items
    assert await listing(api, run.id, parent_ref="nope") == []

    for i in range(3):
        await api.engine.tick()
        await api.steps.ApproveStep(steps_pb.ApproveStepRequest(workflow_run_id=run.id, step_ref=f"each[{i}]",
                                                                comment=f"ok {i}"))
    await api.engine.tick()
    steps = {s.step_ref: s for s in await listing(api, run.id)}
    assert steps["each"].status == STEP.completed and steps["done"].status == STEP.completed
    assert (steps["each"].progress.total, steps["each"].progress.completed) == (3, 3)


async def test_an_item_ref_that_names_no_item_is_not_found(api: Api) -> None:
    wf = await api.create_workflow(review_each(1))
    run = await api.trigger(wf.id)
    await api.engine.tick()
    for ref in ("each[7]", "each[x]", "each[", "each[0][0]"):
        error = await failure(api.steps.ApproveStep(steps_pb.ApproveStepRequest(
            workflow_run_id=run.id, step_ref=ref)))
        assert error.code == grpc.StatusCode.NOT_FOUND, ref


async def test_a_map_step_in_a_definition_is_checked_whole(api: Api) -> None:
    bad = {"name": "bad-map", "steps": [{"ref": "each", "kind": "map", "config": {
        "items": 5, "max_parallel": 0, "bogus": 1, "step": {"kind": "map", "ref": "x"}}}]}
    error = await failure(api.create_workflow(bad))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {field for field, _ in error.violations} == {
        "steps[0].config.items", "steps[0].config.max_parallel", "steps[0].config.bogus",
        "steps[0].config.step.ref", "steps[0].config.step.kind", "steps[0].config.step.config.items",
        "steps[0].config.step.config.step"}


async def test_a_run_watch_shows_map_progress_and_each_item_change(api: Api) -> None:
    wf = await api.create_workflow(review_each(3))
    run = await api.trigger(wf.id)
    await api.engine.tick()
    call = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id))
    stream = call.__aiter__()
    try:
        first = await anext(stream)
        steps = {s.step_ref: s for s in first.snapshot.steps}
        assert (steps["each"].progress.total, steps["each"].progress.running) == (3, 2)
        assert [steps[f"each[{i}]"].map_index for i in range(3)] == [0, 1, 2]
        await api.steps.ApproveStep(steps_pb.ApproveStepRequest(workflow_run_id=run.id, step_ref="each[0]"))
        seen = []
        async with asyncio.timeout(10):
            while len(seen) < 1:
                item = await anext(stream)
                if item.HasField("event") and item.event.step_ref.startswith("each["):
                    seen.append((item.event.step_ref, item.event.status))
        assert seen == [("each[0]", "completed")]  # one event per item state change
    finally:
        call.cancel()
