"""Step use cases: list a run's steps and the operator actions on one step (SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conveyor.domain import fanout
from conveyor.domain import operations as ops
from conveyor.domain.kinds import Start, kind_of
from conveyor.domain.records import Caller, StepRecord
from conveyor.engine.clock import Clock
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.units import RunUnits


@dataclass(frozen=True)
class StepsPage:
    """One page of a run's steps, with the item counts of the map steps on it."""

    items: list[StepRecord]
    next_token: str
    # {total, completed, failed, running} by map step id (SPEC §2.1).
    progress: dict[str, dict[str, int]]


class StepService:
    """Reads and operator actions on step runs."""

    def __init__(self, store: Store, clock: Clock, runner: Runner) -> None:
        self.store = store
        self.units = RunUnits(store, clock, runner)

    async def list(self, run_id: str, limit: int, token: str, caller: Caller,
                   parent_ref: str | None = None) -> StepsPage:
        """A run's steps (with `parent_ref`, the items of that map step), in position order."""
        async with self.store.read() as repo:
            await repo.get_run(run_id, caller.project)  # NOT_FOUND outside the caller's scope
            page = await repo.list_steps(run_id, limit, token, parent_ref)
            maps = {s.id: s for s in page.items if kind_of(s.kind).start is Start.FAN_OUT}
            states = await repo.item_states(run_id, list(maps)) if maps else {}
        return StepsPage(page.items, page.next_token,
                         {i: fanout.progress(maps[i], items) for i, items in states.items()})

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
