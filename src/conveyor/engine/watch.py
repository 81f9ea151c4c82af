"""Run watches (SPEC §5): a snapshot, then every RunEvent in seq order, until the run ends.

Events are read from the database, never from memory, so a watcher sees events written by any
replica and `after_seq` resumes with no gap and no duplicate. A watcher waits on its run's key
of the change feed (domain/feed.py): commits of other runs never wake it. The feed brings this
process's commits at once and, on PostgreSQL, other replicas' (NOTIFY); a slow safety poll
(`poll_seconds`) covers a feed that missed something. The stream is an async generator pulled
by the client, so a slow watcher holds at most one page of events and never slows the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.domain.errors import FieldViolation, invalid
from conveyor.domain.feed import project_key, run_key
from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord
from conveyor.domain.states import FINAL_RUN, RunStatus, run_event_type
from conveyor.engine.clock import Clock
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Store
from conveyor.engine.pulse import KeyedPulses
from conveyor.engine.workflows import project_of

# Event types that end a watch: the run reached a final state.
_FINAL_EVENTS = frozenset(run_event_type(s) for s in FINAL_RUN)
# Events read per query while catching up.
_PAGE = 500


@dataclass
class Snapshot:
    run: RunRecord
    steps: list[StepRecord]
    seq: int


@dataclass
class Heartbeat:
    at: datetime


@dataclass
class ProjectChange:
    """A run as it is after one of its status changes, and that change's cursor."""

    run: RunRecord
    cursor: str


WatchItem = Snapshot | EventRecord | Heartbeat
# A project watch resumes within this long; older changes are purged.
CHANGES_KEPT = timedelta(days=1)
# When transactions still running hold changes back (PostgreSQL), look again after this long.
_HELD_SECONDS = 0.02


class Watches:
    """Serves run watches from the database."""

    def __init__(self, store: Store, clock: Clock, pulses: KeyedPulses, poll_seconds: float = 30.0,
                 heartbeat_seconds: float = 15.0, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.pulses = pulses
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds

    async def watch_run(self, run_id: str, after_seq: int, caller: Caller) -> AsyncIterator[WatchItem]:
        """`_watch_run`, counted as an open watch while it runs."""
        with self.metrics.watching("run"):
            async with contextlib.aclosing(self._watch_run(run_id, after_seq, caller)) as items:
                async for item in items:
                    yield item

    async def _watch_run(self, run_id: str, after_seq: int, caller: Caller) -> AsyncGenerator[WatchItem]:
        """after_seq == 0: a snapshot first, then the events after it; after_seq == N: the
        events after N. Ends after the event that makes the run final, and at once when resumed
        at or past the end of a final run. An after_seq past the run's last event is
        INVALID_ARGUMENT (nothing was sent: the client's cursor is not this run's)."""
        if after_seq < 0:
            raise invalid("after_seq must not be negative", [FieldViolation("after_seq", "is negative")])
        async with self.store.read() as repo:
            run = await repo.get_run(run_id, caller.project)  # NOT_FOUND before anything is sent
            steps = (await repo.steps_of([run.id]))[run.id] if after_seq == 0 else []
        if after_seq > run.last_seq:
            raise invalid(f"after_seq {after_seq} is past the run's last event ({run.last_seq})",
                          [FieldViolation("after_seq", f"is past the last event, {run.last_seq}")],
                          reason="AFTER_SEQ_PAST_END")
        if after_seq == 0:
            yield Snapshot(run, steps, run.last_seq)
            after_seq = run.last_seq
        if run.status in FINAL_RUN and after_seq == run.last_seq:
            return
        loop = asyncio.get_running_loop()
        # Each watch's heartbeats start at its own offset, so 1,000 watches opened together do
        # not all wake in the same instant every heartbeat period.
        quiet_since = loop.time() - random.uniform(0, self.heartbeat_seconds / 2)
        read_at = -math.inf
        woken = True
        while True:
            committed = self.pulses.next(run_key(run_id))  # before reading: no commit is missed
            # The database is read when the feed says the run changed, or by the safety poll; a
            # quiet watch's heartbeat costs no read (idle watches cost next to nothing).
            if woken or loop.time() - read_at >= self.poll_seconds:
                read_at = loop.time()
                async with self.store.read() as repo:
                    page = await repo.list_events(run_id, after_seq, _PAGE, "")
                for i, event in enumerate(page.items):
                    yield event
                    after_seq = event.seq
                    last_in_page = i == len(page.items) - 1
                    if (event.type in _FINAL_EVENTS and last_in_page
                            and not await self._has_more(run_id, event.seq)):
                        return
                if page.items:
                    quiet_since = loop.time()
                    if page.next_token:
                        continue
            if loop.time() - quiet_since >= self.heartbeat_seconds:
                yield Heartbeat(self.clock.now())
                quiet_since = loop.time()
            wait = min(self.heartbeat_seconds - (loop.time() - quiet_since),
                       self.poll_seconds - (loop.time() - read_at))
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await committed.wait()
                    woken = True

    async def watch_project(self, project_id: str, workflow_ids: Sequence[str], statuses: Sequence[str],
                            cursor: str, caller: Caller) -> AsyncIterator[ProjectChange | Heartbeat]:
        """`_watch_project`, counted as an open watch while it runs."""
        with self.metrics.watching("project"):
            async with contextlib.aclosing(
                    self._watch_project(project_id, workflow_ids, statuses, cursor, caller)) as items:
                async for item in items:
                    yield item

    async def _watch_project(self, project_id: str, workflow_ids: Sequence[str], statuses: Sequence[str],
                             cursor: str, caller: Caller) -> AsyncGenerator[ProjectChange | Heartbeat]:
        """Every run status change of the project after `cursor` ("" = from now), in commit
        order, the same from every replica (storage/run_changes.py); never ends by itself."""
        project = project_of(project_id, caller)  # a foreign project: PROJECT_FORBIDDEN
        async with self.store.read() as repo:
            if workflow_ids:
                workflow_ids = [(await repo.find_workflow(w, caller.project, project)).id
                                for w in workflow_ids]
            if not cursor:
                cursor = await repo.head_cursor(project)
            else:
                await repo.changes_after(project, cursor, (), (), 1)  # a forged cursor fails now
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            changed = self.pulses.next(project_key(project))  # before reading: no commit is missed
            async with self.store.read() as repo:
                page = await repo.changes_after(project, cursor, workflow_ids, statuses, _PAGE)
                runs = {r.id: r for r in await repo.get_runs(sorted({c.run_id for c in page.changes}),
                                                             caller.project)}
            for change in page.changes:
                cursor = change.cursor
                run = runs.get(change.run_id)
                if run is not None:
                    yield ProjectChange(dataclasses.replace(run, status=RunStatus(change.status),
                                                            updated_at=change.at), change.cursor)
            if page.changes:
                quiet_since = loop.time()
                if len(page.changes) == _PAGE:
                    continue
            elif loop.time() - quiet_since >= self.heartbeat_seconds:
                yield Heartbeat(self.clock.now())
                quiet_since = loop.time()
            wait = _HELD_SECONDS if page.held else min(self.poll_seconds, self.heartbeat_seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()

    async def purge(self, batch: int = 10_000) -> int:
        """Drop project watch changes older than CHANGES_KEPT (a bounded batch)."""
        async with self.store.write() as repo:
            return await repo.purge_changes(self.clock.now() - CHANGES_KEPT, batch)

    async def _has_more(self, run_id: str, seq: int) -> bool:
        """Whether events follow `seq` (a final run reopened by a retry or replay goes on)."""
        async with self.store.read() as repo:
            return (await repo.get_run(run_id, None)).last_seq > seq
