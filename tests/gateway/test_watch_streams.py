"""Watches over the wire: the real gRPC server (build_server) on a real engine (ManualClock, runs
advanced by tick) and a real Envoy in front of it for REST (SSE).

- A run watch resumed anywhere (before the final event, between it and the comment,
  `run.retried` and notification outcome after it, at the very end) ends, over gRPC and SSE.
- A watch's response headers (gRPC initial metadata; REST 200 text/event-stream) come as soon as
  it is accepted, before any message; a refused watch is still a status (404, 400).
- A project watch's heartbeat arrives through Envoy when the engine's clock says it is due.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from conveyor.api.server import build_server
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from tests.auth import bearer_interceptors, key
from tests.engine.test_engine import ME, events_of, trigger, wf
from tests.engine.test_notify import SECRET, Receiver, receiver  # noqa: F401  (the fixture)
from tests.gateway.conftest import EnvoyGatewayFactory

# What follows the final event in the run's history, oldest first.
TRAILING = ["notification.delivered", "run.comment", "run.retried"]
# Long enough for a loaded machine, far below a heartbeat period (15 s).
AT_ONCE = 5.0


@dataclass
class Served:
    engine: Engine
    clock: ManualClock
    runs: Any  # the WorkflowRunsService stub
    rest: httpx.AsyncClient


@pytest.fixture
async def served(database: Database, clock: ManualClock,
                 envoy_gateway: EnvoyGatewayFactory) -> AsyncIterator[Served]:
    # The hook listens on 127.0.0.1, which egress denies unless allowed.
    settings = Settings(db_url=str(database.url), grpc_host="127.0.0.1", grpc_port=0,
                        envoy_enabled=False, notify_secret=SECRET, http_allow=("127.0.0.1",))
    engine = Engine(SqlStore(database), settings, clock)
    server, port = await build_server(engine, settings)
    await server.start()
    token = await key(engine, "test-admin")
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                      interceptors=bearer_interceptors(token)) as channel,
            envoy_gateway(port) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=30,
                              headers={"authorization": f"Bearer {token}"}) as rest,
        ):
            yield Served(engine, clock, runs_grpc.WorkflowRunsServiceStub(channel), rest)
    finally:
        await server.stop(grace=None)
        await engine.stop()


async def _gated_run(engine: Engine, hook: Receiver) -> str:
    await engine.workflows.create(wf("gated", [{"ref": "ok", "kind": "approval"}], notifications=[
        {"url": hook.url(), "events": ["run.canceled"]}]), ME)
    run_id = await trigger(engine, "gated")
    await engine.tick()
    return run_id


async def _end_then_trail(engine: Engine, run_id: str) -> None:
    """The run's final event, then a notification's outcome, a comment and a retry after it."""
    await engine.runs.cancel(run_id, ME)
    assert await engine.notifier.run_once() == 1
    await engine.runs.comment(run_id, "why it was canceled", ME)
    await engine.runs.retry(run_id, ME)


async def _grpc_watch(served: Served, run_id: str, after_seq: int) -> list[Any]:
    """Every message of a gRPC run watch until it ends (failing if it does not)."""
    call = served.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run_id,
                                                                        after_seq=after_seq))
    async with asyncio.timeout(10):
        return [message async for message in call]


async def _open_sse(served: Served, path: str) -> httpx.Response:
    """An SSE response whose headers arrived within AT_ONCE (its body still to read)."""
    request = served.rest.build_request("GET", path, headers={"accept": "text/event-stream"})
    return await asyncio.wait_for(served.rest.send(request, stream=True), AT_ONCE)


async def _frames(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield json.loads(line.removeprefix("data:"))


async def _sse_watch(served: Served, run_id: str, after_seq: int) -> list[dict[str, Any]]:
    """Every SSE frame of a run watch until it ends (failing if it does not)."""
    response = await _open_sse(served, f"/v1/workflow-runs/{run_id}/watch?after_seq={after_seq}")
    try:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async with asyncio.timeout(10):
            return [frame async for frame in _frames(response)]
    finally:
        await response.aclose()


async def test_a_run_watch_resumed_anywhere_ends_over_grpc_and_sse(
        served: Served, receiver: Receiver) -> None:  # noqa: F811
    engine = served.engine
    run_id = await _gated_run(engine, receiver)
    # Live watches from the start, over both: they end once the run is final.
    live = [asyncio.ensure_future(_grpc_watch(served, run_id, 0)),
            asyncio.ensure_future(_sse_watch(served, run_id, 0))]
    for _ in range(1000):  # 10 s at most: both watchers follow the run's tail
        if engine.watches.tails.watchers(run_id) == 2:
            break
        await asyncio.sleep(0.01)
    await _end_then_trail(engine, run_id)
    history = await events_of(engine, run_id)
    final = next(e.seq for e in history if e.type == "run.canceled")
    last = history[-1].seq
    assert [e.type for e in history if e.seq > final] == TRAILING
    grpc_live, sse_live = await asyncio.gather(*live)
    assert "run.canceled" in [m.event.type for m in grpc_live if m.WhichOneof("message") == "event"]
    assert "run.canceled" in [f["event"]["type"] for f in sse_live if "event" in f]

    for after in (final - 2, final - 1, final, final + 1, final + 2, last):
        messages = await _grpc_watch(served, run_id, after)
        assert [m.event.seq for m in messages] == list(range(after + 1, last + 1)), f"gRPC after {after}"
        frames = await _sse_watch(served, run_id, after)
        assert [f["event"]["seq"] for f in frames] == list(range(after + 1, last + 1)), f"SSE after {after}"
        if after < last:
            assert messages[-1].event.type == frames[-1]["event"]["type"] == "run.retried"
    # From the start: the snapshot of the final run, and the end.
    (snapshot,) = await _sse_watch(served, run_id, 0)
    assert snapshot["snapshot"]["seq"] == last and snapshot["snapshot"]["run"]["status"] == "canceled"


async def test_watch_headers_come_at_once_and_refusals_stay_statuses(served: Served) -> None:
    engine = served.engine
    await engine.workflows.create(wf("gated", [{"ref": "ok", "kind": "approval"}]), ME)
    run_id = await trigger(engine, "gated")
    await engine.tick()
    last = (await engine.runs.get(run_id, ME)).last_seq

    # Nothing to send (a project watch from now; a live run's watch resumed at its end): the
    # headers come anyway, before any event or heartbeat.
    for path in ("/v1/projects/default/workflow-runs/watch", f"/v1/workflow-runs/{run_id}/watch?after_seq="):
        if path.endswith("="):  # resumed at the run's end as it is now (the pass above added events)
            path += str((await engine.runs.get(run_id, ME)).last_seq)
        response = await _open_sse(served, path)
        try:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # The first message is the comment below: nothing was sent before it.
            frames = _frames(response)
            pending = asyncio.ensure_future(anext(frames))
            await asyncio.sleep(0)
            assert not pending.done()
            await engine.runs.pause(run_id, ME)
            first = await asyncio.wait_for(pending, 10)
            paused = first["run"]["status"] if "run" in first else first["event"]["type"]
            assert paused in ("paused", "run.paused")
            await engine.runs.resume(run_id, ME)
        finally:
            await response.aclose()
    call = served.runs.WatchProjectRuns(runs_pb.WatchProjectRunsRequest(project_id="default"))
    assert await asyncio.wait_for(call.initial_metadata(), AT_ONCE) is not None
    call.cancel()

    # Refused before anything is sent: still a status (over REST, its HTTP code and JSON error).
    missing = await served.rest.get("/v1/workflow-runs/00000000-0000-7000-8000-000000000000/watch")
    assert missing.status_code == 404 and missing.json()["details"][0]["reason"] == "RUN_NOT_FOUND"
    past = await served.rest.get(f"/v1/workflow-runs/{run_id}/watch?after_seq={last + 50}")
    assert past.status_code == 400 and past.json()["details"][0]["reason"] == "AFTER_SEQ_PAST_END"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _grpc_watch(served, run_id, last + 50)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_project_watch_heartbeat_arrives_through_envoy_when_due(served: Served) -> None:
    engine = served.engine
    await engine.workflows.create(wf("gated", [{"ref": "ok", "kind": "approval"}]), ME)
    run_id = await trigger(engine, "gated")
    response = await _open_sse(served, "/v1/projects/default/workflow-runs/watch")
    try:
        frames = _frames(response)
        pending = asyncio.ensure_future(anext(frames))
        for _ in range(1000):  # 10 s at most: the watch is open
            if len(engine.watches.beats):
                break
            await asyncio.sleep(0.01)
        await engine.runs.comment(run_id, "nothing to send for this", ME)
        served.clock.advance(15)
        assert engine.watches.beats.beat_due() == 1
        frame = await asyncio.wait_for(pending, 10)
        assert "heartbeat" in frame and "run" not in frame
    finally:
        await response.aclose()
