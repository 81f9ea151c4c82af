"""Dispatch: handing `task` steps to external workers (SPEC §4.3) over the lease mechanism.

`poll` is a long-poll: lease what is ready now, else wait on the queue's key until a commit makes
a task of that queue ready (or the wait ends). `stream` keeps a worker supplied: it holds at most
`max_in_flight` leases at once, leases more as the worker's reports free slots, and tells the
worker when a lease it holds was revoked (cancel, skip, replay, timeout, run deadline).

Wake-ups come from `Runner.keyed` after commit, keyed by queue and by worker, so an idle poller
costs nothing until its own queue moves. The database stays the source of truth: a slow safety
poll covers what another replica committed, and a stream re-reads the leases it handed out so a
revocation committed elsewhere reaches its worker too.

Polls and streams hold their caller's API key (engine/keys.py): once it is revoked or expires
they lease nothing more and end with UNAUTHENTICATED; what a stream leased and did not deliver
is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.feed import queue_key, worker_key
from conveyor.domain.records import Caller
from conveyor.domain.states import StepStatus
from conveyor.engine.clock import Clock
from conveyor.engine.keys import KeyHolds
from conveyor.engine.leases import Demand, Lease, Leases
from conveyor.engine.ports import Store
from conveyor.engine.watch import Heartbeat
from conveyor.engine.workflows import project_of

# Defaults and bounds of what a worker may ask for.
DEFAULT_LEASE_SECONDS = 30
MAX_LEASE_SECONDS = 3600
MAX_WAIT_SECONDS = 60
MAX_TASKS_PER_POLL = 100
MAX_IN_FLIGHT = 1000
# What another replica committed is seen within this long (also: a stream re-reads its leases).
SAFETY_POLL_SECONDS = 1.0
# An idle stream sends a heartbeat this often, so proxies on the way keep it open.
STREAM_HEARTBEAT_SECONDS = 15.0
REVOKED_ELSEWHERE = "lease no longer held"
# Why a lease taken for a stream that closed before delivering it was given back.
UNDELIVERED = "the task stream closed before the task was delivered"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Revoked:
    """A lease a stream handed out that its worker must drop."""

    task_id: str
    attempt: int
    reason: str


StreamItem = Lease | Revoked | Heartbeat


@dataclass(frozen=True)
class Request:
    """Who polls which queue, for how many tasks and how long a lease."""

    queue: str
    worker_id: str
    project: str
    lease_seconds: int
    caller: Caller


class Dispatch:
    """Long-polls and task streams over `Leases`."""

    def __init__(self, store: Store, clock: Clock, leases: Leases, holds: KeyHolds) -> None:
        self.store = store
        self.clock = clock
        self.leases = leases
        self.holds = holds
        self.runner = leases.runner
        # Releases of leases whose stream closed before delivering them, under way.
        self._releasing: set[asyncio.Task[None]] = set()
        # Set when the server begins to stop: no lease is handed out after it (see `quiesce`).
        self.quiescing = False

    def request(self, project_id: str, queue: str, worker_id: str, lease_seconds: int,
                caller: Caller) -> Request:
        """Check what a worker asks for; INVALID_ARGUMENT naming the field otherwise."""
        if not queue:
            raise _invalid("queue is required")
        if not worker_id:
            raise _invalid("worker_id is required")
        project = project_of(project_id, caller)
        # The caller's scope narrowed to that project: leases come from its queue alone.
        return Request(queue, worker_id, project, lease_length(lease_seconds),
                       dataclasses.replace(caller, project=project))

    async def poll(self, req: Request, max_tasks: int, wait_seconds: int) -> list[Lease]:
        """Up to `max_tasks` leases, waiting up to `wait_seconds` for the first."""
        if not 0 <= max_tasks <= MAX_TASKS_PER_POLL:
            raise _invalid(f"max_tasks must be at most {MAX_TASKS_PER_POLL}")
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            raise _invalid(f"wait_seconds must be at most {MAX_WAIT_SECONDS}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        probe = False
        with self.holds.hold(req.caller) as hold:
            keys = (queue_key(req.project, req.queue), *hold.keys)
            while True:
                ready = self.runner.keyed.next_any(keys)  # before looking: a commit in between wakes us
                try:
                    hold.check()
                    if self.quiescing:
                        return []
                    leases = await self.leases.acquire(req.queue, req.worker_id, req.lease_seconds,
                                                       max_tasks or 1, req.caller, probe=probe)
                    if hold.error is not None:  # the key stopped working meanwhile
                        self._give_back(leases, req)
                        hold.check()
                    left = deadline - loop.time()
                    if leases or left <= 0:
                        return leases
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(left, SAFETY_POLL_SECONDS)):
                            await ready.wait()
                    probe = not ready.is_set()  # the safety poll, not a commit of this queue
                finally:
                    self.runner.keyed.forget(keys, ready)

    async def stream(self, req: Request, max_in_flight: int) -> AsyncIterator[StreamItem]:
        """Leases as tasks become ready while fewer than `max_in_flight` are held, revocations
        of the leases handed out, and heartbeats while idle. Runs until the client goes."""
        if not 0 <= max_in_flight <= MAX_IN_FLIGHT:
            raise _invalid(f"max_in_flight must be at most {MAX_IN_FLIGHT}")
        most = max_in_flight or 1
        loop = asyncio.get_running_loop()
        held: dict[str, int] = {}  # task id -> attempt, of the leases this stream handed out
        quiet_since = checked_at = loop.time()
        queue, mine = queue_key(req.project, req.queue), worker_key(req.project, req.worker_id)
        probe = False
        # What this stream still wants, where its worker's reports can see it and lease its next
        # tasks in their own transaction (they land in the inbox).
        demand = Demand(req.project, req.queue, req.worker_id, req.lease_seconds, most, held)
        # Leases taken for the worker and not yet written to its stream: a stream closed before
        # delivering them gives them back (a loss, SPEC §4.3) instead of leaving them to expire.
        # The one being yielded when the stream closes counts as undelivered.
        undelivered: list[Lease] = []
        self.leases.attach(demand)
        try:
            with self.holds.hold(req.caller) as hold:
                keys = (mine, queue, *hold.keys)
                while True:
                    # Taken before looking: a commit in between wakes us (the queue's key: tasks
                    # became ready; the worker's: its leases ended, were revoked or were leased
                    # anew; the hold's: the caller's key stopped working).
                    woken = self.runner.keyed.next_any(keys)
                    try:
                        hold.check()
                        if self.quiescing:
                            return
                        while demand.inbox:
                            lease = demand.inbox[0]
                            held[lease.step.id] = lease.step.attempt
                            quiet_since = loop.time()
                            yield lease
                            demand.inbox.pop(0)  # grpc wrote it before asking for the next item
                        for item in self._ended(held):
                            yield item
                        if loop.time() - checked_at >= SAFETY_POLL_SECONDS:
                            for item in await self._gone_elsewhere(held, req.worker_id):
                                yield item
                            checked_at = loop.time()
                        free = demand.free()
                        if free > 0:
                            leases = await self.leases.acquire(req.queue, req.worker_id, req.lease_seconds,
                                                               free, req.caller, probe=probe)
                            undelivered += leases
                            hold.check()  # the key stopped working meanwhile: given back
                            while undelivered:
                                lease = undelivered[0]
                                held[lease.step.id] = lease.step.attempt
                                yield lease
                                undelivered.pop(0)
                            if leases:
                                quiet_since = loop.time()
                            if len(leases) == free:
                                continue  # every free slot was filled: more may be ready, look again at once
                        if demand.inbox:
                            continue  # a report leased for us meanwhile
                        if loop.time() - quiet_since >= STREAM_HEARTBEAT_SECONDS:
                            yield Heartbeat(self.clock.now())
                            quiet_since = loop.time()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(SAFETY_POLL_SECONDS):
                                await woken.wait()
                        probe = not woken.is_set()  # the safety poll, not a commit of our keys
                    finally:
                        # Also when the client went away mid-yield: nothing of this wait is left behind.
                        self.runner.keyed.forget(keys, woken)
        finally:
            self.leases.detach(demand)
            self._give_back(undelivered + demand.inbox, req)

    def _give_back(self, leases: list[Lease], req: Request) -> None:
        """Release leases a closed stream never delivered, in the background: the stream's task
        is being cancelled, and a release is a report that waits for its commit."""
        if not leases:
            return

        async def release() -> None:
            results = await asyncio.gather(
                *(self.leases.release(lease.step.id, lease.step.attempt, req.worker_id, UNDELIVERED,
                                      req.caller) for lease in leases), return_exceptions=True)
            for lease, result in zip(leases, results, strict=True):
                if isinstance(result, BaseException) and not _lease_lost(result):
                    # The lease expires instead, which is a loss too, only later.
                    log.warning("task %s attempt %d: giving back an undelivered lease failed: %s",
                                lease.step.id, lease.step.attempt, result)

        task = asyncio.create_task(release(), name="conveyor-undelivered-leases")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def quiesce(self) -> None:
        """The server is stopping: hand out no more leases. Open streams end (their workers
        reconnect elsewhere, or here after the restart) and polls answer empty. Without this a
        stream would keep leasing through the shutdown grace while new report and heartbeat
        calls are already refused, and every lease it gave would be lost."""
        self.quiescing = True
        self.runner.keyed.fire_all()  # every stream and poll looks again, and sees it

    async def close(self) -> None:
        """Wait for the releases under way (before the leases' report drain closes)."""
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def _ended(self, held: dict[str, int]) -> list[Revoked]:
        """Leases of `held` that ended in this process: a report by the worker frees its slot
        silently, anything else is a revocation the worker is told about."""
        out = []
        for task_id, attempt in list(held.items()):
            reason = self.runner.ended_leases.get((task_id, attempt))
            if reason is not None:
                del held[task_id]
                if reason:
                    out.append(Revoked(task_id, attempt, reason))
        return out

    async def _gone_elsewhere(self, held: dict[str, int], worker_id: str) -> list[Revoked]:
        """Leases of `held` that another replica ended (the database says so)."""
        if not held:
            return []
        async with self.store.read() as repo:
            steps = await repo.get_steps(list(held))
        out = self._ended(held)  # ended here while we read: known for what it was
        for task_id, attempt in list(held.items()):
            step = steps.get(task_id)
            if (step is None or step.status != StepStatus.RUNNING or step.attempt != attempt
                    or step.worker_id != worker_id):
                del held[task_id]
                out.append(Revoked(task_id, attempt, REVOKED_ELSEWHERE))
        return out


def lease_length(lease_seconds: int) -> int:
    """The lease a worker asked for (0: the default), within bounds."""
    if not 0 <= lease_seconds <= MAX_LEASE_SECONDS:
        raise _invalid(f"lease_seconds must be at most {MAX_LEASE_SECONDS}")
    return lease_seconds or DEFAULT_LEASE_SECONDS


def _lease_lost(error: BaseException) -> bool:
    """The lease had ended anyway (reported, revoked, expired): nothing was left to give back."""
    return isinstance(error, ConveyorError) and error.reason == "LEASE_LOST"


def _invalid(message: str) -> ConveyorError:
    return ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT", message)
