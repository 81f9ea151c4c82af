"""What the SDK says on the wire, against a scripted WorkersService (tests/sdk/fake_server.py):
one batched heartbeat per interval, streams sized by the worker's slots, revocations from a
heartbeat, refused reports, results that are not JSON. End-to-end behaviour against the real
server is in test_worker.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.sdk import Context, NonRetryableError, RetryAfter, Worker, task
from conveyor.sdk.values import result_to_struct, struct_to_dict
from tests.sdk.conftest import eventually
from tests.sdk.fake_server import FakeWorkers, start_fake

running = 0
peak = 0
cancelled: list[str] = []
release = threading.Event()


@task(queue="a")
async def slow_async(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    global running, peak
    running += 1
    peak = max(peak, running)
    try:
        await asyncio.sleep(input.get("seconds", 0))
    except asyncio.CancelledError:
        cancelled.append(ctx.task_id)
        raise
    finally:
        running -= 1
    if input.get("bad_result"):
        return {"when": object()}
    if input.get("error") == "nonretryable":
        raise NonRetryableError("no")
    if input.get("error") == "later":
        raise RetryAfter(7)
    if input.get("error") == "long":
        raise ValueError("x" * 10_000)
    return {"ok": ctx.task_id}


@task(queue="b")
def blocking(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    ctx.wait_cancelled(input.get("seconds", 0))
    if ctx.cancelled:
        cancelled.append(ctx.task_id)
    return {"ok": ctx.task_id}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeWorkers, str]]:
    global running, peak
    running = peak = 0
    cancelled.clear()
    server, fake, target = await start_fake()
    try:
        yield fake, target
    finally:
        await server.stop(grace=None)


async def serve(worker: Worker) -> asyncio.Task[None]:
    t = asyncio.create_task(worker.run_async())
    await asyncio.sleep(0)
    return t


async def stop(worker: Worker, t: asyncio.Task[None]) -> None:
    worker.stop()
    async with asyncio.timeout(10):
        await t


async def test_one_heartbeat_call_per_interval_names_every_lease(fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async, blocking], target=target, slots=8, lease_seconds=1)
    for i in range(3):
        server.add("a", f"a{i}", {"seconds": 1.5})
        server.add("b", f"b{i}", {"seconds": 1.5})
    t = await serve(worker)
    await eventually(lambda: server.reports() == 6, within=10, what="6 reports")
    await stop(worker, t)
    # lease 1 s -> an interval of 1/3 s: about 4 calls in 1.5 s, each naming all six leases,
    # rather than one call per lease.
    full = [h for h in server.heartbeats if len(h.leases) == 6]
    assert 2 <= len(full) <= 6, [len(h.leases) for h in server.heartbeats]
    assert len(server.heartbeats) <= 7
    assert all(h.lease_seconds == 1 and h.worker_id == worker.worker_id for h in server.heartbeats)


async def test_slots_bound_the_tasks_held_and_are_divided_among_queues(
        fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async, blocking], target=target, slots=5)
    assert worker.queue_slots() == {"a": 3, "b": 2}
    for i in range(9):
        server.add("a", f"a{i}", {"seconds": 0.2})
    t = await serve(worker)
    await eventually(lambda: len(server.completed) == 9, within=10, what="9 completions")
    await stop(worker, t)
    assert peak == 3
    assert sorted((r.queue, r.max_in_flight) for r in server.stream_requests) == [("a", 3), ("b", 2)]


async def test_a_lease_revoked_by_heartbeat_cancels_its_handler_and_is_not_reported(
        fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async, blocking], target=target, slots=4, lease_seconds=1)
    server.add("a", "x", {"seconds": 30})
    server.add("b", "y", {"seconds": 30})
    t = await serve(worker)
    await eventually(lambda: running == 1 and len(server.heartbeats) >= 1, what="a running handler")
    # Revoked without telling the stream: only the heartbeat answer says so.
    server.revoke("x", via_stream=False)
    server.revoke("y", via_stream=False)
    await eventually(lambda: sorted(cancelled) == ["x", "y"], within=5, what="both handlers canceled")
    await asyncio.sleep(0.3)
    assert server.reports() == 0
    await stop(worker, t)
    assert server.reports() == 0


async def test_failures_are_reported_with_their_kind(fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async], target=target, slots=4)
    server.add("a", "nr", {"error": "nonretryable"})
    server.add("a", "later", {"error": "later"})
    server.add("a", "long", {"error": "long"})
    server.add("a", "json", {"bad_result": True})
    t = await serve(worker)
    await eventually(lambda: len(server.failed) == 4, what="4 failures")
    await stop(worker, t)
    by_id = {f.task_id: f for f in server.failed}
    assert by_id["nr"].non_retryable and by_id["nr"].error == "NonRetryableError: no"
    assert by_id["later"].retry_after_seconds == 7 and not by_id["later"].non_retryable
    assert by_id["long"].error.startswith("ValueError: xxx") and len(by_id["long"].error) == 2_000
    assert not by_id["long"].non_retryable
    # A result that is not JSON cannot get better on a retry.
    assert by_id["json"].non_retryable and "not a JSON object" in by_id["json"].error


async def test_a_refused_report_is_dropped_and_the_worker_goes_on(fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async], target=target, slots=1)
    server.lose_reports_of.add("lost")
    server.add("a", "lost")
    server.add("a", "next")
    t = await serve(worker)
    await eventually(lambda: [c.task_id for c in server.completed] == ["next"], what="the next task")
    await stop(worker, t)


async def test_stop_cancels_what_outlives_the_grace_period_and_releases_it(
        fake: tuple[FakeWorkers, str]) -> None:
    server, target = fake
    worker = Worker(tasks=[slow_async, blocking], target=target, slots=4, grace_seconds=0.5)
    server.add("a", "quick", {"seconds": 0.1})
    server.add("a", "slow", {"seconds": 30})
    server.add("b", "deaf", {"seconds": 30})
    t = await serve(worker)
    await eventually(lambda: running == 2, what="two async handlers")
    worker.stop()
    async with asyncio.timeout(5):
        await t
    assert [c.task_id for c in server.completed] == ["quick"]
    assert server.failed == []  # a shutdown is no verdict on a task: given back, not failed
    released = {r.task_id: r for r in server.released}
    assert set(released) == {"slow", "deaf"}
    assert all(r.reason == "worker shutting down" and r.attempt == 1 and r.worker_id == worker.worker_id
               for r in released.values())
    assert sorted(cancelled) == ["deaf", "slow"]


async def test_after_a_reconnect_streams_ask_only_for_the_slots_that_are_free() -> None:
    server, fake, target = await start_fake()
    port = int(target.rsplit(":", 1)[1])
    worker = Worker(tasks=[slow_async], target=target, slots=2)
    fake.add("a", "x", {"seconds": 1.5})
    t = await serve(worker)
    try:
        await eventually(lambda: running == 1, what="x running")
        await server.stop(grace=None)
        # A new server where the old one was; x keeps running on the worker meanwhile.
        server, fake, _ = await start_fake(port)
        await eventually(lambda: fake.stream_requests, within=10, what="a new stream")
        assert [r.max_in_flight for r in fake.stream_requests] == [1]
        # x's report reaches the new server, and x's slot goes to a further stream.
        await eventually(lambda: [c.task_id for c in fake.completed] == ["x"], what="x reported")
        await eventually(lambda: len(fake.stream_requests) == 2, what="a stream for x's slot")
        assert [r.max_in_flight for r in fake.stream_requests] == [1, 1]
        fake.add("a", "y", {"seconds": 0.5})
        fake.add("a", "z", {"seconds": 0.5})
        await eventually(lambda: len(fake.completed) == 3, what="y and z")
        assert peak == 2
    finally:
        await stop(worker, t)
        await server.stop(grace=None)


def test_values_round_trip_as_plain_json() -> None:
    s = result_to_struct({"n": 3, "f": 1.5, "l": [1, None, True], "d": {"x": "y"}})
    assert struct_to_dict(s) == {"n": 3, "f": 1.5, "l": [1, None, True], "d": {"x": "y"}}
    assert struct_to_dict(result_to_struct(None)) == {}
    assert struct_to_dict(result_to_struct([1, 2])) == {"value": [1, 2]}
    with pytest.raises(TypeError):
        result_to_struct({"bad": {1, 2}})


def test_a_worker_serves_one_handler_per_queue() -> None:
    @task(queue="a")
    def other(ctx: Context, input: dict[str, Any]) -> None:
        return None

    with pytest.raises(ValueError, match="one handler per queue"):
        Worker(tasks=[slow_async, other])
    with pytest.raises(ValueError):
        Worker(tasks=[slow_async], slots=0)
    assert Worker(tasks=[slow_async], slots=1, worker_id="w").queue_slots() == {"a": 1}
