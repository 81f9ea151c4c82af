"""Clocks: the engine never reads the time itself, so tests inject a ManualClock and tick.

A served engine runs on the `DatabaseClock`: every timer it judges (leases above all, SPEC
§4.3) is judged by the database's time, so replicas whose own clocks differ agree on when a
lease expired, and one replica's clock skewed by minutes steals no live lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Source of the current UTC time."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now


class DatabaseClock:
    """The database's time, read through a local clock: `now()` is the local time plus the
    offset measured by the last `sync` (the database's time at the midpoint of the query's
    round trip), so it costs no query. Re-synced now and then to follow drift."""

    def __init__(self, local: Clock | None = None) -> None:
        self.local: Clock = local or SystemClock()
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return self.local.now() + self.offset

    async def sync(self, database_now: Callable[[], Awaitable[datetime]]) -> timedelta:
        """Measure the offset against `database_now` (a query of the database's clock)."""
        before = self.local.now()
        theirs = await database_now()
        after = self.local.now()
        self.offset = theirs - (before + (after - before) / 2)
        return self.offset
