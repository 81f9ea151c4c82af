"""SqlStore: the storage adapter the engine's ports describe — a Database whose transactions
hand out Repositories.

It is also the storage boundary for database trouble that is not the request's fault and goes
away by itself (issue 5, item 11): SQLite busy/locked beyond its busy timeout, a pool checkout
timeout, a lost or refused PostgreSQL connection, a serialization failure or deadlock. Those
leave `read()` / `write()` as a domain UNAVAILABLE error with reason DATABASE_UNAVAILABLE and a
generic message (gRPC UNAVAILABLE, HTTP 503), never as INTERNAL. A value the database refuses
(DataError) is the request's fault: INVALID_ARGUMENT, reason VALUE_REFUSED. Constraint
violations, programming errors and anything else pass through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy import exc as sa_exc

from conveyor.domain.errors import TRANSACTION_CONFLICT, ConveyorError, invalid, unavailable
from conveyor.domain.feed import Key
from conveyor.storage.db import Database
from conveyor.storage.feed import PgListener
from conveyor.storage.repository import Repository

logger = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
VALUE_REFUSED = "VALUE_REFUSED"
UNAVAILABLE_MESSAGE = "the database is temporarily unavailable; retry the request"
CONFLICT_MESSAGE = "the request conflicted with another one in the database; retry the request"

# SQLite primary result codes (the low byte of sqlite3.Error.sqlite_errorcode): another
# connection holds a lock we waited busy_timeout for.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
# PostgreSQL SQLSTATEs of a transaction aborted in a conflict with another: worth a retry, and
# no outage (TRANSACTION_CONFLICT: a batch meeting one is replayed in smaller transactions).
_PG_CONFLICT_STATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
})
# PostgreSQL SQLSTATEs worth a retry: the whole class 08 (connection exception), and these.
_PG_RETRYABLE_STATES = _PG_CONFLICT_STATES | frozenset({
    "53300",  # too_many_connections
    "57P01",  # admin_shutdown (pg_terminate_backend, a fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, recovering)
})
# Never translated, whatever else is true of them: the request or the code is at fault.
_NOT_TRANSIENT = (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError,
                  sa_exc.NotSupportedError)


def is_transient(error: BaseException) -> bool:
    """True when `error` is database trouble a retry of the same request can get past."""
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection within pool_timeout
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if isinstance(error, _NOT_TRANSIENT):
            return False
        if error.connection_invalidated:  # SQLAlchemy recognised a dropped connection
            return True
        return _driver_error_is_transient(error.orig)
    return _driver_error_is_transient(error)


def is_refused_value(error: BaseException) -> bool:
    """True when the database refused a value (SQLSTATE class 22, data exception; SQLite has
    none it would raise for our columns)."""
    if isinstance(error, sa_exc.DataError):
        return True
    seen: BaseException | None = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    while seen is not None:
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state:
            return state.startswith("22")
        seen = seen.__cause__ if seen.__cause__ is not seen else None
    return False


def is_conflict(error: BaseException) -> bool:
    """True when PostgreSQL aborted the transaction in a conflict with another (a deadlock, a
    serialization failure)."""
    seen: BaseException | None = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    while seen is not None:
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state:
            return state in _PG_CONFLICT_STATES
        seen = seen.__cause__ if seen.__cause__ is not seen else None
    return False


def _driver_error_is_transient(error: BaseException | None) -> bool:
    if error is None:
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str) and state:
        return state.startswith("08") or state in _PG_RETRYABLE_STATES
    # SQLAlchemy's asyncpg adapter keeps the driver's exception as the cause.
    cause = error.__cause__
    if cause is not None and cause is not error and _driver_error_is_transient(cause):
        return True
    return (
        # Refused, reset or timed-out sockets while connecting (asyncpg raises them as is).
        isinstance(error, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError))
        or (isinstance(error, asyncpg.exceptions.InterfaceError) and "connection is closed" in str(error))
    )


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except ConveyorError:
        raise
    except Exception as e:
        if is_refused_value(e):
            # A value the database refuses (PostgreSQL: a NUL character, text too long for its
            # column, a number out of range). The API's limits refuse these first; one that gets
            # through is still the request's fault: its unit fails alone, as INVALID_ARGUMENT.
            logger.warning("database refused a value: %s", next(iter(str(e).splitlines()), ""))
            raise invalid("the database refused a value of this request", reason=VALUE_REFUSED) from e
        if not is_transient(e):
            raise
        # One line, no traceback: a locked or restarting database can fail many requests at once.
        first_line = next(iter(str(e).splitlines()), "")
        if is_conflict(e):
            logger.info("transaction conflict: %s: %s", type(e).__name__, first_line)
            raise unavailable(CONFLICT_MESSAGE, TRANSACTION_CONFLICT) from e
        logger.warning("database unavailable: %s: %s", type(e).__name__, first_line)
        raise unavailable(UNAVAILABLE_MESSAGE, DATABASE_UNAVAILABLE) from e


class SqlStore:
    """Opens read/write units of work on a Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Repository]:
        async with _translated(), self.db.read() as conn:
            yield Repository(conn, self.db.dialect)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Repository]:
        async with _translated(), self.db.write() as conn:
            yield Repository(conn, self.db.dialect)

    async def listen(self, deliver: Callable[[Iterable[Key]], None],
                     resync: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Start hearing other replicas' commits (PostgreSQL); nothing to hear on SQLite."""
        if self.db.dialect != "postgresql":
            return _nothing
        dsn = self.db.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        listener = PgListener(dsn, deliver, resync, self.db.connect_timeout,
                              self.db.command_timeout or self.db.connect_timeout)
        await listener.start()
        return listener.stop


async def _nothing() -> None:
    return None
