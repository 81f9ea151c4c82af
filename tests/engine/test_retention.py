"""Retention (issue 15 item 5, SPEC §11): finished runs past their workflow's retention_days (or
the server's default) are deleted with their steps, events, tags, feed rows, pending
notifications, wake-ups and child runs; unfinished runs, runs finished within the window and runs
an operator reopens are never deleted; idempotency records, the feed and the audit log (kept
longer) are purged too; all in bounded batches, counted in the metrics.

Real database (SQLite, and PostgreSQL with CONVEYOR_TEST_DB=postgresql), ManualClock: time moves
by `clock.advance` and the sweep is called as the housekeeping loop calls it. No sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from conveyor.api.convert import workflow_data, workflow_to_proto
from conveyor.domain.access import AuditEntry
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, TriggerRequest
from conveyor.domain.states import RunStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_children import call, settle

ME = Caller("tester")
DAY = 24 * 3600.0
# Every table holding rows of a run, by the column naming it.
RUN_TABLES = {"workflow_runs": "id", "step_runs": "workflow_run_id", "run_events": "workflow_run_id",
              "run_tags": "run_id", "run_changes": "run_id", "notification_outbox": "run_id",
              "run_wakeups": "run_id"}


def wf(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": steps, **extra}


def noop(ref: str, *deps: str) -> dict[str, Any]:
    return {"ref": ref, "kind": "noop", "depends_on": list(deps)}


def approval(ref: str, *deps: str) -> dict[str, Any]:
    return {"ref": ref, "kind": "approval", "depends_on": list(deps)}


async def trigger(engine: Engine, name: str, **kw: Any) -> str:
    return (await engine.runs.trigger(TriggerRequest(name, **kw), ME)).id


async def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    async with engine.store.read() as repo:
        return (await repo.conn.execute(text(sql), params)).scalar_one()  # type: ignore[attr-defined]


async def rows_of(engine: Engine, run_id: str) -> dict[str, int]:
    """How many rows each run table holds for this run."""
    return {table: int(await scalar(engine, f"SELECT count(*) FROM {table} WHERE {column} = :r", r=run_id))
            for table, column in RUN_TABLES.items()}


async def gone(engine: Engine, run_id: str) -> bool:
    counts = await rows_of(engine, run_id)
    if counts["workflow_runs"]:
        return False
    assert not any(counts.values()), counts  # nothing of a deleted run is left behind
    return True


async def status(engine: Engine, run_id: str) -> RunStatus:
    return (await engine.runs.get(run_id, ME)).status


def deleted_metric(engine: Engine, table: str) -> float:
    value = engine.metrics.registry.get_sample_value("conveyor_retention_deleted_rows_total",
                                                     {"table": table})
    return value or 0.0


@pytest.fixture
async def small_batches(database: Database, clock: ManualClock) -> AsyncIterator[Engine]:
    """An engine whose sweep deletes 3 runs per transaction and keeps runs 2 days by default."""
    eng = Engine(SqlStore(database), Settings(db_url=str(database.url), retention_days=2,
                                              retention_batch_size=3), clock)
    try:
        yield eng
    finally:
        await eng.stop()


async def test_finished_runs_past_the_default_are_deleted_with_everything_of_theirs(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("plain", [noop("a"), noop("b", "a")], notifications=[
        {"url": "https://hooks.example.com/x", "events": ["run.completed"]}]), ME)
    await engine.workflows.create(wf("gated", [approval("gate")]), ME)
    old = await trigger(engine, "plain", tags={"team": "a"})
    waiting = await trigger(engine, "gated")  # never finishes
    async with engine.store.write() as repo:
        await repo.signal([old], clock.now())  # a wake-up left for the finished run
    before = await rows_of(engine, old)
    assert all(before.values()), before  # the run has a row in every table
    clock.advance(29 * DAY)
    recent = await trigger(engine, "plain")
    assert (await engine.retention.sweep()).get("runs", 0) == 0
    clock.advance(1 * DAY + 1)

    deleted = await engine.retention.sweep()
    assert await gone(engine, old)
    assert deleted["runs"] == 1 and deleted["steps"] == 2 and deleted["tags"] == 1
    assert deleted["events"] == before["run_events"] and deleted["notifications"] == 1
    assert deleted["wakeups"] == 1 and deleted["changes"] >= before["run_changes"]
    # Within the window, or never finished however old: kept, whole.
    assert await status(engine, recent) == RunStatus.COMPLETED
    assert await status(engine, waiting) == RunStatus.RUNNING
    assert (await rows_of(engine, waiting))["step_runs"] == 1
    with pytest.raises(ConveyorError) as e:
        await engine.runs.get(old, ME)
    assert e.value.kind == ErrorKind.NOT_FOUND
    assert deleted_metric(engine, "runs") == 1 and deleted_metric(engine, "events") == before["run_events"]
    # Nothing more to do: the next sweep deletes nothing.
    assert not any((await engine.retention.sweep()).values())


async def test_a_workflows_retention_days_wins_and_its_current_definition_decides(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("short", [noop("a")], retention_days=3), ME)
    await engine.workflows.create(wf("default", [noop("a")]), ME)
    await engine.workflows.create(wf("long", [noop("a")], retention_days=90), ME)
    short, default, long = [await trigger(engine, name) for name in ("short", "default", "long")]
    clock.advance(3 * DAY)  # exactly its retention: not older than it yet
    await engine.retention.sweep()
    assert not await gone(engine, short)
    clock.advance(1)
    await engine.retention.sweep()
    assert await gone(engine, short)
    clock.advance(40 * DAY)
    await engine.retention.sweep()
    assert await gone(engine, default) and not await gone(engine, long)
    # Shortened by an update: the runs of older versions follow the current definition.
    await engine.workflows.update("long", wf("long", [noop("a")], retention_days=10), ME)
    await engine.retention.sweep()
    assert await gone(engine, long)


async def test_a_child_run_goes_with_its_root_and_never_before_it(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("leaf", [approval("gate")], retention_days=1), ME)
    await engine.workflows.create(wf("middle", [call("c", "leaf")], retention_days=1), ME)
    await engine.workflows.create(wf("top", [call("c", "middle"), approval("hold", "c")],
                                     retention_days=5), ME)
    root = await trigger(engine, "top")
    await settle(engine)
    middle = await scalar(engine, "SELECT id FROM workflow_runs WHERE parent_workflow_run_id = :r", r=root)
    leaf = await scalar(engine, "SELECT id FROM workflow_runs WHERE parent_workflow_run_id = :r", r=middle)
    await engine.steps.approve(leaf, "gate", "", ME)
    await settle(engine)
    assert await status(engine, leaf) == RunStatus.COMPLETED
    assert await status(engine, middle) == RunStatus.COMPLETED
    # The children are past their own workflows' retention; their root still runs: all kept.
    clock.advance(10 * DAY)
    await engine.retention.sweep()
    assert not await gone(engine, leaf) and not await gone(engine, middle)
    await engine.steps.approve(root, "hold", "", ME)
    await settle(engine)
    assert await status(engine, root) == RunStatus.COMPLETED
    clock.advance(5 * DAY)
    await engine.retention.sweep()
    assert not await gone(engine, root) and not await gone(engine, leaf)
    clock.advance(1)
    deleted = await engine.retention.sweep()
    assert deleted["runs"] == 3
    assert await gone(engine, root) and await gone(engine, middle) and await gone(engine, leaf)


async def test_a_family_with_a_child_unfinished_or_finished_late_is_kept_whole(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("slow", [approval("gate")]), ME)
    await engine.workflows.create(wf("caller", [call("c", "slow")], retention_days=1), ME)
    root = await trigger(engine, "caller")
    await settle(engine)
    child = await scalar(engine, "SELECT id FROM workflow_runs WHERE parent_workflow_run_id = :r", r=root)
    await engine.steps.approve(child, "gate", "", ME)
    await settle(engine)
    assert await status(engine, root) == RunStatus.COMPLETED
    clock.advance(40 * DAY)
    # An operator replays the child's step long after: the child runs again (until the engine
    # cancels it, its parent no longer waiting), its root stays completed.
    await engine.steps.replay_subtree(child, "gate", ME)
    assert await status(engine, child) == RunStatus.RUNNING
    assert (await engine.retention.sweep()).get("runs", 0) == 0
    assert not await gone(engine, root) and not await gone(engine, child)
    await settle(engine)
    assert await status(engine, child) == RunStatus.CANCELED
    # The child finished just now: the family waits until that end is past the root's retention.
    assert (await engine.retention.sweep()).get("runs", 0) == 0
    clock.advance(DAY + 1)
    assert (await engine.retention.sweep())["runs"] == 2
    assert await gone(engine, root) and await gone(engine, child)


async def test_a_run_reopened_between_selection_and_delete_is_not_deleted(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("reopen", [approval("gate"), noop("after", "gate")],
                                     retention_days=1), ME)
    run = await trigger(engine, "reopen")
    await engine.steps.approve(run, "gate", "", ME)
    await settle(engine)
    assert await status(engine, run) == RunStatus.COMPLETED
    clock.advance(2 * DAY)
    before = clock.now() - timedelta(days=1)
    async with engine.store.read() as repo:
        workflows = list(await repo.retention_policies())
        assert await repo.expired_roots(workflows, before, 10) == [run]
    # The operator's replay commits between the sweep's selection and its delete.
    await engine.steps.replay_subtree(run, "gate", ME)
    assert await status(engine, run) == RunStatus.RUNNING
    kept = await rows_of(engine, run)
    async with engine.store.write() as repo:
        assert (await repo.delete_run_families([run], before))["runs"] == 0
    assert await rows_of(engine, run) == kept
    assert (await engine.retention.sweep()).get("runs", 0) == 0
    # It finishes again: its window starts over from the new end.
    await settle(engine)
    await engine.steps.approve(run, "gate", "", ME)
    await settle(engine)
    clock.advance(DAY)
    await engine.retention.sweep()
    assert not await gone(engine, run)
    clock.advance(1)
    await engine.retention.sweep()
    assert await gone(engine, run)


async def test_the_sweep_deletes_in_bounded_batches_until_nothing_is_left(
        small_batches: Engine, clock: ManualClock) -> None:
    engine = small_batches
    await engine.workflows.create(wf("many", [noop("a")]), ME)
    await engine.workflows.create(wf("other", [noop("a")]), ME)
    runs = [await trigger(engine, "many") for _ in range(8)] + [await trigger(engine, "other")]
    clock.advance(2 * DAY + 1)
    async with engine.store.read() as repo:
        workflows = list(await repo.retention_policies())
        # One batch is at most `retention_batch_size` runs.
        assert len(await repo.expired_roots(workflows, clock.now() - timedelta(days=2), 3)) == 3
    writes = 0
    write = engine.store.write

    def counting_write() -> Any:
        nonlocal writes
        writes += 1
        return write()

    engine.retention.store = type("Counted", (), {"write": staticmethod(counting_write),
                                                  "read": staticmethod(engine.store.read)})()
    deleted = await engine.retention.sweep()
    assert deleted["runs"] == 9
    assert all([await gone(engine, r) for r in runs])
    # idempotency, changes, audit: one short batch each; runs: 3 full batches and a short one.
    assert writes >= 3 + 4


async def test_runs_are_kept_while_an_idempotency_record_names_them(
        database: Database, clock: ManualClock) -> None:
    engine = Engine(SqlStore(database), Settings(db_url=str(database.url), retention_days=1,
                                                 idempotency_ttl_seconds=int(3 * DAY)), clock)
    try:
        await engine.workflows.create(wf("idem", [noop("a")]), ME)
        run = await trigger(engine, "idem", idempotency_key="k")
        clock.advance(2 * DAY)
        await engine.retention.sweep()
        # Past the run's retention, not its key's: the repeated trigger still finds its run.
        assert await trigger(engine, "idem", idempotency_key="k") == run
        clock.advance(DAY + 1)
        deleted = await engine.retention.sweep()
        assert deleted["idempotency"] == 1 and deleted["runs"] == 1
        assert await trigger(engine, "idem", idempotency_key="k") != run
    finally:
        await engine.stop()


async def test_the_audit_log_is_kept_longer_than_runs(engine: Engine, clock: ManualClock) -> None:
    start = clock.now()
    async with engine.store.write() as repo:
        await repo.insert_audit([AuditEntry(at=start + timedelta(days=d), actor="ops", project_id="default",
                                            method="TriggerWorkflowRun", resource_id=f"r{d}", code="OK")
                                 for d in (0, 100, 300)])
    clock.advance(365 * DAY)
    assert (await engine.retention.sweep())["audit"] == 0
    clock.advance(1)
    assert (await engine.retention.sweep())["audit"] == 1
    clock.advance(299 * DAY)
    assert (await engine.retention.sweep())["audit"] == 1
    left = await scalar(engine, "SELECT resource_id FROM audit_entries")
    assert left == "r300"
    assert deleted_metric(engine, "audit") == 2


async def test_retention_days_is_validated_and_shown(engine: Engine) -> None:
    for bad in (-1, 1.5, 3651, "30", True):
        with pytest.raises(ConveyorError) as e:
            await engine.workflows.create(wf("bad", [noop("a")], retention_days=bad), ME)
        assert e.value.kind == ErrorKind.INVALID_ARGUMENT
        assert [v.field for v in e.value.violations] == ["retention_days"]
    assert (await engine.workflows.list("", 10, "", True, ME)).items == []
    made = await engine.workflows.create(wf("good", [noop("a")], retention_days=3650), ME)
    assert made.spec.retention_days == 3650
    assert (await engine.workflows.get("good", "", ME)).spec.retention_days == 3650
    # The Workflow resource shows it, and takes it back as the same definition.
    shown = workflow_to_proto(made)
    assert shown.retention_days == 3650 and workflow_data(shown)["retention_days"] == 3650


def test_server_retention_settings_are_checked() -> None:
    from conveyor.engine.clock import SystemClock
    from conveyor.engine.metrics import Metrics
    from conveyor.engine.retention import Retention

    for field in ("retention_days", "audit_retention_days", "batch_size"):
        kwargs: dict[str, Any] = {"retention_days": 30, "audit_retention_days": 365, "batch_size": 500,
                                  "idempotency_ttl_seconds": 3600, field: 0}
        with pytest.raises(ValueError):
            Retention(None, SystemClock(), Metrics(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.postgresql_only
async def test_a_run_another_transaction_holds_is_skipped_not_waited_for(
        engine: Engine, clock: ManualClock, database: Database, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("postgresql_only: row locks (SQLite has one writer)")
    await engine.workflows.create(wf("held", [noop("a")], retention_days=1), ME)
    held, free = await trigger(engine, "held"), await trigger(engine, "held")
    clock.advance(2 * DAY)
    other = Database(database.url)
    try:
        async with other.write() as conn:
            # Another replica's unit of work holds the run (an operator reopening it, say).
            await conn.execute(text("SELECT id FROM workflow_runs WHERE id = :r FOR UPDATE"), {"r": held})
            async with asyncio.timeout(10):  # never waits for the holder
                deleted = await engine.retention.sweep()
        assert deleted["runs"] == 1 and await gone(engine, free) and not await gone(engine, held)
        assert (await engine.retention.sweep())["runs"] == 1
        assert await gone(engine, held)
    finally:
        await other.dispose()
