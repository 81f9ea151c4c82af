"""Run watches (SPEC §5): a snapshot, then every RunEvent in seq order, until the run ends.

Events are read from the database, never from memory, so a watcher sees events written by any
replica and `after_seq` resumes with no gap and no duplicate. A watch catches up by itself, then
follows its run's shared tail (engine/tails.py): one read per commit of the run for all its
watchers, woken by the run's key of the change feed only (domain/feed.py). The stream is an
async generator pulled by the client; a watcher that falls a whole buffer behind ends with
WATCHER_TOO_SLOW and the seq to resume after, so it never slows the engine nor grows memory.
A project watch reads its project's feed of status changes (storage/run_changes.py).
Opening a watch (`watch_run`, `watch_project`) checks the request and answers the stream: a
refusal comes before anything is sent, so the API can send its headers as soon as it has the
stream. Every open watch gets its heartbeats from one clock loop (engine/heartbeats.py).
A watch holds its caller's API key (engine/keys.py) and ends with UNAUTHENTICATED (KEY_REVOKED,
KEY_EXPIRED) once the key stops working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.feed import project_key
from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord
from conveyor.domain.states import FINAL_RUN, RunStatus
from conveyor.engine.clock import Clock
from conveyor.engine.heartbeats import Heartbeats
from conveyor.engine.keys import KeyHolds
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Store
from conveyor.engine.pulse import KeyedPulses
from conveyor.engine.tails import PAGE, RunTails, Subscription, read_history
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
                 buffer: int = 1000, holds: KeyHolds | None = None) -> None:
        self.store = store
        # The engine's, which revocations reach; a fresh one ends watches only on expiry (tests).
        self.holds = holds if holds is not None else KeyHolds(store, clock, pulses)
        self.metrics = metrics or Metrics()
        self.beats = Heartbeats(clock, heartbeat_seconds)
        self.tails = RunTails(store, pulses, self.metrics, self.beats, buffer=buffer,
                              poll_seconds=poll_seconds)
        self.clock = clock
        self.pulses = pulses
        self.poll_seconds = poll_seconds

    async def watch_run(self, run_id: str, after_seq: int, caller: Caller) -> AsyncGenerator[WatchItem]:
        """Open a run's watch: refused here, before anything is sent (NOT_FOUND; an after_seq
        past the run's last event is INVALID_ARGUMENT: the client's cursor is not this run's);
        then the stream. after_seq == 0: a snapshot first, then the events after it; after_seq
        == N: the events after N. It ends once the run is final and every event up to its last
        is sent, whatever events follow the final one (judged by the run's status, see
        engine/tails.py); at once when resumed at the end of a final run."""
        if after_seq < 0:
            raise invalid("after_seq must not be negative", [FieldViolation("after_seq", "is negative")])
        async with self.store.read() as repo:
            run = await repo.get_run(run_id, caller.project)
            steps = (await repo.steps_of([run.id]))[run.id] if after_seq == 0 else []
        if after_seq > run.last_seq:
            raise invalid(f"after_seq {after_seq} is past the run's last event ({run.last_seq})",
                          [FieldViolation("after_seq", f"is past the last event, {run.last_seq}")],
                          reason="AFTER_SEQ_PAST_END")
        return self._run_items(run, steps, after_seq, caller)

    async def _run_items(self, run: RunRecord, steps: list[StepRecord], after_seq: int,
                         caller: Caller) -> AsyncGenerator[WatchItem]:
        with self.metrics.watching("run"), self.holds.hold(caller) as hold:
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
                    hold.check()
                    if subscription is None and caught_up:
                        subscription = self.tails.join(run.id, after_seq)
                        hold.on_lost = subscription.stop  # wakes it: the check below ends the watch
                    if subscription is not None and after_seq >= subscription.tail.seq:
                        break
                    async with self.store.read() as repo:
                        history = await read_history(repo, run.id, after_seq)
                    for event in history.events:
                        yield event
                        after_seq = event.seq
                    if history.ended:
                        return
                    if subscription is not None and not history.events:
                        break
                    caught_up = not history.more
                # Then what the tail hands over (seqs already sent are skipped) until the run
                # ends: the last event handed over reached the end of a final run when read.
                while True:
                    items = await subscription.take()
                    hold.check()
                    if items is None:
                        yield Heartbeat(self.clock.now())
                        continue
                    if not items:  # dropped: the client did not keep up with the run
                        raise too_slow(after_seq, self.tails.buffer)
                    for event, _ in items:
                        if event.seq > after_seq:
                            yield event
                            after_seq = event.seq
                    last, ended = items[-1]
                    if ended and last.seq == after_seq:
                        return
            finally:
                if subscription is not None:
                    self.tails.leave(subscription)

    async def watch_project(self, project_id: str, workflow_ids: Sequence[str], statuses: Sequence[str],
                            cursor: str, caller: Caller) -> AsyncGenerator[ProjectChange | Heartbeat]:
        """Open a project's watch: refused here, before anything is sent (a foreign project,
        an unknown workflow, a forged cursor); then the stream of every run status change of
        the project after `cursor` ("" = from now), in commit order, the same from every replica
        (storage/run_changes.py). It never ends by itself."""
        project = project_of(project_id, caller)  # a foreign project: PROJECT_FORBIDDEN
        async with self.store.read() as repo:
            if workflow_ids:
                workflow_ids = [(await repo.find_workflow(w, caller.project, project)).id
                                for w in workflow_ids]
            if not cursor:
                cursor = await repo.head_cursor(project)
            else:
                await repo.changes_after(project, cursor, (), (), 1)  # a forged cursor fails now
        return self._project_changes(project, workflow_ids, statuses, cursor, caller)

    async def _project_changes(self, project: str, workflow_ids: Sequence[str], statuses: Sequence[str],
                               cursor: str, caller: Caller) -> AsyncGenerator[ProjectChange | Heartbeat]:
        changed = asyncio.Event()
        # Woken by a commit of the project, by its heartbeat falling due or by the caller's key
        # stopping to work, whichever is first: a commit with nothing for this watch (a comment)
        # does not move its heartbeat.
        quiet = self.beats.open(changed)
        with self.metrics.watching("project"), self.holds.hold(caller) as hold:
            keys = (project_key(project), *hold.keys)
            try:
                while True:
                    # A private event per wait (not the key's shared one): the heartbeat loop
                    # may set it without waking the project's other watches.
                    changed = quiet.wake = self.pulses.next_any(keys)  # before reading
                    try:
                        hold.check()
                        async with self.store.read() as repo:
                            page = await repo.changes_after(project, cursor, workflow_ids, statuses, PAGE)
                            runs = {r.id: r for r in await repo.get_runs(
                                sorted({c.run_id for c in page.changes}), caller.project)}
                        for change in page.changes:
                            cursor = change.cursor
                            run = runs.get(change.run_id)
                            if run is not None:
                                as_changed = dataclasses.replace(run, status=RunStatus(change.status),
                                                                 updated_at=change.at)
                                quiet.heard(self.beats.now())
                                yield ProjectChange(as_changed, change.cursor)
                        if len(page.changes) == PAGE:
                            continue
                        if quiet.take():
                            yield Heartbeat(self.clock.now())
                        wait = _HELD_SECONDS if page.held else self.poll_seconds
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await changed.wait()
                    finally:
                        self.pulses.forget(keys, changed)
            finally:
                self.beats.close(quiet)

    async def close(self) -> None:
        """Stop the tails and the heartbeat loop (open streams get nothing more)."""
        await self.tails.close()
        await self.beats.stop()
