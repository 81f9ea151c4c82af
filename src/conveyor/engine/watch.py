"""Run watches (SPEC §5): a snapshot, then every RunEvent in seq order, until the run ends.

Events are read from the database, never from memory, so a watcher sees events written by any
replica and `after_seq` resumes with no gap and no duplicate. A watch catches up by itself, then
follows its run's shared tail (engine/tails.py): one read per commit of the run for all its
watchers, woken by the run's key of the change feed only (domain/feed.py). The stream is an
async generator pulled by the client; a watcher that falls a whole buffer behind ends with
WATCHER_TOO_SLOW and the seq to resume after, so it never slows the engine nor grows memory.
A project watch reads its project's feed of status changes (storage/run_changes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.feed import project_key
from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord
from conveyor.domain.states import FINAL_RUN, RunStatus
from conveyor.engine.clock import Clock
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Store
from conveyor.engine.pulse import KeyedPulses
from conveyor.engine.tails import PAGE, RunTails, Subscription, ends_run
from conveyor.engine.workflows import project_of


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
# A project watch resumes within this long; older changes are purged (engine/retention.py).
CHANGES_KEPT = timedelta(days=1)
# When transactions still running hold changes back (PostgreSQL), look again after this long.
_HELD_SECONDS = 0.02


def too_slow(after_seq: int, buffer: int) -> ConveyorError:
    """The end of a watch whose client fell a whole buffer behind its run (SPEC §5)."""
    return ConveyorError(ErrorKind.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW",
                         f"the watcher fell more than {buffer} events behind the run; "
                         f"resume with after_seq={after_seq}",
                         metadata={"resume_after_seq": str(after_seq)})


class Watches:
    """Serves run watches from the database."""

    def __init__(self, store: Store, clock: Clock, pulses: KeyedPulses, poll_seconds: float = 30.0,
                 heartbeat_seconds: float = 15.0, metrics: Metrics | None = None,
                 buffer: int = 1000) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.tails = RunTails(store, pulses, self.metrics, buffer=buffer, poll_seconds=poll_seconds,
                              heartbeat_seconds=heartbeat_seconds)
        self.clock = clock
        self.pulses = pulses
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds

    async def watch_run(self, run_id: str, after_seq: int, caller: Caller) -> AsyncGenerator[WatchItem]:
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
        with self.metrics.watching("run"):
            if after_seq == 0:
                yield Snapshot(run, steps, run.last_seq)
                after_seq = run.last_seq
            if run.status in FINAL_RUN and after_seq == run.last_seq:
                return
            subscription: Subscription | None = None
            try:
                # Catch up alone (a resumed watch); once caught up, join the run's shared tail,
                # and read once more if the tail was ahead: it hands over only what it reads next.
                caught_up = after_seq >= run.last_seq
                while True:
                    if subscription is None and caught_up:
                        subscription = self.tails.join(run_id, after_seq)
                    if subscription is not None and after_seq >= subscription.tail.seq:
                        break
                    async with self.store.read() as repo:
                        page = await repo.list_events(run_id, after_seq, PAGE, "")
                    for event in page.items:
                        yield event
                        after_seq = event.seq
                    if ends_run(page.items, bool(page.next_token)):
                        return
                    if subscription is not None and not page.items:
                        break
                    caught_up = not page.next_token
                # Then what the tail hands over (seqs already sent are skipped) until the run ends.
                while True:
                    items = await subscription.take()
                    if items is None:
                        yield Heartbeat(self.clock.now())
                        continue
                    if not items:  # dropped: the client did not keep up with the run
                        raise too_slow(after_seq, self.tails.buffer)
                    for i, (event, ends) in enumerate(items):
                        if event.seq > after_seq:
                            yield event
                            after_seq = event.seq
                            if ends and i == len(items) - 1:
                                return
            finally:
                if subscription is not None:
                    self.tails.leave(subscription)

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
                page = await repo.changes_after(project, cursor, workflow_ids, statuses, PAGE)
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
                if len(page.changes) == PAGE:
                    continue
            elif loop.time() - quiet_since >= self.heartbeat_seconds:
                yield Heartbeat(self.clock.now())
                quiet_since = loop.time()
            wait = _HELD_SECONDS if page.held else min(self.poll_seconds, self.heartbeat_seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()
