"""Per-key rate limits through the real server, on a clock the test moves: over its burst a key gets
RESOURCE_EXHAUSTED (RATE_LIMITED) with `retry-after`, refills at its rate, falls back to the
server's default, and a flood from one key never costs another key a single call."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from conveyor.api import access, server
from conveyor.api.server import build_server
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.api.support import decode, listed
from tests.auth import bearer, key


@dataclass
class Limited:
    """A server whose rate limiter reads `now` (seconds) instead of the monotonic clock."""

    engine: Engine
    channel: grpc.aio.Channel
    now: float = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def get(self, token: str) -> grpc.StatusCode:
        """A cheap read as `token`'s key (workflow "x" does not exist: NOT_FOUND means admitted)."""
        stub = wf_grpc.WorkflowsServiceStub(self.channel)
        try:
            await stub.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"), metadata=bearer(token))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return e.code()
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            return grpc.StatusCode.OK
        raise AssertionError("workflow x exists")


async def start(engine: Engine, settings: Settings,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Limited]:
    limited = Limited(engine, channel=None)  # type: ignore[arg-type]
    limiter = access.RateLimiter(now=lambda: limited.now)
    monkeypatch.setattr(server, "Gate", functools.partial(access.Gate, limiter=limiter))
    srv, port = await build_server(engine, settings)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            limited.channel = channel
            yield limited
    finally:
        await srv.stop(grace=None)


@pytest.fixture
async def limited(engine: Engine, settings: Settings,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Limited]:
    async for x in start(engine, settings, monkeypatch):
        yield x


async def test_past_its_burst_a_key_is_refused_with_retry_after(limited: Limited) -> None:
    token = await key(limited.engine, "slow", "*", "viewer", rate_limit=5)
    assert [await limited.get(token) for _ in range(5)] == [grpc.StatusCode.OK] * 5

    stub = wf_grpc.WorkflowsServiceStub(limited.channel)
    try:
        await stub.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"), metadata=bearer(token))
        raise AssertionError("the sixth call in the same instant was admitted")
    except grpc.aio.AioRpcError as e:
        err = decode(e)
        # With the status (trailers-only), so that Envoy can put it next to a 429 (initial
        # metadata first would commit a REST stream to 200).
        headers = dict(e.trailing_metadata() or ())
        assert "retry-after" not in dict(e.initial_metadata() or ())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.info is not None
    assert err.info.reason == "RATE_LIMITED" and err.info.metadata["limit"] == "5"
    assert headers.get("retry-after") == "1"
    assert "slow" in err.message

    # A fifth of a second brings back one call, no more.
    limited.advance(0.2)
    assert await limited.get(token) == grpc.StatusCode.OK
    assert await limited.get(token) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A second's rest refills the burst, and never beyond it.
    limited.advance(60)
    assert [await limited.get(token) for _ in range(6)] == [grpc.StatusCode.OK] * 5 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_retry_after_rounds_up_to_the_wait(limited: Limited) -> None:
    token = await key(limited.engine, "glacial", "*", "viewer", rate_limit=1)
    assert await limited.get(token) == grpc.StatusCode.OK
    stub = wf_grpc.WorkflowsServiceStub(limited.channel)
    for elapsed, expected in ((0.0, "1"), (0.5, "1")):
        limited.advance(elapsed)
        try:
            await stub.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"), metadata=bearer(token))
            raise AssertionError("admitted")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(e.trailing_metadata() or ())["retry-after"] == expected
    # A streaming call is refused the same way, before its first message.
    try:
        await listed(stub.ListWorkflows(wf_pb.ListWorkflowsRequest(), metadata=bearer(token)))
        raise AssertionError("admitted")
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert decode(e).info.reason == "RATE_LIMITED"  # type: ignore[union-attr]
        assert dict(e.trailing_metadata() or ())["retry-after"] == "1"


async def test_a_key_without_its_own_limit_gets_the_servers(engine: Engine, settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async for limited in start(engine, dataclasses.replace(settings, rate_limit=3), monkeypatch):
        default = await key(engine, "default", "*", "viewer")
        own = await key(engine, "own", "*", "viewer", rate_limit=10)
        assert [await limited.get(default) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert [await limited.get(own) for _ in range(10)] == [grpc.StatusCode.OK] * 10


async def test_refused_calls_are_not_audited_and_do_nothing(limited: Limited) -> None:
    admin = await key(limited.engine, "hasty", "*", "admin", rate_limit=2)
    runs = runs_grpc.WorkflowRunsServiceStub(limited.channel)
    codes = []
    for _ in range(4):
        try:
            await runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id="r"),
                                         metadata=bearer(admin))
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.NOT_FOUND] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    limited.advance(10)
    entries, _ = await listed(audit_grpc.AuditServiceStub(limited.channel).ListAuditEntries(
        audit_pb.ListAuditEntriesRequest(actor="hasty"), metadata=bearer(admin)))
    assert [e.code for e in entries] == ["NOT_FOUND", "NOT_FOUND"]


async def test_a_flood_from_one_key_does_not_starve_another(limited: Limited) -> None:
    """Key A floods: 60 concurrent calls every round, far over its 10 per second. Key B calls at
    a modest rate (one call per round, under its 5 per second) in the middle of each flood.
    Every B call is admitted; A gets its rate and not one call more."""
    flooder = await key(limited.engine, "flooder", "*", "viewer", rate_limit=10)
    modest = await key(limited.engine, "modest", "*", "viewer", rate_limit=5)
    rounds, per_round, step = 12, 60, 0.25

    a_ok = a_refused = 0
    b_codes: list[grpc.StatusCode] = []
    for _ in range(rounds):
        calls: list[Any] = [limited.get(flooder) for _ in range(per_round)]
        calls.insert(per_round // 2, limited.get(modest))
        codes = await asyncio.gather(*calls)
        b_codes.append(codes.pop(per_round // 2))
        a_ok += codes.count(grpc.StatusCode.OK)
        a_refused += codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        limited.advance(step)

    assert b_codes == [grpc.StatusCode.OK] * rounds
    # A's burst (10), then 2.5 calls per quarter second: 10 + 11 * 2.5 = 37.5.
    assert a_ok == 10 + int((rounds - 1) * step * 10)
    assert a_refused == rounds * per_round - a_ok
    assert a_refused > 600
