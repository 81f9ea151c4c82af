"""Timers are judged by the database's clock (SPEC §4.3): `DatabaseClock` measures the offset
of the host's clock from the database's, and a replica whose clock runs minutes ahead steals no
live lease, where the same replica judging by its own clock would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conveyor.domain.records import Caller, TriggerRequest
from conveyor.domain.states import StepStatus
from conveyor.engine.clock import DatabaseClock, ManualClock, SystemClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore

ME = Caller("clocks")
SKEW = timedelta(minutes=5)


class SkewedClock:
    """This host's clock, set `skew` wrong."""

    def __init__(self, skew: timedelta) -> None:
        self.skew = skew

    def now(self) -> datetime:
        return SystemClock().now() + self.skew


async def test_the_offset_is_measured_at_the_midpoint_of_the_query() -> None:
    local = ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    clock = DatabaseClock(local)

    async def database_now() -> datetime:
        local.advance(2)  # the round trip takes 2 s; the database answers at its midpoint
        return datetime(2026, 3, 1, 11, 55, 1, tzinfo=UTC)

    assert await clock.sync(database_now) == timedelta(minutes=-5)
    assert clock.now() == datetime(2026, 3, 1, 11, 55, 2, tzinfo=UTC)
    local.advance(10)  # between syncs it follows the local clock
    assert clock.now() == datetime(2026, 3, 1, 11, 55, 12, tzinfo=UTC)


async def test_the_database_clock_reads_the_database(database: Database) -> None:
    clock = DatabaseClock(SkewedClock(SKEW))
    async with SqlStore(database).read() as repo:
        async def database_now() -> datetime:
            return await repo.database_now()

        offset = await clock.sync(database_now)
    # The database runs on this host's true clock: the offset undoes the skew.
    assert abs(offset + SKEW) < timedelta(seconds=1)
    assert abs(clock.now() - SystemClock().now()) < timedelta(seconds=1)


async def test_a_replica_whose_clock_runs_minutes_ahead_steals_no_live_lease(database: Database) -> None:
    dbs = [Database(database.url) for _ in range(3)]
    settings = Settings(db_url=database.url)
    honest = Engine(SqlStore(dbs[0]), settings, DatabaseClock())
    ahead = Engine(SqlStore(dbs[1]), settings, DatabaseClock(SkewedClock(SKEW)))
    naive = Engine(SqlStore(dbs[2]), settings, SkewedClock(SKEW))  # judges by its own clock
    try:
        for engine in (honest, ahead):
            await engine.sync_clock()
        await honest.workflows.create({"name": "work", "steps": [{"ref": "t", "kind": "task", "queue": "q"}]},
                                      ME)
        run = await honest.runs.trigger(TriggerRequest("work"), ME)
        await honest.tick()
        (lease,) = await honest.leases.acquire("q", "w1", 60, 1, ME)

        await ahead.tick()  # its runner sweeps expired leases: this one has 60 s left
        (step,) = (await ahead.steps.list(run.id, 10, "", ME)).items
        assert step.status == StepStatus.RUNNING and step.attempt == 1 and step.worker_id == "w1"
        await ahead.leases.heartbeat(step.id, 1, "w1", 60, ME)  # and it extends, not refuses, it

        # The test can fail: judged by the skewed clock itself, the lease has long expired.
        await naive.tick()
        (stolen,) = (await naive.steps.list(run.id, 10, "", ME)).items
        assert stolen.status == StepStatus.QUEUED and "expired" in stolen.error
        assert lease.step.id == stolen.id
    finally:
        for engine in (honest, ahead, naive):
            await engine.stop()
        for db in dbs:
            await db.dispose()
