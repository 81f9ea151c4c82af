"""Run use cases: trigger, read, list, events, and the run operations of SPEC §3 (cancel,
pause, resume, retry as a new run, bulk cancel and bulk replay)."""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.domain import operations as ops
from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.records import (
    Caller,
    EventRecord,
    Page,
    RunQuery,
    RunRecord,
    TriggerRequest,
)
from conveyor.domain.states import RunStatus
from conveyor.engine import creation
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.triggers import Triggers
from conveyor.engine.units import Operation, RunUnits

# The event type of a run's comments (seed 001): ListRunComments lists these.
COMMENT_EVENT = "run.comment"


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

    async def comment(self, run_id: str, content: str, caller: Caller) -> EventRecord:
        """Add an operator's comment: a "run.comment" event of the run, in any status."""
        if not content.strip():
            raise invalid("a comment needs content", [FieldViolation("content", "is empty")])
        def note(c: Changes, _s: object, _p: object) -> EventRecord:
            return c.event(COMMENT_EVENT, status=str(c.run.status), message=content)

        return await self.units.mutate(run_id, caller, note)

    async def comments(self, run_id: str, limit: int, token: str, caller: Caller) -> Page[EventRecord]:
        async with self.store.read() as repo:
            await repo.get_run(run_id, caller.project)  # NOT_FOUND outside the caller's scope
            return await repo.list_events(run_id, 0, limit, token, type_=COMMENT_EVENT)

    async def cancel(self, run_id: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, steps, _: ops.cancel_run(c, steps))

    async def pause(self, run_id: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, _s, _p: ops.pause_run(c))

    async def resume(self, run_id: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, _s, _p: ops.resume_run(c))

    async def retry(self, run_id: str, caller: Caller) -> RunRecord:
        """A NEW run of the same version and payload with `retry_of_run_id`; completed steps are
        kept with their outputs, the rest run again. The old run records the retry."""
        now = self.clock.now()
        async with self.store.write() as repo:
            old = await repo.get_run(run_id, caller.project, lock=True)
            ops.check_retryable_run(old.status)
            old_steps = (await repo.steps_of([old.id]))[old.id]
            spec = (await self.runner.specs(repo, {old.workflow_version_id}))[old.workflow_version_id]
            run = RunRecord(
                id=new_id(), project_id=old.project_id, workflow_id=old.workflow_id,
                workflow_name=old.workflow_name, workflow_version=old.workflow_version,
                workflow_version_id=old.workflow_version_id, status=RunStatus.PENDING, created_at=now,
                updated_at=now, payload=old.payload, tags=dict(old.tags), triggered_by=caller.name,
                created_by=caller.name, max_parallel_steps=old.max_parallel_steps, entity_id=old.entity_id,
                # An operator's retry of a child run is a run of its own: no parent step waits for it.
                retry_of_run_id=old.id,
                expires_at=now + (old.expires_at - old.created_at) if old.expires_at else None,
                notifications=old.notifications, priority=old.priority)
            # The workflow's cap now, not the old version's; planned on the CPU thread.
            capped = old.workflow_id in await self.runner.capped(repo, [old])
            new = await self.runner.offload.run(
                creation.start_run, run, spec, caller.name, self.runner.limits, capped=capped,
                kept={s.step_ref: s for s in old_steps}, message=f"retry of {old.id}",
                data={"retry_of_run_id": old.id})
            await creation.insert(repo, [new], [])
            c = Changes(old, now, caller.name)
            c.event("run.retried", message=f"retried by {caller.name} as {run.id}", data={"run_id": run.id})
            await repo.save([c])
        self.runner.after_commit([new.changes, c])
        return new.run

    async def bulk_cancel(self, run_ids: Sequence[str], caller: Caller) -> tuple[int, int]:
        return await self._bulk(run_ids, caller, lambda c, steps, _: ops.cancel_run(c, steps))

    async def bulk_replay(self, run_ids: Sequence[str], caller: Caller) -> tuple[int, int]:
        return await self._bulk(run_ids, caller, lambda c, steps, _: ops.replay_run(c, steps))

    async def _bulk(self, run_ids: Sequence[str], caller: Caller, op: Operation[None]) -> tuple[int, int]:
        """Best effort per id, each in its own transaction: one id's failure never stops the rest."""
        # At most Limits.max_bulk_ids per request (the API refuses more first), so one call
        # stays one short burst.
        most = self.runner.limits.max_bulk_ids
        if len(run_ids) > most:
            raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "TOO_MANY_IDS",
                                f"at most {most} workflow_run_ids per request")
        done = failed = 0
        for run_id in dict.fromkeys(run_ids):
            try:
                await self.units.mutate(run_id, caller, op)
                done += 1
            except ConveyorError:
                failed += 1
        return done, failed
