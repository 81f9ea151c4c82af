"""Retryable database trouble answers UNAVAILABLE with reason DATABASE_UNAVAILABLE (issue 5,
item 11): the Store's read()/write() translate SQLite busy, pool timeouts, lost PostgreSQL
connections and deadlocks; constraint violations and programming errors pass through as they are.
Everything here is provoked for real: another connection holding the lock, a full pool,
pg_terminate_backend, two transactions locking rows in opposite order."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from sqlalchemy import insert, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from conveyor.api.server import build_server
from conveyor.domain.errors import TRANSACTION_CONFLICT, ConveyorError, ErrorKind, is_outage
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database, normalize_url
from conveyor.storage.migrate import migrate
from conveyor.storage.models import WorkflowRow
from conveyor.storage.store import CONFLICT_MESSAGE, DATABASE_UNAVAILABLE, UNAVAILABLE_MESSAGE, SqlStore
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.api.support import failure
from tests.auth import bearer_interceptors, key
from tests.conftest import PG_ADMIN_DSN
from tests.storage.test_db import NOW, _workflow

# Short enough to keep the tests fast, long enough that a healthy unit of work never hits it.
SHORT_BUSY_MS = 50
SHORT_POOL_SECONDS = 0.2
# Connections a PostgreSQL Database's pool hands out at most (pool_size + max_overflow).
PG_POOL_CAPACITY = 15


def _assert_unavailable(error: ConveyorError) -> None:
    assert error.kind is ErrorKind.UNAVAILABLE
    assert error.reason == DATABASE_UNAVAILABLE
    assert error.message == UNAVAILABLE_MESSAGE


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    await migrate(db_url)
    db = Database(db_url, busy_timeout_ms=SHORT_BUSY_MS, pool_timeout=SHORT_POOL_SECONDS)
    try:
        yield SqlStore(db)
    finally:
        await db.dispose()


def _lock_sqlite(db_url: str) -> sqlite3.Connection:
    """Another connection (as another process would) holding the database's write lock."""
    other = sqlite3.connect(normalize_url(db_url).database or "", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


@pytest.mark.sqlite_only
async def test_sqlite_locked_beyond_busy_timeout_is_unavailable(store: SqlStore, db_url: str) -> None:
    other = _lock_sqlite(db_url)
    try:
        started = time.monotonic()
        with pytest.raises(ConveyorError) as caught:
            async with store.write() as repo:
                await repo.conn.execute(insert(WorkflowRow), _workflow("w1"))
        _assert_unavailable(caught.value)
        # It waited busy_timeout, not the 5 s default.
        assert time.monotonic() - started < 2
    finally:
        other.execute("ROLLBACK")
        other.close()
    async with store.write() as repo:  # the lock is gone: the same unit of work now succeeds
        await repo.conn.execute(insert(WorkflowRow), _workflow("w1"))


async def test_pool_timeout_is_unavailable(store: SqlStore, backend: str) -> None:
    # Every connection the writer pool has is in use: SQLite has one writer, PostgreSQL 15.
    capacity = 1 if backend == "sqlite" else PG_POOL_CAPACITY
    async with AsyncExitStack() as held:
        for _ in range(capacity):
            await held.enter_async_context(store.write())
        started = time.monotonic()
        with pytest.raises(ConveyorError) as caught:
            async with store.write():
                pass
        _assert_unavailable(caught.value)
        assert time.monotonic() - started < 2
    async with store.write():
        pass


async def test_postgres_connection_terminated_mid_use_is_unavailable(store: SqlStore, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL only")
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        with pytest.raises(ConveyorError) as caught:
            async with store.write() as repo:
                await repo.conn.execute(insert(WorkflowRow), _workflow("w1"))
                pid = (await repo.conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await repo.conn.execute(update(WorkflowRow).values(updated_at=NOW))
        _assert_unavailable(caught.value)
        # A read on a pooled connection that was killed while idle fails the same way.
        async with store.read() as repo:
            pid = (await repo.conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(0.1)  # the backend is gone once the server has processed the signal
        with pytest.raises(ConveyorError) as caught:
            async with store.read() as repo:
                await repo.conn.execute(text("SELECT 1"))
        _assert_unavailable(caught.value)
    finally:
        await admin.close()
    # The pool reconnects: the retried unit of work succeeds, and the first one left nothing.
    async with store.read() as repo:
        assert (await repo.conn.execute(text("SELECT count(*) FROM workflows"))).scalar_one() == 0


async def test_postgres_deadlock_is_a_conflict_not_an_outage(store: SqlStore, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("PostgreSQL only")
    async with store.write() as repo:
        await repo.conn.execute(insert(WorkflowRow), [_workflow("a"), _workflow("b")])
    both_locked_one = asyncio.Barrier(2)

    def touch(wf_id: str) -> Any:
        return update(WorkflowRow).where(WorkflowRow.id == wf_id).values(updated_at=NOW)

    async def lock_in_order(first: str, second: str) -> None:
        async with store.write() as repo:
            await repo.conn.execute(touch(first))
            await both_locked_one.wait()
            await repo.conn.execute(touch(second))

    results = await asyncio.gather(lock_in_order("a", "b"), lock_in_order("b", "a"), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    # PostgreSQL breaks the deadlock by failing exactly one of the two: the client may retry
    # (UNAVAILABLE), but a batch meeting it is replayed in smaller transactions, not failed whole.
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, ConveyorError)
    assert (error.kind, error.reason, error.message) == (ErrorKind.UNAVAILABLE, TRANSACTION_CONFLICT,
                                                         CONFLICT_MESSAGE)
    assert not is_outage(error)


async def test_constraint_and_programming_errors_are_not_translated(store: SqlStore) -> None:
    async with store.write() as repo:
        await repo.conn.execute(insert(WorkflowRow), _workflow("w1"))
    with pytest.raises(IntegrityError):
        async with store.write() as repo:
            await repo.conn.execute(insert(WorkflowRow), _workflow("w1"))
    with pytest.raises(DBAPIError):  # SQLite: OperationalError, PostgreSQL: ProgrammingError
        async with store.read() as repo:
            await repo.conn.execute(text("SELECT no_such_column FROM workflows"))


async def test_grpc_answers_unavailable_with_the_reason(db_url: str, backend: str) -> None:
    await migrate(db_url)
    db = Database(db_url, busy_timeout_ms=SHORT_BUSY_MS, pool_timeout=SHORT_POOL_SECONDS)
    settings = Settings(db_url=db_url, grpc_port=0, envoy_enabled=False)
    engine = Engine(SqlStore(db), settings, ManualClock())
    server, port = await build_server(engine, settings)
    await server.start()
    admin = await asyncpg.connect(PG_ADMIN_DSN) if backend == "postgresql" else None
    token = await key(engine, "test-admin")  # resolved (and cached) before the database is locked
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=bearer_interceptors(token)) as channel:
            workflows = wf_grpc.WorkflowsServiceStub(channel)
            runs = runs_grpc.WorkflowRunsServiceStub(channel)
            definition = json_format.ParseDict({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]},
                                               pb.Workflow())
            await workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(workflow=definition))
            # Its audit entry is written now, not by a background flush that would otherwise be
            # the first to meet the killed connections below (and reset the pool for the call).
            await engine.audit.flush()
            if admin is None:
                other = _lock_sqlite(db_url)
                try:
                    error = await failure(runs.TriggerWorkflowRun(
                        runs_pb.TriggerWorkflowRunRequest(workflow_id="w")))
                finally:
                    other.execute("ROLLBACK")
                    other.close()
            else:
                # Every pooled connection of the server is killed behind its back.
                database = normalize_url(db_url).database
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND application_name = 'conveyor'", database)
                assert killed >= 1
                await asyncio.sleep(0.1)
                request = runs_pb.GetWorkflowRunRequest(workflow_run_id="nope")
                error = await failure(runs.GetWorkflowRun(request))
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert error.info is not None and error.info.reason == DATABASE_UNAVAILABLE
            assert error.message == UNAVAILABLE_MESSAGE
            # Nothing was stored by the failed call, and the server answers again at once.
            listed = [r async for r in runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest())]
            assert listed == []
    finally:
        if admin is not None:
            await admin.close()
        await server.stop(grace=None)
        await engine.stop()
        await db.dispose()
