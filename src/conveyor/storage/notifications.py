"""Statements of the notification outbox (domain/notifications.py, engine/notify.py).

A mixin of `Repository` (same connection, same transaction). Rows are written by `save` and
`insert_runs` in the transaction of the events that cause them; the delivery loop claims due
rows (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas share them and never take the same one),
pushes their timer past the attempt (a lease: a replica that dies mid-delivery leaves the row to
be claimed again when it runs out), and records each outcome fenced by the attempt it claimed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.changes import Changes
from conveyor.domain.notifications import OutboxEntry, outbox_entries
from conveyor.domain.records import EventRecord, RunRecord, StepRecord
from conveyor.storage.models import NotificationRow

outbox_t = cast(Table, NotificationRow.__table__)


def outbox_of_units(units: Sequence[Changes]) -> list[OutboxEntry]:
    """The deliveries the events of these units cause (runs without targets cost one test)."""
    return [entry for u in units if u.run.notifications and u.events
            for entry in outbox_entries(u.run, u.events, {s.step_ref: s.kind for s in u.steps.values()})]


def outbox_of_new_runs(runs: Sequence[RunRecord], steps: Sequence[StepRecord],
                       events: Sequence[EventRecord]) -> list[OutboxEntry]:
    """The deliveries the first events of new runs cause (a run may end as it is created)."""
    targeted = {r.id: r for r in runs if r.notifications}
    if not targeted:
        return []
    kinds: dict[str, dict[str, str]] = {run_id: {} for run_id in targeted}
    for s in steps:
        if s.workflow_run_id in kinds:
            kinds[s.workflow_run_id][s.step_ref] = s.kind
    by_run: dict[str, list[EventRecord]] = {}
    for e in events:
        if e.workflow_run_id in targeted:
            by_run.setdefault(e.workflow_run_id, []).append(e)
    return [entry for run_id, evs in by_run.items()
            for entry in outbox_entries(targeted[run_id], evs, kinds[run_id])]


def _entry(m: Any) -> OutboxEntry:
    return OutboxEntry(id=m["id"], run_id=m["run_id"], project_id=m["project_id"], url=m["url"],
                       event_type=m["event_type"], event_seq=m["event_seq"], body=m["body"],
                       created_at=m["created_at"], attempt=m["attempt"])


class NotificationStatements:
    """Outbox statements over the repository's connection."""

    conn: AsyncConnection
    dialect: str

    async def insert_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Write deliveries to make, due at once (their event's time)."""
        if entries:
            await self.conn.execute(insert(outbox_t), [
                {"id": e.id, "run_id": e.run_id, "project_id": e.project_id, "url": e.url,
                 "event_type": e.event_type, "event_seq": e.event_seq, "body": e.body, "attempt": 0,
                 "next_attempt_at": e.created_at, "last_error": "", "created_at": e.created_at}
                for e in entries])

    async def claim_notifications(self, now: datetime, lease_until: datetime, limit: int,
                                  busy_urls: Collection[str] = ()) -> list[OutboxEntry]:
        """Take up to `limit` due deliveries, oldest timer first (ix_notification_outbox_due), but
        none to `busy_urls` (endpoints already at their share of the loop's slots): each one's
        attempt is counted and its timer moved to `lease_until`. PostgreSQL: rows another
        replica holds are skipped, never waited for."""
        stmt = (select(outbox_t).where(outbox_t.c.next_attempt_at <= now)
                .order_by(outbox_t.c.next_attempt_at, outbox_t.c.id).limit(limit))
        if busy_urls:
            stmt = stmt.where(outbox_t.c.url.not_in(sorted(busy_urls)))
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = [_entry(m) for m in (await self.conn.execute(stmt)).mappings()]
        if rows:
            await self.conn.execute(
                update(outbox_t).where(outbox_t.c.id == bindparam("b_id"))
                .values(attempt=bindparam("v_attempt"), next_attempt_at=lease_until),
                [{"b_id": r.id, "v_attempt": r.attempt + 1} for r in rows])
            for r in rows:
                r.attempt += 1
        return rows

    async def finish_notification(self, ident: str, attempt: int) -> bool:
        """Delete a delivery that succeeded or was given up; False when this attempt's claim was
        taken over (its lease ran out and another claim counted a later attempt)."""
        res = await self.conn.execute(
            delete(outbox_t).where(outbox_t.c.id == ident, outbox_t.c.attempt == attempt))
        return res.rowcount == 1

    async def retry_notification(self, ident: str, attempt: int, at: datetime, error: str) -> bool:
        """Make a failed delivery due again at `at`; False as for finish_notification."""
        res = await self.conn.execute(
            update(outbox_t).where(outbox_t.c.id == ident, outbox_t.c.attempt == attempt)
            .values(next_attempt_at=at, last_error=error))
        return res.rowcount == 1

    async def release_notification(self, ident: str, attempt: int, at: datetime) -> None:
        """Hand a claimed row back unattempted, due at `at` (its claim is not counted)."""
        await self.conn.execute(
            update(outbox_t).where(outbox_t.c.id == ident, outbox_t.c.attempt == attempt)
            .values(attempt=attempt - 1, next_attempt_at=at))

    async def next_notification(self) -> datetime | None:
        """The earliest timer of the outbox (ix_notification_outbox_due)."""
        return cast(datetime | None, (await self.conn.execute(
            select(func.min(outbox_t.c.next_attempt_at)))).scalar())
