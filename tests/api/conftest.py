"""Fixtures for API tests: a real Engine over a migrated SQLite (or PostgreSQL) database, the real
gRPC server from `build_server` on port 0, and generated stubs on a grpc.aio channel to it.

The engine's background loop is not started: tests advance runs with `await engine.tick()`
under a ManualClock, so nothing depends on wall-clock timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from conveyor.api.server import build_server
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.api.support import Api
from tests.auth import bearer_interceptors, key


@pytest.fixture
def settings(db_url: str) -> Settings:
    # No per-address limit on anonymous calls and webhook deliveries: tests here make hundreds
    # from 127.0.0.1 on the wall clock (tests/api/test_anonymous_limits.py turns it on).
    return Settings(db_url=db_url, grpc_host="127.0.0.1", grpc_port=0, envoy_enabled=False,
                    anonymous_rate_limit=0, webhook_rate_limit=0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def engine(database: Database, settings: Settings, clock: ManualClock) -> AsyncIterator[Engine]:
    engine = Engine(SqlStore(database), settings, clock)
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
async def api(engine: Engine, settings: Settings, clock: ManualClock) -> AsyncIterator[Api]:
    server, port = await build_server(engine, settings)
    await server.start()
    # Every call of the stubs is an admin of every project unless it names its own token.
    token = await key(engine, "test-admin")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=bearer_interceptors(token)) as channel:
            yield Api(channel, engine, clock)
    finally:
        await server.stop(grace=None)
