"""Step leases: the one mechanism by which anything outside the planner runs an attempt of a
step — external workers (`task`) and the engine's http executor (`http`).

A lease is the step row itself: `worker_id`, `attempt`, `job_run_id` and `lease_expires_at`.
`acquire` starts attempts of ready queued steps (the planner gave them a slot) under their runs'
locks; `heartbeat` moves one lease's expiry and touches only that step row; `complete` and
`fail` report an attempt, fenced by (step, attempt, holder): a late or duplicate report is
LEASE_LOST and changes nothing. The run is planned on in the same transaction as the report.
`release` gives an attempt back unfinished. An attempt released, or whose lease expired with no
report (swept by the runner through their own index, `Runner.tick`), is a loss, not a failure
(SPEC §4.3, `planner.lose_step`). Any exit from running (cancel, skip, replay, timeout, run
timeout) clears the lease (`Changes.step_to`).

Secrets (SPEC §11): the values of the secrets a leased step names are loaded in the lease's
transaction and rendered into the config its executor gets (`Lease.config`), never into what is
stored; a report's output, error or release reason has them masked before it is applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain import fanout
from conveyor.domain.changes import Changes
from conveyor.domain.errors import (
    ConcurrentChange,
    ConveyorError,
    ErrorKind,
    is_outage,
    not_found,
    overloaded,
)
from conveyor.domain.kinds import WORKER_KINDS
from conveyor.domain.limits import Limits
from conveyor.domain.operations import find_step_by_id
from conveyor.domain.planner import (
    ENGINE,
    check_lease,
    complete_step,
    fail_step,
    lose_step,
    plan,
    start_leased,
)
from conveyor.domain.records import Caller, RunRecord, StepRecord
from conveyor.domain.secrets import redactor
from conveyor.domain.spec import StepKind, StepSpec, WorkflowSpec
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Repo, Store
from conveyor.engine.runner import Runner
from conveyor.engine.secrets import Secrets

log = logging.getLogger(__name__)

# Longest wait a worker may ask for before its task's next attempt (RetryAfter).
MAX_RETRY_AFTER_SECONDS = 7 * 24 * 3600.0
# Rounds of candidate runs a lease looks at while every candidate is held by another transaction.
_LOCKED_ROUNDS = 3
# Tries of a report batch that keeps losing its compare-and-set before the workers are told.
_REPORT_TRIES = 3


@dataclass
class Lease:
    """One leased attempt: the step, its run, its spec, and its config rendered for its executor
    (secrets included: the step's stored `input` has them masked)."""

    run: RunRecord
    step: StepRecord
    spec: StepSpec
    config: dict[str, Any]
    # A map's item: its element and index (SPEC §2.1); None for any other step.
    item: Any = None
    index: int | None = None


class Leases:
    """Acquire, extend and report step leases."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, limits: Limits, secrets: Secrets,
                 batch_size: int = 256, queue_limit: int = 2048) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.limits = limits
        self.secrets = secrets
        self.batch_size = batch_size
        # Reports waiting for their batch; beyond, RESOURCE_EXHAUSTED QUEUE_FULL (the SDK retries).
        self.queue_limit = queue_limit
        self._reports: list[_Report] = []
        self._drain_task: asyncio.Task[None] | None = None
        # Streams' standing demands by (project, worker).
        self._demands: dict[tuple[str, str], list[Demand]] = {}

    async def acquire(self, queue: str, holder: str, lease_seconds: float, max_steps: int, caller: Caller,
                      kinds: Collection[StepKind] = WORKER_KINDS, probe: bool = False) -> list[Lease]:
        """Lease up to `max_steps` ready steps of these kinds on `queue` in the caller's project
        (every project for a caller scoped to none), oldest ready first. `probe`: the caller
        looks on the off chance (a safety poll, which mostly finds nothing): a snapshot is asked
        first, so an idle waiter does not take the writer (SQLite's one writer, for everyone)."""
        _check_positive(lease_seconds, max_steps)
        now = self.clock.now()
        if probe:
            async with self.store.read() as repo:
                if not await repo.leasable_runs(caller.project, queue, sorted(kinds), now, 1):
                    return []
        async with self.store.write() as repo:
            leases, units = await self._lease_in(repo, queue, holder, lease_seconds, max_steps,
                                                 caller.project, kinds, now)
        if units:
            self.runner.after_commit(units)
        return _live(leases)

    async def _lease_in(self, repo: Repo, queue: str, holder: str, lease_seconds: float, max_steps: int,
                        project: str | None, kinds: Collection[StepKind],
                        now: datetime) -> tuple[list[Lease], list[Changes]]:
        """`acquire` inside the caller's transaction: the leases and the units it saved."""
        until = now + timedelta(seconds=lease_seconds)
        leases: list[Lease] = []
        # Runs first, then their steps (the lock order everywhere); a run another replica or
        # poller holds is skipped, its steps are left for the next poll, and the next
        # candidates are looked at instead (so a poll is not starved by runs held elsewhere).
        skipped: list[str] = []
        for _ in range(_LOCKED_ROUNDS):
            run_ids = await repo.leasable_runs(project, queue, sorted(kinds), now, max_steps, skipped)
            runs = await repo.get_runs(run_ids, None, lock=True, skip_locked=True)
            if runs or not run_ids:
                break
            skipped += run_ids
        if not runs:
            return [], []
        await self.runner.capped(repo, runs)  # planning on may end a run and free its slot
        steps = await repo.steps_of([r.id for r in runs])
        specs = await self.runner.specs(repo, {r.workflow_version_id for r in runs})
        found = await self.secrets.load(repo, await self.runner.offload.run(_secrets_of, runs, specs))

        def start() -> list[Changes]:
            # On the offload thread: each lease renders its step's config templates.
            units = []
            for run in sorted(runs, key=lambda r: run_ids.index(r.id)):
                if run.status != RunStatus.RUNNING:
                    continue
                c = Changes(run, now, holder)
                spec = specs[run.workflow_version_id]
                for step in steps[run.id]:
                    if len(leases) >= max_steps or not _ready(step, queue, kinds, now):
                        continue
                    self.runner.metrics.leased(step, now)  # before starting clears its ready_at
                    step_spec = spec.step(step.step_ref)
                    config = start_leased(c, steps[run.id], step, step_spec, holder, new_id(), until,
                                          self.limits, found.get(run.project_id))
                    if config is not None:
                        item = fanout.item_of(steps[run.id], step)
                        leases.append(Lease(run, step, step_spec, config, *item))
                c.actor = ENGINE
                plan(c, steps[run.id], spec, limits=self.limits)  # a failed template may end the run
                units.append(c)
            return units

        units = await self.runner.offload.run(start)
        await repo.save(units)
        await self.runner.wake_waiting(repo, units, now)
        return leases, units

    def attach(self, demand: Demand) -> None:
        """A stream's standing demand: reports of its worker lease its next tasks for it."""
        self._demands.setdefault((demand.project, demand.worker_id), []).append(demand)

    def detach(self, demand: Demand) -> None:
        demands = self._demands.get((demand.project, demand.worker_id), [])
        if demand in demands:
            demands.remove(demand)
        if not demands:
            self._demands.pop((demand.project, demand.worker_id), None)

    async def heartbeat(self, task_id: str, attempt: int, holder: str, lease_seconds: float,
                        caller: Caller) -> datetime:
        """Extend a live lease; LEASE_LOST when it is no longer this holder's attempt (revoked,
        expired, reported), which is how a worker learns to stop."""
        _check_positive(lease_seconds, 1)
        now = self.clock.now()
        until = now + timedelta(seconds=lease_seconds)
        async with self.store.write() as repo:
            step = await repo.get_step(task_id, caller.project)
            if await repo.extend_lease(step.id, attempt, holder, until, now):
                return until
        check_lease(step, attempt, holder, now)  # explains why, from the step as last read
        raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "LEASE_LOST",
                            f"the lease of task {task_id!r} attempt {attempt} has expired")

    async def heartbeat_many(self, leases: Sequence[tuple[str, int]], holder: str, lease_seconds: float,
                             caller: Caller) -> list[datetime | None]:
        """Extend many leases of one holder in one transaction (what a worker sends for all it
        holds): per lease its new expiry, or None when it is no longer this holder's attempt
        (revoked, expired, reported, unknown or in another project)."""
        _check_positive(lease_seconds, 1)
        now = self.clock.now()
        until = now + timedelta(seconds=lease_seconds)
        out: list[datetime | None] = []
        async with self.store.write() as repo:
            known = await repo.get_steps([task_id for task_id, _ in leases])
            for task_id, attempt in leases:
                step = known.get(task_id)
                mine = step is not None and (caller.project is None or step.project_id == caller.project)
                ok = mine and await repo.extend_lease(task_id, attempt, holder, until, now)
                out.append(until if ok else None)
        return out

    async def complete(self, task_id: str, attempt: int, holder: str, output: dict[str, Any],
                       caller: Caller) -> None:
        """The attempt succeeded: the step completes with `output` and its run goes on."""
        await self._report(_Report(task_id, attempt, holder, caller, output=output))

    async def fail(self, task_id: str, attempt: int, holder: str, error: str, retryable: bool,
                   caller: Caller, retry_after: float = 0.0) -> None:
        """The attempt failed: retried per the step's policy (no sooner than `retry_after`
        seconds) unless `retryable` is false."""
        if not 0 <= retry_after <= MAX_RETRY_AFTER_SECONDS:  # also refuses NaN
            raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                f"retry_after_seconds must be between 0 and {MAX_RETRY_AFTER_SECONDS}")
        await self._report(_Report(task_id, attempt, holder, caller, error=error, retryable=retryable,
                                   retry_after=retry_after))

    async def release(self, task_id: str, attempt: int, holder: str, reason: str, caller: Caller) -> None:
        """The holder gives the attempt back unfinished (a worker shutting down, an executor
        stopping): a loss, not a failure (SPEC §4.3), so the task is offered again at once."""
        why = f"released by {holder!r}" + (f": {reason}" if reason else "")
        await self._report(_Report(task_id, attempt, holder, caller, lost=why))

    # -- reports, committed in groups --------------------------------------------------------

    async def _report(self, report: _Report) -> None:
        """Queue a report and wait until the transaction holding it has committed (or refused
        it). Concurrent reports are applied together: one transaction for a whole batch, as
        triggers are, so a worker with many slots costs one commit per batch, not per task."""
        if len(self._reports) >= self.queue_limit:
            raise overloaded("QUEUE_FULL", "too many reports are waiting to be written; retry shortly")
        self._reports.append(report)
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="conveyor-report-drain")
        await asyncio.shield(report.future)

    async def close(self) -> None:
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)

    async def _drain(self) -> None:
        # Its own task, so a worker that hangs up cannot stop the other reports of its batch.
        while self._reports:
            batch, self._reports = self._reports[:self.batch_size], self._reports[self.batch_size:]
            try:
                await self._apply(batch)
            except Exception as e:
                if is_outage(e):
                    # The database is gone, not refusing one report: the batch fails together,
                    # and so do the reports queued behind it meanwhile (one by one, each would
                    # wait its own timeout for the same answer).
                    self._settle_all(batch, e)
                    continue
                if len(batch) == 1:
                    _settle(batch[0], e)
                    continue
                # The database refused the batch (or it kept losing races): one by one, so only
                # the report that causes it fails.
                log.warning("report batch of %d failed (%s); applying them one by one", len(batch), e)
                for i, report in enumerate(batch):
                    try:
                        await self._apply([report])
                    except Exception as e1:
                        if is_outage(e1):  # met midway: the rest would meet it too
                            self._settle_all(batch[i:], e1)
                            break
                        _settle(report, e1)

    def _settle_all(self, batch: list[_Report], error: Exception) -> None:
        """Fail these reports and every one still queued with `error` (an outage)."""
        queued, self._reports = self._reports, []
        for report in (*batch, *queued):
            _settle(report, error)

    async def _apply(self, batch: list[_Report]) -> None:
        """Apply a batch of reports in one write transaction, each run locked once; a report
        that is refused (LEASE_LOST, unknown task) is answered alone and changes nothing. A lost
        compare-and-set is tried again on the new state."""
        for _ in range(_REPORT_TRIES):
            handed: list[_Handover] = []
            try:
                answers, units = await self._apply_once(batch, handed)
            except ConcurrentChange:
                continue
            finally:
                for h in handed:
                    h.demand.reserved -= h.reserved
            for h in handed:  # committed: the stream takes them from its inbox
                h.demand.inbox += _live(h.leases)
            self.runner.after_commit(units)
            for report in batch:
                _settle(report, answers.get(id(report)))
            return
        raise ConveyorError(ErrorKind.ABORTED, "CONCURRENT_CHANGE",
                            "the run kept changing concurrently; try again")

    async def _apply_once(self, batch: list[_Report], handed: list[_Handover]
                          ) -> tuple[dict[int, Exception | None], list[Changes]]:
        now = self.clock.now()
        answers: dict[int, Exception | None] = {}
        async with self.store.write() as repo:
            found = await repo.get_steps([r.task_id for r in batch])
            live: list[_Report] = []
            for r in batch:
                step = found.get(r.task_id)
                if step is None or (r.caller.project is not None and step.project_id != r.caller.project):
                    answers[id(r)] = not_found("task", r.task_id)
                else:
                    live.append(r)
            # Slots these reports free on their workers' streams, reserved now (on the loop, so
            # the stream cannot lease them meanwhile) for the tasks these runs make ready. A
            # release frees none: its holder is going away and must not get the task back.
            handed += self._reserve([r for r in live if r.lost is None], found)
            run_ids = sorted({found[r.task_id].workflow_run_id for r in live})
            runs = {run.id: run for run in await repo.get_runs(run_ids, None, lock=True)}
            await self.runner.capped(repo, list(runs.values()))
            steps = await repo.steps_of(run_ids)
            specs = await self.runner.specs(repo, {r.workflow_version_id for r in runs.values()})
            # The secrets of every step of these runs: those a report must not store, and those
            # of the steps it makes ready, leased below in the same unit.
            wanted = await self.runner.offload.run(_secrets_of, runs.values(), specs)
            values = await self.secrets.load(repo, wanted)

            def apply() -> list[Changes]:
                # On the offload thread: each report is checked against its lease before it
                # changes anything, so a refused one leaves its run's unit as it was.
                units: dict[str, Changes] = {}
                accepted: set[str] = set()
                for r in live:
                    run_id = found[r.task_id].workflow_run_id
                    c = units.get(run_id)
                    if c is None:
                        c = units[run_id] = Changes(runs[run_id], now, r.holder)
                    c.actor = r.holder  # each report's events name its worker
                    try:
                        step = find_step_by_id(steps[run_id], r.task_id)
                        check_lease(step, r.attempt, r.holder, now)
                    except ConveyorError as e:
                        answers[id(r)] = e
                        continue
                    spec = specs[runs[run_id].workflow_version_id].step(step.step_ref)
                    # What the attempt gives back may quote the secrets it was given.
                    redact = redactor(spec.secrets, values.get(runs[run_id].project_id, {}))
                    c.reporter = r.holder
                    if r.lost is not None:
                        lose_step(c, step, spec, redact.text(r.lost))
                    elif r.output is not None:
                        complete_step(c, step, spec, redact(r.output), self.limits)
                    else:
                        fail_step(c, step, spec, redact.text(r.error), retryable=r.retryable,
                                  retry_after=r.retry_after)
                    c.reporter = None
                    answers[id(r)] = None
                    accepted.add(run_id)
                # A task none of whose reports was accepted frees no slot: it stays with its stream.
                reported = {r.task_id for r in live if answers[id(r)] is None}
                for h in handed:
                    h.left -= len(h.freed - reported)
                # A run whose reports were all refused is left exactly as it was.
                for run_id in accepted:
                    # Plan the run on in the report's own transaction, sparing a runner round trip.
                    c = units[run_id]
                    c.actor = ENGINE
                    if c.run.status in (RunStatus.RUNNING, RunStatus.PAUSED):
                        workflow = specs[c.run.workflow_version_id]
                        plan(c, steps[run_id], workflow, limits=self.limits)
                        if self._lease_ready(c, steps[run_id], workflow, handed, now,
                                             values.get(c.run.project_id)):
                            plan(c, steps[run_id], workflow, limits=self.limits)  # the new attempts' timers
                return [units[run_id] for run_id in sorted(accepted)]

            units = await self.runner.offload.run(apply)
            await repo.save(units)
            await self.runner.wake_waiting(repo, units, now)
        return answers, units

    def _reserve(self, live: list[_Report], found: dict[str, StepRecord]) -> list[_Handover]:
        """For each stream of a reporting worker: the slots its reports free plus those it had
        free, reserved at once (`Demand.reserved`), with where their leases will go."""
        out: list[_Handover] = []
        for (project, worker), demands in self._demands.items():
            for demand in demands:
                # Distinct tasks: a duplicate report in the batch frees its slot once.
                freed = frozenset(r.task_id for r in live if r.holder == worker and r.task_id in demand.held
                                  and found[r.task_id].project_id == project)
                wanted = demand.free() + len(freed)
                if freed and wanted > 0:
                    demand.reserved += wanted
                    out.append(_Handover(demand, freed, wanted, wanted))
        return out

    def _lease_ready(self, c: Changes, steps: list[StepRecord], spec: WorkflowSpec,
                     handed: list[_Handover], now: datetime,
                     secrets: dict[str, str | None] | None) -> bool:
        """Lease the task steps this unit made ready to the reserved streams of their queue, in
        this same unit: the next step of a chain goes to the worker that finished the step
        before it with no further transaction. True when any was leased."""
        started = False
        for step, _key in list(c.announced.values()):
            if step.status != StepStatus.QUEUED or step.kind not in WORKER_KINDS:
                continue
            for h in handed:
                demand = h.demand
                if h.left > 0 and demand.queue == step.queue and demand.project == step.project_id:
                    step_spec = spec.step(step.step_ref)
                    c.actor = demand.worker_id  # the lease's event names its worker, as acquire's does
                    self.runner.metrics.leased(step, now)
                    config = start_leased(c, steps, step, step_spec, demand.worker_id, new_id(),
                                          now + timedelta(seconds=demand.lease_seconds), self.limits, secrets)
                    if config is not None:
                        h.leases.append(Lease(c.run, step, step_spec, config, *fanout.item_of(steps, step)))
                    h.left -= 1
                    c.actor = ENGINE
                    started = True
                    break
        return started


@dataclass(eq=False)
class Demand:
    """A task stream's standing demand for tasks of its queue: at most `most` held at once."""

    project: str
    queue: str
    worker_id: str
    lease_seconds: float
    most: int
    # The stream's own map of the leases it handed out (task id -> attempt).
    held: dict[str, int]
    # Leases a report's transaction took for the stream, not yet handed out by it.
    inbox: list[Lease] = field(default_factory=list)
    # Slots a report's transaction in flight is leasing for the stream.
    reserved: int = 0

    def free(self) -> int:
        return self.most - len(self.held) - len(self.inbox) - self.reserved


@dataclass(eq=False)
class _Handover:
    """Slots of a stream a report batch reserved (`reserved`, released after the batch), the
    tasks its reports free there, how many may still be leased, and the leases taken."""

    demand: Demand
    freed: frozenset[str]
    reserved: int
    left: int
    leases: list[Lease] = field(default_factory=list)


def _secrets_of(runs: Iterable[RunRecord], specs: Mapping[str, WorkflowSpec]) -> dict[str, set[str]]:
    """The secrets the steps of these runs name, by project (nothing for most runs). On the
    offload thread: a spec not asked before parses its templates (CEL) to know."""
    wanted: dict[str, set[str]] = {}
    for run in runs:
        names = specs[run.workflow_version_id].secret_names
        if names:
            wanted.setdefault(run.project_id, set()).update(names)
    return wanted


def _live(leases: list[Lease]) -> list[Lease]:
    """Planning a run on may have ended it (a template that failed another step): only the
    attempts still running are handed out; the others were revoked with their run."""
    return [lease for lease in leases if lease.step.status == StepStatus.RUNNING]


@dataclass
class _Report:
    """One worker report waiting for its batch: a completion (`output`), a release (`lost`:
    why the attempt ends with no verdict) or a failure."""

    task_id: str
    attempt: int
    holder: str
    caller: Caller
    output: dict[str, Any] | None = None
    error: str = ""
    retryable: bool = True
    retry_after: float = 0.0
    lost: str | None = None
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future(),
                                         repr=False)


def _settle(report: _Report, error: Exception | None) -> None:
    if report.future.done():
        return
    if error is None:
        report.future.set_result(None)
    else:
        report.future.set_exception(error)


def _ready(step: StepRecord, queue: str, kinds: Collection[StepKind], now: datetime) -> bool:
    return (step.status == StepStatus.QUEUED and step.kind in kinds and step.queue == queue
            and step.ready_at is not None and step.ready_at <= now)


def _check_positive(lease_seconds: float, max_steps: int) -> None:
    if lease_seconds <= 0 or max_steps <= 0:
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                            "lease_seconds and max_tasks must be positive")
