"""Run tails: one database read per commit of a watched run, shared by all its watchers.

The first watcher of a run opens the run's tail: one task that waits on the run's key of the
change feed, reads the events after the last one it read, and hands the same records to every
subscriber's buffer. A run watched by 1,000 clients is read once per commit, not 1,000 times.

Each buffer is bounded: a subscriber too slow to drain it is dropped (the tail never waits for
anyone) and its stream ends with the seq to resume after (SPEC §5). The last subscriber to leave
stops the tail. One clock loop serves every tail: it tells subscribers quiet for
`heartbeat_seconds` to send a heartbeat (no timer per watch or per wait), and every
`poll_seconds` it reads the last seqs of all tailed runs in one query and wakes the tails that are
behind: a feed that missed a commit is caught up without each tail polling on its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Sequence

from conveyor.domain.feed import run_key
from conveyor.domain.records import EventRecord
from conveyor.domain.states import FINAL_RUN, run_event_type
from conveyor.engine.background import Background, abandon
from conveyor.engine.metrics import Metrics
from conveyor.engine.ports import Store
from conveyor.engine.pulse import KeyedPulses

log = logging.getLogger(__name__)

# Event types that end a watch: the run reached a final state.
FINAL_EVENTS = frozenset(run_event_type(s) for s in FINAL_RUN)
# Events read per query.
PAGE = 500
# Runs read per query of the safety sweep.
_SWEEP_CHUNK = 500


def ends_run(page: Sequence[EventRecord], more: bool) -> bool:
    """Whether a page read in seq order ends the run's history: its last event made the run
    final and nothing followed it when it was read (a retry or replay reopening the run goes on)."""
    return bool(page) and page[-1].type in FINAL_EVENTS and not more


class Subscription:
    """One watcher's place in a tail: the events handed to it and not yet taken, at most
    `limit` of them."""

    def __init__(self, tail: Tail, limit: int, quiet_since: float) -> None:
        self.tail = tail
        self._limit = limit
        # (event, whether the run's history ended with it when it was read)
        self._items: deque[tuple[EventRecord, bool]] = deque()
        self._ready = asyncio.Event()
        self.quiet_since = quiet_since  # loop time of the last events or heartbeat handed over
        self._beat = False
        self.dropped = False
        self.error: BaseException | None = None

    def offer(self, events: Sequence[EventRecord], end: bool) -> bool:
        """Buffer events; False (and nothing buffered) when they would overflow the buffer."""
        if len(self._items) + len(events) > self._limit:
            return False
        last = len(events) - 1
        self._items.extend((e, end and i == last) for i, e in enumerate(events))
        self._ready.set()
        return True

    def beat(self, now: float) -> None:
        """Quiet too long: the next `take` answers with a heartbeat."""
        self._beat = True
        self.quiet_since = now
        self._ready.set()

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
            if self._beat:
                self._beat = False
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

    def __init__(self, store: Store, pulses: KeyedPulses, metrics: Metrics, buffer: int = 1000,
                 poll_seconds: float = 30.0, heartbeat_seconds: float = 15.0) -> None:
        self.store = store
        self.metrics = metrics
        self.pulses = pulses
        self.buffer = buffer
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._tails: dict[str, Tail] = {}
        self._clock = Background("conveyor-tails-clock", self._clock_loop)

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
            self._clock.start()
        # Each watch's heartbeats start at its own offset, so 1,000 watches opened together do
        # not all beat in the same instant every period.
        offset = random.uniform(0, self.heartbeat_seconds / 2)
        subscription = Subscription(tail, self.buffer, asyncio.get_running_loop().time() - offset)
        tail.subscribers.add(subscription)
        return subscription

    def leave(self, subscription: Subscription) -> None:
        """Unsubscribe (a watch ended or its client went away); the last one stops the tail."""
        tail = subscription.tail
        tail.subscribers.discard(subscription)
        if not tail.subscribers and self._tails.get(tail.run_id) is tail:
            del self._tails[tail.run_id]
            if tail.task is not None:
                tail.task.cancel()

    async def _follow(self, tail: Tail) -> None:
        key = run_key(tail.run_id)
        try:
            while True:
                committed = self.pulses.next(key)  # before reading: no commit is missed
                async with self.store.read() as repo:
                    page = await repo.list_events(tail.run_id, tail.seq, PAGE, "")
                if page.items:
                    tail.seq = page.items[-1].seq
                    end = ends_run(page.items, bool(page.next_token))
                    now = asyncio.get_running_loop().time()
                    for subscription in list(tail.subscribers):
                        subscription.quiet_since = now
                        if not subscription.offer(page.items, end):
                            subscription.stop()  # too slow: it ends once it drained its buffer
                            tail.subscribers.discard(subscription)
                            self.metrics.watchers_dropped.inc()
                if not page.next_token:
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

    async def _clock_loop(self) -> None:
        """Heartbeats and the safety poll of every tail at once; ends when no tail is left."""
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.heartbeat_seconds / 2)
        polled_at = loop.time()
        while self._tails:
            await asyncio.sleep(tick)
            now = loop.time()
            for tail in list(self._tails.values()):
                for subscription in tail.subscribers:
                    if now - subscription.quiet_since >= self.heartbeat_seconds:
                        subscription.beat(now)
            if now - polled_at >= self.poll_seconds:
                polled_at = now
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
        await self._clock.stop()
