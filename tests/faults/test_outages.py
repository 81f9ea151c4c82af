"""Database outages answered fast and healed (issue 15, item 3), one server in this process.

The database really goes away: on SQLite another process holds the file's exclusive lock; on
PostgreSQL the server's connections go through `FaultProxy`, which drops them (a restart, the
server made unreachable), black-holes them (a network partition: accepted, never answered) or
delays them. While it is gone a call is answered UNAVAILABLE DATABASE_UNAVAILABLE within the
configured bounds; a trigger or report batch meeting the outage fails as one batch (counted:
the write transactions the store was asked for); the queues and calls in flight are bounded
(RESOURCE_EXHAUSTED with retry-after); and when the database is back the same server answers
again, no restart.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from conveyor.api.server import build_server
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.feed import Key, run_key
from conveyor.domain.records import TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.feed import CHANNEL, payloads
from conveyor.storage.repository import Repository
from conveyor.storage.store import DATABASE_UNAVAILABLE, SqlStore
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.api.support import RichError, decode
from tests.auth import bearer_interceptors, key
from tests.engine.test_engine import ME, wf
from tests.faults.conftest import ANSWERED_WITHIN, Outage

# How long the healed server may take to answer again (its pool reconnects on first use).
RECOVERS_WITHIN = 5.0


class CountingStore(SqlStore):
    """The real store, counting the write transactions asked of it."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.writes = 0

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Repository]:
        self.writes += 1
        async with super().write() as repo:
            yield repo


@dataclass
class Server:
    engine: Engine
    store: CountingStore
    workflows: wf_grpc.WorkflowsServiceStub
    runs: runs_grpc.WorkflowRunsServiceStub


@pytest.fixture
def tuned() -> dict[str, Any]:
    """Settings a test overrides (queue and in-flight bounds)."""
    return {}


@pytest.fixture
async def server(fault_settings: Settings, tuned: dict[str, Any]) -> AsyncIterator[Server]:
    settings = Settings(**{**fault_settings.__dict__, **tuned})
    db = Database(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms,
                  pool_timeout=settings.db_pool_timeout_seconds,
                  connect_timeout=settings.db_connect_timeout_seconds,
                  command_timeout=settings.db_command_timeout_seconds)
    store = CountingStore(db)
    engine = Engine(store, settings, ManualClock())
    grpc_server, port = await build_server(engine, settings)
    await grpc_server.start()
    token = await key(engine, "test-admin")  # resolved (and cached) before any outage
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=bearer_interceptors(token)) as channel:
            out = Server(engine, store, wf_grpc.WorkflowsServiceStub(channel),
                         runs_grpc.WorkflowRunsServiceStub(channel))
            definition = json_format.ParseDict({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]},
                                               pb.Workflow())
            await out.workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(workflow=definition))
            await out.runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="w"))  # "w" known
            await engine.audit.flush()  # no audit flush of the setup meets the outage
            yield out
    finally:
        await grpc_server.stop(grace=None)
        await engine.stop()
        await db.dispose()


async def outcome(call: Awaitable[Any]) -> tuple[RichError | None, float]:
    """How a call ended (None: it succeeded) and how long it took."""
    started = time.monotonic()
    try:
        await call
        return None, time.monotonic() - started
    except grpc.aio.AioRpcError as e:
        return decode(e), time.monotonic() - started


def trigger(server: Server, key_: str = "") -> Awaitable[Any]:
    return server.runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="w",
                                                                            idempotency_key=key_))


def assert_unavailable(error: RichError | None) -> None:
    assert error is not None, "the call succeeded during the outage"
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert error.info is not None and error.info.reason == DATABASE_UNAVAILABLE


async def recovered(call: Callable[[], Awaitable[Any]]) -> Any:
    """The call's answer once the healed server gives one (retried, as a client would)."""
    deadline = time.monotonic() + RECOVERS_WITHIN
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)  # a client's retry backoff, not a wait for behaviour


@pytest.mark.parametrize("mode", ["drop", "blackhole", "delay"])
async def test_a_trigger_is_answered_unavailable_at_once_and_the_server_heals(
        server: Server, outage: Outage, mode: str) -> None:
    if outage.proxy is None and mode != "drop":
        pytest.skip("SQLite has one outage: its file locked by another process")
    # delay: every answer of the database comes 1 s late, past the statement bound (0.3 s).
    await outage.cut(mode, delay=1.0)  # type: ignore[arg-type]
    for attempt in range(3):  # the first, and the ones after it (no pooled connection helps)
        error, took = await outcome(trigger(server, f"cut-{attempt}"))
        assert_unavailable(error)
        assert took < ANSWERED_WITHIN, f"attempt {attempt} took {took:.2f} s"
    await outage.heal()
    run = await recovered(lambda: trigger(server, "healed"))
    assert run.id
    # Nothing refused was written; what was answered is there.
    listed = [r async for r in server.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest())]
    assert {r.idempotency_key for r in listed} == {"", "healed"}


async def test_a_trigger_batch_meeting_an_outage_fails_as_one_batch(server: Server, outage: Outage) -> None:
    await outage.cut("blackhole")
    server.store.writes = 0
    started = time.monotonic()
    results = await asyncio.gather(*(outcome(trigger(server, f"k{i}")) for i in range(40)))
    took = time.monotonic() - started
    for error, _ in results:
        assert_unavailable(error)
    # One write per batch, none per request: 40 requests replayed alone would have asked for
    # 40 more, each waiting its own timeout.
    assert server.store.writes <= 3, server.store.writes
    assert took < 2 * ANSWERED_WITHIN
    await outage.heal()
    runs = await asyncio.gather(*(recovered(functools.partial(trigger, server, f"k{i}")) for i in range(40)))
    assert len({r.id for r in runs}) == 40


async def test_a_report_batch_meeting_an_outage_fails_as_one_batch(server: Server, outage: Outage) -> None:
    engine = server.engine
    await engine.workflows.create(wf("tasks", [{"ref": "t", "kind": "task", "queue": "q"}]), ME)
    for _ in range(20):
        await engine.runs.trigger(TriggerRequest("tasks"), ME)
    await engine.tick()
    leases = await engine.leases.acquire("q", "worker-1", 60, 20, ME)
    assert len(leases) == 20
    await outage.cut("blackhole")
    server.store.writes = 0
    results = await asyncio.gather(*(engine.leases.complete(lease.step.id, 1, "worker-1", {"ok": True}, ME)
                                     for lease in leases), return_exceptions=True)
    for result in results:
        assert isinstance(result, ConveyorError) and result.kind is ErrorKind.UNAVAILABLE, result
    assert server.store.writes <= 3, server.store.writes
    await outage.heal()
    deadline = time.monotonic() + RECOVERS_WITHIN
    while True:  # the leases are still held (the engine's clock did not move): reported again
        try:
            await asyncio.gather(*(engine.leases.complete(lease.step.id, 1, "worker-1", {"ok": True}, ME)
                                   for lease in leases))
            break
        except ConveyorError as e:
            if e.kind is not ErrorKind.UNAVAILABLE or time.monotonic() > deadline:
                raise
    await engine.tick()
    for lease in leases:
        assert (await engine.runs.get(lease.run.id, ME)).status.value == "completed"


@pytest.mark.parametrize("tuned", [{"trigger_queue_limit": 4}])
async def test_a_full_trigger_queue_is_resource_exhausted_with_retry_after(
        server: Server, outage: Outage) -> None:
    await outage.cut("blackhole")
    calls = [trigger(server, f"q{i}") for i in range(30)]
    results = await asyncio.gather(*(_with_trailers(c) for c in calls))
    full = [(e, t) for e, t in results if e is not None and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert full, "no trigger was refused by the queue bound"
    for error, trailers in full:
        assert error.info is not None and error.info.reason == "QUEUE_FULL"
        assert trailers.get("retry-after") == "1"
    for refused, _ in results:  # every other one was answered by the outage
        assert refused is not None and refused.code in (grpc.StatusCode.UNAVAILABLE,
                                                    grpc.StatusCode.RESOURCE_EXHAUSTED)
    await outage.heal()
    assert (await recovered(lambda: trigger(server, "after"))).id


@pytest.mark.parametrize("tuned", [{"max_in_flight": 3}])
async def test_calls_beyond_the_in_flight_bound_are_refused_at_once(server: Server, outage: Outage) -> None:
    await outage.cut("blackhole")
    results = await asyncio.gather(*(_with_trailers(trigger(server, f"f{i}")) for i in range(12)))
    busy = [(e, t) for e, t in results if e is not None and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(busy) >= 12 - 3 - 3, results  # at most 3 at a time got in (some after others ended)
    for error, trailers in busy:
        assert error.info is not None and error.info.reason == "SERVER_BUSY"
        assert trailers.get("retry-after") == "1"
    await outage.heal()
    assert (await recovered(lambda: trigger(server, "after"))).id


@pytest.mark.postgresql_only
async def test_the_change_feed_reconnects_after_a_drop_and_a_silent_network(
        outage: Outage) -> None:
    if outage.proxy is None:
        pytest.skip("PostgreSQL only: SQLite has no change feed to lose")
    db = Database(outage.url, connect_timeout=0.3, command_timeout=0.3)
    heard: list[Key] = []
    resyncs: list[float] = []
    stop = await SqlStore(db).listen(heard.extend, lambda: resyncs.append(time.monotonic()))
    sender = await asyncpg.connect(outage.real_url.replace("+asyncpg", ""))
    try:
        for mode in ("drop", "blackhole"):
            await _eventually(lambda: outage.proxy is not None and outage.proxy.open_connections == 1)
            before = len(resyncs)
            outage.proxy.set_mode(mode)
            if mode == "blackhole":
                # Silent: only the listener's ping notices; give it its interval and timeout.
                await _eventually(lambda: outage.proxy is not None and outage.proxy.accepted >= 3, within=6)
            await outage.heal()
            # Reconnected, and it looked again.
            await _eventually(lambda n=before: len(resyncs) > n, within=8)  # type: ignore[misc]
            key_ = run_key(f"after-{mode}")
            await sender.execute("SELECT pg_notify($1, $2)", CHANNEL, payloads([key_])[0])
            await _eventually(lambda k=key_: k in heard)  # type: ignore[misc]
    finally:
        await sender.close()
        await stop()
        await db.dispose()


async def _with_trailers(call: Any) -> tuple[RichError | None, dict[str, str]]:
    try:
        await call
        return None, {}
    except grpc.aio.AioRpcError as e:
        return decode(e), {k: v for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)}


async def _eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for an observable condition of real connections, with a deadline."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
