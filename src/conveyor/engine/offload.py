"""CPU work off the event loop.

Validating a definition compiles every expression in it, and planning runs evaluates `when`s,
conditions and templates: bounded, but a big definition or run can still take tens or hundreds
of milliseconds of CPU, during which the event loop would answer no one. Such work runs here,
on ONE worker thread: the loop keeps serving other clients meanwhile (the interpreter switches
threads every few milliseconds), and every CEL parse and evaluation happens on that one thread,
since cel-python's parser is a process-wide object not made for concurrent use.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    """The engine's one CPU worker thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="conveyor-cpu")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the worker thread; its exception, if any, raised here."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
