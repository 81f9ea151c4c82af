"""Heartbeats of open watches (SPEC §5): a message at least every `seconds` on every stream, so
proxies keep an idle stream open; one clock loop for all of them, no timer per watch.

Each open watch, of a run or of a project, holds a `Quiet`: when it last sent something, by the
engine's clock. Each tick the loop marks every watch quiet for a heartbeat period as due and
wakes it; the watch sends its heartbeat. Whatever else wakes a watch (a commit of its run or
project that it had nothing to send for) does not move its heartbeat: only a message sent does.
Time is the injected clock's, so tests judge heartbeats with a ManualClock (`beat_due`); only
the loop's tick is real time.
"""

from __future__ import annotations

import asyncio
import random

from conveyor.engine.background import Background
from conveyor.engine.clock import Clock


class Quiet:
    """One watch's silence: since when (clock seconds), whether a heartbeat is due, and the event
    that wakes the watch to send it."""

    __slots__ = ("due", "since", "wake")

    def __init__(self, since: float, wake: asyncio.Event) -> None:
        self.since = since
        self.due = False
        self.wake = wake

    def heard(self, now: float) -> None:
        """The watch sent a message at `now`: its next heartbeat is a whole period away."""
        self.since = now
        self.due = False

    def take(self) -> bool:
        """Whether a heartbeat is due (and no longer, once asked)."""
        due, self.due = self.due, False
        return due


class Heartbeats:
    """The open watches' silences and the one loop that ends them."""

    def __init__(self, clock: Clock, seconds: float = 15.0) -> None:
        self.clock = clock
        self.seconds = seconds
        # The loop's real-time tick; a watch is due one tick early, so a tick landing just
        # before the period ends never makes its heartbeat a tick late.
        self.tick = min(1.0, seconds / 2)
        self._quiet: set[Quiet] = set()
        self._loop = Background("conveyor-heartbeats", self._run)

    def __len__(self) -> int:
        return len(self._quiet)

    def now(self) -> float:
        return self.clock.now().timestamp()

    def open(self, wake: asyncio.Event) -> Quiet:
        """A new watch's silence, woken through `wake` (the watch may replace it later)."""
        # Each watch's heartbeats start at its own offset, so 1,000 watches opened together do
        # not all beat in the same instant every period.
        quiet = Quiet(self.now() - random.uniform(0, self.seconds / 2), wake)
        self._quiet.add(quiet)
        self._loop.start()
        return quiet

    def close(self, quiet: Quiet) -> None:
        self._quiet.discard(quiet)

    def beat_due(self) -> int:
        """Mark every watch quiet for a period (less a tick) as due and wake it; how many."""
        now = self.now()
        due_after = self.seconds - self.tick
        count = 0
        for quiet in self._quiet:
            if now - quiet.since >= due_after:
                quiet.since = now
                quiet.due = True
                quiet.wake.set()
                count += 1
        return count

    async def _run(self) -> None:
        """Ticks while any watch is open (the next watch to open starts it again)."""
        while self._quiet:
            await asyncio.sleep(self.tick)
            self.beat_due()

    async def stop(self) -> None:
        await self._loop.stop()
