"""Run tails: one database read per commit of a watched run, shared by all its watchers.

The first watcher of a run opens the run's tail: one task that waits on the run's key of the
change feed, reads the events after the last one it read, and hands the same records to every
subscriber's buffer. A run watched by 1,000 clients is read once per commit, not 1,000 times.

Where a run's history ends is judged by the run's status, never by the type of an event: every
read (`read_history`) reads the events and then the run, and the events reach the end when the run
is final and its last seq is the last event read. Events written after a run's final one (a
comment, `run.retried`, a notification's outcome) are sent and end the watch in turn; a run
reopened by a retry goes on.

Each buffer is bounded: a subscriber too slow to drain it is dropped (the tail never waits for
anyone) and its stream ends with the seq to resume after (SPEC §5). The last subscriber to leave
stops the tail. Heartbeats come from the one clock loop of engine/heartbeats.py; every
`poll_seconds` one safety sweep reads the last seqs of all tailed runs in one query and wakes the
tails that are behind: a feed that missed a commit is caught up without each tail polling on its
own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.domain.feed import run_key
from conveyor.domain.records import EventRecord
from conveyor.domain.states import FINAL_RUN
from conveyor.engine.background import Background, abandon
from conveyor.engine.heartbeats import Heartbeats
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Repo, Store
from conveyor.engine.pulse import KeyedPulses

log = logging.getLogger(__name__)

# Events read per query.
PAGE = 500
# Runs read per query of the safety sweep.
_SWEEP_CHUNK = 500


@dataclass
class History:
    """One read of a run's events after a seq, judged by the run's record read right after."""

    events: list[EventRecord]
    more: bool  # events past these are committed already: read again without waiting
    ended: bool  # the run is final and these events reach its last: a watch ends after them


async def read_history(repo: Repo, run_id: str, after_seq: int) -> History:
    """The events after `after_seq` (a page) and whether they end the run's history."""
    page = await repo.list_events(run_id, after_seq, PAGE, "")
    # The run is read AFTER its events, so its last_seq is at least theirs (one snapshot on
    # SQLite; a later statement under PostgreSQL's READ COMMITTED). A final run whose last_seq
    # is the last event read ended there; a greater last_seq means more to read first.
    run = await repo.get_run(run_id, None)
    last = page.items[-1].seq if page.items else after_seq
    return History(page.items, run.last_seq > last, run.status in FINAL_RUN and run.last_seq == last)


class Subscription:
    """One watcher's place in a tail: the events handed to it and not yet taken, at most
    `limit` of them; and its silence, for heartbeats."""

    def __init__(self, tail: Tail, limit: int, beats: Heartbeats) -> None:
        self.tail = tail
        self._limit = limit
        # (event, whether the run's history ended with it when it was read)
        self._items: deque[tuple[EventRecord, bool]] = deque()
        self._ready = asyncio.Event()
        self.quiet = beats.open(self._ready)
        self.dropped = False
        self.error: BaseException | None = None

    def offer(self, events: Sequence[EventRecord], end: bool, now: float) -> bool:
        """Buffer events read at `now`; False (and nothing buffered) when they would overflow
        the buffer."""
        if len(self._items) + len(events) > self._limit:
            return False
        last = len(events) - 1
        self._items.extend((e, end and i == last) for i, e in enumerate(events))
        self.quiet.heard(now)
        self._ready.set()
        return True

    def stop(self, error: BaseException | None = None) -> None:
        """No more events will come: dropped for being slow, or the tail failed with `error`."""
        self.dropped = True
        self.error = error
        self._ready.set()

    async def take(self) -> list[tuple[EventRecord, bool]] | None:
        """Every buffered event (waits for some); None when a heartbeat is due; [] once the
        subscription was stopped and its buffer is empty. A tail's failure is raised once the
        events before it were taken."""
        while not self._items:
            if self.dropped:
                if self.error is not None:
                    raise self.error
                return []
            if self.quiet.take():
                return None
            self._ready.clear()
            await self._ready.wait()
        items = list(self._items)
        self._items.clear()
        return items


class Tail:
    """The shared reader of one run's events."""

    def __init__(self, run_id: str, seq: int) -> None:
        self.run_id = run_id
        self.seq = seq  # the last event read (or known to be read by every subscriber)
        self.subscribers: set[Subscription] = set()
        self.task: asyncio.Task[None] | None = None


class RunTails:
    """The open tails, by run id."""

    def __init__(self, store: Store, pulses: KeyedPulses, metrics: Metrics, beats: Heartbeats,
                 buffer: int = 1000, poll_seconds: float = 30.0) -> None:
        self.store = store
        self.metrics = metrics
        self.pulses = pulses
        self.beats = beats
        self.buffer = buffer
        self.poll_seconds = poll_seconds
        self._tails: dict[str, Tail] = {}
        self._sweep = Background("conveyor-tails-sweep", self._sweep_loop)

    def __len__(self) -> int:
        """How many runs have a tail open."""
        return len(self._tails)

    def watchers(self, run_id: str) -> int:
        """How many watchers follow the run's tail now."""
        tail = self._tails.get(run_id)
        return len(tail.subscribers) if tail is not None else 0

    def join(self, run_id: str, seq: int) -> Subscription:
        """Subscribe to the run's events; the caller has read (or sent) every event up to
        `seq`. A new tail reads from there; an existing tail hands over what it reads next, so
        a caller behind it (tail.seq > seq) reads the events in between itself."""
        tail = self._tails.get(run_id)
        if tail is None:
            tail = self._tails[run_id] = Tail(run_id, seq)
            tail.task = asyncio.create_task(self._follow(tail), name=f"conveyor-tail-{run_id}")
            self._sweep.start()
        subscription = Subscription(tail, self.buffer, self.beats)
        tail.subscribers.add(subscription)
        return subscription

    def leave(self, subscription: Subscription) -> None:
        """Unsubscribe (a watch ended or its client went away); the last one stops the tail."""
        self.beats.close(subscription.quiet)
        tail = subscription.tail
        tail.subscribers.discard(subscription)
        if not tail.subscribers and self._tails.get(tail.run_id) is tail:
            del self._tails[tail.run_id]
            if tail.task is not None:
                tail.task.cancel()

    async def _follow(self, tail: Tail) -> None:
        key = run_key(tail.run_id)
        committed: asyncio.Event | None = None
        try:
            while True:
                committed = self.pulses.next(key)  # before reading: no commit is missed
                async with self.store.read() as repo:
                    history = await read_history(repo, tail.run_id, tail.seq)
                if history.events:
                    tail.seq = history.events[-1].seq
                    now = self.beats.now()
                    for subscription in list(tail.subscribers):
                        if not subscription.offer(history.events, history.ended, now):
                            subscription.stop()  # too slow: it ends once it drained its buffer
                            tail.subscribers.discard(subscription)
                            self.beats.close(subscription.quiet)
                            self.metrics.watchers_dropped.inc()
                if not history.more:
                    await committed.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The database failed under the tail: every subscriber's stream ends with the error
            # (a StreamError), and the next watcher of the run opens a new tail.
            log.warning("reading the events of run %s for its watchers failed: %r", tail.run_id, e)
            for subscription in tail.subscribers:
                subscription.stop(e)
            tail.subscribers.clear()
            if self._tails.get(tail.run_id) is tail:
                del self._tails[tail.run_id]
        finally:
            # A tail is its run key's one waiter: with no tail of the run left, its pulse goes
            # (a finished run's key may never fire again). A newer tail keeps it.
            if committed is not None and tail.run_id not in self._tails:
                self.pulses.drop(key, committed)

    async def _sweep_loop(self) -> None:
        """The safety poll of every tail at once; ends when no tail is left."""
        while self._tails:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self._catch_up_missed()
            except Exception as e:
                log.warning("the run watches' safety poll failed: %r", e)

    async def _catch_up_missed(self) -> None:
        ids = list(self._tails)
        for start in range(0, len(ids), _SWEEP_CHUNK):
            async with self.store.read() as repo:
                runs = await repo.get_runs(ids[start:start + _SWEEP_CHUNK], None)
            behind = [r.id for r in runs if (t := self._tails.get(r.id)) is not None and r.last_seq > t.seq]
            self.pulses.fire(run_key(r) for r in behind)

    async def close(self) -> None:
        tasks = [tail.task for tail in self._tails.values() if tail.task is not None]
        self._tails.clear()
        await abandon(tasks)
        await self._sweep.stop()
