"""Fixtures shared by the engine tests: several engines on one database, as replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_notify import make_engine
from tests.engine.test_races import Pair, _install_cap_audit


@pytest.fixture
async def pair(database: Database, clock: ManualClock, backend: str) -> AsyncIterator[Pair]:
    """Engines A and B on the test database (migrated by `database`), plus the cap audit."""
    p = Pair(database.url, clock, backend)
    await _install_cap_audit(p.db)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def replicas(database: Database, clock: ManualClock) -> AsyncIterator[list[Engine]]:
    """Two engines with their own pools on one database, as two server replicas (allowed to
    reach test servers on 127.0.0.1, which egress denies by default)."""
    dbs = [Database(database.url), Database(database.url)]
    settings = Settings(db_url=database.url, http_allow=("127.0.0.1",))
    out = [Engine(SqlStore(db), settings, clock) for db in dbs]
    try:
        yield out
    finally:
        for engine in out:
            await engine.stop()
        for db in dbs:
            await db.dispose()


@pytest.fixture
async def eng(database: Database, clock: ManualClock) -> AsyncIterator[Engine]:
    """An engine whose notifier signs and delivers quickly to the tests' local receivers
    (test_notify.make_engine); tests drive it with run_once and ticks."""
    engine = make_engine(database, clock)
    try:
        yield engine
    finally:
        await engine.stop()
