"""Suite-wide fixtures: which backend the suite runs on, a fresh database per test, and the
`sqlite_only` marker.

The suite runs on SQLite by default and on PostgreSQL when CONVEYOR_TEST_DB=postgresql (the
Makefile runs it both ways). On PostgreSQL every test gets its own freshly created database,
dropped afterwards; an unreachable server fails the run at start instead of skipping tests.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
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


@pytest.fixture
async def db_url(tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a fresh, empty database, gone after the test."""
    if BACKEND == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'conveyor.db'}"
        return
    name = f"conveyor_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield PG_URL_PREFIX + name
        # FORCE: a connection the test leaked must not keep the database alive.
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """A migrated Database on a fresh database; disposed after the test."""
    await migrate(db_url)
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
