"""Revocation and expiry reach open streams (issue 16, finding 4), and the `worker` role.

Through the real server and database: a key revoked (through the API, or straight in the
database as another replica would) or expired ends every stream it opened — task streams, long
polls, run and project watches — with UNAUTHENTICATED (KEY_REVOKED, KEY_EXPIRED): a task stream
and a poll as their status, a watch as its last message (StreamError, what SSE clients can see).
After that the key leases nothing: a task made ready after the revocation stays queued. Two
servers on one database show a revocation through one ending the streams of the other within
5 s (its holds loop re-reads the keys every second) and its cache forgetting the key at once.
Expiry is judged by the engine's ManualClock: `holds.check()` is the loop's pass, called by hand.
A worker key leases, heartbeats and reports its project's tasks and may do nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.api.server import build_server
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from conveyor.v1 import keys_service_pb2 as keys_pb
from conveyor.v1 import keys_service_pb2_grpc as keys_grpc
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from tests.api.support import Api, decode
from tests.auth import TEST_ADMIN, bearer, bearer_interceptors, key

ALPHA = "alpha"
# Far above what a revocation needs (at once here, ~1 s on another replica), below a heartbeat.
AT_ONCE = 5.0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
WORK = {"name": "work", "project_id": ALPHA, "steps": [{"ref": "t", "kind": "task", "queue": "q"}]}
GATED = {"name": "gated", "project_id": ALPHA, "steps": [{"ref": "ok", "kind": "approval"}]}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most AT_ONCE) for an observable condition of the server."""
    deadline = time.monotonic() + AT_ONCE
    while not condition():
        assert time.monotonic() < deadline, f"waited {AT_ONCE}s for {what}"
        await asyncio.sleep(0.01)


async def holding(engine: Engine, n: int) -> None:
    await until(lambda: len(engine.keys.holds) == n, f"{n} open streams holding keys")


async def ended_with(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read a task stream until it fails (within AT_ONCE): its status code and reason."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async with asyncio.timeout(AT_ONCE):
            while (message := await call.read()) is not grpc.aio.EOF:
                assert message.WhichOneof("message") != "task", f"leased after the key stopped: {message}"
    rich = decode(failed.value)
    assert rich.info is not None
    return rich.code, rich.info.reason


async def watch_end(call: Any) -> pb.StreamError:
    """Read a watch to its end (within AT_ONCE): the error that is its last message."""
    messages = []
    async with asyncio.timeout(AT_ONCE):
        async for message in call:
            messages.append(message)
    assert messages and messages[-1].WhichOneof("message") == "error", messages
    return messages[-1].error


async def step_status(api: Api, run_id: str) -> str:
    steps = [s async for s in api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run_id))]
    return pb.StepStatus.Value.Name(steps[0].status)


async def ready_task(api: Api, workflow_id: str) -> str:
    """Trigger a run whose one task becomes ready; its id."""
    run = await api.trigger(workflow_id)
    await api.engine.tick()
    return str(run.id)


async def test_a_revoked_keys_task_stream_ends_and_it_leases_nothing_more(api: Api) -> None:
    engine = api.engine
    work = await api.create_workflow(WORK)
    worker, token = await engine.keys.create(TEST_ADMIN, "w1", ALPHA, "worker")
    stream = api.workers.StreamTasks(workers_pb.StreamTasksRequest(
        project_id=ALPHA, queue="q", worker_id="w1", max_in_flight=5), metadata=bearer(token))
    first = await ready_task(api, work.id)
    message = await asyncio.wait_for(stream.read(), AT_ONCE)
    assert message.task.workflow_run_id == first

    revoked = await keys_grpc.KeysServiceStub(api.channel).RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(key_id=worker.id))

    assert revoked.HasField("revoked_at")
    assert await ended_with(stream) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED")
    assert len(engine.keys.holds) == 0
    # A task ready after the revocation: nobody leases it (the stream had 4 free slots).
    second = await ready_task(api, work.id)
    assert await step_status(api, second) == "queued"
    # The key opens nothing new either.
    again = api.workers.StreamTasks(workers_pb.StreamTasksRequest(
        project_id=ALPHA, queue="q", worker_id="w1"), metadata=bearer(token))
    assert await ended_with(again) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    assert await step_status(api, second) == "queued"


async def test_a_revoked_keys_long_poll_ends_at_once(api: Api) -> None:
    engine = api.engine
    work = await api.create_workflow(WORK)
    _, token = await engine.keys.create(TEST_ADMIN, "poller", ALPHA, "worker")
    poll = asyncio.ensure_future(api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="q", worker_id="p", wait_seconds=60), metadata=bearer(token)))
    await holding(engine, 1)

    await engine.keys.revoke(TEST_ADMIN, "poller")

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(poll, AT_ONCE)
    rich = decode(failed.value)
    assert (rich.code, rich.info and rich.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED")
    run_id = await ready_task(api, work.id)
    assert await step_status(api, run_id) == "queued"


async def test_run_and_project_watches_end_with_unauthenticated_when_their_key_is_revoked(api: Api) -> None:
    engine = api.engine
    gated = await api.create_workflow(GATED)
    run = await api.trigger(gated.id)
    await engine.tick()
    _, token = await engine.keys.create(TEST_ADMIN, "dashboard", ALPHA, "viewer")
    run_watch = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id),
                                          metadata=bearer(token))
    snapshot = await asyncio.wait_for(run_watch.read(), AT_ONCE)
    assert snapshot.snapshot.run.id == run.id
    project_watch = api.runs.WatchProjectRuns(runs_pb.WatchProjectRunsRequest(project_id=ALPHA),
                                              metadata=bearer(token))
    await holding(engine, 2)

    await engine.keys.revoke(TEST_ADMIN, "dashboard")

    for call in (run_watch, project_watch):
        error = await watch_end(call)
        assert (error.code, error.reason) == (UNAUTHENTICATED, "KEY_REVOKED")
        assert "dashboard" in error.message
    assert len(engine.keys.holds) == 0
    # The run goes on without them, and is still watched by keys that work.
    assert engine.watches.tails.watchers(run.id) == 0


async def test_an_expired_keys_streams_end_at_the_instant_it_expires(api: Api) -> None:
    engine, clock = api.engine, api.clock
    work = await api.create_workflow(WORK)
    gated = await api.create_workflow(GATED)
    run = await api.trigger(gated.id)
    await engine.tick()
    _, token = await engine.keys.create(TEST_ADMIN, "temp", ALPHA, "operator",
                                        expires_at=clock.now() + timedelta(seconds=60))
    auth = bearer(token)
    stream = api.workers.StreamTasks(
        workers_pb.StreamTasksRequest(project_id=ALPHA, queue="q", worker_id="s"), metadata=auth)
    poll = asyncio.ensure_future(api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="other", worker_id="p", wait_seconds=60), metadata=auth))
    run_watch = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id),
                                          metadata=auth)
    project_watch = api.runs.WatchProjectRuns(runs_pb.WatchProjectRunsRequest(project_id=ALPHA),
                                              metadata=auth)
    await holding(engine, 4)

    clock.advance(59.9)
    await engine.keys.holds.check()
    assert len(engine.keys.holds) == 4  # nothing ended before the instant
    clock.advance(0.1)
    await engine.keys.holds.check()

    assert await ended_with(stream) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_EXPIRED")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await asyncio.wait_for(poll, AT_ONCE)
    assert decode(failed.value).info.reason == "KEY_EXPIRED"  # type: ignore[union-attr]
    for call in (run_watch, project_watch):
        error = await watch_end(call)
        assert (error.code, error.reason) == (UNAUTHENTICATED, "KEY_EXPIRED")
    run_id = await ready_task(api, work.id)
    assert await step_status(api, run_id) == "queued"


async def test_streams_of_callers_without_a_key_hold_nothing(engine: Engine, database: Database,
                                                            clock: ManualClock) -> None:
    """CONVEYOR_AUTH=disabled: every caller is `anonymous`, holding no key; its streams run on."""
    settings = Settings(db_url=str(database.url), grpc_host="127.0.0.1", grpc_port=0, envoy_enabled=False,
                        auth_enabled=False)
    server, port = await build_server(engine, settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = runs_grpc.WorkflowRunsServiceStub(channel).WatchProjectRuns(
                runs_pb.WatchProjectRunsRequest(project_id=ALPHA))
            await asyncio.wait_for(call.initial_metadata(), AT_ONCE)
            await until(lambda: len(engine.watches.beats) == 1, "the watch to open")
            clock.advance(3600)
            await engine.keys.holds.check()
            assert len(engine.keys.holds) == 0
            assert not call.done()
            call.cancel()
    finally:
        await server.stop(grace=None)


# -- two servers on one database -------------------------------------------------------------


@pytest.fixture
async def replica_b(database: Database, settings: Settings, clock: ManualClock) -> AsyncIterator[Api]:
    """A second engine and server on the same database (its own pool), as another replica."""
    db = Database(database.url)
    engine = Engine(SqlStore(db), settings, clock)
    server, port = await build_server(engine, settings)
    await server.start()
    token = await key(engine, "b-admin")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=bearer_interceptors(token)) as channel:
            yield Api(channel, engine, clock)
    finally:
        await server.stop(grace=None)
        await engine.stop()
        await db.dispose()


async def test_a_key_revoked_through_one_replica_ends_its_streams_on_another_within_seconds(
        api: Api, replica_b: Api) -> None:
    b = replica_b
    work = await api.create_workflow(WORK)
    gated = await api.create_workflow(GATED)
    run = await api.trigger(gated.id)
    await api.engine.tick()
    worker, token = await api.engine.keys.create(TEST_ADMIN, "roaming", ALPHA, "operator")
    auth = bearer(token)
    stream = b.workers.StreamTasks(workers_pb.StreamTasksRequest(project_id=ALPHA, queue="q", worker_id="r"),
                                   metadata=auth)
    run_watch = b.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id),
                                        metadata=auth)
    await holding(b.engine, 2)
    started = time.monotonic()

    await keys_grpc.KeysServiceStub(api.channel).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=worker.id))

    assert await ended_with(stream) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED")
    error = await watch_end(run_watch)
    assert (error.code, error.reason) == (UNAUTHENTICATED, "KEY_REVOKED")
    assert time.monotonic() - started < AT_ONCE
    # B's cache entry of the key was fresh (its clock did not move): B forgot it with its streams.
    refused = b.workers.StreamTasks(workers_pb.StreamTasksRequest(project_id=ALPHA, queue="q", worker_id="r"),
                                    metadata=auth)
    assert await ended_with(refused) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
    run_id = await ready_task(api, work.id)
    await b.engine.tick()
    assert await step_status(api, run_id) == "queued"


# -- the worker role -------------------------------------------------------------------------


async def test_a_worker_key_works_its_projects_tasks_and_may_do_nothing_else(api: Api) -> None:
    engine = api.engine
    work = await api.create_workflow(WORK)
    created = await keys_grpc.KeysServiceStub(api.channel).CreateApiKey(keys_pb.CreateApiKeyRequest(
        name="builder", project_id=ALPHA, role="worker"))
    assert created.key.role == "worker"
    auth = bearer(created.token)
    run_id = await ready_task(api, work.id)

    (task,) = (await api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="q", worker_id="b", max_tasks=5), metadata=auth)).tasks
    lease = workers_pb.TaskLease(task_id=task.task_id, attempt=task.attempt)
    beat = await api.workers.HeartbeatTasks(workers_pb.HeartbeatTasksRequest(worker_id="b", leases=[lease]),
                                            metadata=auth)
    assert [s.revoked for s in beat.leases] == [False]
    await api.workers.CompleteTask(workers_pb.CompleteTaskRequest(
        task_id=task.task_id, attempt=task.attempt, worker_id="b",
        result=json_format.ParseDict({"ok": True}, struct_pb2.Struct())), metadata=auth)
    await engine.tick()
    assert (await engine.runs.get(run_id, TEST_ADMIN)).status == "completed"

    # Not even reading the run it worked on; nor steering it; nor another project's queue.
    refusals = {
        "GetWorkflowRun": api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id),
                                                  metadata=auth),
        "CancelWorkflowRun": api.runs.CancelWorkflowRun(
            runs_pb.CancelWorkflowRunRequest(workflow_run_id=run_id), metadata=auth),
        "TriggerWorkflowRun": api.runs.TriggerWorkflowRun(
            runs_pb.TriggerWorkflowRunRequest(workflow_id=work.id), metadata=auth),
    }
    for name, pending in refusals.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pending
        rich = decode(refused.value)
        assert (rich.code, rich.info and rich.info.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                                               "ROLE_TOO_LOW"), name
        assert rich.info is not None and dict(rich.info.metadata) == {"needed": "viewer" if name.startswith(
            "Get") else "operator", "role": "worker"}
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await api.workers.PollTasks(workers_pb.PollTasksRequest(project_id="beta", queue="q", worker_id="b"),
                                    metadata=auth)
    assert decode(foreign.value).info.reason == "PROJECT_FORBIDDEN"  # type: ignore[union-attr]


async def test_a_project_admin_creates_worker_keys_and_unknown_roles_are_refused(api: Api) -> None:
    keys = keys_grpc.KeysServiceStub(api.channel)
    alpha_admin = bearer(await key(api.engine, "alpha-admin", ALPHA, "admin"))

    created = await keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="w", project_id=ALPHA, role="worker"),
                                      metadata=alpha_admin)

    assert (created.key.role, created.key.project_id) == ("worker", ALPHA)
    for role in ("workers", "root", " worker", "worker-ish"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="x", project_id=ALPHA, role=role),
                                    metadata=alpha_admin)
        rich = decode(refused.value)
        assert rich.code == grpc.StatusCode.INVALID_ARGUMENT
        assert rich.info is not None and rich.info.reason == "INVALID_ROLE"
        assert "worker, viewer, operator, admin" in rich.message
    listed = [k.name async for k in keys.ListApiKeys(keys_pb.ListApiKeysRequest(project_id=ALPHA))]
    assert sorted(listed) == ["alpha-admin", "w"]
