"""Pulse: an in-process "something was committed" broadcast that wakes every waiter at once."""

from __future__ import annotations

import asyncio


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
