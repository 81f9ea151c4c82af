"""Step use cases: list a run's steps and the operator actions on one step (SPEC §3)."""

from __future__ import annotations

from typing import Any

from conveyor.domain import operations as ops
from conveyor.domain.records import Caller, Page, StepRecord
from conveyor.engine.clock import Clock
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.units import RunUnits


class StepService:
    """Reads and operator actions on step runs."""

    def __init__(self, store: Store, clock: Clock, runner: Runner) -> None:
        self.store = store
        self.units = RunUnits(store, clock, runner)

    async def list(self, run_id: str, limit: int, token: str, caller: Caller) -> Page[StepRecord]:
        async with self.store.read() as repo:
            await repo.get_run(run_id, caller.project)  # NOT_FOUND outside the caller's scope
            return await repo.list_steps(run_id, limit, token)

    async def approve(self, run_id: str, step_ref: str, comment: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller,
                                lambda c, steps, _: ops.approve_step(c, steps, step_ref, comment))

    async def submit_input(self, run_id: str, step_ref: str, data: dict[str, Any], caller: Caller) -> None:
        await self.units.mutate(run_id, caller,
                                lambda c, steps, _: ops.submit_input(c, steps, step_ref, data))

    async def skip(self, run_id: str, step_ref: str, reason: str, caller: Caller) -> None:
        await self.units.mutate(run_id, caller, lambda c, steps, _: ops.skip_step(c, steps, step_ref, reason))

    async def force_complete(self, run_id: str, step_ref: str, result: dict[str, Any],
                             caller: Caller) -> None:
        await self.units.mutate(run_id, caller,
                                lambda c, steps, _: ops.force_complete_step(c, steps, step_ref, result))

    async def retry(self, run_id: str, step_ref: str, caller: Caller) -> StepRecord:
        return await self.units.mutate(run_id, caller,
                                       lambda c, steps, spec: ops.retry_step(c, steps, spec, step_ref))

    async def replay_subtree(self, run_id: str, step_ref: str, caller: Caller) -> int:
        return await self.units.mutate(run_id, caller,
                                       lambda c, steps, spec: ops.replay_subtree(c, steps, spec, step_ref))
