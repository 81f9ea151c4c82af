"""Statements of waits for events (SPEC §9, domain/event_waits.py): recording that steps start
or stop waiting, the runs a published event must wake, and the events that arrived for waiting
steps.

A mixin of `Repository` (same connection, same transaction). Publishing an event and a step
starting to wait for it take the same lock, one per (project, name, key) (PostgreSQL: a
transaction-scoped advisory lock; SQLite: its one writer): whichever commits second sees the
other's row, so an event is never missed by a wait registered at the same instant, nor a wait
by an event — the publish signals the waiting runs, the wait signals its own run when an event
for it is already there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.event_waits import WaitChange
from conveyor.storage.events import events_t
from conveyor.storage.models import EventWaitRow

waits_t = cast(Table, EventWaitRow.__table__)
# Events looked at per waiting step and pass (oldest first): a wait whose `match` refuses more
# than this many earlier events of its key sees the next ones after it consumes one.
ARRIVED_PER_STEP = 100


def _lock_id(project: str, name: str, key: str) -> int:
    """A 64-bit advisory lock id for (project, name, key)."""
    digest = hashlib.sha256("\x00".join((project, name, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class EventWaitStatements:
    """Event wait statements over the repository's connection."""

    conn: AsyncConnection
    dialect: str

    async def lock_event_key(self, keys: Iterable[tuple[str, str, str]]) -> None:
        """Hold the (project, name, key) locks until the transaction ends, in one order."""
        if self.dialect != "postgresql":
            return  # SQLite: this transaction holds the one write lock
        for lock_id in sorted({_lock_id(*k) for k in keys}):
            await self.conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})

    async def record_event_waits(self, changes: Sequence[WaitChange]) -> set[str]:
        """Steps started or stopped waiting; returns the runs of new waits whose event already
        arrived (to signal, in the same transaction)."""
        if not changes:
            return set()
        await self.lock_event_key({(c.project_id, c.name, c.key) for c in changes if c.waiting})
        arrived: set[str] = set()
        for c in changes:
            if not c.waiting:
                values: dict[str, Any] = {"active": False}
                if c.consumed is not None:
                    values |= {"after_at": c.consumed[0], "after_id": c.consumed[1]}
                await self.conn.execute(
                    update(waits_t).where(waits_t.c.step_id == c.step_id).values(**values))
                continue
            row = (await self.conn.execute(
                update(waits_t).where(waits_t.c.step_id == c.step_id)
                .values(active=True, name=c.name, key=c.key)
                .returning(waits_t.c.after_at, waits_t.c.after_id))).first()
            if row is None:
                await self.conn.execute(insert(waits_t).values(
                    step_id=c.step_id, run_id=c.run_id, project_id=c.project_id, name=c.name, key=c.key,
                    active=True, since=c.since))
            after = (row.after_at, row.after_id) if row is not None and row.after_at is not None else None
            found = (await self.conn.execute(
                _arrived(c.project_id, c.name, c.key, c.since, after).limit(1))).first()
            if found is not None:
                arrived.add(c.run_id)
        return arrived

    async def waiting_runs(self, project: str, name: str, key: str, received_at: datetime) -> list[str]:
        """Runs with a step waiting for this event (one entry per waiting step)."""
        rows = await self.conn.execute(select(waits_t.c.run_id).where(
            waits_t.c.project_id == project, waits_t.c.name == name, waits_t.c.key == key,
            waits_t.c.active.is_(True), waits_t.c.since <= received_at))
        return list(rows.scalars())

    async def arrived_events(self, step_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """For each of these steps that waits, the events that arrived for it, oldest first, as
        `Event.as_context` gives them (steps with none are left out)."""
        if not step_ids:
            return {}
        waits = (await self.conn.execute(select(waits_t).where(
            waits_t.c.step_id.in_(sorted(set(step_ids))), waits_t.c.active.is_(True)))).all()
        out: dict[str, list[dict[str, Any]]] = {}
        for w in waits:
            after = (w.after_at, w.after_id) if w.after_at is not None else None
            rows = (await self.conn.execute(
                _arrived(w.project_id, w.name, w.key, w.since, after).limit(ARRIVED_PER_STEP))).all()
            if rows:
                out[w.step_id] = [{"id": r.id, "name": r.name, "key": r.key, "payload": r.payload,
                                   "received_at": r.received_at.isoformat()} for r in rows]
        return out


def _arrived(project: str, name: str, key: str, since: datetime,
             after: tuple[datetime, str] | None) -> Any:
    """Events of (project, name, key) received at or after `since` and after `after`, oldest
    first (ix_events_project_name_key)."""
    stmt = select(events_t.c.id, events_t.c.name, events_t.c.key, events_t.c.payload,
                  events_t.c.received_at).where(
        events_t.c.project_id == project, events_t.c.name == name, events_t.c.key == key,
        events_t.c.received_at >= since)
    if after is not None:
        stmt = stmt.where(or_(events_t.c.received_at > after[0],
                              and_(events_t.c.received_at == after[0], events_t.c.id > after[1])))
    return stmt.order_by(events_t.c.received_at, events_t.c.id)
