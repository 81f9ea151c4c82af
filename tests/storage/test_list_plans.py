"""Lists stay fast at scale (issue 5, item 8): every list query is served by an index, in list
order, on both dialects — checked on the query plan of the very statement the Repository runs.

SQLite: `EXPLAIN QUERY PLAN` of the statement on a fresh, unanalysed database (what a server
sees until someone runs ANALYZE): no table scan without an index, and no temporary B-tree to
sort (the page is read in order from the index). PostgreSQL: `EXPLAIN` with sequential scans and
sorts priced out (`enable_seqscan`/`enable_sort` off), so the plan answers "can an index serve
this?" rather than "is a scan cheaper on an empty table?": no Seq Scan, no Sort.
bench/list.py measures the same queries on a million runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from conveyor.domain.records import RunQuery
from conveyor.domain.states import RunStatus
from conveyor.storage.db import Database
from conveyor.storage.models import IdempotencyRow, WorkflowRow
from conveyor.storage.paging import encode_cursor
from conveyor.storage.store import SqlStore
from tests.storage.test_db import _workflow

AT = datetime(2026, 3, 1, tzinfo=UTC)
CURSOR = encode_cursor(AT, "ffffffff-0000-4000-8000-000000000000")


class Statements:
    """The statements a Database runs, as (sql, parameters), collected while `on` is set."""

    def __init__(self, db: Database) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.on = False
        for engine in db.engines:
            event.listen(engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any,
                _many: bool) -> None:
        if self.on:
            self.seen.append((statement, parameters))

    async def of(self, call: Callable[[], Awaitable[object]]) -> tuple[str, Any]:
        """The last statement `call` runs (the page query; a workflow name lookup comes first)."""
        self.seen.clear()
        self.on = True
        try:
            await call()
        finally:
            self.on = False
        return self.seen[-1]


@pytest.fixture
async def store(database: Database) -> AsyncIterator[SqlStore]:
    async with database.write() as conn:
        await conn.execute(insert(WorkflowRow), [_workflow("w1"), _workflow("w2")])
    yield SqlStore(database)


async def _plan(store: SqlStore, sql: str, params: Any) -> list[str]:
    """The plan as lines: SQLite's EXPLAIN QUERY PLAN details, or PostgreSQL's node types with
    their relation and index ("Index Scan Backward workflow_runs ix_runs_created")."""
    async with store.write() as repo:
        conn = repo.conn
        if store.db.dialect == "sqlite":
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)).all()
            return [str(r[3]) for r in rows]
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        await conn.exec_driver_sql("SET LOCAL enable_sort = off")
        raw = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params)).scalar_one()
        plan = json.loads(raw) if isinstance(raw, str) else raw
        lines: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            direction = " Backward" if node.get("Scan Direction") == "Backward" else ""
            lines.append(" ".join(filter(None, [node["Node Type"] + direction, node.get("Relation Name"),
                                                 node.get("Index Name")])))
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return lines


def _assert_indexed(plan: list[str], dialect: str, index: str, ordered: bool = True) -> None:
    text = "\n".join(plan)
    assert index in text, text
    if dialect == "sqlite":
        scans = [line for line in plan if line.startswith("SCAN ") and "INDEX" not in line]
        assert not scans, text
        if ordered:
            assert "TEMP B-TREE" not in text, text
    else:
        assert "Seq Scan" not in text, text
        if ordered:
            assert not any(line.startswith(("Sort", "Incremental Sort")) for line in plan), text


def _range() -> RunQuery:
    return RunQuery(started_after=AT - timedelta(days=1), started_before=AT)


# (label, caller's project scope, filter, cursor, the index that must serve it, read in order)
RUN_LISTS: list[tuple[str, str | None, RunQuery, str, str, bool]] = [
    ("no filter", None, RunQuery(), "", "ix_runs_created", True),
    ("deep page via cursor", None, RunQuery(), CURSOR, "ix_runs_created", True),
    ("project scope", "acme", RunQuery(), "", "ix_runs_project_created", True),
    ("project filter", None, RunQuery(project_id="acme"), "", "ix_runs_project_created", True),
    ("project + cursor", "acme", RunQuery(), CURSOR, "ix_runs_project_created", True),
    ("status", None, RunQuery(statuses=[RunStatus.RUNNING]), "", "ix_runs_status_created", True),
    ("project + status", "acme", RunQuery(statuses=[RunStatus.RUNNING]), "",
     "ix_runs_project_status_created", True),
    # Several statuses: an index serves them (SQLite reads each status in order and merges).
    ("statuses", None, RunQuery(statuses=[RunStatus.FAILED, RunStatus.TIMED_OUT]), "", "ix_runs_", False),
    ("workflow by name", None, RunQuery(workflow_ids=["w1"]), "", "ix_runs_workflow_created", True),
    ("workflow by id in project", "acme", RunQuery(workflow_ids=["w1"]), CURSOR,
     "ix_runs_workflow_created", True),
    # ix_runs_workflow_status fits best; the planner may take ix_runs_workflow_created on few rows.
    ("workflow + status", None, RunQuery(workflow_ids=["w1"], statuses=[RunStatus.PENDING]), "",
     "ix_runs_workflow_", True),
    # The search becomes workflow ids first, so it is the workflow filter's index range.
    ("search", None, RunQuery(search="W1"), "", "ix_runs_workflow_created", True),
    ("search in project", "acme", RunQuery(search="w1"), CURSOR, "ix_runs_workflow_created", True),
    ("search + workflow + status", None,
     RunQuery(search="w", workflow_ids=["w2"], statuses=[RunStatus.PENDING]), "", "ix_runs_workflow_", True),
    ("triggered_by", None, RunQuery(triggered_by="schedule"), "", "ix_runs_triggered_created", True),
    ("started_at range", None, _range(), "", "ix_runs_created", True),
    ("project + started_at range", "acme", _range(), "", "ix_runs_project_created", True),
    ("tag", None, RunQuery(tags=[("team", "web")]), "", "ix_runs_created", True),
    ("project + tag", "acme", RunQuery(tags=[("team", "web")]), CURSOR, "ix_runs_project_created", True),
]


@pytest.mark.parametrize(("scope", "query", "token", "index", "ordered"),
                         [case[1:] for case in RUN_LISTS], ids=[case[0] for case in RUN_LISTS])
async def test_every_run_list_is_an_index_range_in_list_order(
        store: SqlStore, scope: str | None, query: RunQuery, token: str, index: str, ordered: bool) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_runs(query, scope, 50, token)

    sql, params = await seen.of(page)
    plan = await _plan(store, sql, params)
    _assert_indexed(plan, store.db.dialect, index, ordered)
    if query.tags:
        # The tag is probed by the run_tags primary key, run by run, in list order.
        assert any("run_tags" in line for line in plan)
        assert not any("run_tags" in line and ("Seq Scan" in line or line == "SCAN run_tags")
                       for line in plan)


@pytest.mark.parametrize(("scope", "token", "index"), [
    (None, "", "ix_workflows_created"),
    (None, CURSOR, "ix_workflows_created"),
    ("acme", CURSOR, "ix_workflows_project_created"),
])
async def test_workflow_lists_are_index_ranges(store: SqlStore, scope: str | None, token: str,
                                               index: str) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_workflows(scope, 50, token, include_archived=False)

    sql, params = await seen.of(page)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, index)


async def test_an_unknown_workflow_name_answers_an_empty_page_without_touching_runs(store: SqlStore) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            assert (await repo.list_runs(RunQuery(workflow_ids=["nope"]), None, 50, "")).items == []

    sql, _ = await seen.of(page)
    assert "workflow_runs" not in sql


async def test_a_search_matching_no_workflow_answers_an_empty_page_without_touching_runs(
        store: SqlStore) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            assert (await repo.list_runs(RunQuery(search="w_"), None, 50, "")).items == []

    sql, _ = await seen.of(page)
    assert "workflow_runs" not in sql


async def test_purge_idempotency_is_bounded_and_oldest_first(store: SqlStore) -> None:
    now = AT
    rows = [{"project_id": "acme", "workflow_id": "w1", "key": f"k{i:02}", "request_hash": "h",
             "run_id": f"r{i}", "expires_at": now + timedelta(minutes=i - 25)} for i in range(30)]
    async with store.write() as repo:
        await repo.conn.execute(insert(IdempotencyRow), rows)
    # 26 have expired (i = 0..25, expiry <= now); a batch of 10 takes the 10 oldest.
    async with store.write() as repo:
        assert await repo.purge_idempotency(now, batch=10) == 10
    async with store.read() as repo:
        left = sorted((await repo.conn.execute(select(IdempotencyRow.key))).scalars())
    assert left == [f"k{i:02}" for i in range(10, 30)]
    async with store.write() as repo:
        assert await repo.purge_idempotency(now, batch=10) == 10
    async with store.write() as repo:
        assert await repo.purge_idempotency(now, batch=10) == 6
    async with store.write() as repo:
        assert await repo.purge_idempotency(now, batch=10) == 0
    async with store.read() as repo:
        assert len((await repo.conn.execute(select(IdempotencyRow.key))).all()) == 4

    seen = Statements(store.db)

    async def purge() -> None:
        async with store.write() as repo:
            await repo.purge_idempotency(now, batch=10)

    sql, params = await seen.of(purge)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_idempotency_expires")


async def test_idempotency_lookup_searches_the_primary_key(store: SqlStore) -> None:
    """A batch's keys, across two workflows, are found through the primary key, never a scan of
    the whole table (which holds every key of the last 24 hours)."""
    rows = [{"project_id": "acme", "workflow_id": w, "key": f"k{i}", "request_hash": "h",
             "run_id": f"r{i}", "expires_at": AT + timedelta(hours=1)}
            for w in ("w1", "w2") for i in range(50)]
    async with store.write() as repo:
        await repo.conn.execute(insert(IdempotencyRow), rows)
    keys = [("acme", "w1", "k1"), ("acme", "w1", "k2"), ("acme", "w2", "k3"), ("acme", "w2", "nope")]
    async with store.write() as repo:
        found = await repo.idempotency_lookup(keys, AT)
    assert found == {("acme", "w1", "k1"): ("h", "r1"), ("acme", "w1", "k2"): ("h", "r2"),
                     ("acme", "w2", "k3"): ("h", "r3")}

    seen = Statements(store.db)

    async def lookup() -> None:
        async with store.write() as repo:
            await repo.idempotency_lookup(keys, AT)

    sql, params = await seen.of(lookup)
    sqlite = store.db.dialect == "sqlite"
    primary_key = "sqlite_autoindex_idempotency_keys_1" if sqlite else "pk_idempotency_keys"
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, primary_key, ordered=False)
