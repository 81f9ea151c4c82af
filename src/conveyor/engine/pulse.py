"""Pulses: in-process wake-ups after commit, the one mechanism every waiter uses.

`Pulse` is one broadcast signal; `KeyedPulses` keeps one per key, so a waiter wakes only on the
commits that concern it: a worker's long-poll on its queue's key, an executor on its kind's
key, a run watch on its run's. Keys are tuples (see `queue_key`, `worker_key`, `HTTP_KEY`).
A waiter takes the event with `next(key)` BEFORE it reads the database and waits on it after,
so a commit landing in between is never missed; the database stays the source of truth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable

# The engine's own http executor waits on this key: an http step became ready somewhere.
HTTP_KEY: tuple[str, ...] = ("http",)


def queue_key(project: str, queue: str) -> tuple[str, ...]:
    """Task steps of `queue` in `project` became ready (or came back after a retry)."""
    return ("queue", project, queue)


def worker_key(project: str, worker: str) -> tuple[str, ...]:
    """A lease of `worker` was reported or revoked: its stream frees a slot or tells it."""
    return ("worker", project, worker)


class Pulse:
    """A broadcast "something was committed" signal for any number of waiters."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next `fire()` sets. Take it BEFORE reading state and wait on it after,
        so a commit landing in between is not missed."""
        return self._event


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

    def fire(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            event = self._events.pop(key, None)
            if event is not None:
                event.set()
            for waiter in self._any.pop(key, ()):
                waiter.set()
