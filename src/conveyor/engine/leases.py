"""Step leases: the one mechanism by which anything outside the planner runs an attempt of a
step — external workers (`task`) and, next, the engine's own executors (`http`, `workflow`).

A lease is the step row itself: `worker_id`, `attempt`, `job_run_id` and `lease_expires_at`.
`acquire` starts attempts of ready queued steps (the planner gave them a slot) under their runs'
locks; `heartbeat` moves one lease's expiry and touches only that step row; `complete` and
`fail` report an attempt, fenced by (step, attempt, holder): a late or duplicate report is
LEASE_LOST and changes nothing. The run is planned on in the same transaction as the report.
Expired leases are swept by the runner through their own index (`Runner.tick`), and any exit
from running (cancel, skip, replay, timeout, run timeout) clears the lease (`Changes.step_to`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.limits import Limits
from conveyor.domain.operations import find_step_by_id
from conveyor.domain.planner import check_lease, complete_step, fail_step, plan, start_leased
from conveyor.domain.records import Caller, RunRecord, StepRecord
from conveyor.domain.spec import StepKind, WorkflowSpec
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.units import RunUnits


@dataclass
class Lease:
    """One leased attempt: the step (its rendered config in `input`) and its run."""

    run: RunRecord
    step: StepRecord

    @property
    def expires_at(self) -> datetime:
        assert self.step.lease_expires_at is not None
        return self.step.lease_expires_at


class Leases:
    """Acquire, extend and report step leases."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, limits: Limits) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.limits = limits
        self.units = RunUnits(store, clock, runner)

    async def acquire(self, queue: str, holder: str, lease_seconds: float, max_steps: int, caller: Caller,
                      kinds: Collection[StepKind] = (StepKind.TASK,)) -> list[Lease]:
        """Lease up to `max_steps` ready steps of these kinds on `queue`, oldest ready first."""
        _check_positive(lease_seconds, max_steps)
        now = self.clock.now()
        until = now + timedelta(seconds=lease_seconds)
        leases: list[Lease] = []
        async with self.store.write() as repo:
            run_ids = await repo.leasable_runs(caller.project, queue, sorted(kinds), now, max_steps)
            # Runs first, then their steps (the lock order everywhere); a run another replica or
            # poller holds is skipped, its steps are left for the next poll.
            runs = await repo.get_runs(run_ids, None, lock=True, skip_locked=True)
            await self.runner.capped(repo, runs)  # planning on may end a run and free its slot
            steps = await repo.steps_of([r.id for r in runs])
            specs = await self.runner.specs(repo, {r.workflow_version_id for r in runs})

            def start() -> list[Changes]:
                # On the offload thread: each lease renders its step's config templates.
                units = []
                for run in sorted(runs, key=lambda r: run_ids.index(r.id)):
                    if run.status != RunStatus.RUNNING:
                        continue
                    c = Changes(run, now, holder)
                    spec = specs[run.workflow_version_id]
                    for step in steps[run.id]:
                        if len(leases) < max_steps and _ready(step, queue, kinds, now) and start_leased(
                                c, steps[run.id], step, spec.step(step.step_ref), holder, new_id(), until,
                                self.limits):
                            leases.append(Lease(run, step))
                    plan(c, steps[run.id], spec, limits=self.limits)  # a failed template may end the run
                    units.append(c)
                return units

            units = await self.runner.offload.run(start)
            await repo.save(units)
            await self.runner.wake_waiting(repo, units, now)
        # Planning a run on may have ended it (a template that failed another step): only the
        # attempts still running are handed out; the others were revoked with their run.
        leases = [lease for lease in leases if lease.step.status == StepStatus.RUNNING]
        if units:
            self.runner.committed.fire()
        return leases

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

    async def complete(self, task_id: str, attempt: int, holder: str, output: dict[str, Any],
                       caller: Caller) -> None:
        """The attempt succeeded: the step completes with `output` and its run goes on."""
        def op(c: Changes, steps: list[StepRecord], spec: WorkflowSpec) -> None:
            step = find_step_by_id(steps, task_id)
            check_lease(step, attempt, holder, c.now)
            complete_step(c, step, spec.step(step.step_ref), output, self.limits)
            self._go_on(c, steps, spec)
        await self.units.mutate(await self._run_of(task_id, caller), caller, op)

    async def fail(self, task_id: str, attempt: int, holder: str, error: str, retryable: bool,
                   caller: Caller) -> None:
        """The attempt failed: retried per the step's policy unless `retryable` is false."""
        def op(c: Changes, steps: list[StepRecord], spec: WorkflowSpec) -> None:
            step = find_step_by_id(steps, task_id)
            check_lease(step, attempt, holder, c.now)
            fail_step(c, step, spec.step(step.step_ref), error, retryable=retryable)
            self._go_on(c, steps, spec)
        await self.units.mutate(await self._run_of(task_id, caller), caller, op)

    async def _run_of(self, task_id: str, caller: Caller) -> str:
        async with self.store.read() as repo:
            return (await repo.get_step(task_id, caller.project)).workflow_run_id

    def _go_on(self, c: Changes, steps: list[StepRecord], spec: WorkflowSpec) -> None:
        """Plan the run on in the report's own transaction, sparing a runner round trip."""
        if c.run.status in (RunStatus.RUNNING, RunStatus.PAUSED):
            plan(c, steps, spec, limits=self.limits)


def _ready(step: StepRecord, queue: str, kinds: Collection[StepKind], now: datetime) -> bool:
    return (step.status == StepStatus.QUEUED and step.kind in kinds and step.queue == queue
            and step.ready_at is not None and step.ready_at <= now)


def _check_positive(lease_seconds: float, max_steps: int) -> None:
    if lease_seconds <= 0 or max_steps <= 0:
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                            "lease_seconds and max_tasks must be positive")
