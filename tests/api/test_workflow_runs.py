"""WorkflowRunsService through the real server: trigger, advance with engine ticks, list with
filters and pages, operations and their transitions, idempotency, events."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from conveyor.domain.errors import unavailable
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, gated, listed, stream_failure, two_steps

RUN = pb.RunStatus
STEP = pb.StepStatus


async def get_run(api: Api, run_id: str) -> pb.WorkflowRun:
    return await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))


async def list_runs(api: Api, **fields: object) -> tuple[list[pb.WorkflowRun], str]:
    request = json_format.ParseDict(fields, runs_pb.ListWorkflowRunsRequest())
    return await listed(api.runs.ListWorkflowRuns(request))


async def test_trigger_then_ticks_complete_the_run_and_its_steps(api: Api) -> None:
    # A concurrency cap makes the trigger leave the run pending for the runner (an uncapped
    # run of in-engine steps is written already advanced).
    wf = await api.create_workflow(two_steps("deploy", project_id="acme", max_concurrent_runs=10))

    run = await api.trigger(wf.id, payload={"commit": "abc"}, tags={"team": "core"}, entity_id="svc-1")

    assert run.id
    assert run.status == RUN.pending
    assert run.workflow_id == wf.id
    assert run.workflow_name == "deploy"
    assert run.project_id == "acme"
    assert run.workflow_version == 1
    assert run.workflow_version_id == wf.workflow_version_id
    assert json_format.MessageToDict(run.payload) == {"commit": "abc"}
    assert dict(run.tags) == {"team": "core"}
    assert run.entity_id == "svc-1"
    assert run.triggered_by == "test-admin" and run.created_by == "test-admin"
    assert run.HasField("created_at") and not run.HasField("started_at") and not run.HasField("finished_at")
    assert run.duration_in_seconds == 0

    await api.engine.tick()
    done = await get_run(api, run.id)

    assert done.status == RUN.completed
    assert done.HasField("started_at") and done.HasField("finished_at")
    assert done.duration_in_seconds >= 0
    steps, token = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run.id)))
    assert token == ""
    assert [(s.step_ref, s.status) for s in steps] == [("build", STEP.completed), ("test", STEP.completed)]
    build = steps[0]
    assert build.workflow_run_id == run.id
    assert build.kind == "noop"
    assert build.attempt == 1
    assert json_format.MessageToDict(build.output) == {"sha": "abc123"}
    assert (steps[1].deps_required, steps[1].deps_completed) == (1, 1)


async def test_immediate_trigger_answers_after_the_first_pass(api: Api) -> None:
    wf = await api.create_workflow(gated())

    run = await api.trigger(wf.id, immediate=True)

    assert run.status == RUN.running
    assert run.HasField("started_at")


async def test_trigger_by_name_needs_the_project(api: Api) -> None:
    await api.create_workflow(two_steps("deploy", project_id="acme"))

    run = await api.trigger("deploy", project_id="acme")
    error = await failure(api.trigger("deploy"))

    assert run.workflow_name == "deploy"
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "WORKFLOW_NOT_FOUND"


async def test_payload_is_checked_against_the_variables(api: Api) -> None:
    wf = await api.create_workflow(two_steps("deploy", variables=[
        {"name": "environment", "required": True}, {"name": "region", "default": "eu"}]))

    error = await failure(api.trigger(wf.id, payload={"colour": "blue"}))
    run = await api.trigger(wf.id, payload={"environment": "prod"})

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in error.violations} == {"payload.environment", "payload.colour"}
    assert json_format.MessageToDict(run.payload) == {"environment": "prod", "region": "eu"}


async def test_unknown_run_is_not_found(api: Api) -> None:
    error = await failure(get_run(api, "00000000-0000-7000-8000-000000000000"))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None
    assert error.info.reason == "RUN_NOT_FOUND"
    assert error.info.domain == "conveyor.dev"


async def test_list_filters(api: Api) -> None:
    # Capped, so runs stay pending until the runner ticks (see the test above).
    deploy = await api.create_workflow(two_steps("deploy", project_id="acme", max_concurrent_runs=10))
    audit = await api.create_workflow(gated("audit"))
    start = api.clock.now()
    first = await api.trigger(deploy.id, tags={"env": "prod", "team": "core"})
    await api.engine.tick()  # first completes, started at `start`
    api.clock.advance(60)
    second = await api.trigger(deploy.id, run_as="alice", tags={"env": "dev"})
    third = await api.trigger(audit.id, tags={"env": "prod"})
    await api.engine.tick()  # second completes, third waits for its approval; both started at +60s
    api.clock.advance(60)
    fourth = await api.trigger(deploy.id, tags={"url": "http://x:1"})  # pending: not ticked

    async def ids(**fields: object) -> set[str]:
        items, token = await list_runs(api, **fields)
        assert token == ""
        return {r.id for r in items}

    everything = {first.id, second.id, third.id, fourth.id}
    assert await ids() == everything
    assert await ids(project_id="acme") == {first.id, second.id, fourth.id}
    assert await ids(project_id="default") == {third.id}
    assert await ids(status=["completed"]) == {first.id, second.id}
    assert await ids(status=["running", "pending"]) == {third.id, fourth.id}
    assert await ids(status=["unspecified"]) == set()
    assert await ids(workflow_id=[audit.id]) == {third.id}
    assert await ids(workflow_id=[deploy.id, audit.id]) == everything
    assert await ids(triggered_by="alice") == {second.id}
    assert await ids(tag=["env:prod"]) == {first.id, third.id}
    assert await ids(tag=["env:prod", "team:core"]) == {first.id}
    assert await ids(tag=["url:http://x:1"]) == {fourth.id}
    after = timestamp_pb2.Timestamp()
    after.FromDatetime(start + timedelta(seconds=30))
    assert await ids(started_after=after.ToJsonString()) == {second.id, third.id}
    assert await ids(started_before=after.ToJsonString()) == {first.id}


async def test_a_tag_filter_without_a_colon_is_invalid(api: Api) -> None:
    error = await stream_failure(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(tag=["env"])))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "INVALID_TAG_FILTER"
    assert error.violations == [("tag[0]", "must be written key:value")]


async def test_list_pages_newest_first_with_the_token_in_initial_metadata(api: Api) -> None:
    wf = await api.create_workflow(two_steps("deploy"))
    triggered = []
    for _ in range(5):
        triggered.append((await api.trigger(wf.id)).id)
        api.clock.advance(1)

    pages: list[list[str]] = []
    token = ""
    while True:
        items, token = await list_runs(api, limit=2, page_token=token)
        pages.append([r.id for r in items])
        if not token:
            break
        assert len(pages) < 10, "pagination does not end"

    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == list(reversed(triggered))


async def test_cancel_is_allowed_while_active_and_refused_once_final(api: Api) -> None:
    wf = await api.create_workflow(gated())
    waiting = await api.trigger(wf.id)
    await api.engine.tick()
    assert (await get_run(api, waiting.id)).status == RUN.running

    response = await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=waiting.id))

    assert response == runs_pb.CancelWorkflowRunResponse()
    canceled = await get_run(api, waiting.id)
    assert canceled.status == RUN.canceled
    steps, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=waiting.id)))
    assert {s.step_ref: s.status for s in steps} == {
        "build": STEP.completed, "gate": STEP.canceled, "answer": STEP.canceled, "ship": STEP.canceled}

    again = await failure(api.runs.CancelWorkflowRun(
        runs_pb.CancelWorkflowRunRequest(workflow_run_id=waiting.id)))

    assert again.code == grpc.StatusCode.FAILED_PRECONDITION
    assert again.info is not None and again.info.reason == "INVALID_TRANSITION"
    assert (await get_run(api, waiting.id)).updated_at == canceled.updated_at


async def test_pause_and_resume(api: Api) -> None:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id)
    await api.engine.tick()

    await api.runs.PauseWorkflowRun(runs_pb.PauseWorkflowRunRequest(workflow_run_id=run.id))
    paused = await get_run(api, run.id)
    refused = await failure(api.runs.ResumeWorkflowRun(runs_pb.ResumeWorkflowRunRequest(
        workflow_run_id=(await api.trigger(wf.id)).id)))
    await api.runs.ResumeWorkflowRun(runs_pb.ResumeWorkflowRunRequest(workflow_run_id=run.id))
    resumed = await get_run(api, run.id)

    assert paused.status == RUN.paused
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.info is not None and refused.info.reason == "INVALID_TRANSITION"
    assert resumed.status == RUN.running


async def test_retry_creates_a_new_run_that_keeps_completed_steps(api: Api) -> None:
    wf = await api.create_workflow(gated())
    old = await api.trigger(wf.id, payload={"n": 1})
    await api.engine.tick()
    not_yet = await failure(api.runs.RetryWorkflowRun(
        runs_pb.RetryWorkflowRunRequest(workflow_run_id=old.id)))
    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=old.id))

    new = await api.runs.RetryWorkflowRun(runs_pb.RetryWorkflowRunRequest(workflow_run_id=old.id))

    assert not_yet.code == grpc.StatusCode.FAILED_PRECONDITION
    assert new.id != old.id
    assert new.retry_of_run_id == old.id
    assert json_format.MessageToDict(new.payload) == {"n": 1}
    steps, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=new.id)))
    build = next(s for s in steps if s.step_ref == "build")
    assert build.status == STEP.completed


async def test_bulk_cancel_and_bulk_replay_count_per_id(api: Api) -> None:
    wf = await api.create_workflow(gated())
    a = await api.trigger(wf.id)
    b = await api.trigger(wf.id)
    await api.engine.tick()
    unknown = "00000000-0000-7000-8000-000000000000"

    canceled = await api.runs.BulkCancelWorkflowRuns(runs_pb.BulkCancelWorkflowRunsRequest(
        workflow_run_ids=[a.id, unknown, b.id]))
    replayed = await api.runs.BulkReplayWorkflowRuns(runs_pb.BulkReplayWorkflowRunsRequest(
        workflow_run_ids=[a.id, unknown]))

    assert (canceled.canceled, canceled.failed) == (2, 1)
    assert (replayed.replayed, replayed.failed) == (1, 1)
    assert (await get_run(api, b.id)).status == RUN.canceled


async def test_events_are_listed_in_seq_order_with_pages(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id)
    await api.engine.tick()

    everything, token = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(
        workflow_run_id=run.id, limit=1000)))
    first_two, token2 = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(
        workflow_run_id=run.id, limit=2)))
    rest, _ = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(
        workflow_run_id=run.id, after_seq=2, limit=1000)))

    assert token == ""
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert everything[0].type == "run.running"  # created and started by one transaction
    assert everything[-1].type == "run.completed"
    assert all(e.workflow_run_id == run.id and e.HasField("at") for e in everything)
    assert {e.step_ref for e in everything if e.type == "step.completed"} == {"build", "test"}
    assert [e.seq for e in first_two] == [1, 2]
    assert token2 != ""
    assert [e.seq for e in rest] == [e.seq for e in everything[2:]]


async def test_events_of_an_unknown_run_are_not_found(api: Api) -> None:
    error = await stream_failure(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(
        workflow_run_id="00000000-0000-7000-8000-000000000000")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "RUN_NOT_FOUND"


# --- idempotency ---------------------------------------------------------------------------------

async def test_same_key_and_body_answers_the_original_run(api: Api) -> None:
    wf = await api.create_workflow(two_steps())

    first = await api.trigger(wf.id, idempotency_key="k1", payload={"a": 1})
    second = await api.trigger(wf.id, idempotency_key="k1", payload={"a": 1})
    via_header = await api.trigger(wf.id, metadata=(("idempotency-key", "k1"),), payload={"a": 1})

    assert first.idempotency_key == "k1"
    assert second.id == first.id
    assert via_header.id == first.id
    items, _ = await list_runs(api)
    assert [r.id for r in items] == [first.id]


async def test_same_key_with_another_body_is_already_exists(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    await api.trigger(wf.id, idempotency_key="k1", payload={"a": 1})

    error = await failure(api.trigger(wf.id, idempotency_key="k1", payload={"a": 2}))

    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.info is not None and error.info.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_header_and_body_keys_that_differ_are_invalid(api: Api) -> None:
    wf = await api.create_workflow(two_steps())

    error = await failure(api.trigger(wf.id, metadata=(("idempotency-key", "h"),), idempotency_key="b"))
    same = await api.trigger(wf.id, metadata=(("idempotency-key", "h"),), idempotency_key="h")

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "IDEMPOTENCY_KEY_MISMATCH"
    assert same.idempotency_key == "h"
    items, _ = await list_runs(api)
    assert [r.id for r in items] == [same.id]


async def test_concurrent_duplicates_make_one_run(api: Api) -> None:
    wf = await api.create_workflow(two_steps())

    runs = await asyncio.gather(*(
        api.trigger(wf.id, metadata=(("idempotency-key", "burst"),), payload={"x": "y"}) for _ in range(20)))

    assert len({r.id for r in runs}) == 1
    items, _ = await list_runs(api)
    assert [r.id for r in items] == [runs[0].id]


async def test_an_error_after_a_watch_began_is_its_last_message(api: Api, monkeypatch: Any) -> None:
    """Once a stream began, an HTTP/1.1 (SSE) client can no longer see a status: the error is
    sent as a final StreamError message, with its code and reason, and the stream ends."""
    await api.create_workflow(gated())
    run = await api.trigger("gated")
    await api.engine.tick()
    call = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id))
    first = await call.read()
    assert first.WhichOneof("message") == "snapshot"

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise unavailable("the database is temporarily unavailable; retry the request",
                          "DATABASE_UNAVAILABLE")

    store = api.engine.watches.store
    monkeypatch.setattr(type(store), "read", _failing_read(broken), raising=True)
    await api.runs.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run.id, content="wake up"))
    last = await asyncio.wait_for(call.read(), 10)
    assert last.WhichOneof("message") == "error"
    assert last.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert last.error.reason == "DATABASE_UNAVAILABLE"
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_watcher_left_behind_is_told_where_to_resume(api: Api) -> None:
    """A watcher whose buffer overflows (here: a buffer of no events) ends with a final
    WATCHER_TOO_SLOW StreamError carrying the seq to resume after; resuming there loses nothing."""
    await api.create_workflow(gated())
    run = await api.trigger("gated")
    await api.engine.tick()
    api.engine.watches.tails.buffer = 0
    call = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id))
    first = await call.read()
    assert first.WhichOneof("message") == "snapshot"
    pending = asyncio.ensure_future(call.read())
    for _ in range(1000):  # until the watch has joined its run's tail (10 s at most)
        if api.engine.watches.tails.watchers(run.id):
            break
        await asyncio.sleep(0.01)
    await api.runs.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run.id, content="missed"))
    last = await asyncio.wait_for(pending, 10)
    assert last.WhichOneof("message") == "error"
    assert last.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert last.error.reason == "WATCHER_TOO_SLOW"
    assert last.error.resume_after_seq == first.snapshot.seq
    assert await call.read() == grpc.aio.EOF
    api.engine.watches.tails.buffer = 1000
    resumed = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(
        workflow_run_id=run.id, after_seq=last.error.resume_after_seq))
    again = await asyncio.wait_for(resumed.read(), 10)
    assert again.event.message == "missed" and again.event.seq == first.snapshot.seq + 1
    resumed.cancel()


def _failing_read(fail: Any) -> Any:
    """A Store.read that fails when entered."""

    @contextlib.asynccontextmanager
    async def read(self: Any) -> Any:
        await fail()
        yield None

    return read
