"""The unit of work every run and step operation goes through.

`RunUnits.mutate` locks the run (row lock on PostgreSQL; SQLite's single writer already
serializes), loads its steps and spec, lets a pure domain operation change them through
`Changes`, saves the changes with their events in the same transaction, hands a freed
concurrency slot to the next pending run, and then nudges the runner. If the operation raises,
the transaction rolls back: nothing is half-applied; if its compare-and-set loses a race, it is
tried again on the new state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConcurrentChange, ConveyorError, ErrorKind
from conveyor.domain.records import Caller, StepRecord
from conveyor.domain.spec import WorkflowSpec
from conveyor.engine.clock import Clock
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner

T = TypeVar("T")
# Tries of an operation that keeps losing its compare-and-set before the caller is told.
_ATTEMPTS = 3
Operation = Callable[[Changes, list[StepRecord], WorkflowSpec], T]


class RunUnits:
    """Runs one operation on one run inside one write transaction."""

    def __init__(self, store: Store, clock: Clock, runner: Runner) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner

    async def mutate(self, run_id: str, caller: Caller, op: Operation[T]) -> T:
        """Apply `op` to the run and save what it changed; returns what `op` returned. A lost
        compare-and-set (another writer moved the run between our read and our write) runs the
        operation again on the new state; if it keeps losing, the caller gets ABORTED."""
        for _ in range(_ATTEMPTS):
            try:
                result, unit = await self._once(run_id, caller, op)
            except ConcurrentChange:
                continue
            self.runner.after_commit([unit])
            return result
        raise ConveyorError(ErrorKind.ABORTED, "CONCURRENT_CHANGE",
                            f"run {run_id!r} kept changing concurrently; try again")

    async def _once(self, run_id: str, caller: Caller, op: Operation[T]) -> tuple[T, Changes]:
        now = self.clock.now()
        async with self.store.write() as repo:
            run = await repo.get_run(run_id, caller.project, lock=True)
            steps = (await repo.steps_of([run.id]))[run.id]
            spec = (await self.runner.specs(repo, {run.workflow_version_id}))[run.workflow_version_id]
            capped = run.workflow_id in await self.runner.capped(repo, [run])
            c = Changes(run, now, caller.name, capped)
            result = await self.runner.offload.run(op, c, steps, spec)  # it may plan the run on
            await repo.save([c])
            await self.runner.wake_waiting(repo, [c], now)
        return result, c
