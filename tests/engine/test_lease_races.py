"""Leasing is exact under concurrency: pollers on two replicas (each with its own pool, as two
replicas) racing over the same ready tasks never hold the same attempt, and every task is leased
exactly once per attempt; a heartbeat racing the expiry sweep either extends the lease or loses
it, never both."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

from conveyor.domain.errors import ConveyorError
from conveyor.domain.records import Caller, RunQuery, TriggerRequest
from conveyor.domain.states import StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore

ME = Caller("racer")
RUNS = 60


async def test_two_replicas_never_lease_the_same_attempt(replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create({"name": "work", "steps": [
        {"ref": "t1", "kind": "task", "queue": "q"}, {"ref": "t2", "kind": "task", "queue": "q"}]}, ME)
    for i in range(RUNS):
        await a.runs.trigger(TriggerRequest("work", payload={"i": i}), ME)

    held: list[tuple[str, int, str]] = []

    async def poller(engine: Engine, name: str) -> None:
        while True:
            leases = await engine.leases.acquire("q", name, 60, 7, ME)
            if not leases:
                return
            held.extend((lease.step.id, lease.step.attempt, name) for lease in leases)

    await asyncio.gather(*(poller(e, f"{tag}{n}") for n in range(3) for tag, e in (("a", a), ("b", b))))

    counts = Counter((step_id, attempt) for step_id, attempt, _ in held)
    assert len(counts) == 2 * RUNS and set(counts.values()) == {1}, counts.most_common(3)
    assert {attempt for _, attempt in counts} == {1}
    page = await a.runs.list(RunQuery(), 1000, "", ME)
    for run in page.items:
        steps = (await b.steps.list(run.id, 10, "", ME)).items
        assert {s.status for s in steps} == {StepStatus.RUNNING}
        events = (await b.runs.events(run.id, 0, 100, "", ME)).items
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_heartbeat_racing_the_expiry_sweep_wins_or_loses_cleanly(database: Database) -> None:
    """Worker-side engine A still sees the leases live (its clock is a second behind) while B's
    runner sweeps them as expired: per lease, exactly one of the two wins."""
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    clocks = [ManualClock(t0), ManualClock(t0)]
    dbs = [Database(database.url), Database(database.url)]
    a, b = (Engine(SqlStore(db), Settings(db_url=database.url), c) for db, c in zip(dbs, clocks, strict=True))
    try:
        retry = {"max_attempts": 2, "initial_interval_seconds": 1}
        await a.workflows.create({"name": "beat", "steps": [
            {"ref": "t", "kind": "task", "queue": "q", "retry": retry}]}, ME)
        for i in range(30):
            await a.runs.trigger(TriggerRequest("beat", payload={"i": i}), ME)
        leases = await a.leases.acquire("q", "w", 10, 100, ME)
        assert len(leases) == 30
        clocks[0].advance(9)   # A: one second before expiry
        clocks[1].advance(10)  # B: at expiry

        async def beat(step_id: str) -> bool:
            try:
                await a.leases.heartbeat(step_id, 1, "w", 30, ME)
                return True
            except ConveyorError as e:
                assert e.reason == "LEASE_LOST"
                return False

        results = await asyncio.gather(b.tick(), *(beat(lease.step.id) for lease in leases))
        await b.tick()  # whatever the first pass left to sweep
        for lease, extended in zip(leases, results[1:], strict=True):
            (step,) = (await a.steps.list(lease.run.id, 10, "", ME)).items
            events = (await a.runs.events(lease.run.id, 0, 100, "", ME)).items
            expired = [e for e in events if e.type == "step.queued" and "expired" in e.message]
            if extended:  # the heartbeat won: the sweep's stale save was fenced off
                assert step.status == StepStatus.RUNNING
                assert step.lease_expires_at == t0 + timedelta(seconds=39)
                assert expired == []
            else:  # the sweep won: one failed attempt, retried
                assert step.status == StepStatus.QUEUED and step.lease_expires_at is None
                assert len(expired) == 1
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
    finally:
        for engine in (a, b):
            await engine.stop()
        for db in dbs:
            await db.dispose()
