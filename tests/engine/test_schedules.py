"""Cron schedules against a real database with a ManualClock: ticks fire runs (one per due tick,
missed ticks once), `next_fire_at` follows create, update, archive, pause and resume, time zones
(with a DST change), containment of one workflow's failure, a firing that cannot commit, and
concurrent firing on one engine and on two engines with their own pools (PostgreSQL: row locks
with SKIP LOCKED; SQLite: the one writer)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.feed import project_key
from conveyor.domain.records import DEFAULT_PROJECT, Caller, RunQuery, RunRecord
from conveyor.domain.spec import Schedule
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine import creation, schedules
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.schedules import NO_VARIABLES, next_tick
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.repository import wf_t
from conveyor.storage.store import SqlStore
from tests.engine.events import without_change

ME = Caller("tester")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # the `clock` fixture's start
EVERY_MINUTE = {"cron": "* * * * *"}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def scheduled(name: str, schedule: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    definition: dict[str, Any] = {"name": name, "steps": [{"ref": "a", "kind": "noop"}], **extra}
    if schedule is not None:
        definition["schedule"] = schedule
    return definition


async def runs_of(engine: Engine, workflow: str) -> list[RunRecord]:
    """The workflow's runs, oldest first."""
    page = await engine.runs.list(RunQuery(workflow_ids=[workflow]), 1000, "", ME)
    return sorted(page.items, key=lambda r: (r.created_at, r.id))


async def scheduled_at(engine: Engine, run: RunRecord) -> str:
    """The tick a scheduled run was fired for, from its opening event."""
    opened = (await engine.runs.events(run.id, 0, 1, "", ME)).items[0]
    assert opened.data is not None
    return str(opened.data["scheduled_at"])


async def next_fire(engine: Engine, workflow: str) -> datetime | None:
    return (await engine.workflows.get(workflow, "", ME)).next_fire_at


async def test_every_minute_fires_one_run_per_tick(engine: Engine, clock: ManualClock) -> None:
    wf = await engine.workflows.create(scheduled("minutely", EVERY_MINUTE), ME)
    assert wf.next_fire_at == T0 + timedelta(minutes=1)
    assert await engine.schedules.fire_due() == 0  # 12:00 is not after creation: nothing due

    fired = []
    for minute in range(1, 4):
        clock.advance(60)
        assert await engine.schedules.fire_due() == 1
        assert await engine.schedules.fire_due() == 0  # the same tick never fires twice
        assert await next_fire(engine, "minutely") == T0 + timedelta(minutes=minute + 1)
        fired.append(clock.now())

    runs = await runs_of(engine, "minutely")
    assert [r.created_at for r in runs] == fired
    for run in runs:
        assert (run.triggered_by, run.created_by) == ("schedule", "schedule")
        assert (run.workflow_id, run.workflow_version) == (wf.id, 1)
        assert run.status == RunStatus.COMPLETED  # a noop run is planned in the firing transaction
    events = (await engine.runs.events(runs[0].id, 0, 100, "", ME)).items
    assert events[0].actor == "schedule"
    assert without_change(events[0].data) == {
        "scheduled_at": "2026-03-01T12:01:00+00:00", "cron": "* * * * *", "timezone": "UTC"}
    # Scheduled runs are found by who triggered them.
    page = await engine.runs.list(RunQuery(triggered_by="schedule"), 100, "", ME)
    assert len(page.items) == 3


async def test_missed_ticks_fire_once(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("minutely", EVERY_MINUTE), ME)
    clock.advance(10 * 60 + 30)  # ten ticks (12:01 .. 12:10) passed while nothing fired

    assert await engine.schedules.fire_due() == 1
    assert await engine.schedules.fire_due() == 0
    assert await next_fire(engine, "minutely") == datetime(2026, 3, 1, 12, 11, tzinfo=UTC)
    (run,) = await runs_of(engine, "minutely")
    assert await scheduled_at(engine, run) == "2026-03-01T12:01:00+00:00"  # the oldest missed tick


async def test_the_schedules_loop_fires_a_missed_tick_on_start(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("minutely", EVERY_MINUTE), ME)
    clock.advance(5 * 60)
    committed = engine.runner.keyed.next(project_key(DEFAULT_PROJECT))
    engine.schedules.start()
    try:
        await asyncio.wait_for(committed.wait(), 10)
    finally:
        await engine.schedules.stop()
    assert len(await runs_of(engine, "minutely")) == 1
    assert await next_fire(engine, "minutely") == datetime(2026, 3, 1, 12, 6, tzinfo=UTC)


async def test_schedules_stored_without_a_tick_get_one(engine: Engine, clock: ManualClock,
                                                       database: Database) -> None:
    # Workflows written before schedules fired carry a cron and no next_fire_at.
    for name in ("old", "paused", "archived"):
        await engine.workflows.create(scheduled(name, EVERY_MINUTE), ME)
    await engine.workflows.pause_schedule("paused", "", ME)
    await engine.workflows.archive("archived", "", ME)
    async with database.write() as conn:
        await conn.execute(update(wf_t).values(next_fire_at=None))
    clock.advance(90)

    assert await engine.schedules.adopt_unscheduled() == 1
    assert await next_fire(engine, "old") == T0 + timedelta(minutes=2)
    assert await next_fire(engine, "paused") is None
    assert await next_fire(engine, "archived") is None
    assert await engine.schedules.adopt_unscheduled() == 0


async def test_variables_defaults_are_the_payload(engine: Engine, clock: ManualClock) -> None:
    variables = [{"name": "region", "default": "eu"}, {"name": "dry_run", "default": False}]
    await engine.workflows.create(scheduled("defaults", EVERY_MINUTE, variables=variables,
                                            timeout_seconds=600, max_parallel_steps=3), ME)
    clock.advance(60)
    assert await engine.schedules.fire_due() == 1
    (run,) = await runs_of(engine, "defaults")
    assert run.payload == {"region": "eu", "dry_run": False}
    assert run.expires_at == clock.now() + timedelta(seconds=600)
    assert run.max_parallel_steps == 3


async def test_a_required_variable_fails_its_runs_and_nothing_else(engine: Engine,
                                                                   clock: ManualClock) -> None:
    # The definition is valid (a trigger can give the variable); each tick is recorded as a run
    # that failed at once, naming what is missing; the other workflow's schedule is unaffected.
    needs = scheduled("needs", EVERY_MINUTE, variables=[{"name": "environment", "required": True}])
    needs["steps"].append({"ref": "b", "kind": "noop", "depends_on": ["a"]})
    await engine.workflows.create(needs, ME)
    await engine.workflows.create(scheduled("fine", EVERY_MINUTE), ME)
    clock.advance(60)

    assert await engine.schedules.fire_due() == 2
    (failed,) = await runs_of(engine, "needs")
    assert failed.status == RunStatus.FAILED
    assert failed.status_message == NO_VARIABLES
    assert failed.error == "payload.environment: required variable missing"
    assert failed.triggered_by == "schedule"
    steps = (await engine.steps.list(failed.id, 10, "", ME)).items
    assert {s.status for s in steps} == {StepStatus.CANCELED}
    (ok,) = await runs_of(engine, "fine")
    assert ok.status == RunStatus.COMPLETED
    for name in ("needs", "fine"):
        assert await next_fire(engine, name) == T0 + timedelta(minutes=2)


async def test_a_bug_building_one_run_skips_that_tick_only(engine: Engine, clock: ManualClock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    broken = await engine.workflows.create(scheduled("broken", EVERY_MINUTE), ME)
    await engine.workflows.create(scheduled("fine", EVERY_MINUTE), ME)
    real = creation.start_run

    def start_run(run: RunRecord, *args: Any, **kwargs: Any) -> Any:
        if run.workflow_id == broken.id:
            raise RuntimeError("a bug")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(creation, "start_run", start_run)
    clock.advance(60)
    assert await engine.schedules.fire_due() == 1
    assert await runs_of(engine, "broken") == []
    assert len(await runs_of(engine, "fine")) == 1
    assert await next_fire(engine, "broken") == T0 + timedelta(minutes=2)  # the tick is skipped

    monkeypatch.setattr(creation, "start_run", real)
    clock.advance(60)
    assert await engine.schedules.fire_due() == 2


async def test_a_firing_that_does_not_commit_moves_nothing(engine: Engine, clock: ManualClock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Inserting the run and advancing next_fire_at are one transaction: a crash (here: the
    # insert failing) between them leaves the tick due, and it then fires exactly once.
    await engine.workflows.create(scheduled("minutely", EVERY_MINUTE), ME)
    real = creation.insert
    calls = Counter[str]()

    async def insert_once_failing(repo: Any, runs: Any, idempotency: Any) -> None:
        calls["insert"] += 1
        if calls["insert"] == 1:
            raise RuntimeError("the server died here")
        await real(repo, runs, idempotency)

    monkeypatch.setattr(schedules.creation, "insert", insert_once_failing)
    clock.advance(60)
    with pytest.raises(RuntimeError):
        await engine.schedules.fire_due()
    assert await next_fire(engine, "minutely") == T0 + timedelta(minutes=1)
    assert await runs_of(engine, "minutely") == []

    clock.advance(5)
    assert await engine.schedules.fire_due() == 1
    assert await engine.schedules.fire_due() == 0
    assert len(await runs_of(engine, "minutely")) == 1
    assert await next_fire(engine, "minutely") == T0 + timedelta(minutes=2)


async def test_pause_and_resume(engine: Engine, clock: ManualClock) -> None:
    wf = await engine.workflows.create(scheduled("minutely", EVERY_MINUTE), ME)

    paused = await engine.workflows.pause_schedule("minutely", "", ME)
    assert (paused.schedule_paused, paused.next_fire_at, paused.version) == (True, None, 1)
    again = await engine.workflows.pause_schedule(wf.id, "", ME)  # idempotent
    assert (again.schedule_paused, again.next_fire_at) == (True, None)
    for _ in range(5):
        clock.advance(60)
        assert await engine.schedules.fire_due() == 0
    stored = await engine.workflows.get("minutely", "", ME)
    assert (stored.schedule_paused, stored.next_fire_at, stored.version) == (True, None, 1)

    clock.advance(30)  # 12:05:30: resumed from the next tick after now, with no backlog
    resumed = await engine.workflows.resume_schedule("minutely", "", ME)
    assert (resumed.schedule_paused, resumed.next_fire_at) == (False, datetime(2026, 3, 1, 12, 6, tzinfo=UTC))
    assert (await engine.workflows.resume_schedule("minutely", "", ME)).next_fire_at == resumed.next_fire_at
    assert await engine.schedules.fire_due() == 0
    clock.advance(30)
    assert await engine.schedules.fire_due() == 1
    assert len(await runs_of(engine, "minutely")) == 1


async def test_pause_and_resume_need_a_schedule_and_a_live_workflow(engine: Engine) -> None:
    await engine.workflows.create(scheduled("plain"), ME)
    for op in (engine.workflows.pause_schedule, engine.workflows.resume_schedule):
        with pytest.raises(ConveyorError) as caught:
            await op("plain", "", ME)
        assert (caught.value.kind, caught.value.reason) == (ErrorKind.FAILED_PRECONDITION, "NO_SCHEDULE")

    await engine.workflows.create(scheduled("gone", EVERY_MINUTE), ME)
    await engine.workflows.archive("gone", "", ME)
    with pytest.raises(ConveyorError) as caught:
        await engine.workflows.pause_schedule("gone", "", ME)
    assert caught.value.reason == "WORKFLOW_ARCHIVED"


async def test_update_recomputes_next_fire_at_only_when_the_schedule_changes(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("wf", {"cron": "0 * * * *"}), ME)
    assert await next_fire(engine, "wf") == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)

    clock.advance(10 * 60)  # 12:10
    changed = await engine.workflows.update("wf", scheduled("wf", {"cron": "*/15 * * * *"}), ME)
    assert changed.next_fire_at == datetime(2026, 3, 1, 12, 15, tzinfo=UTC)

    # The same schedule in a new version keeps its tick, even one that is due and not yet fired.
    clock.advance(6 * 60)  # 12:16
    kept = await engine.workflows.update(
        "wf", scheduled("wf", {"cron": "*/15 * * * *", "timezone": "UTC"}, description="v3"), ME)
    assert kept.next_fire_at == datetime(2026, 3, 1, 12, 15, tzinfo=UTC)
    assert await engine.schedules.fire_due() == 1
    (run,) = await runs_of(engine, "wf")
    assert run.workflow_version == 3  # the version current when it fired

    removed = await engine.workflows.update("wf", scheduled("wf"), ME)
    assert (removed.next_fire_at, removed.schedule_paused) == (None, False)
    clock.advance(3600)
    assert await engine.schedules.fire_due() == 0

    added = await engine.workflows.update("wf", scheduled("wf", EVERY_MINUTE), ME)
    assert added.next_fire_at == datetime(2026, 3, 1, 13, 17, tzinfo=UTC)


async def test_update_of_a_paused_schedule_stays_paused(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("wf", EVERY_MINUTE), ME)
    await engine.workflows.pause_schedule("wf", "", ME)
    updated = await engine.workflows.update("wf", scheduled("wf", {"cron": "0 * * * *"}), ME)
    assert (updated.schedule_paused, updated.next_fire_at) == (True, None)
    resumed = await engine.workflows.resume_schedule("wf", "", ME)
    assert resumed.next_fire_at == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)  # the new cron


async def test_archive_stops_the_schedule(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("wf", EVERY_MINUTE), ME)
    clock.advance(60)
    assert await engine.schedules.fire_due() == 1
    await engine.workflows.archive("wf", "", ME)
    assert await next_fire(engine, "wf") is None
    clock.advance(600)
    assert await engine.schedules.fire_due() == 0
    assert len(await runs_of(engine, "wf")) == 1


async def test_a_cron_that_never_matches_is_invalid(engine: Engine) -> None:
    with pytest.raises(ConveyorError) as caught:
        await engine.workflows.create(scheduled("feb30", {"cron": "0 0 30 2 *"}), ME)
    assert caught.value.kind == ErrorKind.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["schedule.cron"]
    await engine.workflows.create(scheduled("wf"), ME)
    with pytest.raises(ConveyorError) as caught:
        await engine.workflows.update("wf", scheduled("wf", {"cron": "0 0 30 2 *"}), ME)
    assert [v.field for v in caught.value.violations] == ["schedule.cron"]
    assert await next_fire(engine, "wf") is None


def test_next_tick_reads_the_cron_in_its_time_zone_across_dst() -> None:
    paris = Schedule("0 9 * * *", "Europe/Paris")
    # Winter (CET, UTC+1): 09:00 is 08:00 UTC; summer time from 29 March 2026 (UTC+2): 07:00 UTC.
    assert next_tick(paris, utc(2026, 1, 10, 12)) == utc(2026, 1, 11, 8)
    assert next_tick(paris, utc(2026, 3, 28, 7)) == utc(2026, 3, 28, 8)
    assert next_tick(paris, utc(2026, 3, 28, 8)) == utc(2026, 3, 29, 7)
    # Strictly after: a time on a tick gives the next one.
    every = Schedule("* * * * *")
    assert next_tick(every, T0) == T0 + timedelta(minutes=1)
    assert next_tick(every, T0 + timedelta(microseconds=1)) == T0 + timedelta(minutes=1)


async def test_a_time_zone_schedule_fires_at_local_time_across_dst(engine: Engine,
                                                                   clock: ManualClock) -> None:
    await engine.workflows.create(scheduled("paris", {"cron": "0 9 * * *", "timezone": "Europe/Paris"}), ME)
    assert await next_fire(engine, "paris") == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    clock.advance((datetime(2026, 3, 28, 8, 0, 30, tzinfo=UTC) - clock.now()).total_seconds())
    assert await engine.schedules.fire_due() == 1  # 26 missed mornings, one run
    assert await next_fire(engine, "paris") == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    clock.advance((datetime(2026, 3, 29, 7, 0, tzinfo=UTC) - clock.now()).total_seconds())
    assert await engine.schedules.fire_due() == 1
    assert await next_fire(engine, "paris") == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)


async def test_a_capped_workflow_queues_scheduled_runs_until_a_slot_frees(
        engine: Engine, clock: ManualClock) -> None:
    definition = {"name": "capped", "max_concurrent_runs": 1, "schedule": EVERY_MINUTE,
                  "steps": [{"ref": "wait", "kind": "delay", "config": {"seconds": 90}}]}
    await engine.workflows.create(definition, ME)
    clock.advance(60)  # 12:01: the first run takes the slot and waits until 12:02:30
    assert await engine.schedules.fire_due() == 1
    await engine.tick()
    clock.advance(60)  # 12:02: the second waits for the slot
    assert await engine.schedules.fire_due() == 1
    await engine.tick()
    first, second = await runs_of(engine, "capped")
    assert (first.status, second.status) == (RunStatus.RUNNING, RunStatus.PENDING)
    opened = (await engine.runs.events(second.id, 0, 1, "", ME)).items[0]
    assert (opened.type, opened.actor) == ("run.pending", "schedule")
    assert opened.message == "scheduled for 2026-03-01T12:02:00+00:00 by cron '* * * * *' (UTC)"

    clock.advance(30)  # 12:02:30: the first completes and hands its slot on
    await engine.tick()
    first, second = await runs_of(engine, "capped")
    assert (first.status, second.status) == (RunStatus.COMPLETED, RunStatus.RUNNING)


async def test_concurrent_fire_due_on_one_engine_fires_each_tick_once(engine: Engine,
                                                                     clock: ManualClock) -> None:
    for i in range(5):
        await engine.workflows.create(scheduled(f"wf{i}", EVERY_MINUTE), ME)
    for _ in range(10):
        clock.advance(60)
        counts = await asyncio.gather(*(engine.schedules.fire_due() for _ in range(4)))
        assert sum(counts) == 5
    await _assert_one_run_per_tick(engine, 5, 10)


async def _assert_one_run_per_tick(engine: Engine, workflows: int, ticks: int) -> None:
    for i in range(workflows):
        runs = await runs_of(engine, f"wf{i}")
        ticks_fired = [await scheduled_at(engine, r) for r in runs]
        assert ticks_fired == [(T0 + timedelta(minutes=m)).isoformat() for m in range(1, ticks + 1)]


@pytest.fixture
async def two_engines(database: Database, clock: ManualClock) -> AsyncIterator[tuple[Engine, Engine]]:
    """Two engines, each with its own Database (pool) on the test database, one ManualClock."""
    dbs = [Database(database.url), Database(database.url)]
    engines = [Engine(SqlStore(db), Settings(db_url=database.url), clock) for db in dbs]
    try:
        yield engines[0], engines[1]
    finally:
        for eng in engines:
            await eng.stop()
        for db in dbs:
            await db.dispose()


async def test_two_engines_racing_fire_each_tick_exactly_once(two_engines: tuple[Engine, Engine],
                                                             clock: ManualClock) -> None:
    # PostgreSQL: each replica locks the due rows it takes and skips those the other holds;
    # SQLite: the writers of the two pools take turns. Either way one run per workflow and tick.
    a, b = two_engines
    n, ticks = 8, 25
    for i in range(n):
        await a.workflows.create(scheduled(f"wf{i}", EVERY_MINUTE), ME)
    # Small batches, so the two engines' transactions interleave over the same due rows.
    a.schedules.batch_size = b.schedules.batch_size = 3
    for _ in range(ticks):
        clock.advance(60)
        counts = await asyncio.gather(a.schedules.fire_due(), b.schedules.fire_due(),
                                      a.schedules.fire_due(), b.schedules.fire_due())
        assert sum(counts) == n
    await _assert_one_run_per_tick(a, n, ticks)
    for i in range(n):
        assert await next_fire(b, f"wf{i}") == T0 + timedelta(minutes=ticks + 1)


async def test_firing_races_pause_and_update(two_engines: tuple[Engine, Engine], clock: ManualClock) -> None:
    # A firing on one engine and a pause or update on the other are ordered by the workflow row:
    # the tick fires at most once, and the pause or update leaves the state it describes.
    a, b = two_engines
    await a.workflows.create(scheduled("wf0", EVERY_MINUTE), ME)
    fired = 0
    for minute in range(1, 21):
        clock.advance(60)
        op = b.workflows.pause_schedule("wf0", "", ME) if minute % 2 else \
            b.workflows.resume_schedule("wf0", "", ME)
        counts = await asyncio.gather(a.schedules.fire_due(), op)
        fired += counts[0]
        wf = await a.workflows.get("wf0", "", ME)
        if minute % 2:
            assert (wf.schedule_paused, wf.next_fire_at) == (True, None)
        else:
            assert (wf.schedule_paused, wf.next_fire_at) == (False, clock.now() + timedelta(minutes=1))
    runs = await runs_of(a, "wf0")
    assert len(runs) == fired <= 10
    assert len({r.created_at for r in runs}) == len(runs)
