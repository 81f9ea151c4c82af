"""The audit log: every write call and how it ended, readable by admins.

Entries are appended in memory by the request path and written in batches, at most one batch
transaction per `FLUSH_SECONDS`: one INSERT per write request would compete with the triggers
for SQLite's single writer (and cost the trigger rate its 5 % budget). The price, written down
in the README: a kill -9 can lose the entries of the last fraction of a second; what the calls
did is durable anyway, with the actor recorded in the runs and their events. Reading the log
flushes first, so a caller sees its own entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from conveyor.domain.access import AuditEntry, AuditQuery
from conveyor.domain.errors import is_outage
from conveyor.domain.records import Caller, Page
from conveyor.engine.ports import Store

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.1
# Entries held when the database keeps refusing them; beyond this the oldest are dropped (and
# the drop is logged) rather than growing without bound.
MAX_PENDING = 100_000


class AuditLog:
    """A buffered writer of audit entries, and the admins' reader."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[AuditEntry] = []
        self._flusher: asyncio.Task[None] | None = None
        # One flush at a time: entries are written in the order they were recorded.
        self._lock = asyncio.Lock()
        self._closed = False
        self._closing = asyncio.Event()

    def record(self, entry: AuditEntry) -> None:
        self._pending.append(entry)
        if len(self._pending) > MAX_PENDING:
            del self._pending[:len(self._pending) - MAX_PENDING]
            log.error("audit log: database unavailable, dropping the oldest entries")
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(self._flush_soon(), name="conveyor-audit")

    async def _flush_soon(self) -> None:
        try:
            # Never cancelled (a write cancelled mid-transaction would leave its connection
            # inside it): close() sets the event to make the wait end early instead.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), FLUSH_SECONDS)
            await self.flush()
        except Exception as e:
            if is_outage(e):  # one line per try, no traceback: an outage is not a bug
                log.warning("audit log: database unavailable; %d entries kept for the next flush",
                            len(self._pending))
            else:
                log.exception("audit log: writing entries failed; they are kept for the next flush")
        finally:
            self._flusher = None
            if self._pending and not self._closed:
                self._flusher = asyncio.create_task(self._flush_soon(), name="conveyor-audit")

    async def flush(self) -> None:
        """Write what is pending; returns once every entry recorded before the call is
        committed (waiting for a flush already under way, which may hold some of them)."""
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                async with self.store.write() as repo:
                    await repo.insert_audit(batch)
            except BaseException:
                self._pending[:0] = batch
                raise

    async def close(self) -> None:
        """Write what is pending; nothing is recorded after."""
        self._closed = True
        self._closing.set()
        if self._flusher is not None:
            await self._flusher
        if self._pending:
            await self.flush()

    async def list(self, caller: Caller, query: AuditQuery, limit: int, token: str) -> Page[AuditEntry]:
        await self.flush()  # the caller's own entries, even those a flush under way holds
        async with self.store.read() as repo:
            return await repo.list_audit(query, caller.project, limit, token)
