"""Keyed pulses: in-process wake-ups after commit, the one mechanism every waiter uses.

`KeyedPulses` keeps one signal per key, so a waiter wakes only on the commits that concern it:
a worker's long-poll on its queue's key, an executor on its kind's key, a run watch on its
run's, a project watch on its project's. The keys are the change feed's (domain/feed.py); on
PostgreSQL the commits of other replicas fire them too (storage/feed.py).
A waiter takes the event with `next(key)` BEFORE it reads the database and waits on it after,
so a commit landing in between is never missed; the database stays the source of truth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable


class KeyedPulses:
    """One pulse per key, created on demand and dropped once fired (a key nobody waits on
    costs nothing)."""

    def __init__(self) -> None:
        self._events: dict[Hashable, asyncio.Event] = {}
        # Events of waiters on several keys (next_any), by key.
        self._any: dict[Hashable, list[asyncio.Event]] = {}

    def next(self, key: Hashable) -> asyncio.Event:
        """The event the next `fire(key)` sets (take it before reading, wait on it after)."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def next_any(self, keys: Iterable[Hashable]) -> asyncio.Event:
        """One event the next `fire` of ANY of these keys sets: a waiter with several keys waits
        on it alone, with no task per key."""
        event = asyncio.Event()
        for key in keys:
            self._any.setdefault(key, []).append(event)
        return event

    def forget(self, keys: Iterable[Hashable], event: asyncio.Event) -> None:
        """A `next_any` waiter that stopped waiting (a timeout) leaves nothing behind."""
        for key in keys:
            waiters = self._any.get(key)
            if waiters is not None and event in waiters:
                waiters.remove(event)
                if not waiters:
                    del self._any[key]

    def held(self) -> int:
        """Keys with a pulse kept for a waiter (what this process holds). Not `__len__`: an
        object with a length is false when empty, and `pulses or KeyedPulses()` then swaps it."""
        return len(self._events) + len(self._any)

    def drop(self, key: Hashable, event: asyncio.Event) -> None:
        """The one waiter of `key` (a watched run's tail) is gone for good: its pulse goes too, or
        a key that is never fired again (a finished run's) would be kept forever."""
        if self._events.get(key) is event:
            del self._events[key]

    def fire_all(self) -> None:
        """Wake every waiter: commits may have been missed (the feed from other replicas was
        down a while), so everyone looks again."""
        self.fire([*self._events, *self._any])

    def fire(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            event = self._events.pop(key, None)
            if event is not None:
                event.set()
            for waiter in self._any.pop(key, ()):
                waiter.set()
