"""Dispatch and leases below the API: two replicas (two Engines, each with its own pool, on one
database) never hand out the same attempt and see each other's commits through the safety
poll; reports are fenced one by one inside a grouped commit; a caller scoped to one project
never touches another's leases; an output too large to store fails the step for good.

Runs on SQLite and on PostgreSQL (CONVEYOR_TEST_DB=postgresql); on SQLite the two engines share
one file, whose single writer serializes them, which is still a valid (if easier) race.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import asyncpg
import pytest

from conveyor.domain.errors import ConveyorError
from conveyor.domain.records import Caller, RunQuery, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine import dispatch as dispatch_module
from conveyor.engine.clock import ManualClock
from conveyor.engine.dispatch import REVOKED_ELSEWHERE, Heartbeat, Revoked
from conveyor.engine.facade import Engine
from conveyor.engine.leases import Lease
from conveyor.storage.db import Database

ME = Caller("tester")
RUNS = 100


def one_task(name: str = "work", queue: str = "q", **step: Any) -> dict[str, Any]:
    return {"name": name, "steps": [{"ref": "t", "kind": "task", "queue": queue, **step}]}


async def trigger(engine: Engine, workflow: str, n: int = 1, caller: Caller = ME,
                  project: str = "") -> list[str]:
    out = []
    for i in range(n):
        request = TriggerRequest(workflow, project_id=project, payload={"i": i})
        run = await engine.runs.trigger(request, caller)
        out.append(run.id)
    return out


async def step_of(engine: Engine, run_id: str, ref: str = "t") -> Any:
    (step,) = [s for s in (await engine.steps.list(run_id, 100, "", ME)).items if s.step_ref == ref]
    return step


async def events_of(engine: Engine, run_id: str) -> list[Any]:
    return list((await engine.runs.events(run_id, 0, 1000, "", ME)).items)


async def next_item(stream: AsyncIterator[Any], seconds: float) -> Any:
    return await asyncio.wait_for(anext(stream), seconds)


def open_stream(engine: Engine, worker: str, max_in_flight: int, lease_seconds: int = 600,
                queue: str = "q") -> AsyncGenerator[Any, None]:
    """A Dispatch stream, as the servicer runs it (an async generator; close it with aclose)."""
    req = engine.dispatch.request("", queue, worker, lease_seconds, ME)
    stream = engine.dispatch.stream(req, max_in_flight)
    assert isinstance(stream, AsyncGenerator)
    return stream


# -- two replicas -----------------------------------------------------------------------------


async def test_pollers_on_two_replicas_lease_and_complete_every_task_exactly_once(
        replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(one_task(), ME)
    run_ids = await trigger(a, "work", RUNS)
    leased: list[tuple[str, int, str]] = []
    completed: list[str] = []

    async def worker(engine: Engine, name: str) -> None:
        req = engine.dispatch.request("", "q", name, 60, ME)
        while len(completed) < RUNS:
            for lease in await engine.dispatch.poll(req, 3, 1):
                leased.append((lease.step.id, lease.step.attempt, name))
                await engine.leases.complete(lease.step.id, lease.step.attempt, name, {"by": name}, ME)
                completed.append(lease.step.id)

    await asyncio.wait_for(asyncio.gather(*(worker(e, f"{tag}{n}") for n in range(4)
                                            for tag, e in (("a", a), ("b", b)))), 60)

    counts = Counter((step_id, attempt) for step_id, attempt, _ in leased)
    assert len(counts) == RUNS and set(counts.values()) == {1}, counts.most_common(3)
    assert {attempt for _, attempt in counts} == {1}
    assert Counter(completed) == Counter({step_id: 1 for step_id, _ in counts})
    for run_id in run_ids:
        assert (await b.runs.get(run_id, ME)).status == RunStatus.COMPLETED
        events = await events_of(b, run_id)
        assert [e.type for e in events].count("step.completed") == 1
        assert [e.type for e in events].count("step.running") == 1
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_concurrent_duplicate_reports_through_two_replicas_apply_once(replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(one_task(), ME)
    run_ids = await trigger(a, "work", 10)
    leases = await a.leases.acquire("q", "w", 60, 100, ME)
    assert len(leases) == 10

    async def report(engine: Engine, lease: Lease, n: int) -> bool:
        try:
            await engine.leases.complete(lease.step.id, 1, "w", {"n": n}, ME)
            return True
        except ConveyorError as e:
            assert e.reason == "LEASE_LOST", e
            return False

    results = await asyncio.gather(*(report(e, lease, n) for lease in leases
                                     for n, e in enumerate((a, b, a, b))))

    assert sum(results) == 10
    for run_id in run_ids:
        assert [e.type for e in await events_of(a, run_id)].count("step.completed") == 1
        assert (await a.runs.get(run_id, ME)).status == RunStatus.COMPLETED


async def test_a_revocation_on_one_replica_reaches_a_stream_on_the_other(replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(one_task(), ME)
    (run_id,) = await trigger(a, "work")
    stream = open_stream(b, "w1", 1)
    try:
        lease = await next_item(stream, 2)
        assert isinstance(lease, Lease) and lease.run.id == run_id

        await a.runs.cancel(run_id, ME)
        began = time.monotonic()
        item = await next_item(stream, 3)

        assert isinstance(item, Revoked), item
        assert (item.task_id, item.attempt, item.reason) == (lease.step.id, 1, REVOKED_ELSEWHERE)
        assert time.monotonic() - began < 2.5  # the 1 s safety poll, not the lease's 600 s
    finally:
        await stream.aclose()
    with pytest.raises(ConveyorError) as lost:
        await b.leases.complete(lease.step.id, 1, "w1", {}, ME)
    assert lost.value.reason == "LEASE_LOST"


async def test_a_report_through_another_replica_frees_the_streams_slot(replicas: list[Engine]) -> None:
    """The worker's stream is on replica B, its report lands on replica A: the stream learns
    the lease ended (from the database, within the safety poll) and leases the next task."""
    a, b = replicas
    await a.workflows.create(one_task(), ME)
    await trigger(a, "work", 2)
    stream = open_stream(b, "w1", 1)
    try:
        first = await next_item(stream, 2)
        await a.leases.complete(first.step.id, 1, "w1", {}, ME)
        items = [await next_item(stream, 3)]
        while not isinstance(items[-1], Lease):
            items.append(await next_item(stream, 3))
    finally:
        await stream.aclose()

    assert items[-1].step.id != first.step.id
    # What it says of the lease the worker itself reported (it cannot tell apart here):
    assert all(isinstance(i, Revoked) and i.task_id == first.step.id for i in items[:-1])


async def test_a_trigger_on_one_replica_reaches_a_long_poll_on_the_other(replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(one_task(), ME)
    req = b.dispatch.request("", "q", "w1", 60, ME)
    waiting = asyncio.create_task(b.dispatch.poll(req, 1, 30))
    await asyncio.sleep(0.1)

    (run_id,) = await trigger(a, "work")
    began = time.monotonic()
    (lease,) = await asyncio.wait_for(waiting, 3)

    assert lease.run.id == run_id and time.monotonic() - began < 2.5


async def test_a_poll_is_not_starved_by_runs_another_replica_holds_locked(
        engine: Engine, database: Database, clock: ManualClock, backend: str) -> None:
    """While another replica (here: a bare connection) holds the oldest ready runs locked, a
    poll must lease the ready tasks of the other runs (SKIP LOCKED), not answer empty."""
    if backend != "postgresql":
        pytest.skip("row locks: SQLite's writer locks the whole database, there is nothing to skip")
    await engine.workflows.create(one_task(), ME)
    run_ids = []
    for _ in range(10):
        run_ids += await trigger(engine, "work")
        clock.advance(1)  # ready_at orders them: the first three are the oldest
    conn = await asyncpg.connect(str(database.url).replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with conn.transaction():
            await conn.execute("SELECT id FROM workflow_runs WHERE id = ANY($1::text[]) FOR UPDATE",
                               run_ids[:3])
            leases = await engine.dispatch.poll(engine.dispatch.request("", "q", "w", 60, ME), 3, 0)
    finally:
        await conn.close()

    assert sorted(lease.run.id for lease in leases) == sorted(run_ids[3:6]), \
        f"{len(leases)} leased while 7 unlocked runs had a ready task"


# -- one engine -------------------------------------------------------------------------------


async def test_reports_in_one_batch_are_fenced_one_by_one(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    await engine.workflows.create({"name": "pair", "steps": [
        {"ref": "x", "kind": "task", "queue": "q"}, {"ref": "y", "kind": "task", "queue": "q"}]}, ME)
    (run_id,) = await trigger(engine, "pair")
    (other,) = await trigger(engine, "pair")
    acquired = await engine.leases.acquire("q", "w", 60, 10, ME)
    leases = {(lease.run.id, lease.step.step_ref): lease for lease in acquired}
    batches: list[int] = []
    original = engine.leases._apply_once

    async def counted(batch: list[Any], handed: list[Any]) -> Any:
        batches.append(len(batch))
        return await original(batch, handed)

    monkeypatch.setattr(engine.leases, "_apply_once", counted)
    x, y = leases[(run_id, "x")], leases[(run_id, "y")]
    ox, oy = leases[(other, "x")], leases[(other, "y")]

    results = await asyncio.gather(
        engine.leases.complete(x.step.id, 1, "w", {"ok": 1}, ME),
        engine.leases.complete(y.step.id, 1, "intruder", {"bad": 1}, ME),   # another worker
        engine.leases.complete(ox.step.id, 2, "w", {"bad": 2}, ME),         # another attempt
        engine.leases.complete("ghost", 1, "w", {}, ME),                    # unknown
        engine.leases.fail(oy.step.id, 1, "w", "boom", False, ME),          # fine
        return_exceptions=True)

    assert batches[0] == 5, batches  # one transaction for the whole batch
    assert results[0] is None and results[4] is None
    reasons = [getattr(r, "reason", None) for r in results[1:4]]
    assert reasons == ["LEASE_LOST", "LEASE_LOST", "TASK_NOT_FOUND"]
    assert (await step_of(engine, run_id, "x")).status == StepStatus.COMPLETED
    assert (await step_of(engine, run_id, "y")).status == StepStatus.RUNNING
    assert (await step_of(engine, other, "y")).status == StepStatus.FAILED
    # The run whose only accepted report failed it: its other lease was revoked with it.
    assert (await step_of(engine, other, "x")).status == StepStatus.CANCELED
    assert (await engine.runs.get(other, ME)).status == RunStatus.FAILED


async def test_an_output_too_large_to_store_fails_the_step_for_good(engine: Engine) -> None:
    await engine.workflows.create(one_task(retry={"max_attempts": 5, "initial_interval_seconds": 1}), ME)
    (run_id,) = await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", "w", 60, 1, ME)

    await engine.leases.complete(lease.step.id, 1, "w", {"blob": "x" * (256 * 1024 + 1)}, ME)

    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and "OUTPUT_TOO_LARGE" in step.error and step.output is None
    assert (await engine.runs.get(run_id, ME)).status == RunStatus.FAILED
    failed = [e for e in await events_of(engine, run_id) if e.type == "step.failed"]
    assert len(failed) == 1 and failed[0].data["reason"] == "OUTPUT_TOO_LARGE"
    assert await engine.leases.acquire("q", "w", 60, 1, ME) == []


async def test_an_output_at_the_limit_is_stored(engine: Engine) -> None:
    await engine.workflows.create(one_task(), ME)
    (run_id,) = await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", "w", 60, 1, ME)
    output = {"blob": "x" * (256 * 1024 - len('{"blob":""}'))}

    await engine.leases.complete(lease.step.id, 1, "w", output, ME)

    assert (await step_of(engine, run_id)).status == StepStatus.COMPLETED


async def test_a_caller_scoped_to_one_project_never_touches_anothers_leases(engine: Engine) -> None:
    admin_a, admin_b = Caller("key-a", project="a"), Caller("key-b", project="b")
    await engine.workflows.create({**one_task(), "project_id": "a"}, admin_a)
    (run_id,) = await trigger(engine, "work", caller=admin_a, project="a")
    (lease,) = await engine.leases.acquire("q", "w", 60, 1, admin_a)

    assert await engine.leases.acquire("q", "w", 60, 10, admin_b) == []
    assert await engine.leases.heartbeat_many([(lease.step.id, 1)], "w", 60, admin_b) == [None]
    with pytest.raises(ConveyorError) as beat:
        await engine.leases.heartbeat(lease.step.id, 1, "w", 60, admin_b)
    with pytest.raises(ConveyorError) as done:
        await engine.leases.complete(lease.step.id, 1, "w", {}, admin_b)
    with pytest.raises(ConveyorError) as failed:
        await engine.leases.fail(lease.step.id, 1, "w", "x", False, admin_b)
    with pytest.raises(ConveyorError) as asked:
        engine.dispatch.request("a", "q", "w", 60, admin_b)

    assert beat.value.reason == done.value.reason == failed.value.reason == "TASK_NOT_FOUND"
    assert asked.value.reason == "PROJECT_FORBIDDEN"
    assert (await step_of(engine, run_id)).status == StepStatus.RUNNING
    [until] = await engine.leases.heartbeat_many([(lease.step.id, 1)], "w", 60, admin_a)
    assert until is not None
    await engine.leases.complete(lease.step.id, 1, "w", {}, admin_a)


async def test_a_stream_with_max_in_flight_zero_holds_one(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch_module, "STREAM_HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 0.05)
    await engine.workflows.create(one_task(), ME)
    await trigger(engine, "work", 3)
    stream = open_stream(engine, "w", 0)
    try:
        first = await next_item(stream, 2)
        second = await next_item(stream, 2)
    finally:
        await stream.aclose()

    assert isinstance(first, Lease) and isinstance(second, Heartbeat)


async def test_a_poll_woken_by_its_key_is_not_woken_by_other_keys(engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing a commit fires only the keys of the queues it made ready."""
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 30.0)
    await engine.workflows.create(one_task("on-a", queue="a"), ME)
    await engine.workflows.create(one_task("on-b", queue="b"), ME)
    calls: Counter[str] = Counter()
    original = engine.leases.acquire

    async def counted(queue: str, *args: Any, **kwargs: Any) -> Any:
        calls[queue] += 1
        return await original(queue, *args, **kwargs)

    monkeypatch.setattr(engine.leases, "acquire", counted)
    waiting = asyncio.create_task(engine.dispatch.poll(engine.dispatch.request("", "b", "w", 60, ME), 1, 30))
    await asyncio.sleep(0.1)

    await trigger(engine, "on-a", 5)
    await asyncio.sleep(0.2)
    assert calls["b"] == 1 and not waiting.done()
    (run_b,) = await trigger(engine, "on-b")
    (lease,) = await asyncio.wait_for(waiting, 2)
    assert lease.run.id == run_b and calls["b"] == 2


async def test_an_idle_pollers_safety_polls_do_not_take_the_writer(engine: Engine,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: every safety poll of an idle long-poll or stream opened a write
    transaction to find nothing (on SQLite, the one writer everybody waits for). A safety poll
    now probes with a snapshot first; a wake-up by its key still leases at once."""
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 0.02)
    await engine.workflows.create(one_task(), ME)
    writes = 0
    original = engine.store.write

    def counted() -> Any:
        nonlocal writes
        writes += 1
        return original()

    monkeypatch.setattr(engine.store, "write", counted)
    req = engine.dispatch.request("", "q", "w", 60, ME)
    assert await engine.dispatch.poll(req, 1, 1) == []  # ~50 safety polls of an empty queue
    assert writes == 1, writes  # the first look only

    stream = engine.dispatch.stream(req, 2)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.5)
    assert writes == 2, writes  # again only its first look
    monkeypatch.setattr(engine.store, "write", original)
    (run_id,) = await trigger(engine, "work")
    lease = await asyncio.wait_for(first, 2)
    assert isinstance(lease, Lease) and lease.run.id == run_id
    await stream.aclose()


async def test_a_scheduled_runs_task_wakes_its_queue(engine: Engine, clock: ManualClock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a schedule's commit did not publish, so a long-poll on the queue of a
    scheduled run's first task waited for the safety poll. Every commit outside a runner pass
    now goes through `Runner.after_commit`."""
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 30.0)
    await engine.workflows.create({**one_task("nightly"), "schedule": {"cron": "* * * * *"}}, ME)
    waiting = asyncio.create_task(engine.dispatch.poll(engine.dispatch.request("", "q", "w", 60, ME), 1, 30))
    await asyncio.sleep(0.1)
    assert not waiting.done()

    clock.advance(61)
    assert await engine.schedules.fire_due() == 1
    (lease,) = await asyncio.wait_for(waiting, 2)
    assert lease.run.triggered_by == "schedule" and lease.step.step_ref == "t"


async def test_a_retried_task_wakes_its_queue_when_its_backoff_ends(engine: Engine,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   clock: ManualClock) -> None:
    """The runner's pass that makes a retry ready again publishes the queue's key."""
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 30.0)
    await engine.workflows.create(one_task(retry={"max_attempts": 2, "initial_interval_seconds": 10}), ME)
    await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", "w", 60, 1, ME)
    await engine.leases.fail(lease.step.id, 1, "w", "boom", True, ME)
    waiting = asyncio.create_task(engine.dispatch.poll(engine.dispatch.request("", "q", "w", 60, ME), 1, 30))
    await asyncio.sleep(0.1)
    assert not waiting.done()

    clock.advance(10)
    await engine.tick()
    (again,) = await asyncio.wait_for(waiting, 2)

    assert (again.step.id, again.step.attempt) == (lease.step.id, 2)


# -- losses -------------------------------------------------------------------------------------


async def test_a_stream_closed_before_delivery_gives_its_undelivered_leases_back(engine: Engine) -> None:
    await engine.workflows.create(one_task(), ME)
    run_ids = await trigger(engine, "work", n=3)
    await engine.tick()
    stream = open_stream(engine, "w1", max_in_flight=3)
    first = await next_item(stream, 5)
    second = await next_item(stream, 5)  # asking again: the first was written to the worker

    await stream.aclose()  # the worker hung up with the second on its way and the third unsent
    await engine.dispatch.close()

    by_run = {run_id: await step_of(engine, run_id) for run_id in run_ids}
    delivered = by_run[first.run.id]
    assert delivered.status == StepStatus.RUNNING and delivered.worker_id == "w1"
    for run_id in set(run_ids) - {first.run.id}:
        step = by_run[run_id]
        assert step.status == StepStatus.QUEUED and step.attempt == 1, step
        (lost,) = [e for e in await events_of(engine, run_id) if e.data and "lost" in e.data]
        assert lost.data["lost"] == "released by 'w1': the task stream closed before the task was delivered"
    assert second.run.id in set(run_ids) - {first.run.id}
    # Offered again at once, to anyone.
    again = await engine.leases.acquire("q", "w2", 60, 10, ME)
    assert sorted(lease.step.attempt for lease in again) == [2, 2]


async def test_a_quiescing_dispatch_hands_out_nothing_and_ends_its_streams(engine: Engine) -> None:
    await engine.workflows.create(one_task(), ME)
    stream = open_stream(engine, "w1", max_in_flight=2)
    waiting = asyncio.ensure_future(next_item(stream, 5))

    engine.dispatch.quiesce()
    await trigger(engine, "work")
    await engine.tick()

    with pytest.raises(StopAsyncIteration):
        await waiting
    req = engine.dispatch.request("", "q", "w2", 60, ME)
    assert await engine.dispatch.poll(req, 5, 0) == []
    (run_id,) = [r.id for r in (await engine.runs.list(RunQuery(), 10, "", ME)).items]
    assert (await step_of(engine, run_id)).status == StepStatus.QUEUED
