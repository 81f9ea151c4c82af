"""The threads sync handlers run on: daemon threads, reused, grown on demand.

Not a `ThreadPoolExecutor`: its threads are joined at interpreter exit, so one sync handler
that ignores `ctx.cancelled` would keep a worker from exiting after SIGTERM. Growing instead of
queueing means a revoked handler that keeps running never delays the next task's start; the
number of busy threads stays bounded by the leases the worker holds (its slots) plus such
stragglers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreads:
    """Run callables on daemon threads, one idle thread per call when there is one."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._started += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._started}", daemon=True).start()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            # False when the caller canceled it before it started (a shutdown): skip it.
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the awaiting coroutine, which judges it
                    future.set_exception(e)
            del future, fn, args  # drop references before idling
            with self._lock:
                self._idle += 1
