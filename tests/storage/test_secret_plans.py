"""Secrets' statements (issue 16, SPEC §11) are index ranges on both dialects, checked on the
plan of the very statement the Repository runs (as tests/storage/test_list_plans.py does): a
project's list newest first through ix_secrets_project_created, read in order; the values an
attempt needs through an index (the primary key); and the statements themselves on a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import insert

from conveyor.storage.db import Database
from conveyor.storage.models import SecretRow
from conveyor.storage.paging import encode_cursor
from conveyor.storage.store import SqlStore
from tests.storage.test_list_plans import AT, Statements, _assert_indexed, _plan


@pytest.fixture
async def store(database: Database) -> AsyncIterator[SqlStore]:
    rows = [{"project_id": p, "name": f"S{i:03}", "ciphertext": bytes([i]) * 40,
             "created_at": AT + timedelta(seconds=i), "updated_at": AT + timedelta(seconds=i)}
            for p in ("acme", "other") for i in range(60)]
    async with database.write() as conn:
        await conn.execute(insert(SecretRow), rows)
    yield SqlStore(database)


@pytest.mark.parametrize("token", ["", encode_cursor(AT + timedelta(seconds=30), "S030")])
async def test_a_projects_list_is_an_index_range_newest_first(store: SqlStore, token: str) -> None:
    seen = Statements(store.db)

    async def page() -> None:
        async with store.read() as repo:
            await repo.list_secrets("acme", 50, token)

    sql, params = await seen.of(page)
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "ix_secrets_project_created")


async def test_the_values_an_attempt_needs_are_read_through_the_primary_key(store: SqlStore) -> None:
    seen = Statements(store.db)

    async def lookup() -> None:
        async with store.read() as repo:
            await repo.sealed_secrets("acme", ["S001", "S002", "nope"])

    sql, params = await seen.of(lookup)
    # The primary key, or PostgreSQL's pick on an unanalysed table: the list index's project prefix.
    _assert_indexed(await _plan(store, sql, params), store.db.dialect, "_secrets", ordered=False)


async def test_pages_walk_every_secret_once_newest_first(store: SqlStore) -> None:
    names: list[str] = []
    token = ""
    while True:
        async with store.read() as repo:
            page = await repo.list_secrets("acme", 25, token)
        names += [s.name for s in page.items]
        assert all(s.project_id == "acme" for s in page.items)
        if not (token := page.next_token):
            break
    assert names == [f"S{i:03}" for i in reversed(range(60))]


async def test_put_replaces_in_place_and_refuses_a_full_project(store: SqlStore) -> None:
    later = AT + timedelta(hours=1)
    async with store.write() as repo:
        replaced = await repo.put_secret("acme", "S005", b"new", later, most=60)
        refused = await repo.put_secret("acme", "NEW", b"x", later, most=60)  # holds 60 already
        added = await repo.put_secret("acme", "NEW", b"x", later, most=61)
    assert replaced is not None
    assert (replaced.created_at, replaced.updated_at) == (AT + timedelta(seconds=5), later)
    assert refused is None
    assert added is not None and added.created_at == added.updated_at == later
    async with store.write() as repo:
        assert await repo.sealed_secrets("acme", ["S005", "NEW"]) == {"S005": b"new", "NEW": b"x"}
        assert await repo.delete_secret("acme", "NEW") is True
        assert await repo.delete_secret("acme", "NEW") is False
        assert await repo.sealed_secrets("other", ["S005"]) == {"S005": bytes([5]) * 40}  # untouched
