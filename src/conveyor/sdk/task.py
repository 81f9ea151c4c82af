"""What a worker runs: the `@task` decorator, the task definitions it makes, and the `Context`
each handler call receives.

A handler is `def handler(ctx, input)` or `async def handler(ctx, input)`; `input` is the step's
config with its templates rendered (a dict). A worker serves one handler per queue: the queue is
the routing key, as a Hatchet action or a Temporal task queue is.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

SyncHandler = Callable[["Context", dict[str, Any]], Any]
AsyncHandler = Callable[["Context", dict[str, Any]], Awaitable[Any]]
# The decorated function's own type, so `@task` keeps its signature for callers and checkers.
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskDefinition(Generic[H]):
    """A handler bound to the queue it serves. Calling it calls the handler (handy in unit tests)."""

    fn: H
    queue: str
    name: str
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.fn))

    def __call__(self, ctx: Context, input: dict[str, Any]) -> Any:
        return self.fn(ctx, input)


@overload
def task(fn: H, /) -> TaskDefinition[H]: ...
@overload
def task(*, queue: str, name: str | None = None) -> Callable[[H], TaskDefinition[H]]: ...
def task(fn: H | None = None, /, *, queue: str | None = None,
         name: str | None = None) -> TaskDefinition[H] | Callable[[H], TaskDefinition[H]]:
    """Declare a handler of `task` steps on `queue`: ``@task(queue="builds")``.

    `name` (default: the function's name) labels the handler in logs. Bare ``@task`` serves the
    queue named after the function.
    """

    def wrap(f: H) -> TaskDefinition[H]:
        if not callable(f):
            raise TypeError("@task decorates a function (ctx, input)")
        q = queue if queue is not None else f.__name__
        if not q:
            raise ValueError("@task needs a non-empty queue")
        return TaskDefinition(fn=f, queue=q, name=name or f.__name__)

    return wrap(fn) if fn is not None else wrap


class Context:
    """What a handler knows about the attempt it runs, and how it learns it should stop.

    Cancellation (the run was canceled, the step skipped or timed out, the worker is shutting
    down) reaches an async handler as `asyncio.CancelledError`; a sync handler runs in a thread,
    where nothing is ever thrown into it: it polls `ctx.cancelled` or sleeps with
    `ctx.wait_cancelled(seconds)`, which returns early on cancellation.
    """

    def __init__(self, *, task_id: str, attempt: int, max_attempts: int, step_ref: str, run_id: str,
                 queue: str, project_id: str, payload: dict[str, Any], timeout_seconds: int,
                 worker_id: str, item: Any = None, index: int | None = None) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.step_ref = step_ref
        self.run_id = run_id
        self.queue = queue
        self.project_id = project_id
        self.payload = payload
        # The attempt's time limit in seconds (0: none); the server enforces it and revokes.
        self.timeout_seconds = timeout_seconds
        self.worker_id = worker_id
        # A map's item (SPEC §2.1): its element of the map's items and its index; None for a
        # task that is no map item.
        self.item = item
        self.index = index
        self.logger: logging.LoggerAdapter[logging.Logger] = _TaskLogger(
            logging.getLogger("conveyor.sdk.handler"),
            {"task_id": task_id, "attempt": attempt, "step_ref": step_ref, "run_id": run_id})
        # A threading.Event, not an asyncio one: sync handlers read and wait on it from threads.
        self._cancelled = threading.Event()
        self.cancel_reason = ""

    @property
    def cancelled(self) -> bool:
        """True once the attempt was revoked or the worker gave up waiting for it to finish."""
        return self._cancelled.is_set()

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure of this attempt fails the step (no retries left)."""
        return self.attempt >= self.max_attempts

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (a sync handler's sleep) until cancelled or `timeout` seconds pass; True if cancelled."""
        return self._cancelled.wait(timeout)

    def _cancel(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    def __repr__(self) -> str:
        return (f"Context(task_id={self.task_id!r}, attempt={self.attempt}, step_ref={self.step_ref!r}, "
                f"run_id={self.run_id!r}, queue={self.queue!r})")


class _TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with the run, step and attempt (and keeps them as record attributes)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        x = self.extra or {}
        kwargs.setdefault("extra", {}).update(x)
        return f"[{x['run_id']} {x['step_ref']}#{x['attempt']}] {msg}", kwargs
