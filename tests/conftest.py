"""Suite-wide fixtures: which backend the suite runs on, a fresh database per test, and the
`sqlite_only` marker.

The suite runs on SQLite by default and on PostgreSQL when CONVEYOR_TEST_DB=postgresql (the
Makefile runs it both ways). On PostgreSQL every test gets its own freshly created database,
dropped afterwards; an unreachable server fails the run at start instead of skipping tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.migrate import migrate
from conveyor.storage.store import SqlStore

BACKEND = os.environ.get("CONVEYOR_TEST_DB", "sqlite")
# Servers the suite spawns (`conveyor serve`) serve /metrics on a free port, not on 9464: the two
# backends' runs, and anyone else's, start servers side by side.
os.environ.setdefault("CONVEYOR_METRICS_PORT", "0")
# The server the PostgreSQL run uses (trust auth); test databases are created from `postgres`.
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"


async def _check_postgres() -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    await conn.close()


def pytest_configure(config: pytest.Config) -> None:
    if BACKEND not in ("sqlite", "postgresql"):
        raise pytest.UsageError(f"CONVEYOR_TEST_DB must be sqlite or postgresql, not {BACKEND!r}")
    if BACKEND == "postgresql":
        try:
            asyncio.run(_check_postgres())
        except (OSError, asyncpg.PostgresError, TimeoutError) as e:
            raise pytest.UsageError(f"CONVEYOR_TEST_DB=postgresql: {PG_ADMIN_DSN} unreachable: {e}") from e


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BACKEND != "postgresql":
        return
    skip = pytest.mark.skip(reason="sqlite_only: the suite runs on PostgreSQL")
    for item in items:
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def backend() -> str:
    """"sqlite" or "postgresql": the backend this run of the suite uses."""
    return BACKEND


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where each test's database at the head migration comes from (running the migrations
    costs ~0.3 s, every test). SQLite: a migrated file, copied per test. PostgreSQL: ONE migrated
    database, emptied after each test (a TRUNCATE takes ~20 ms where creating a database from a
    template takes as long as migrating a new one); see `_pg_reset`."""
    if BACKEND == "sqlite":
        path = tmp_path_factory.mktemp("template") / "conveyor.db"
        asyncio.run(migrate(f"sqlite+aiosqlite:///{path}"))
        # Everything into the main file (a copy takes that file alone).
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        yield str(path)
        return
    name = f"conveyor_test_{uuid.uuid4().hex[:16]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(migrate(PG_URL_PREFIX + name))
        asyncio.run(_pg_reset(name))  # records the shape the migrations give it
        yield name
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


async def _pg_admin(statement: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def _pg_shape(conn: asyncpg.Connection) -> tuple[str, ...]:
    """What a test could add to a database besides rows: tables, indexes, functions, triggers."""
    rows = await conn.fetch(
        "SELECT 'table ' || tablename FROM pg_tables WHERE schemaname = 'public' "
        "UNION ALL SELECT 'index ' || indexname FROM pg_indexes WHERE schemaname = 'public' "
        "UNION ALL SELECT 'function ' || proname FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = 'public' "
        "UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal")
    return tuple(sorted(r[0] for r in rows))


_PG_SHAPE: dict[str, tuple[str, ...]] = {}


async def _pg_reset(name: str) -> None:
    """The test database as the migrations left it, for the next test: the connections the test
    left behind closed, every table emptied (the migration history kept) — or, when the test
    changed the schema (its own tables, functions, triggers), made again from scratch."""
    await _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    conn = await asyncpg.connect(PG_URL_PREFIX.replace("+asyncpg", "") + name)
    try:
        shape = await _pg_shape(conn)
        if _PG_SHAPE.setdefault(name, shape) == shape:
            tables = [t.removeprefix("table ") for t in shape
                      if t.startswith("table ") and t != "table alembic_version"]
            listed = ", ".join(f'"{t}"' for t in tables)
            await conn.execute(f"TRUNCATE {listed} RESTART IDENTITY CASCADE")
            return
    finally:
        await conn.close()
    await _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    await _pg_admin(f'CREATE DATABASE "{name}"')
    await migrate(PG_URL_PREFIX + name)


@pytest.fixture
async def db_url(request: pytest.FixtureRequest, tmp_path: Path, template: str) -> AsyncIterator[str]:
    """The URL of a database at the head migration holding nothing (for tests marked
    `empty_db`: an empty database, not migrated), as good as new for the next test after."""
    empty = request.node.get_closest_marker("empty_db") is not None
    if BACKEND == "sqlite":
        path = tmp_path / "conveyor.db"
        if not empty:
            shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    if not empty:
        try:
            yield PG_URL_PREFIX + template
        finally:
            await _pg_reset(template)
        return
    name = f"conveyor_test_{uuid.uuid4().hex[:16]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL_PREFIX + name
    finally:
        # FORCE: a connection the test leaked must not keep the database alive.
        await _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """A Database on a fresh database at the head migration; disposed after the test."""
    db = Database(db_url)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def clock() -> ManualClock:
    """The engine's clock in tests: time moves only when a test advances it."""
    return ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
async def engine(database: Database, clock: ManualClock) -> AsyncIterator[Engine]:
    """An Engine over the test database with a ManualClock and no background loop: tests
    advance runs with `await engine.tick()`."""
    eng = Engine(SqlStore(database), Settings(db_url=str(database.url)), clock)
    try:
        yield eng
    finally:
        await eng.stop()
