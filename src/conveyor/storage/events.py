"""Statements of events (SPEC §9): recording one (once per id), finding a recorded one, listing
a project's newest first, purging the old; and the listener index (`event_listeners`) that
tells a publish which workflows its event name may start, kept per workflow.

A mixin of `Repository` (same connection, same transaction). Every statement is scoped by the
project the engine resolved from the caller.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, delete, insert, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.events import Event, Skipped
from conveyor.domain.records import Page
from conveyor.storage.models import EventListenerRow, EventRow
from conveyor.storage.paging import cursor_time, decode_cursor, encode_cursor, page_size

events_t = cast(Table, EventRow.__table__)
listeners_t = cast(Table, EventListenerRow.__table__)


def _event(m: Any) -> Event:
    return Event(project_id=m.project_id, id=m.id, name=m.name, key=m.key, payload=m.payload,
                 received_at=m.received_at, resumed=m.resumed, started=m.started,
                 skipped=tuple(Skipped(**s) for s in m.skipped or ()), created_by=m.created_by,
                 request_hash=m.request_hash)


class EventStatements:
    """Event statements over the repository's connection."""

    conn: AsyncConnection

    async def insert_event(self, event: Event) -> bool:
        """Record `event`; False when its project already holds an event of its id (on
        PostgreSQL a concurrent publish of the same id waits here for the other to end)."""
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(insert(events_t).values(
                    project_id=event.project_id, id=event.id, name=event.name, key=event.key,
                    payload=event.payload, request_hash=event.request_hash, received_at=event.received_at,
                    resumed=event.resumed, started=event.started,
                    skipped=[s.__dict__ for s in event.skipped] or None, created_by=event.created_by))
        except IntegrityError:
            return False
        return True

    async def get_event(self, project: str, ident: str) -> Event | None:
        row = (await self.conn.execute(select(events_t).where(
            events_t.c.project_id == project, events_t.c.id == ident))).first()
        return None if row is None else _event(row)

    async def list_project_events(self, project: str, name: str, key: str, limit: int,
                                  token: str) -> Page[Event]:
        """A page of the project's events, newest first; of one name, one key, when given."""
        n = page_size(limit)
        stmt = select(events_t).where(events_t.c.project_id == project)
        if name:
            stmt = stmt.where(events_t.c.name == name)
        if key:
            stmt = stmt.where(events_t.c.key == key)
        if token:
            at, ident = decode_cursor(token, 2)
            ts = cursor_time(at)
            stmt = stmt.where(or_(events_t.c.received_at < ts,
                                  and_(events_t.c.received_at == ts, events_t.c.id < ident)))
        rows = (await self.conn.execute(
            stmt.order_by(events_t.c.received_at.desc(), events_t.c.id.desc()).limit(n + 1))).all()
        items = [_event(m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].received_at, items[-1].id) if len(rows) > n else "")

    async def purge_events(self, before: datetime, batch: int) -> int:
        """Delete at most `batch` events received before `before`, oldest first; returns how many."""
        pk = (events_t.c.project_id, events_t.c.id)
        oldest = (select(*pk).where(events_t.c.received_at < before)
                  .order_by(events_t.c.received_at).limit(batch))
        res = await self.conn.execute(delete(events_t).where(tuple_(*pk).in_(oldest)))
        return res.rowcount or 0

    # -- the listener index ---------------------------------------------------------------------

    async def set_event_listeners(self, workflow_id: str, project: str, names: Collection[str]) -> None:
        """The event names a workflow listens to are now `names` (none: archived, or no
        `on_events`)."""
        await self.conn.execute(delete(listeners_t).where(listeners_t.c.workflow_id == workflow_id))
        if names:
            await self.conn.execute(insert(listeners_t), [
                {"project_id": project, "event_name": name, "workflow_id": workflow_id}
                for name in sorted(set(names))])

    async def event_listeners(self, project: str, name: str, limit: int) -> list[str]:
        """Ids of the workflows listening to `name` in `project` (at most `limit`, by id)."""
        rows = await self.conn.execute(
            select(listeners_t.c.workflow_id)
            .where(listeners_t.c.project_id == project, listeners_t.c.event_name == name)
            .order_by(listeners_t.c.workflow_id).limit(limit))
        return list(rows.scalars())
