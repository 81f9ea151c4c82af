"""Database: URLs, SQLite PRAGMAs, transaction modes (BEGIN IMMEDIATE, read-only reads,
rollback), the JSON codec, and migrations matching the models on both backends."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError, StatementError

from conveyor.storage.db import Database, normalize_url
from conveyor.storage.migrate import current_revision, head_revision, migrate
from conveyor.storage.models import ApiKeyRow, Base, WorkflowRow, WorkflowVersionRow

VERSIONS = Path(__file__).parents[2] / "src" / "conveyor" / "storage" / "migrations" / "versions"

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _api_key(key_id: str) -> dict[str, object]:
    return {"id": key_id, "name": "ci", "project_id": "acme", "role": "admin",
            "token_hash": f"hash-{key_id}", "created_at": NOW}


def _workflow(wf_id: str) -> dict[str, object]:
    return {"id": wf_id, "project_id": "acme", "name": wf_id, "current_version": 1,
            "current_version_id": f"{wf_id}-v1", "created_at": NOW, "updated_at": NOW}


def test_urls_are_normalised_to_async_drivers(tmp_path: Path) -> None:
    assert normalize_url("postgresql://u@h:5432/d").drivername == "postgresql+asyncpg"
    assert normalize_url("postgresql+asyncpg://u@h/d").drivername == "postgresql+asyncpg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert normalize_url("sqlite+aiosqlite:///x.db").drivername == "sqlite+aiosqlite"
    for bad in ("mysql://h/d", "sqlite://", "sqlite:///:memory:", "postgresql+psycopg://h/d"):
        with pytest.raises(ValueError):
            normalize_url(bad)
    db = Database(f"sqlite:///{tmp_path}/new/dir/c.db")
    assert db.dialect == "sqlite"
    assert db.url == f"sqlite+aiosqlite:///{tmp_path}/new/dir/c.db"
    assert (tmp_path / "new" / "dir").is_dir()
    assert Database("postgresql://postgres@127.0.0.1/x").dialect == "postgresql"


@pytest.mark.sqlite_only
async def test_sqlite_pragmas(database: Database) -> None:
    assert await database.pragmas() == {
        "busy_timeout": 1000,
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL
        "foreign_keys": 1,
        "cache_size": -4000,
        "temp_store": 2,  # MEMORY
        "journal_size_limit": 64 * 1024 * 1024,
    }


@pytest.mark.sqlite_only
async def test_sqlite_write_takes_the_lock_at_begin(database: Database, db_url: str) -> None:
    other = sqlite3.connect(normalize_url(db_url).database or "", timeout=0, isolation_level=None)
    try:
        async with database.write():
            # No statement yet, and the write lock is already held.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


@pytest.mark.sqlite_only
async def test_sqlite_read_then_write_units_queue_instead_of_failing(db_url: str) -> None:
    # Two Database objects act like two processes on one file. With a deferred BEGIN, B would
    # read the old value, and its write would then fail with SQLITE_BUSY once A commits.
    a, b = Database(db_url), Database(db_url)
    try:
        async with a.write() as conn:
            await conn.exec_driver_sql("CREATE TABLE counter (n INTEGER NOT NULL)")
            await conn.exec_driver_sql("INSERT INTO counter VALUES (0)")
        a_has_read, b_started = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def increment(db: Database, name: str) -> None:
            async with db.write() as conn:
                n = (await conn.exec_driver_sql("SELECT n FROM counter")).scalar_one()
                if name == "a":
                    a_has_read.set()
                    await b_started.wait()
                    await asyncio.sleep(0.1)  # B is now inside its BEGIN, waiting for A's lock
                await conn.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
                order.append(name)

        task_a = asyncio.create_task(increment(a, "a"))
        await a_has_read.wait()
        b_started.set()
        await increment(b, "b")
        await task_a
        async with a.read() as conn:
            assert (await conn.exec_driver_sql("SELECT n FROM counter")).scalar_one() == 2
        assert order == ["a", "b"]
    finally:
        await a.dispose()
        await b.dispose()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("engine_index", [0, 1], ids=["writer", "reader"])
async def test_sqlite_connection_left_in_a_transaction_is_recovered(database: Database,
                                                                    engine_index: int) -> None:
    # A unit of work cancelled while its BEGIN is on aiosqlite's thread (a client hanging up a
    # watch) returns its connection to the pool before that BEGIN runs: the connection is then
    # in a transaction nobody owns. Simulated here: BEGIN straight on the driver, a write in it,
    # and the connection back in the pool.
    async with database.write() as conn:
        await conn.exec_driver_sql("CREATE TABLE marks (n INTEGER NOT NULL)")
    engine = database.engines[engine_index]
    for _ in range(5):  # every pooled connection (the writer has one, readers four)
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            if not driver.in_transaction:
                await driver.execute("BEGIN")
                if engine_index == 0:
                    await driver.execute("INSERT INTO marks VALUES (1)")

    for _ in range(5):
        async with database.read() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM marks WHERE n = 1")).scalar_one() == 0
        async with database.write() as conn:
            await conn.exec_driver_sql("INSERT INTO marks VALUES (2)")
    async with database.read() as conn:
        # The orphaned transaction's write never committed; each unit's own did.
        assert (await conn.exec_driver_sql("SELECT n FROM marks")).scalars().all() == [2] * 5


@pytest.mark.sqlite_only
async def test_sqlite_schema_change_checks_foreign_keys(database: Database) -> None:
    async with database.schema_change() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 0
    with pytest.raises(RuntimeError, match="broken foreign keys"):
        async with database.schema_change() as conn:
            version = {"id": "v1", "workflow_id": "missing", "project_id": "acme", "version": 1,
                       "spec": {}, "created_at": NOW}
            await conn.execute(insert(WorkflowVersionRow), version)
    async with database.write() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 1
        assert (await conn.execute(select(func.count()).select_from(WorkflowVersionRow))).scalar_one() == 0


async def test_transaction_modes(database: Database, backend: str) -> None:
    if backend == "postgresql":
        async with database.read() as conn:
            assert (await conn.exec_driver_sql("SHOW transaction_isolation")).scalar_one() == "read committed"
            assert (await conn.exec_driver_sql("SHOW transaction_read_only")).scalar_one() == "on"
        async with database.write() as conn:
            assert (await conn.exec_driver_sql("SHOW transaction_isolation")).scalar_one() == "read committed"
            assert (await conn.exec_driver_sql("SHOW transaction_read_only")).scalar_one() == "off"
    else:
        async with database.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA query_only")).scalar_one() == 1
        async with database.write() as conn:
            assert (await conn.exec_driver_sql("PRAGMA query_only")).scalar_one() == 0


async def test_read_refuses_writes(database: Database) -> None:
    with pytest.raises(DBAPIError):
        async with database.read() as conn:
            await conn.execute(insert(ApiKeyRow), _api_key("k1"))
    # The pooled connection is a normal writer again afterwards.
    async with database.write() as conn:
        await conn.execute(insert(ApiKeyRow), _api_key("k1"))


async def test_failed_write_rolls_back(database: Database) -> None:
    with pytest.raises(KeyError):
        async with database.write() as conn:
            await conn.execute(insert(ApiKeyRow), _api_key("k1"))
            raise KeyError("boom")
    async with database.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(ApiKeyRow))).scalar_one() == 0


async def test_foreign_keys_are_enforced(database: Database) -> None:
    with pytest.raises(DBAPIError):
        async with database.write() as conn:
            version = {"id": "v1", "workflow_id": "missing", "project_id": "acme", "version": 1,
                       "spec": {}, "created_at": NOW}
            await conn.execute(insert(WorkflowVersionRow), version)


async def test_json_round_trip_and_null(database: Database, backend: str) -> None:
    doc = {"name": "déploiement", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    async with database.write() as conn:
        await conn.execute(insert(WorkflowRow), _workflow("w1"))
        await conn.execute(insert(WorkflowVersionRow), {
            "id": "v1", "workflow_id": "w1", "project_id": "acme", "version": 1, "spec": doc,
            "created_at": NOW})
    async with database.read() as conn:
        assert (await conn.execute(select(WorkflowVersionRow.spec))).scalar_one() == doc
        if backend == "sqlite":
            # Stored compactly: no spaces, UTF-8 rather than \u escapes.
            raw = (await conn.exec_driver_sql("SELECT spec FROM workflow_versions")).scalar_one()
            assert raw == '{"name":"déploiement","n":[1,2.5,null,true],"nested":{"k":"v"}}'
    # NaN is refused in Python on both backends (PostgreSQL's JSONB would reject it).
    with pytest.raises(StatementError):
        async with database.write() as conn:
            await conn.execute(insert(WorkflowVersionRow), {
                "id": "v2", "workflow_id": "w1", "project_id": "acme", "version": 2,
                "spec": {"x": math.nan}, "created_at": NOW})


@pytest.mark.empty_db
async def test_migrations_match_the_models(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    assert await current_revision(db_url) is None
    await migrate(db_url)
    # The head is the newest revision file: no revision is left out of the chain.
    newest = max(p.name[:4] for p in VERSIONS.glob("[0-9]*_*.py"))
    assert await current_revision(db_url) == head_revision() == newest

    db = Database(db_url)
    try:
        async with db.read() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    finally:
        await db.dispose()
    assert diff == []

    caplog.set_level(logging.INFO, logger="alembic")
    await migrate(db_url)
    assert not [r for r in caplog.records if "Running upgrade" in r.getMessage()]
    assert await current_revision(db_url) == newest


@pytest.mark.empty_db
async def test_concurrent_migrations_apply_once(db_url: str) -> None:
    # Replicas starting together on an empty database: one migrates, the other finds it done.
    await asyncio.gather(migrate(db_url), migrate(db_url), migrate(db_url))
    assert await current_revision(db_url) == head_revision()
