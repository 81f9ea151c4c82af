"""The orders of issue 17 (SPEC §3) are index ranges on both dialects, checked on the plan of the
very statement the Repository runs (as tests/storage/test_list_plans.py does): a workflow's slot
waiters highest priority first, then oldest (ix_runs_slot_queue), a key's waiters and running
count (ix_runs_key_queue), a queue's leasable tasks (ix_step_runs_queue); and what they answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import insert, update

from conveyor.storage.db import Database
from conveyor.storage.models import RunRow, StepRunRow, WorkflowRow, WorkflowVersionRow
from conveyor.storage.store import SqlStore
from tests.storage.test_db import _workflow
from tests.storage.test_list_plans import AT, Statements, _assert_indexed, _plan

# (id, key, priority, seconds after AT, status, start_at seconds after AT or None)
RUNS = [
    ("r00", "acme", 0, 0, "running", None),
    ("r01", "acme", 0, 1, "pending", None),
    ("r02", "bolt", 5, 2, "pending", None),
    ("r03", "acme", 5, 3, "pending", None),
    ("r04", "acme", 9, 4, "pending", 3600),  # delayed: no waiter before its time
    ("r05", "bolt", -1, 5, "pending", None),
    ("r06", "corp", 0, 6, "pending", None),
    ("r07", "bolt", 0, 7, "running", None),
]


@pytest.fixture
async def store(database: Database) -> AsyncIterator[SqlStore]:
    async with database.write() as conn:
        await conn.execute(insert(WorkflowRow), [_workflow("w1")])
        await conn.execute(insert(WorkflowVersionRow), [{
            "id": "w1-v1", "workflow_id": "w1", "project_id": "acme", "version": 1,
            "spec": {"name": "w1", "steps": []}, "created_at": AT}])
        await conn.execute(insert(RunRow), [{
            "id": rid, "project_id": "acme", "workflow_id": "w1", "workflow_name": "w1",
            "workflow_version": 1,
            "workflow_version_id": "w1-v1", "status": status, "payload": {}, "tags": {},
            "priority": prio, "concurrency_key": key, "created_at": AT + timedelta(seconds=at),
            "updated_at": AT, "start_at": AT + timedelta(seconds=start) if start is not None else None}
            for rid, key, prio, at, status, start in RUNS])
        await conn.execute(insert(StepRunRow), [{
            "id": f"s-{rid}", "workflow_run_id": rid, "project_id": "acme", "position": 0,
            "step_ref": "t",
            "workflow_step_id": "w1-v1/t", "kind": "task", "queue": "q", "status": "queued",
            "priority": prio, "ready_at": AT + timedelta(seconds=at), "created_at": AT, "updated_at": AT}
            for rid, _key, prio, at, _status, _start in RUNS])
    yield SqlStore(database)


NOW = AT + timedelta(minutes=1)


async def test_a_workflows_waiters_are_an_index_range_in_slot_order(store: SqlStore) -> None:
    seen = Statements(store.db)
    found: list[str] = []

    async def waiters() -> None:
        async with store.read() as repo:
            found.extend(w.id for w in await repo.slot_waiters("w1", 10, NOW))

    sql, params = await seen.of(waiters)
    assert found == ["r02", "r03", "r01", "r06", "r05"]
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_runs_slot_queue")


async def test_a_keys_waiters_and_running_count_are_index_ranges(store: SqlStore) -> None:
    seen = Statements(store.db)
    found: list[str] = []

    async def waiters() -> None:
        async with store.read() as repo:
            found.extend(w.id for w in await repo.slot_waiters("w1", 10, NOW, key="acme"))

    sql, params = await seen.of(waiters)
    assert found == ["r03", "r01"]
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_runs_key_queue")

    async def counts() -> None:
        async with store.read() as repo:
            assert await repo.running_key_counts("w1", ["acme", "bolt", "corp"]) == {"acme": 1, "bolt": 1}

    sql, params = await seen.of(counts)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_runs_key_queue", ordered=False)


async def test_waiters_of_keys_with_room_leave_out_full_keys(store: SqlStore) -> None:
    async with store.read() as repo:
        # One slot per key: acme and bolt each hold theirs, so only corp's waiter is left.
        assert [w.id for w in await repo.slot_waiters("w1", 10, NOW, per_key=1)] == ["r06"]
        assert [w.id for w in await repo.slot_waiters("w1", 2, NOW, per_key=2)] == ["r02", "r03"]
        # Past its start_at, the delayed run is the first waiter.
        later = AT + timedelta(hours=2)
        assert [w.id for w in await repo.slot_waiters("w1", 1, later)] == ["r04"]


async def test_a_queues_tasks_are_an_index_range_highest_priority_first(store: SqlStore) -> None:
    async with store.write() as repo:
        await repo.conn.execute(update(RunRow).values(status="running"))
    seen = Statements(store.db)
    found: list[str] = []

    async def lease() -> None:
        async with store.read() as repo:
            found.extend(await repo.leasable_runs("acme", "q", ["task"], NOW, 10))

    if store.db.dialect == "sqlite":
        # SQLite's twin goes straight to the driver (no statement to capture): its answer is checked.
        await lease()
    else:
        sql, params = await seen.of(lease)
        # Grouped by run, so the order is a sort over the queue's ready tasks, found by the index.
        plan = await _plan(store, sql, params)
        _assert_indexed(plan, store.db.dialect, "ix_step_runs_queue", ordered=False)
    assert found == ["r04", "r02", "r03", "r00", "r01", "r06", "r07", "r05"]
