"""Run use cases: trigger, read, list, events, and the run operations of SPEC §3 (cancel,
pause, resume, retry as a new run, bulk cancel and bulk replay)."""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.domain import operations as ops
from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import (
    Caller,
    EventRecord,
    Page,
    RunQuery,
    RunRecord,
    StepRecord,
    TriggerRequest,
)
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.triggers import Triggers, opening_events
from conveyor.engine.units import Operation, RunUnits

# Bulk operations take at most this many ids per request, so one call stays one short burst.
MAX_BULK = 1000


class RunService:
    """Use cases on workflow runs."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, triggers: Triggers) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.triggers = triggers
        self.units = RunUnits(store, clock, runner)

    async def trigger(self, req: TriggerRequest, caller: Caller) -> RunRecord:
        return await self.triggers.trigger(req, caller)

    async def get(self, run_id: str, caller: Caller) -> RunRecord:
        async with self.store.read() as repo:
            return await repo.get_run(run_id, caller.project)

    async def list(self, query: RunQuery, limit: int, token: str, caller: Caller) -> Page[RunRecord]:
        if caller.project is not None and query.project_id not in ("", caller.project):
            return Page([], "")
        async with self.store.read() as repo:
            return await repo.list_runs(query, caller.project, limit, token)

    async def events(self, run_id: str, after_seq: int, limit: int, token: str,
                     caller: Caller) -> Page[EventRecord]:
        async with self.store.read() as repo:
            await repo.get_run(run_id, caller.project)  # NOT_FOUND outside the caller's scope
            return await repo.list_events(run_id, after_seq, limit, token)

    async def cancel(self, run_id: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, steps, _: ops.cancel_run(c, steps))

    async def pause(self, run_id: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, _s, _p: ops.pause_run(c))

    async def resume(self, run_id: str, caller: Caller) -> None:
        async with self.store.read() as repo:
            run = await repo.get_run(run_id, caller.project)
            capped = (await repo.workflow_limits([run.workflow_id])).get(run.workflow_id, 0) > 0
        await self.units.mutate(run_id, caller, lambda c, _s, _p: ops.resume_run(c, capped))

    async def retry(self, run_id: str, caller: Caller) -> RunRecord:
        """A NEW run of the same version and payload with `retry_of_run_id`; completed steps are
        copied with their outputs, the rest run again. The old run records the retry."""
        now = self.clock.now()
        async with self.store.write() as repo:
            old = await repo.get_run(run_id, caller.project, lock=True)
            ops.check_retryable_run(old.status)
            old_steps = (await repo.steps_of([old.id]))[old.id]
            run = RunRecord(
                id=new_id(), project_id=old.project_id, workflow_id=old.workflow_id,
                workflow_name=old.workflow_name, workflow_version=old.workflow_version,
                workflow_version_id=old.workflow_version_id, status=RunStatus.PENDING, created_at=now,
                updated_at=now, payload=old.payload, tags=dict(old.tags), triggered_by=caller.name,
                created_by=caller.name, max_parallel_steps=old.max_parallel_steps, entity_id=old.entity_id,
                retry_of_run_id=old.id, parent_workflow_run_id=old.parent_workflow_run_id,
                parent_step_run_id=old.parent_step_run_id, depth=old.depth, wake_at=now,
                expires_at=now + (old.expires_at - old.created_at) if old.expires_at else None)
            steps = [_copy_step(s, run) for s in old_steps]
            first = opening_events(run, now, caller.name, f"retry of {old.id}", {"retry_of_run_id": old.id})
            await repo.insert_runs([run], steps, first, [], now)
            c = Changes(old, now, caller.name)
            c.event("run.retried", message=f"retried by {caller.name} as {run.id}", data={"run_id": run.id})
            await repo.save([c])
        self.runner.notify()
        return run

    async def bulk_cancel(self, run_ids: Sequence[str], caller: Caller) -> tuple[int, int]:
        return await self._bulk(run_ids, caller, lambda c, steps, _: ops.cancel_run(c, steps))

    async def bulk_replay(self, run_ids: Sequence[str], caller: Caller) -> tuple[int, int]:
        return await self._bulk(run_ids, caller, lambda c, steps, _: ops.replay_run(c, steps))

    async def _bulk(self, run_ids: Sequence[str], caller: Caller, op: Operation[None]) -> tuple[int, int]:
        """Best effort per id, each in its own transaction: one id's failure never stops the rest."""
        if len(run_ids) > MAX_BULK:
            raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "TOO_MANY_IDS",
                                f"at most {MAX_BULK} workflow_run_ids per request")
        done = failed = 0
        for run_id in dict.fromkeys(run_ids):
            try:
                await self.units.mutate(run_id, caller, op)
                done += 1
            except ConveyorError:
                failed += 1
        return done, failed


def _copy_step(old: StepRecord, run: RunRecord) -> StepRecord:
    """The new run's copy of a step: completed steps keep their output, the rest start over."""
    kept = old.status == StepStatus.COMPLETED
    return StepRecord(
        id=new_id(), workflow_run_id=run.id, project_id=run.project_id, position=old.position,
        step_ref=old.step_ref, workflow_step_id=old.workflow_step_id, kind=old.kind,
        status=StepStatus.COMPLETED if kept else StepStatus.PENDING, created_at=run.created_at,
        updated_at=run.created_at, queue=old.queue, attempt=old.attempt if kept else 0,
        deps_required=old.deps_required, deps_completed=0, output=old.output if kept else None,
        started_at=old.started_at if kept else None, finished_at=old.finished_at if kept else None)

