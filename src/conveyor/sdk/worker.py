"""The `Worker`: leases `task` steps from Conveyor's WorkersService, runs their handlers, keeps
their leases alive, and reports each attempt once.

How it talks to the server, and why:

- **One `StreamTasks` stream per queue** (not `PollTasks`): the server pushes a task the moment
  it is ready and a slot of the stream is free, so a finished handler's slot is refilled without
  a poll round trip, and revocations (cancel, skip, timeout, replay) arrive at once instead of on
  the next heartbeat. A stream is opened with `max_in_flight` = the slots it may fill.
- **Slots** bound the tasks a worker holds. With several queues they are divided among them
  (each queue gets at least one): a stream's `max_in_flight` is fixed when it opens, so sharing
  one pool between streams would mean leasing tasks that then wait locally for a slot.
- **Capacity after a reconnect**: when a stream dies its handlers keep running (their leases are
  rows in the server's database, not part of the stream). A new stream is opened at once with
  the slots that are free; the slot of each still-running handler is handed to a further
  stream when that handler finishes. The server's count of a stream's tasks therefore always
  matches the worker's.
- **One `HeartbeatTasks` call per interval** (lease_seconds / 3) for every lease the worker
  holds, including attempts whose report is being retried. A lease the server calls revoked
  cancels its handler; a revoked attempt is never reported.
- **Reports** (`CompleteTask` / `FailTask`) are retried while the server is unavailable and the
  lease is alive; a `FAILED_PRECONDITION` (LEASE_LOST) answer means the attempt was revoked or
  re-leased elsewhere: logged and dropped.
- **Reconnects**: UNAVAILABLE (or any stream error) backs off 0.1 s doubling to 5 s with jitter
  and reopens; the channel's own reconnect backoff is capped likewise, so a restarted server is
  served again within seconds. A key the server refuses (revoked, expired, too low a role: the
  stream ends UNAUTHENTICATED or PERMISSION_DENIED) is logged as an ERROR naming the reason, once
  per change of failure, and retried the same way: the worker leases nothing meanwhile and
  serves again as soon as the key works (a revoked or expired key never does: restart the worker
  with a new one).
- **Shutdown** (`stop()`, SIGTERM, SIGINT): streams close at once (no new leases), running
  handlers get `grace_seconds` to finish and be reported normally; then what still runs is
  cancelled and given back with `ReleaseTask` ("worker shutting down"): a lost attempt, not a
  failed one, so another worker gets the task at once and no retry is spent (SPEC §4.3). A
  second signal skips the rest of the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from conveyor.sdk.errors import NonRetryableError, RetryAfter
from conveyor.sdk.task import Context, TaskDefinition
from conveyor.sdk.threads import DaemonThreads
from conveyor.sdk.values import result_to_struct, struct_to_dict, value_to_python
from conveyor.v1 import resources_pb2
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_PROJECT = "default"
# Every character an API key may hold: visible ASCII (the server's domain/access.py, which the
# SDK does not import, says the same).
_TOKEN = re.compile(r"[\x21-\x7e]+")

log = logging.getLogger("conveyor.sdk.worker")

# Error text sent with FailTask: the exception's type and message, never its traceback (that
# is logged here); bounded so a handler that stringifies a whole document cannot bloat events.
MAX_ERROR_LENGTH = 2_000
# Backoff of stream reconnects and report retries.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
# A stream that delivered nothing (not even the server's ~15 s idle heartbeat) for this long
# is presumed dead (a peer that vanished without closing its connection) and reopened.
STREAM_IDLE_TIMEOUT = 60.0
# Deadline of one report or heartbeat call.
CALL_TIMEOUT = 10.0
# After the grace period: how long canceled handlers get to unwind and be reported.
SHUTDOWN_REPORT_TIMEOUT = 10.0
# Most leases named in one HeartbeatTasks call (the server's cap).
MAX_HEARTBEAT_BATCH = 1_000
# Why the worker gives back what it did not finish when it shuts down.
SHUTDOWN_ERROR = "worker shutting down"

# The channel's own reconnect backoff defaults to 1 s growing to 120 s: a server back after a
# restart could wait minutes for the worker. Cap it like ours.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX * 1000)),
]

# A CompleteTask answer that refuses the result itself (invalid, or beyond the server's
# message size): the same result would be refused again.
_RESULT_REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A stream's answers that say the API key does not work (revoked, expired, unknown, too low).
_KEY_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Report answers worth retrying (the server is away or busy); anything else is final.
_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# What an attempt sends when it ends: its verdict, or (shutting down) its lease given back.
_Report = workers_pb.CompleteTaskRequest | workers_pb.FailTaskRequest | workers_pb.ReleaseTaskRequest


def default_worker_id() -> str:
    """host:pid:random — unique per process, readable in a step's `worker_id`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def error_text(e: BaseException) -> str:
    """What FailTask says about an exception: `Type: message`, truncated."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 3] + "..."
    return text


def _reason(e: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a rich gRPC error, or ""."""
    for key, value in e.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


class _Backoff:
    """Exponential backoff with full jitter; `reset()` once a connection proved healthy."""

    def __init__(self) -> None:
        self._next = BACKOFF_INITIAL

    def reset(self) -> None:
        self._next = BACKOFF_INITIAL

    def delay(self) -> float:
        d = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, BACKOFF_MAX)
        return d


@dataclass(eq=False)
class _Stream:
    """One StreamTasks call and the slots the server may fill on it."""

    capacity: int
    alive: bool = True
    in_flight: int = 0


@dataclass(eq=False)
class _Lane:
    """A queue this worker serves: its handler, its slots, and the slots no stream holds."""

    definition: TaskDefinition[Any]
    slots: int
    free: int
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    backoff: _Backoff = field(default_factory=_Backoff)
    retry_at: float = 0.0
    # The status code of the stream failures since a stream last delivered ("" while none):
    # one log line per outage, not one per retry.
    failing: str = ""

    def give_back(self, n: int) -> None:
        if n > 0:
            self.free += n
            self.changed.set()


@dataclass(eq=False)
class _Attempt:
    """A leased attempt this worker holds, from its arrival until its report is settled."""

    task: resources_pb2.Task
    ctx: Context
    lane: _Lane
    stream: _Stream
    runner: asyncio.Task[None] | None = None
    # "running" (handler going), then "reporting" (result known, report being sent).
    phase: str = "running"
    # Set when the server revoked the lease: the attempt is never reported.
    revoked: bool = False
    # Set when the worker canceled it for shutdown: given back (ReleaseTask), not reported.
    shutdown: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.task.task_id, self.task.attempt)


class Worker:
    """Serves `task` steps of the queues of `tasks` from the Conveyor server at `target`.

    ``Worker(tasks=[build, test], slots=8).run()`` blocks until SIGTERM/SIGINT (or `stop()`),
    then drains. `run_async()` is the same inside a running event loop (it installs no signal
    handlers unless asked). Async handlers run on the worker's event loop; sync handlers on
    daemon threads, at most `slots` of them busy with held leases.
    """

    def __init__(self, *, tasks: Iterable[TaskDefinition[Any]], target: str = DEFAULT_TARGET, slots: int = 8,
                 project_id: str = DEFAULT_PROJECT, worker_id: str | None = None, lease_seconds: int = 30,
                 grace_seconds: float = 25.0, api_key: str | None = None) -> None:
        self.tasks: list[TaskDefinition[Any]] = list(tasks)
        if not self.tasks:
            raise ValueError("a Worker needs at least one @task")
        queues: dict[str, TaskDefinition[Any]] = {}
        for t in self.tasks:
            if not isinstance(t, TaskDefinition):
                raise TypeError(f"{t!r} is not a @task")
            if t.queue in queues:
                # The queue is the routing key: a step names a queue, not a handler.
                raise ValueError(f"queue {t.queue!r} is served by both {queues[t.queue].name!r} and "
                                 f"{t.name!r}; a worker serves one handler per queue")
            queues[t.queue] = t
        self._by_queue = queues
        self.target = target
        self.slots = slots
        self.project_id = project_id
        self.worker_id = worker_id or default_worker_id()
        if int(lease_seconds) != lease_seconds or lease_seconds < 1:
            raise ValueError("lease_seconds must be a whole number of seconds >= 1")
        self.lease_seconds = int(lease_seconds)
        if grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        self.grace_seconds = float(grace_seconds)
        self.api_key = api_key if api_key is not None else os.environ.get("CONVEYOR_API_KEY") or None
        if self.api_key is not None and not _TOKEN.fullmatch(self.api_key):
            # grpc would refuse it at every call, with nothing but its own log lines to say why.
            raise ValueError("api_key (or CONVEYOR_API_KEY) holds characters no API key has (only "
                             "printable ASCII, no spaces, line breaks or NUL)")
        self._check_slots()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._early_stop = False
        self._tearing_down = False
        self._heartbeat_failing = False
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._threads = DaemonThreads("conveyor-task")
        self._stub: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def _check_slots(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")

    @property
    def queues(self) -> list[str]:
        """The queues this worker serves, in the order of its tasks."""
        return list(self._by_queue)

    def queue_slots(self) -> dict[str, int]:
        """Slots per queue: `slots` divided among the queues, each at least one."""
        n = len(self._by_queue)
        base, extra = divmod(self.slots, n)
        return {q: max(1, base + (1 if i < extra else 0)) for i, q in enumerate(self._by_queue)}

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or `stop()`, drain, and return."""
        asyncio.run(self.run_async(handle_signals=True))

    def stop(self, *, force: bool = False) -> None:
        """Stop leasing and drain (safe from any thread or a signal handler). A second call, or
        `force=True`, ends the grace period at once."""
        loop = self._loop
        if loop is None or self._stop_requested is None:
            self._early_stop = True
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._request_stop(force)
        else:
            loop.call_soon_threadsafe(self._request_stop, force)

    def _request_stop(self, force: bool) -> None:
        assert self._stop_requested is not None and self._force is not None
        if self._stop_requested.is_set() or force:
            self._force.set()
        self._stop_requested.set()

    async def run_async(self, *, handle_signals: bool = False) -> None:
        """Serve until `stop()` (or, with `handle_signals`, SIGTERM/SIGINT), then drain."""
        self._check_slots()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._tearing_down = False
        if self._early_stop:
            self._stop_requested.set()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        self._metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = workers_grpc.WorkersServiceStub(channel)
        heartbeats = asyncio.create_task(self._heartbeat_loop(), name="conveyor-heartbeats")
        lanes = [asyncio.create_task(self._lane_loop(_Lane(self._by_queue[q], n, n)),
                                     name=f"conveyor-lane-{q}")
                 for q, n in self.queue_slots().items()]
        log.info("worker %s serving %s on %s (slots %s, lease %ss)", self.worker_id,
                 ", ".join(f"{q}->{d.name}" for q, d in self._by_queue.items()), self.target,
                 self.slots, self.lease_seconds)
        try:
            await self._stop_requested.wait()
            log.info("worker %s stopping: no new leases, draining %d running task(s) for up to %gs",
                     self.worker_id, len(self._attempts), self.grace_seconds)
            await _cancel_all(lanes)
            await self._drain()
        finally:
            self._tearing_down = True
            await _cancel_all(lanes)
            # Whatever is left (a report the server never answered, a handler deaf to
            # cancellation) is abandoned: its lease expires and the task runs again elsewhere.
            await _cancel_all([a.runner for a in self._attempts.values() if a.runner is not None],
                              wait_at_most=1.0)
            await _cancel_all([heartbeats])
            await channel.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._loop = None
            log.info("worker %s stopped", self.worker_id)

    async def _drain(self) -> None:
        assert self._force is not None
        runners = {a.runner for a in self._attempts.values() if a.runner is not None}
        if runners:
            # Until every handler is done and reported, the grace period ends, or a second signal.
            finished = asyncio.ensure_future(asyncio.wait(runners))
            force = asyncio.ensure_future(self._force.wait())
            await asyncio.wait([finished, force], timeout=self.grace_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            force.cancel()
        still = [a for a in self._attempts.values() if a.phase == "running"]
        for a in still:
            log.warning("task %s attempt %d (%s) still running after the grace period: canceled, reported as"
                        " a retryable failure", a.task.task_id, a.task.attempt, a.task.step_ref)
            self._cancel(a, SHUTDOWN_ERROR, revoked=False)
        runners = {a.runner for a in self._attempts.values() if a.runner is not None}
        if runners:
            await asyncio.wait(runners, timeout=SHUTDOWN_REPORT_TIMEOUT)

    # ---- leasing ---------------------------------------------------------------------------

    async def _lane_loop(self, lane: _Lane) -> None:
        """Keep the lane's free slots on open streams: one stream at start, a new one after a
        stream dies (after a backoff) or when the handlers of a dead stream finish."""
        streams: set[asyncio.Task[None]] = set()
        try:
            while True:
                while lane.free <= 0:
                    lane.changed.clear()
                    await lane.changed.wait()
                wait = lane.retry_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif streams:
                    # Handlers of a dead stream finish one by one: gather a few slots per stream.
                    await asyncio.sleep(0.05)
                capacity, lane.free = lane.free, 0
                if capacity <= 0:
                    continue
                t = asyncio.create_task(self._stream(lane, _Stream(capacity)))
                streams.add(t)
                t.add_done_callback(streams.discard)
        finally:
            await _cancel_all(list(streams))

    async def _stream(self, lane: _Lane, stream: _Stream) -> None:
        queue = lane.definition.queue
        request = workers_pb.StreamTasksRequest(project_id=self.project_id, queue=queue,
                                                worker_id=self.worker_id, max_in_flight=stream.capacity,
                                                lease_seconds=self.lease_seconds)
        call = self._stub.StreamTasks(request, metadata=self._metadata)
        opened = time.monotonic()
        healthy = False
        try:
            while True:
                async with asyncio.timeout(STREAM_IDLE_TIMEOUT):
                    message = await call.read()
                if message is grpc.aio.EOF:
                    log.info("queue %s: the server closed the task stream; reopening", queue)
                    break
                if not healthy:
                    healthy = True
                    lane.backoff.reset()
                    if lane.failing:
                        lane.failing = ""
                        log.info("queue %s: task stream connected again", queue)
                kind = message.WhichOneof("message")
                if kind == "task":
                    self._start(lane, stream, message.task)
                elif kind == "revoked":
                    self._revoke(message.revoked.task_id, message.revoked.attempt,
                                 message.revoked.reason or "revoked")
        except grpc.aio.AioRpcError as e:
            if time.monotonic() - opened > BACKOFF_MAX:
                lane.backoff.reset()  # it served a while: this is a fresh outage
            # One line per outage (or change of failure), not one per retry.
            code = e.code().name
            refused = e.code() in _KEY_REFUSED
            level = (logging.DEBUG if lane.failing == code
                     else logging.ERROR if refused else logging.WARNING)
            lane.failing = code
            if refused:
                log.log(level, "queue %s: the server refused this worker's API key (%s %s: %s); no task is "
                        "leased until it works again; retrying with backoff", queue, code, _reason(e),
                        e.details())
            else:
                log.log(level, "queue %s: task stream failed (%s: %s); reconnecting with backoff", queue,
                        code, e.details())
        except TimeoutError:
            log.warning("queue %s: nothing from the server for %gs; reconnecting", queue, STREAM_IDLE_TIMEOUT)
        finally:
            call.cancel()
            stream.alive = False
            lane.retry_at = time.monotonic() + lane.backoff.delay()
            # Slots the stream held but did not fill go back now; filled ones when their
            # handlers finish (`_finish`).
            lane.give_back(stream.capacity - stream.in_flight)

    def _start(self, lane: _Lane, stream: _Stream, task: resources_pb2.Task) -> None:
        key = (task.task_id, task.attempt)
        if key in self._attempts:
            log.warning("task %s attempt %d delivered twice; ignored", task.task_id, task.attempt)
            return
        ctx = Context(task_id=task.task_id, attempt=task.attempt, max_attempts=task.max_attempts or 1,
                      step_ref=task.step_ref, run_id=task.workflow_run_id,
                      queue=task.queue or lane.definition.queue,
                      project_id=task.project_id or self.project_id, payload=struct_to_dict(task.payload),
                      timeout_seconds=task.timeout_seconds, worker_id=self.worker_id,
                      item=value_to_python(task.item) if task.HasField("index") else None,
                      index=task.index if task.HasField("index") else None)
        attempt = _Attempt(task=task, ctx=ctx, lane=lane, stream=stream)
        stream.in_flight += 1
        self._attempts[key] = attempt
        attempt.runner = asyncio.create_task(self._run(attempt),
                                             name=f"conveyor-task-{task.task_id}-{task.attempt}")

    def _revoke(self, task_id: str, attempt_no: int, reason: str) -> None:
        attempt = self._attempts.get((task_id, attempt_no))
        if attempt is None:
            return  # finished already, or never ours
        if attempt.phase == "running":
            log.info("task %s attempt %d (%s) revoked: %s", task_id, attempt_no, attempt.task.step_ref,
                     reason)
            self._cancel(attempt, reason, revoked=True)
        else:
            # Its report is being retried: the lease is gone, so the report would be refused.
            attempt.revoked = True

    def _cancel(self, attempt: _Attempt, reason: str, *, revoked: bool) -> None:
        if attempt.phase != "running" or attempt.revoked or attempt.shutdown:
            return
        if revoked:
            attempt.revoked = True
        else:
            attempt.shutdown = True
        attempt.ctx._cancel(reason)
        if attempt.runner is not None:
            # An async handler sees CancelledError at its await; a sync handler's thread is left
            # alone (only the flag tells it), the runner stops waiting for it.
            attempt.runner.cancel()

    # ---- running ---------------------------------------------------------------------------

    async def _run(self, attempt: _Attempt) -> None:
        definition = attempt.lane.definition
        try:
            request = await self._execute(attempt, definition)
            if request is not None:
                await self._report(attempt, request)
        finally:
            self._finish(attempt)

    async def _execute(self, attempt: _Attempt, definition: TaskDefinition[Any]) -> _Report | None:
        """Run the handler; the report it earned, or None when nothing must be reported."""
        task = attempt.task
        ctx = attempt.ctx
        try:
            data = struct_to_dict(task.config)
            if definition.is_async:
                value = await definition.fn(ctx, data)
            else:
                value = await asyncio.wrap_future(self._threads.submit(definition.fn, ctx, data))
        except asyncio.CancelledError:
            if self._tearing_down or not (attempt.revoked or attempt.shutdown):
                raise  # not ours to absorb: the worker itself is being torn down
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            attempt.phase = "reporting"
            if attempt.revoked:
                return None
            return workers_pb.ReleaseTaskRequest(task_id=task.task_id, attempt=task.attempt,
                                                 worker_id=self.worker_id, reason=SHUTDOWN_ERROR)
        except NonRetryableError as e:
            attempt.phase = "reporting"
            ctx.logger.warning("failed (non-retryable): %s", e)
            return self._fail(task, error_text(e), non_retryable=True)
        except RetryAfter as e:
            attempt.phase = "reporting"
            ctx.logger.info("asked to retry after %gs: %s", e.seconds, e.message)
            return self._fail(task, error_text(e), retry_after=e.seconds)
        except Exception as e:
            attempt.phase = "reporting"
            ctx.logger.exception("failed (retryable): %s", error_text(e))
            return self._fail(task, error_text(e))
        attempt.phase = "reporting"
        if attempt.revoked:
            return None  # the handler absorbed its cancellation; the lease is gone anyway
        try:
            result = result_to_struct(value)
        except TypeError as e:
            ctx.logger.error("%s", e)
            return self._fail(task, error_text(e), non_retryable=True)
        return workers_pb.CompleteTaskRequest(task_id=task.task_id, attempt=task.attempt,
                                              worker_id=self.worker_id, result=result)

    def _fail(self, task: resources_pb2.Task, error: str, *, non_retryable: bool = False,
              retry_after: float = 0.0) -> workers_pb.FailTaskRequest:
        return workers_pb.FailTaskRequest(task_id=task.task_id, attempt=task.attempt,
                                          worker_id=self.worker_id, error=error,
                                          non_retryable=non_retryable, retry_after_seconds=retry_after)

    async def _report(self, attempt: _Attempt, request: _Report) -> None:
        """Send the report (or release) until the server answers it, the lease is gone, or the
        worker exits."""
        backoff = _Backoff()
        complete = isinstance(request, workers_pb.CompleteTaskRequest)
        task = attempt.task
        while True:
            if attempt.revoked:
                log.info("task %s attempt %d: lease gone before its report was delivered; dropped",
                         task.task_id, task.attempt)
                return
            try:
                if isinstance(request, workers_pb.CompleteTaskRequest):
                    await self._stub.CompleteTask(request, timeout=CALL_TIMEOUT, metadata=self._metadata)
                elif isinstance(request, workers_pb.ReleaseTaskRequest):
                    await self._stub.ReleaseTask(request, timeout=CALL_TIMEOUT, metadata=self._metadata)
                else:
                    await self._stub.FailTask(request, timeout=CALL_TIMEOUT, metadata=self._metadata)
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    log.info("task %s attempt %d: report refused (%s %s): the lease was revoked or re-leased",
                             task.task_id, task.attempt, code.name, _reason(e) or e.details())
                    return
                # A RESOURCE_EXHAUSTED with a retry-after is the server busy (a full queue, a
                # rate limit), not the result refused: retried below like UNAVAILABLE.
                busy = any(key == "retry-after" for key, _ in e.trailing_metadata() or ())
                if complete and code in _RESULT_REFUSED and not busy:
                    # The result itself was refused (invalid, or beyond the server's message
                    # size): the same result would be refused again, so the step fails.
                    log.error("task %s attempt %d: result refused (%s): %s", task.task_id, task.attempt,
                              _reason(e), e.details())
                    request = self._fail(task, f"result refused: {e.details()}"[:MAX_ERROR_LENGTH],
                                         non_retryable=True)
                    complete = False
                    continue
                if code not in _RETRYABLE_CODES:
                    log.error("task %s attempt %d: report failed (%s: %s); dropped", task.task_id,
                              task.attempt, code.name, e.details())
                    return
                delay = backoff.delay()
                log.info("task %s attempt %d: report failed (%s); retrying in %.1fs", task.task_id,
                         task.attempt, code.name, delay)
                await asyncio.sleep(delay)

    def _finish(self, attempt: _Attempt) -> None:
        self._attempts.pop(attempt.key, None)
        if attempt.stream.alive:
            attempt.stream.in_flight -= 1  # the server refills this slot on the same stream
        else:
            attempt.lane.give_back(1)

    # ---- heartbeats ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._attempts.values())
            for i in range(0, len(held), MAX_HEARTBEAT_BATCH):
                await self._heartbeat(held[i:i + MAX_HEARTBEAT_BATCH], interval)

    async def _heartbeat(self, batch: Sequence[_Attempt], interval: float) -> None:
        request = workers_pb.HeartbeatTasksRequest(
            worker_id=self.worker_id, lease_seconds=self.lease_seconds,
            leases=[workers_pb.TaskLease(task_id=a.task.task_id, attempt=a.task.attempt) for a in batch])
        try:
            response = await self._stub.HeartbeatTasks(request, timeout=max(interval, 1.0),
                                                       metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            # The next interval tries again; a lease outlives two missed heartbeats.
            log.log(logging.DEBUG if self._heartbeat_failing else logging.WARNING,
                    "heartbeat of %d lease(s) failed: %s %s", len(batch), e.code().name, e.details())
            self._heartbeat_failing = True
            return
        self._heartbeat_failing = False
        for status in response.leases:
            if status.revoked:
                self._revoke(status.task_id, status.attempt, "lease revoked")


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]], wait_at_most: float | None = None) -> None:
    """Cancel tasks and wait for them to end (at most `wait_at_most` seconds)."""
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait_at_most)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.debug("task %s ended with %r", t.get_name(), t.exception())
