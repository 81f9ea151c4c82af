"""Run watches (SPEC §5): a snapshot, then every RunEvent in seq order, until the run ends.

Events are read from the database, never from memory, so a watcher sees events written by any
replica and `after_seq` resumes with no gap and no duplicate. Within a process, a `Pulse` fired
after every commit wakes watchers at once; across replicas they also re-read every
`poll_seconds`. The stream is an async generator pulled by the client, so a slow watcher holds
at most one page of events and never slows the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord
from conveyor.domain.states import FINAL_RUN, run_event_type
from conveyor.engine.clock import Clock
from conveyor.engine.ports import Store
from conveyor.engine.pulse import Pulse

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


WatchItem = Snapshot | EventRecord | Heartbeat


class Watches:
    """Serves run watches from the database."""

    def __init__(self, store: Store, clock: Clock, pulse: Pulse, poll_seconds: float = 1.0,
                 heartbeat_seconds: float = 15.0) -> None:
        self.store = store
        self.clock = clock
        self.pulse = pulse
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds

    async def watch_run(self, run_id: str, after_seq: int, caller: Caller) -> AsyncIterator[WatchItem]:
        """after_seq == 0: a snapshot first, then the events after it; after_seq == N: the
        events after N. Ends after the event that makes the run final."""
        async with self.store.read() as repo:
            run = await repo.get_run(run_id, caller.project)  # NOT_FOUND before anything is sent
            steps = (await repo.steps_of([run.id]))[run.id] if after_seq <= 0 else []
        if after_seq <= 0:
            yield Snapshot(run, steps, run.last_seq)
            if run.status in FINAL_RUN:
                return
            after_seq = run.last_seq
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            committed = self.pulse.next()
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
            elif loop.time() - quiet_since >= self.heartbeat_seconds:
                yield Heartbeat(self.clock.now())
                quiet_since = loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.poll_seconds, self.heartbeat_seconds)):
                    await committed.wait()

    async def _has_more(self, run_id: str, seq: int) -> bool:
        """Whether events follow `seq` (a final run reopened by a retry or replay goes on)."""
        async with self.store.read() as repo:
            return (await repo.get_run(run_id, None)).last_seq > seq
