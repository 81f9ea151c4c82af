"""The database handle: URL normalisation, the engines and their pools, connection setup
(SQLite PRAGMAs), the JSON codec, and the transaction modes of `write()`, `read()` and
`schema_change()`. Every unit of work runs inside exactly one of these blocks; this module is the
one place that knows how opening a transaction differs between SQLite and PostgreSQL.

Rules for callers: never nest `write()` blocks (on SQLite the single writer connection would wait
for itself), keep `read()` blocks short (an open SQLite reader stops WAL checkpoints), and write
only through `write()` (`read()` transactions are read-only on both backends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool
from sqlalchemy.util import await_only

Backend = Literal["sqlite", "postgresql"]

# Compact JSON (no spaces, non-ASCII kept as UTF-8). NaN/Infinity are refused because
# PostgreSQL's JSONB rejects them: a value that fails on one backend fails on both, in Python.
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_text(value: object) -> str:
    """A JSON document as both databases store it."""
    return _json_encoder.encode(value)


# The bounds on waiting for a database that is gone; each failure is answered UNAVAILABLE by the
# Store. Constructor arguments: the server passes its Settings' values (the same defaults,
# README "Database outages"), tests shorter ones, migrations none on statements.
# Milliseconds a SQLite connection waits for another process's lock (e.g. `conveyor keys
# create` beside a running server) before failing with "database is locked".
DEFAULT_BUSY_TIMEOUT_MS = 1000
# Seconds a unit of work waits for a pooled connection (all busy, or hung on a dead network).
DEFAULT_POOL_TIMEOUT = 2.0
# PostgreSQL: seconds to open a connection, and to get the answer of one statement.
DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_COMMAND_TIMEOUT = 2.0

# PRAGMAs run, in this order, on every new SQLite connection (most are per connection).
_SQLITE_PRAGMAS: tuple[tuple[str, object], ...] = (
    # Another process holding the lock is waited for up to busy_timeout ms (replaced by the
    # Database's own value); set first so that the journal_mode switch below waits too.
    ("busy_timeout", DEFAULT_BUSY_TIMEOUT_MS),
    # WAL: readers never block the writer nor each other (persistent in the file).
    ("journal_mode", "WAL"),
    # In WAL mode NORMAL fsyncs only at checkpoints: commits survive a process crash; an OS crash
    # or power loss can lose the last commits (the file itself stays consistent).
    ("synchronous", "NORMAL"),
    # SQLite ignores FOREIGN KEY clauses unless this is on, per connection.
    ("foreign_keys", "ON"),
    # The writer's page cache: 4 MiB (negative = KiB; SQLite's default is 2 MiB), readers the
    # default (below); the OS page cache serves the rest. Each connection's cache fills as the
    # database grows: in a 10-minute bench/soak.py, five 32 MiB caches grew the server's memory
    # by 5 MiB a minute, a 16 MiB writer's by 18 %, a 4 MiB one's by 8 %.
    ("cache_size", -4000),
    # Temporary b-trees of sorts and GROUP BYs stay in memory instead of temp files.
    ("temp_store", "MEMORY"),
    # After a checkpoint the WAL file is truncated back to 64 MiB instead of keeping its peak size.
    ("journal_size_limit", 64 * 1024 * 1024),
)
# Reader connections only: a write there would be a deferred-lock upgrade that can fail with
# SQLITE_BUSY under load; refuse it at once instead.
_SQLITE_READER_PRAGMAS: tuple[tuple[str, object], ...] = (("query_only", "ON"), ("cache_size", -2000))

# Readers run concurrently in WAL; each aiosqlite connection is a thread, so a few suffice.
_SQLITE_READERS = 4
# Connections per process on PostgreSQL; several replicas share the server's max_connections.
_PG_POOL_SIZE = 10
_PG_MAX_OVERFLOW = 5


def normalize_url(url: str | URL) -> URL:
    """The URL with its async driver: sqlite[+aiosqlite]:///path -> sqlite+aiosqlite,
    postgresql[+asyncpg]://... -> postgresql+asyncpg. Anything else is a ValueError."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            # The writer and the readers are separate connections: they must share a file.
            raise ValueError("an in-memory SQLite database is not supported; give a file path")
        return parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername in ("postgresql", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database URL {parsed!r}: use sqlite:///path or postgresql://...")


def masked_url(url: str) -> str:
    """The URL as it may be printed or logged: its password, if any, shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: it may be anything, a password too
        return "(not a database URL)"


# PostgreSQL's SQLSTATE for a database that does not exist (invalid_catalog_name).
_NO_SUCH_DATABASE = "3D000"


class NoDatabase(Exception):
    """The database a URL names does not exist."""


async def require_database(url: str) -> None:
    """Raise NoDatabase unless the database exists, creating nothing: an absent SQLite file
    stays absent (opening it would create it), a PostgreSQL database is only connected to."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not await asyncio.to_thread(Path(parsed.database or "").is_file):
            raise NoDatabase(f"no database at {parsed.database}")
        return
    database = Database(url)
    try:
        async with database.read():
            pass
    except DBAPIError as e:
        if getattr(e.orig, "sqlstate", None) == _NO_SUCH_DATABASE:
            raise NoDatabase(f"no database {parsed.database!r} at {masked_url(url)}") from None
        raise
    finally:
        await database.dispose()


class Database:
    """One per process: the engines of one database and its transaction blocks."""

    def __init__(self, url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
                 pool_timeout: float = DEFAULT_POOL_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> None:
        self._url = normalize_url(url)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        codec: dict[str, Any] = {"json_serializer": json_text, "json_deserializer": json.loads}
        if self._url.get_backend_name() == "sqlite":
            pragmas = tuple((name, int(busy_timeout_ms) if name == "busy_timeout" else value)
                            for name, value in _SQLITE_PRAGMAS)
            Path(self._url.database or "").parent.mkdir(parents=True, exist_ok=True)
            # One writer connection: SQLite serializes writers anyway, and in-process writers
            # then queue on the pool instead of spinning on busy_timeout.
            # No reset on return: every unit of work ends in COMMIT or ROLLBACK (write(), read()),
            # so the pool's own ROLLBACK would be one more round trip to the driver's thread.
            self._writer = create_async_engine(
                self._url, poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0,
                pool_timeout=pool_timeout, pool_reset_on_return=None, **codec,
            )
            self._reader = create_async_engine(
                self._url, poolclass=AsyncAdaptedQueuePool, pool_size=_SQLITE_READERS,
                max_overflow=0, pool_timeout=pool_timeout, pool_reset_on_return=None, **codec,
            )
            # The write lock is taken at BEGIN, so a read-then-write unit never fails upgrading it.
            _setup_sqlite(self._writer, pragmas, begin="BEGIN IMMEDIATE")
            # Readers take a snapshot at their first read and hold no lock against the writer.
            _setup_sqlite(self._reader, pragmas + _SQLITE_READER_PRAGMAS, begin="BEGIN")
            self._engines = [self._writer, self._reader]
        else:
            self._writer = create_async_engine(
                self._url,
                pool_size=_PG_POOL_SIZE,
                max_overflow=_PG_MAX_OVERFLOW,
                pool_timeout=pool_timeout,
                # No pre-ping: it costs a round trip per checkout; a connection found dead on use
                # fails that one unit of work and invalidates the whole pool, which reconnects.
                pool_pre_ping=False,
                # READ COMMITTED, named explicitly so a changed server default cannot alter it:
                # the engine's correctness comes from row locks and compare-and-set updates.
                isolation_level="READ COMMITTED",
                # A server that does not answer fails a connect after connect_timeout, and a
                # statement after command_timeout (a network gone silent sends no reset: only a
                # client-side deadline notices it).
                connect_args={"server_settings": {"application_name": "conveyor"},
                              "timeout": connect_timeout, "command_timeout": command_timeout},
                **codec,
            )
            _drop_timed_out(self._writer)
            # Same pool; BEGIN ... READ ONLY, so a write through read() fails as it does on SQLite.
            self._reader = self._writer.execution_options(postgresql_readonly=True)
            self._engines = [self._writer]

    @property
    def url(self) -> str:
        """The normalised URL (async driver), password included."""
        return self._url.render_as_string(hide_password=False)

    @property
    def engines(self) -> list[AsyncEngine]:
        """Every engine of this database (one on PostgreSQL; writer and readers on SQLite), e.g.
        to observe the statements it runs."""
        return list(self._engines)

    @property
    def dialect(self) -> Backend:
        """"sqlite" or "postgresql"."""
        return "sqlite" if self._url.get_backend_name() == "sqlite" else "postgresql"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: commits when the block ends, rolls back if it raises.
        SQLite: BEGIN IMMEDIATE on the one writer connection. PostgreSQL: READ COMMITTED."""
        async with self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction. SQLite: deferred BEGIN on a reader connection (one snapshot
        for the whole block). PostgreSQL: READ COMMITTED, READ ONLY."""
        async with self._reader.begin() as conn:
            yield conn

    @asynccontextmanager
    async def schema_change(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction for migrations. SQLite: foreign keys are off while it runs (the
        table rebuilds of batch migrations would otherwise cascade or fail), checked with
        foreign_key_check before commit, and on again after. PostgreSQL: write() plus a
        transaction-scoped advisory lock."""
        if self.dialect == "postgresql":
            async with self.write() as conn:
                # Replicas starting together: one migrates, the others wait here and then find
                # the schema already at head.
                await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('conveyor.migrate'))"))
                yield conn
            return
        async with self._writer.connect() as conn:
            # foreign_keys cannot change inside a transaction, and any statement through `conn`
            # would begin one, so it is switched on the driver connection (autocommit) itself.
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("PRAGMA foreign_keys = OFF")
            try:
                async with conn.begin():
                    yield conn
                    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise RuntimeError(f"schema change leaves broken foreign keys: {broken[:5]}")
            finally:
                await driver.execute("PRAGMA foreign_keys = ON")

    async def ping(self) -> None:
        """Raise unless the database can take work now (the readiness probe). PostgreSQL: SELECT 1
        on a pooled connection through read(). SQLite: the same through write(), since readers
        in WAL mode never wait for anyone: only taking the write lock finds a file another
        process holds locked (after busy_timeout), which is what stops this server's writes."""
        block = self.write() if self.dialect == "sqlite" else self.read()
        async with block as conn:
            await conn.execute(text("SELECT 1"))

    def pool_usage(self) -> dict[str, tuple[int, int]]:
        """Per pool ("writer" and "reader" on SQLite, "main" on PostgreSQL): the connections
        checked out now and the most it hands out (pool size plus overflow)."""
        if self.dialect == "sqlite":
            pools = {"writer": (self._writer, 1), "reader": (self._reader, _SQLITE_READERS)}
        else:
            pools = {"main": (self._writer, _PG_POOL_SIZE + _PG_MAX_OVERFLOW)}
        out: dict[str, tuple[int, int]] = {}
        for name, (engine, capacity) in pools.items():
            pool = engine.pool
            out[name] = (pool.checkedout() if isinstance(pool, QueuePool) else 0, capacity)
        return out

    async def pragmas(self) -> dict[str, object]:
        """The writer connection's PRAGMAs as SQLite reports them (briefly takes the write lock);
        empty on PostgreSQL, which has none."""
        if self.dialect == "postgresql":
            return {}
        async with self.write() as conn:
            return {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one()
                for name, _ in _SQLITE_PRAGMAS
            }

    async def dispose(self) -> None:
        """Close every pooled connection."""
        for engine in self._engines:
            await engine.dispose()


def _drop_timed_out(engine: AsyncEngine) -> None:
    """A statement or connect that timed out leaves its connection mid-protocol, maybe on a dead
    network: it counts as a disconnect, so it is closed instead of rolled back (the ROLLBACK
    would wait a timeout again) and the pool's older connections are replaced on checkout (the
    same network is likely gone under them too)."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        if isinstance(context.original_exception, TimeoutError):
            context.is_disconnect = True
            # Closed now: the pool's graceful close would wait up to 2 s for a goodbye over
            # the same silent network.
            with contextlib.suppress(Exception):  # already closed or invalidated: nothing to do
                assert context.connection is not None
                driver = context.connection.connection.driver_connection
                assert driver is not None
                driver.terminate()


def _set_journal_mode(cursor: Any, mode: str, busy_ms: int) -> None:
    """Set the (persistent) journal mode unless the file has it already. Switching needs the
    file exclusively and SQLite does not wait for that on busy_timeout: connections opened
    together on a new file, or while another migrates it, would fail at once, so they retry
    (only ever while a file is first set up: then the mode is in the file)."""
    deadline = time.monotonic() + busy_ms / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode")
            if str(cursor.fetchone()[0]).lower() != mode.lower():
                cursor.execute(f"PRAGMA journal_mode = {mode}")
            return
        except Exception as e:  # the driver adapter's OperationalError
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _setup_sqlite(engine: AsyncEngine, pragmas: tuple[tuple[str, object], ...], begin: str) -> None:
    """Apply `pragmas` to each new connection of `engine` and open its transactions with `begin`."""
    busy_ms = int(dict(pragmas).get("busy_timeout", DEFAULT_BUSY_TIMEOUT_MS))  # type: ignore[call-overload]

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # The driver's own implicit BEGIN (deferred, and only before DML) is turned off: every
        # transaction is begun by the "begin" hook below, and PRAGMAs here run outside one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for name, value in pragmas:
            if name == "journal_mode":
                _set_journal_mode(cursor, str(value), busy_ms)
            else:
                cursor.execute(f"PRAGMA {name} = {value}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: one hop to aiosqlite's thread instead of three through a
        # SQLAlchemy cursor (create, execute, close); every unit of work begins here.
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            await_only(driver.execute(begin))
        except sqlite3.OperationalError as e:
            if "within a transaction" not in str(e):
                raise
            # A unit of work cancelled while its BEGIN was on the driver's thread (a client
            # that hung up, e.g. a watch) returned the connection to the pool (no reset on
            # return) before that BEGIN ran: the connection is in a transaction nobody owns,
            # and every later unit on it would fail. Whatever it holds never committed: roll
            # it back and begin ours.
            await_only(driver.execute("ROLLBACK"))
            await_only(driver.execute(begin))
