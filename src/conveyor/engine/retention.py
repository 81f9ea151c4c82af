"""Retention (SPEC §11): the housekeeping sweep that deletes what has outlived its keep.

One `sweep()` (the engine's housekeeping loop calls it every few minutes; tests call it after
moving a ManualClock) deletes, each in bounded batches of one transaction apiece so the writer
is never held long:

- idempotency records past their TTL (they are ignored once expired; this only frees room);
- the project watch's feed (run_changes) older than a watch may resume from (`CHANGES_KEPT`);
- finished runs older than their workflow's `retention_days` (0: the server's default), each
  top-level run with its whole family of child runs, their steps, events, tags, pending
  notifications and wake-ups (storage/retention.py: fenced, so an unfinished run, a run
  finished within the window, or one an operator reopens meanwhile is never deleted). The
  workflow's current definition decides, for runs started by older versions too, and a family
  goes with its root's retention (a child run's own workflow does not keep it longer). A run is
  also kept at least as long as idempotency records, so a repeated trigger never finds its
  record naming a deleted run;
- audit entries older than the audit log's own, longer retention;
- events received more than `event_retention_days` ago (SPEC §9), and with them the answer a
  repeated publish of their id would get (a publish of that id is then a new event).

Every count deleted goes to `Metrics.retention_swept` once its transaction has committed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from conveyor.engine.clock import Clock
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Repo, Store
from conveyor.engine.watch import CHANGES_KEPT

log = logging.getLogger(__name__)

# Workflows whose runs one statement looks for (their ids are bound parameters).
_WORKFLOWS_PER_STATEMENT = 500


class Retention:
    """The retention sweep over one store, on the engine's clock."""

    def __init__(self, store: Store, clock: Clock, metrics: Metrics, *, retention_days: int,
                 audit_retention_days: int, batch_size: int, idempotency_ttl_seconds: int,
                 event_retention_days: int = 7) -> None:
        for name, value in (("retention_days", retention_days),
                            ("audit_retention_days", audit_retention_days),
                            ("event_retention_days", event_retention_days),
                            ("retention_batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.default_days = retention_days
        self.audit_kept = timedelta(days=audit_retention_days)
        self.events_kept = timedelta(days=event_retention_days)
        self.batch = batch_size
        self.kept_at_least = timedelta(seconds=idempotency_ttl_seconds)

    async def sweep(self) -> dict[str, int]:
        """Delete everything past its retention as of the clock's now; rows deleted per table."""
        now = self.clock.now()
        deleted: dict[str, int] = {}

        def add(counts: dict[str, int]) -> None:
            self.metrics.retention_swept(counts)
            for table, n in counts.items():
                deleted[table] = deleted.get(table, 0) + n

        await self._purge("idempotency", lambda repo: repo.purge_idempotency(now, self.batch), add)
        await self._purge("changes", lambda repo: repo.purge_changes(now - CHANGES_KEPT, self.batch), add)
        await self._runs(now, add)
        await self._purge("audit", lambda repo: repo.purge_audit(now - self.audit_kept, self.batch), add)
        await self._purge("events", lambda repo: repo.purge_events(now - self.events_kept, self.batch), add)
        if any(deleted.values()):
            log.info("retention deleted %s", ", ".join(f"{n} {t}" for t, n in sorted(deleted.items()) if n))
        return deleted

    async def _purge(self, table: str, statement: Callable[[Repo], Awaitable[int]],
                     add: Callable[[dict[str, int]], None]) -> None:
        """Run a bounded delete, one transaction each, until a batch comes back short."""
        while True:
            async with self.store.write() as repo:
                n = await statement(repo)
            add({table: n})
            if n < self.batch:
                return

    async def _runs(self, now: datetime, add: Callable[[dict[str, int]], None]) -> None:
        async with self.store.read() as repo:
            policies = await repo.retention_policies()
        by_days: dict[int, list[str]] = {}
        for workflow_id, days in policies.items():
            by_days.setdefault(days or self.default_days, []).append(workflow_id)
        for days, workflow_ids in sorted(by_days.items()):
            before = now - max(timedelta(days=days), self.kept_at_least)
            workflow_ids.sort()
            for i in range(0, len(workflow_ids), _WORKFLOWS_PER_STATEMENT):
                await self._families(workflow_ids[i:i + _WORKFLOWS_PER_STATEMENT], before, add)

    async def _families(self, workflow_ids: list[str], before: datetime,
                        add: Callable[[dict[str, int]], None]) -> None:
        """Delete the expired families of these workflows, a batch of roots per transaction,
        until a batch comes back short or deletes nothing (its runs held by others: next sweep)."""
        while True:
            async with self.store.write() as repo:
                roots = await repo.expired_roots(workflow_ids, before, self.batch)
                counts = await repo.delete_run_families(roots, before) if roots else {}
            add(counts)
            if len(roots) < self.batch or not counts.get("runs"):
                return
