"""The change feed across replicas on PostgreSQL: NOTIFY inside the committing transaction, one
LISTEN connection per replica.

A unit of work's keys (domain/feed.py) are sent with `pg_notify` before its transaction ends:
PostgreSQL delivers a notification only when, and only if, its transaction commits, so a
listener never hears of a change it could not yet read, nor of one rolled back. Each replica
keeps one dedicated asyncpg connection LISTENing and hands the keys it hears to the engine's
keyed pulses; when that connection is lost (closed, or silent to the SELECT 1 it is asked every
PING_SECONDS) it reconnects and, since notifications sent while
it was away are gone, wakes every waiter once to look again (the database stays the source of
truth). SQLite has one process and needs none of this: its commits fire the keys in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable

import asyncpg

from conveyor.domain.feed import Key, decode, encode

log = logging.getLogger(__name__)

CHANNEL = "conveyor_feed"
# A NOTIFY payload must stay under 8,000 bytes: keys are sent in chunks below that.
MAX_PAYLOAD = 7_000
# Backoff between reconnects of a lost LISTEN connection.
RECONNECT_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)
# How often the LISTEN connection is asked a SELECT 1: a network gone silent closes nothing, so
# without a question nobody would notice that notifications stopped coming.
PING_SECONDS = 2.0


def payloads(keys: Iterable[Key]) -> list[str]:
    """The NOTIFY payloads that carry these keys (one per MAX_PAYLOAD bytes)."""
    chunks: list[str] = []
    lines: list[str] = []
    size = 0
    for line in encode(keys):
        if lines and size + len(line.encode()) + 1 > MAX_PAYLOAD:
            chunks.append("\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line.encode()) + 1
    if lines:
        chunks.append("\n".join(lines))
    return chunks


class PgListener:
    """One LISTEN connection, kept open; the keys it hears go to `deliver`."""

    def __init__(self, dsn: str, deliver: Callable[[Iterable[Key]], None],
                 resync: Callable[[], None], connect_timeout: float, command_timeout: float) -> None:
        self._dsn = dsn
        # The Database's bounds: a connect or a ping that takes longer means the server is gone.
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._deliver = deliver
        self._resync = resync
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="conveyor-feed-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._deliver(decode(payload.split("\n")))

    async def _run(self) -> None:
        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout,
                                             command_timeout=self._command_timeout,
                                             server_settings={"application_name": "conveyor-feed"})
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(CHANNEL, self._heard)
                failures = 0
                self.connected.set()
                self._resync()  # what was committed while nobody listened: look again
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING_SECONDS)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1")  # TimeoutError after command_timeout
                log.warning("change feed: the LISTEN connection was lost; reconnecting")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("change feed: cannot LISTEN (%s); retrying", type(e).__name__)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()  # at once: a goodbye over a silent network would wait
            await asyncio.sleep(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])
            failures += 1


def _set(event: asyncio.Event, _conn: object) -> None:
    event.set()
