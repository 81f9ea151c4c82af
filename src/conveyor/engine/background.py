"""Background: the one way the engine runs a loop beside the requests (the runner, schedules,
housekeeping, the http executor, the notifier): started once, cancelled and awaited on stop,
startable again after; and the one way such a loop drops the tasks it left in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from conveyor.domain.errors import is_outage


def log_loop_failure(log: logging.Logger, what: str, error: Exception) -> None:
    """A background loop's pass failed: a database outage is one line (the store logged why,
    and every pass of every loop meets it until the database is back), anything else a bug
    worth its traceback."""
    if is_outage(error):
        log.warning("%s: %s", what, error)
    else:
        log.error("%s", what, exc_info=error)


class Background:
    """One named background task running `loop`."""

    def __init__(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._loop = loop
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop unless it is running (a loop that returned by itself starts again)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def abandon(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel these tasks and wait until every one has ended (their errors are dropped: an
    abandoned attempt is picked up again by whoever takes its lease over)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
