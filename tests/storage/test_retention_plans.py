"""Retention's statements are index ranges, on both dialects (issue 15 item 5): finding expired
top-level runs and probing their families (ix_runs_root_finished), deleting a family's steps,
events and tags (their primary keys and run indexes), and the audit log's purge (ix_audit_at).
Checked on the plan of the very statements the Repository runs, as tests/storage/test_list_plans.py
does for the lists (see there for how each dialect's plan is read)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import text

from conveyor.domain.access import AuditEntry
from conveyor.domain.records import Caller, TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.storage.store import SqlStore
from tests.storage.test_list_plans import Statements, _assert_indexed, _plan

ME = Caller("tester")
# The tables whose statements of a family delete must be index searches.
INDEXED_TABLES = ("run_events", "step_runs", "run_tags", "notification_outbox", "workflow_runs")


async def _expired(engine: Engine, clock: ManualClock) -> tuple[SqlStore, list[str], Any]:
    """Two finished runs (one with a tag), two workflows, and a cutoff they both finished before."""
    for name in ("w1", "w2"):
        await engine.workflows.create({"name": name, "steps": [{"ref": "a", "kind": "noop"}]}, ME)
    runs = [(await engine.runs.trigger(TriggerRequest(name, tags={"t": "v"}), ME)).id
            for name in ("w1", "w2")]
    clock.advance(3600)
    store = engine.store
    assert isinstance(store, SqlStore)
    return store, runs, clock.now()


async def test_expired_roots_and_their_families_are_index_ranges(engine: Engine, clock: ManualClock) -> None:
    store, runs, before = await _expired(engine, clock)
    async with store.read() as repo:
        workflows = sorted(await repo.retention_policies())
    seen = Statements(store.db)

    async def find() -> None:
        async with store.write() as repo:
            assert sorted(await repo.expired_roots(workflows, before, 500)) == sorted(runs)

    sql, params = await seen.of(find)
    plan = await _plan(store, sql, params)
    _assert_indexed(plan, store.db.dialect, "ix_runs_root_finished", ordered=False)
    # The family probe (the NOT EXISTS) is the same index, never a scan of the runs.
    assert sum("ix_runs_root_finished" in line for line in plan) >= 2, plan


async def test_a_family_delete_reads_and_deletes_through_indexes(engine: Engine, clock: ManualClock) -> None:
    store, runs, before = await _expired(engine, clock)
    seen = Statements(store.db)

    async def delete() -> None:
        async with store.write() as repo:
            counts = await repo.delete_run_families(runs, before)
            assert counts["runs"] == 2 and counts["tags"] == 2 and counts["steps"] == 2
            raise _Rollback  # keep the rows: the plans are read below, on the same data

    seen.seen.clear()
    seen.on = True
    try:
        await delete()
    except _Rollback:
        pass
    finally:
        seen.on = False
    statements = [(sql, params) for sql, params in seen.seen
                  if sql.lstrip().upper().startswith(("SELECT", "DELETE"))]
    checked = 0
    for sql, params in statements:
        table = next((t for t in INDEXED_TABLES if f"FROM {t}" in sql), None)
        if table is None:
            continue  # wake-ups: signals in flight, a small table (storage/retention.py)
        plan = await _plan(store, sql, params)
        text_plan = "\n".join(plan)
        if store.db.dialect == "sqlite":
            assert not [line for line in plan if line.startswith("SCAN ")], text_plan
        else:
            assert "Seq Scan" not in text_plan, text_plan
        checked += 1
    # The family read, the two fenced reads, and the deletes of events, steps, tags, deliveries
    # and runs (the foreign keys' checks on deleting runs included, on SQLite's plan).
    assert checked >= 8, statements


class _Rollback(Exception):
    pass


async def test_the_audit_purge_is_bounded_and_oldest_first(engine: Engine, clock: ManualClock) -> None:
    start = clock.now()
    async with engine.store.write() as repo:
        await repo.insert_audit([AuditEntry(at=start + timedelta(minutes=i), actor="a", project_id="p",
                                            method="M", resource_id=str(i), code="OK") for i in range(10)])
    store = engine.store
    assert isinstance(store, SqlStore)
    seen = Statements(store.db)

    async def purge() -> None:
        async with store.write() as repo:
            assert await repo.purge_audit(start + timedelta(minutes=7), 4) == 4

    sql, params = await seen.of(purge)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_audit_at")
    async with store.write() as repo:
        assert await repo.purge_audit(start + timedelta(minutes=7), 4) == 3
        left = sorted(int(r) for r in (await repo.conn.execute(
            text("SELECT resource_id FROM audit_entries"))).scalars())
    assert left == [7, 8, 9]
