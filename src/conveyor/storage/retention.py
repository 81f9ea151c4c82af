"""Statements of retention (SPEC §11, engine/retention.py): which finished runs have outlived
their workflow's retention, deleting them with everything that hangs off them, and the audit
log's own purge.

A mixin of `Repository` (same connection, same transaction). A run is deleted only with its
whole family (the runs whose root_run_id is its id: children, grandchildren…), only once every
run of the family is final with `finished_at` before the cutoff, and only top-level runs are
candidates, so a child is never orphaned and never outlives its root. The delete is fenced:
the family's rows are re-read with that condition under the write lock (SQLite) or locked
`FOR UPDATE SKIP LOCKED` (PostgreSQL, which re-checks the condition on the newest row version),
so a run reopened by an operator (a retry, a replay) just before is left alone, and one reopened
just after waits for this transaction and then finds its run gone (NOT_FOUND).

Not deleted by run: run_changes (the project watch's feed) has no index by run; its rows are
purged by age (`purge_changes`, a day) and every change of a run is stamped at or before its
`finished_at`, which retention's cutoff (a day at least) has passed. run_wakeups has no index
by run either: it holds only signals in flight (each taken by the next runner pass), so it is
small; a signal left for a deleted run would otherwise stay unread at the head of that table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.errors import ConcurrentChange
from conveyor.storage.models import (
    AuditRow,
    EventWaitRow,
    NotificationRow,
    RunEventRow,
    RunRow,
    RunTagRow,
    RunWakeupRow,
    StepRunRow,
    WorkflowRow,
)

runs_t = cast(Table, RunRow.__table__)
wf_t = cast(Table, WorkflowRow.__table__)
audit_t = cast(Table, AuditRow.__table__)
# What hangs off a run, by the column naming it: deleted before the run (foreign keys).
_OF_RUN: tuple[tuple[str, Table, str], ...] = (
    ("events", cast(Table, RunEventRow.__table__), "workflow_run_id"),
    ("steps", cast(Table, StepRunRow.__table__), "workflow_run_id"),
    ("tags", cast(Table, RunTagRow.__table__), "run_id"),
    ("notifications", cast(Table, NotificationRow.__table__), "run_id"),  # ix_notification_outbox_run
    ("wakeups", cast(Table, RunWakeupRow.__table__), "run_id"),
    ("event_waits", cast(Table, EventWaitRow.__table__), "run_id"),  # ix_event_waits_run
)
# Run ids bound per statement: far below both databases' bound-parameter caps (~32k).
_IDS_PER_STATEMENT = 1000


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), _IDS_PER_STATEMENT):
        yield ids[i:i + _IDS_PER_STATEMENT]


class RetentionStatements:
    """Retention statements over the repository's connection."""

    conn: AsyncConnection
    dialect: str

    async def retention_policies(self) -> dict[str, int]:
        """Every workflow's retention_days (0: the server's default), archived ones too."""
        rows = await self.conn.execute(select(wf_t.c.id, wf_t.c.retention_days))
        return {r.id: r.retention_days for r in rows}

    async def expired_roots(self, workflow_ids: Sequence[str], before: datetime, limit: int) -> list[str]:
        """Up to `limit` top-level runs of these workflows that finished before `before`, with
        every run of their family finished before it too (ix_runs_root_finished: one index
        range per workflow, and a probe of the same index per family)."""
        member = runs_t.alias("member")
        unfinished = exists().where(member.c.root_run_id == runs_t.c.id,
                                    or_(member.c.finished_at.is_(None), member.c.finished_at >= before))
        stmt = (select(runs_t.c.id)
                .where(runs_t.c.root_run_id == "", runs_t.c.workflow_id.in_(workflow_ids),
                       runs_t.c.finished_at < before, ~unfinished)
                .limit(limit))
        return list((await self.conn.execute(stmt)).scalars())

    async def delete_run_families(self, roots: Sequence[str], before: datetime) -> dict[str, int]:
        """Delete these top-level runs with their families, their steps, events, tags, pending
        notifications and wake-ups; a family with a run that is not (or no longer) final and
        finished before `before`, or that another transaction holds, is left whole. Returns the
        rows deleted per table ("runs", "steps", "events", "tags", "notifications", "wakeups")."""
        family: dict[str, list[str]] = {root: [root] for root in roots}
        for chunk in _chunks(roots):
            rows = await self.conn.execute(
                select(runs_t.c.id, runs_t.c.root_run_id).where(runs_t.c.root_run_id.in_(chunk)))
            for run_id, root in rows:
                family[root].append(run_id)
        held: set[str] = set()
        for chunk in _chunks(roots):
            for by in (runs_t.c.id, runs_t.c.root_run_id):
                stmt = self._fenced(select(runs_t.c.id).where(by.in_(chunk)), before)
                held.update((await self.conn.execute(stmt)).scalars())
        doomed = [run_id for members in family.values() if all(m in held for m in members)
                  for run_id in members]
        counts = {name: 0 for name, _, _ in _OF_RUN}
        counts["runs"] = 0
        for chunk in _chunks(doomed):
            for name, table, column in _OF_RUN:
                result = await self.conn.execute(delete(table).where(table.c[column].in_(chunk)))
                counts[name] += int(result.rowcount or 0)
            result = await self.conn.execute(
                delete(runs_t).where(runs_t.c.id.in_(chunk), runs_t.c.finished_at < before))
            if result.rowcount != len(chunk):
                # Cannot happen while the rows are held; if it did, roll everything back.
                raise ConcurrentChange("a run changed while its family was being deleted")
            counts["runs"] += len(chunk)
        return counts

    def _fenced(self, stmt: Select[Any], before: datetime) -> Select[Any]:
        """`stmt` kept to runs finished before `before` and, on PostgreSQL, locked without waiting
        (a run another unit holds is being changed: its family waits for the next sweep)."""
        stmt = stmt.where(runs_t.c.finished_at < before)
        if self.dialect == "postgresql":
            return stmt.with_for_update(skip_locked=True)
        return stmt  # SQLite: this unit holds the database's one write lock

    async def purge_audit(self, before: datetime, batch: int) -> int:
        """Delete up to `batch` audit entries older than `before`, oldest first (ix_audit_at)."""
        oldest = select(audit_t.c.id).where(audit_t.c.at < before).order_by(audit_t.c.at).limit(batch)
        result = await self.conn.execute(delete(audit_t).where(audit_t.c.id.in_(oldest)))
        return int(result.rowcount or 0)
