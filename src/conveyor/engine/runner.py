"""Runner: advances runs from the database.

A run is due when its `wake_at` has passed (a trigger, an operator action, a timer, a retry
backoff or a freed concurrency slot set it). `tick` claims a batch of due runs in one write
transaction, plans each with the pure planner and saves every change with its events as
compare-and-set updates. Nothing lives only in memory: after a crash, `wake_at` in the database
says what is still due, so a restarted server continues exactly where the last commit left off.

The background loop sleeps until the next `wake_at` or until `after_commit()` says a unit
committed elsewhere (a trigger, a report, an operation, a schedule) left work due sooner; tests
call `tick()` / `run_until_idle()` with a ManualClock instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timedelta

from conveyor.domain.changes import Changes
from conveyor.domain.concurrency import Caps, Waiter
from conveyor.domain.errors import ConcurrentChange, ConveyorError, ErrorKind
from conveyor.domain.feed import keys_of
from conveyor.domain.limits import Limits
from conveyor.domain.planner import DEFAULT_LIMITS, ENGINE, Links, advance, fail_unplannable
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.spec import WorkflowSpec
from conveyor.domain.states import RunStatus
from conveyor.engine import children, event_waits
from conveyor.engine.background import Background
from conveyor.engine.clock import Clock
from conveyor.engine.metrics import Metrics
from conveyor.engine.offload import Offload
from conveyor.engine.ports import Repo, Store
from conveyor.engine.pulse import KeyedPulses

log = logging.getLogger(__name__)

# Specs are immutable per version id, so a small LRU spares re-parsing them on every pass.
_SPEC_CACHE_SIZE = 256
# Shortest sleep of the background loop between passes that found nothing to claim.
_MIN_WAIT_SECONDS = 0.01
# A run that cannot be planned or saved (a bug, not its own error) is looked at again after this.
_SET_ASIDE_SECONDS = 60.0
# Ended leases remembered for the streams of their workers (a stream reads them within ms).
_ENDED_LEASES_KEPT = 10_000


class Runner:
    """Claims due runs in batches and advances them."""

    def __init__(self, store: Store, clock: Clock, offload: Offload, batch_size: int = 256,
                 idle_seconds: float = 1.0, limits: Limits = DEFAULT_LIMITS,
                 max_nesting_depth: int = 10, metrics: Metrics | None = None) -> None:
        self.store = store
        # The engine's metrics: every commit passes through `publish`, so they are counted there.
        self.metrics = metrics or Metrics()
        self.max_nesting_depth = max_nesting_depth
        self.clock = clock
        self.offload = offload
        self.limits = limits
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self._specs: OrderedDict[str, WorkflowSpec] = OrderedDict()
        self._wakeup = asyncio.Event()
        # When the sleeping loop will next look at the database (None: it is mid-pass, or
        # waits only for the idle timeout), so a commit whose timers come later need not wake it.
        self._next: datetime | None = None
        # Fired after every commit that changed runs, so watchers look at once.
        # Fired after commit per key: lease holders wait on their queue's key, streams on
        # their worker's (see `publish`).
        self.keyed = KeyedPulses()
        # Leases ended lately, by (step id, attempt): "" when the holder reported it, else why
        # it was revoked. A worker's stream reads it to free a slot or tell the worker.
        self.ended_leases: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._background = Background("conveyor-runner", self._loop)

    # -- planning over loaded state ---------------------------------------------------------

    async def specs(self, repo: Repo, version_ids: set[str]) -> dict[str, WorkflowSpec]:
        """Specs by version id, from the cache or the database."""
        missing = version_ids - self._specs.keys()
        if missing:
            for vid, spec in (await repo.specs(missing)).items():
                self._specs[vid] = spec
        out = {}
        for vid in version_ids:
            self._specs.move_to_end(vid)
            out[vid] = self._specs[vid]
        while len(self._specs) > _SPEC_CACHE_SIZE:
            self._specs.popitem(last=False)
        return out

    async def advance_loaded(self, repo: Repo, runs: Sequence[RunRecord], now: datetime) -> list[Changes]:
        """Plan and save every change the engine can make to `runs` (locked by the caller)."""
        if not runs:
            return []
        steps = await repo.steps_of([r.id for r in runs])
        specs = await self.specs(repo, {r.workflow_version_id for r in runs})
        capped = await self.capped(repo, runs)
        may_start = await self._slots(repo, [r for r in runs if r.status == RunStatus.PENDING], capped, now)
        related = await children.links(repo, runs, steps)
        await event_waits.attach(repo, runs, steps, related)
        planned = await self.offload.run(self._plan_all, runs, steps, specs, may_start, related, now)
        units = [c if c is not None else await self._unplannable(repo, run.id, now)
                 for run, c in zip(runs, planned, strict=True)]
        news = await children.start(repo, self.offload, units, steps, specs, self.limits,
                                    self.max_nesting_depth, now)
        await repo.save(units)
        await self.wake_waiting(repo, units, now)
        return [*units, *(n.changes for n in news)]

    def _plan_all(self, runs: Sequence[RunRecord], steps: dict[str, list[StepRecord]],
                  specs: dict[str, WorkflowSpec], may_start: set[str], related: dict[str, Links],
                  now: datetime) -> list[Changes | None]:
        """Plan each run (on the offload thread); None for a run whose planning raised."""
        out: list[Changes | None] = []
        for run in runs:
            try:
                out.append(advance(run, steps[run.id], specs[run.workflow_version_id], now,
                                   may_start=run.id in may_start, limits=self.limits,
                                   links=related.get(run.id)))
            except Exception:
                # A bug met by one run must not stop the others: this run alone is failed (or
                # set aside) from its state as loaded, since nothing of this pass is saved yet.
                log.exception("runner: planning run %s raised; failing it", run.id)
                out.append(None)
        return out

    async def _unplannable(self, repo: Repo, run_id: str, now: datetime) -> Changes:
        run = await repo.get_run(run_id, None)
        c = Changes(run, now, ENGINE)
        fail_unplannable(c, (await repo.steps_of([run_id]))[run_id], _SET_ASIDE_SECONDS)
        return c

    async def capped(self, repo: Repo, runs: Sequence[RunRecord]) -> dict[str, Caps]:
        """The concurrency slots of the capped workflows among these runs (max_concurrent_runs,
        a per-key cap), their rows locked: the lock order is runs, then workflows (sorted), so
        replicas count, take and free a workflow's slots, of every key, one at a time and a pass
        that frees a slot is seen by the next. Every unit that may start or end runs (passes,
        operations, reports, leases) takes them here."""
        limits = await repo.workflow_limits({r.workflow_id for r in runs})
        capped = {wf: caps for wf, caps in limits.items() if caps}
        if capped:
            await repo.workflow_limits(capped, lock=True)
        return capped

    async def _slots(self, repo: Repo, pending: list[RunRecord], capped: dict[str, Caps],
                     now: datetime) -> set[str]:
        """Ids of the pending runs that may start now. A capped workflow hands its free slots to
        its waiting runs highest priority first, then oldest (SPEC §3); with a per-key cap, each
        key of these runs hands out its own free slots so, and max_concurrent_runs, if any,
        takes the best of those."""
        allowed = {r.id for r in pending if r.workflow_id not in capped}
        waiting = {r.workflow_id for r in pending} & capped.keys()
        if waiting:
            running = await repo.running_counts(waiting)
            heads: list[str] = []
            for wf in sorted(waiting):
                caps = capped[wf]
                free = caps.runs - running.get(wf, 0)
                if caps.per_key == 0:
                    heads += [w.id for w in await repo.slot_waiters(wf, free, now)]
                    continue
                keys = sorted({r.concurrency_key for r in pending if r.workflow_id == wf})
                held = await repo.running_key_counts(wf, keys)
                candidates = [w for k in keys
                              for w in await repo.slot_waiters(wf, caps.per_key - held.get(k, 0), now, key=k)]
                if caps.runs and free > 0:
                    # Waiters of keys not in this batch compete for the workflow's slots too.
                    seen = {w.id for w in candidates}
                    candidates += [w for w in await repo.slot_waiters(wf, free, now, per_key=caps.per_key)
                                   if w.id not in seen and w.key not in keys]
                chosen = _within_key_caps(candidates, held, caps.per_key)
                heads += [w.id for w in (chosen[:max(free, 0)] if caps.runs else chosen)]
            allowed.update(heads)
            # A waiter ahead of them outside this batch is owed the slot: make it due now.
            in_batch = {r.id for r in pending}
            await repo.wake([h for h in heads if h not in in_batch], now)
        return allowed

    async def wake_waiting(self, repo: Repo, units: Sequence[Changes], now: datetime) -> None:
        """Runs these saved units took out of `running` freed slots: wake the first waiters of
        those workflows (with a per-key cap: of the keys freed, and, under max_concurrent_runs,
        of any key with room)."""
        freed: dict[str, list[str]] = {}
        for u in units:
            if u.left_running:
                freed.setdefault(u.run.workflow_id, []).append(u.run.concurrency_key)
        if not freed:
            return
        limits = await repo.workflow_limits(freed)
        for wf, keys in sorted(freed.items()):
            caps = limits.get(wf, Caps())
            woken: list[str] = []
            if caps.per_key:
                for key in sorted(set(keys)):
                    woken += [w.id for w in await repo.slot_waiters(wf, keys.count(key), now, key=key)]
            if caps.runs:
                woken += [w.id for w in await repo.slot_waiters(wf, len(keys), now, per_key=caps.per_key)]
            await repo.wake(sorted(set(woken)), now)

    def after_commit(self, units: Sequence[Changes]) -> None:
        """These units were committed outside a runner pass (a trigger, a report, a lease, an
        operation, a schedule): tell watchers and lease holders, and wake the runner only if one
        of them left work due before it would look anyway (a timer, or a signal to another run)."""
        due = [u.run.wake_at for u in units if u.run.wake_at is not None]
        if any(u.signals for u in units):
            due.append(self.clock.now())
        at = min(due, default=None)
        # `_next` is None while the loop is mid-pass or waits only for its idle timeout.
        if at is not None and (self._next is None or at < self._next):
            self._wakeup.set()
        self.publish(units)

    def nudge(self) -> None:
        """Work was left for the runner outside any unit (the signals a published event left
        for waiting runs): look now."""
        self._wakeup.set()

    def publish(self, units: Sequence[Changes]) -> None:
        """After commit: fire the change feed's keys of these units in this process (watchers
        of their runs and projects, lease holders of steps made ready, streams of workers
        whose leases ended), and remember why those leases ended."""
        self.metrics.observe_units(units)
        for c in units:
            for step, attempt, _holder, reason in c.revoked:
                self.ended_leases[(step.id, attempt)] = reason
        while len(self.ended_leases) > _ENDED_LEASES_KEPT:
            self.ended_leases.popitem(last=False)
        if keys := keys_of(units):
            self.keyed.fire(keys)

    # -- passes -------------------------------------------------------------------------------

    async def tick(self) -> int:
        """One pass: advance up to `batch_size` due runs in one transaction; returns how many
        (plus the wake-up signals it took, so `run_until_idle` goes on while any are left)."""
        now = self.clock.now()
        started = time.perf_counter()
        claimed: list[str] = []
        for _ in range(3):
            try:
                async with self.store.write() as repo:
                    # Signals other runs left for these (a child that ended, a step that stopped
                    # waiting) make them due, under their own locks.
                    signals = await repo.take_wakeups(now, self.batch_size)
                    runs = await repo.claim_due_runs(now, self.batch_size)
                    oldest_due = runs[0].wake_at if runs else None  # claimed oldest first
                    # Expired leases are found by their own index, not by the run's wake_at (a
                    # heartbeat moves only the step's expiry); the planner fails those attempts.
                    expired = set(await repo.expired_lease_runs(now, self.batch_size)) - {r.id for r in runs}
                    if expired:
                        runs += await repo.get_runs(sorted(expired), None, lock=True, skip_locked=True)
                    claimed = [r.id for r in runs]
                    units = await self.advance_loaded(repo, runs, now)
                self.publish(units)
                self.metrics.runner_pass(time.perf_counter() - started, oldest_due, now)
                # Signals taken count as work done: more may be waiting behind them.
                return len(runs) + signals
            except ConcurrentChange:
                # Another writer changed one of these runs between our read and our write (only
                # possible across PostgreSQL replicas); the transaction rolled back, plan again.
                log.info("runner: concurrent change, retrying the pass")
            except Exception as e:
                unavailable = isinstance(e, ConveyorError) and e.kind == ErrorKind.UNAVAILABLE
                if unavailable or not claimed:
                    raise
                # The database refused the batch's save: pass its runs one by one, so only the
                # run that causes it is held back.
                log.exception("runner: saving a batch of %d runs failed; advancing them one by one",
                              len(claimed))
                await self._one_by_one(claimed, now)
                return len(claimed)
        return 0

    async def _one_by_one(self, run_ids: list[str], now: datetime) -> None:
        for run_id in run_ids:
            try:
                await self.advance_now([run_id])
            except Exception:
                log.exception("runner: run %s cannot be saved; setting it aside", run_id)
                async with self.store.write() as repo:
                    await repo.wake([run_id], now + timedelta(seconds=_SET_ASIDE_SECONDS))

    async def run_until_idle(self) -> int:
        """Tick until nothing is due at the clock's current time; returns runs looked at."""
        total = 0
        while (n := await self.tick()) > 0:
            total += n
        return total

    async def advance_now(self, run_ids: Sequence[str]) -> None:
        """Advance these runs at once, in the caller's stead (trigger with `immediate`)."""
        now = self.clock.now()
        async with self.store.write() as repo:
            runs = await repo.get_runs(list(run_ids), None, lock=True)
            units = await self.advance_loaded(repo, runs, now)
        self.publish(units)

    # -- background loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            self._next = None
            try:
                await self.run_until_idle()
                async with self.store.read() as repo:
                    nxt = await repo.next_wake()
            except ConveyorError as e:
                # The database is briefly unavailable (the store said so and logged why): try
                # again after the idle wait; the work is still due in the database.
                log.warning("runner: pass failed: %s", e)
                nxt = None
            except Exception:
                # Anything else must not kill the loop either; its traceback goes to the log.
                log.exception("runner: pass failed")
                nxt = None
            wait = self.idle_seconds
            if nxt is not None:
                # A due run another replica holds locked is still "due" here: a small floor keeps
                # the loop from spinning on it until that replica commits.
                wait = max(_MIN_WAIT_SECONDS, min(wait, (nxt - self.clock.now()).total_seconds()))
            self._next = self.clock.now() + timedelta(seconds=wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)


def _within_key_caps(candidates: list[Waiter], held: dict[str, int], per_key: int) -> list[Waiter]:
    """The candidates in slot order, at most `per_key` running per key (`held` already run)."""
    taken = dict(held)
    out = []
    for w in sorted(candidates, key=lambda w: w.order):
        if taken.get(w.key, 0) < per_key:
            taken[w.key] = taken.get(w.key, 0) + 1
            out.append(w)
    return out
