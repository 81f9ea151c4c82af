"""Events' statements (issue 17, SPEC §9) are index ranges on both dialects, checked on the plan
of the very statement the Repository runs (as tests/storage/test_list_plans.py does): a project's
list newest first through ix_events_project_received, a name and key's through
ix_events_project_name_key, the workflows listening to a name through the listener index's
primary key; and the statements themselves on a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import insert

from conveyor.storage.db import Database
from conveyor.storage.models import EventRow
from conveyor.storage.paging import encode_cursor
from conveyor.storage.store import SqlStore
from tests.storage.test_list_plans import AT, Statements, _assert_indexed, _plan


@pytest.fixture
async def store(database: Database) -> AsyncIterator[SqlStore]:
    rows = [{"project_id": p, "id": f"E{i:03}", "name": f"n{i % 3}", "key": f"k{i % 2}", "payload": {"i": i},
             "request_hash": "ab" * 32, "received_at": AT + timedelta(seconds=i), "resumed": 0, "started": 0,
             "skipped": None, "created_by": "ci"}
            for p in ("acme", "other") for i in range(60)]
    async with database.write() as conn:
        await conn.execute(insert(EventRow), rows)
        if database.dialect == "postgresql":
            # Statistics, as autovacuum gathers them on a live table: unanalysed, PostgreSQL takes
            # the project's index for a name and key, filtering it (fine at 120 rows, not at 10^6).
            await conn.exec_driver_sql("ANALYZE events")
    yield SqlStore(database)


@pytest.mark.parametrize("token", ["", encode_cursor(AT + timedelta(seconds=30), "E030")])
async def test_a_projects_list_is_an_index_range_newest_first(store: SqlStore, token: str) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_project_events("acme", "", "", 50, token)

    sql, params = await seen.of(page)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_events_project_received")


async def test_a_name_and_key_list_is_an_index_range_newest_first(store: SqlStore) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_project_events("acme", "n1", "k0", 50, "")

    sql, params = await seen.of(page)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_events_project_name_key")


async def test_listeners_are_read_through_their_index(store: SqlStore) -> None:
    seen = Statements(store.db)

    async def lookup() -> None:
        async with store.read() as repo:
            await repo.event_listeners("acme", "n1", 100)

    sql, params = await seen.of(lookup)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "event_listeners", ordered=False)


async def test_pages_walk_every_event_once_and_filters_hold(store: SqlStore) -> None:
    ids: list[str] = []
    token = ""
    while True:
        async with store.read() as repo:
            page = await repo.list_project_events("acme", "", "", 25, token)
        ids += [e.id for e in page.items]
        assert all(e.project_id == "acme" for e in page.items)
        if not (token := page.next_token):
            break
    assert ids == [f"E{i:03}" for i in reversed(range(60))]
    async with store.read() as repo:
        named = await repo.list_project_events("acme", "n1", "k0", 1000, "")
    wanted = [f"E{i:03}" for i in reversed(range(60)) if i % 3 == 1 and i % 2 == 0]
    assert [e.id for e in named.items] == wanted


async def test_purge_deletes_the_oldest_in_batches(store: SqlStore) -> None:
    async with store.write() as repo:
        assert await repo.purge_events(AT + timedelta(seconds=10), 15) == 15
        assert await repo.purge_events(AT + timedelta(seconds=10), 15) == 5
        assert await repo.get_event("acme", "E009") is None
        kept = await repo.get_event("acme", "E010")
    assert kept is not None and kept.payload == {"i": 10}
