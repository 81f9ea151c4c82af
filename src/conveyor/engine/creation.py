"""Creating runs: the engine's half of the one way a run comes into being.

`start_run` builds a new run with the domain's `open_run` and, when it needs no concurrency
slot and is not delayed (`start_at`), plans it at once, outside any transaction, so a chain of
in-engine steps is written finished in the same insert. A failure while planning is contained
to that run: it is written failed with a generic error, and the traceback goes to the log.
`insert` writes a batch of new runs in the caller's transaction. Triggers, run retries,
schedules and child runs use both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from conveyor.domain.feed import keys_of
from conveyor.domain.limits import Limits
from conveyor.domain.new_runs import NewRun, open_run
from conveyor.domain.planner import fail_unplannable, plan
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.spec import WorkflowSpec
from conveyor.domain.states import RunStatus
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Repo

log = logging.getLogger(__name__)


def start_run(run: RunRecord, spec: WorkflowSpec, actor: str, limits: Limits, *, capped: bool,
              check_condition: bool = False, kept: Mapping[str, StepRecord] | None = None,
              message: str = "", data: dict[str, Any] | None = None) -> NewRun:
    """A new run (filled in by the caller, status pending), its steps and first events; planned
    already unless its workflow caps concurrent runs (`capped`: then the runner's slot
    accounting starts it) or it is delayed (the runner plans it once its `start_at` is due)."""
    pristine = dataclasses.replace(run)
    new = open_run(run, spec, actor, new_id, limits, check_condition=check_condition, kept=kept,
                   message=message, data=data)
    if new.run.status != RunStatus.PENDING or capped or new.run.wake_at != new.run.created_at:
        return new  # canceled by its condition, waiting for its start_at or for a slot
    try:
        plan(new.changes, new.steps, spec, limits=limits)
    except Exception:
        log.exception("planning new run %s raised; it is created failed", run.id)
        new = open_run(pristine, spec, actor, new_id, limits, kept=kept, message=message, data=data)
        fail_unplannable(new.changes, new.steps, 0)
    return new


async def insert(repo: Repo, runs: Sequence[NewRun], idempotency: list[dict[str, Any]]) -> None:
    """Write new runs with their steps, tags, events and idempotency records."""
    for n in runs:
        n.changes.describe(n.steps)
    await repo.insert_runs([n.run for n in runs], [s for n in runs for s in n.steps],
                           [e for n in runs for e in n.changes.events], idempotency)
    await repo.notify(keys_of([n.changes for n in runs]))
    # A child run that ended as it was created tells its parent.
    signals = {r for n in runs for r in n.changes.signals}
    if signals:
        await repo.signal(signals, runs[0].run.created_at)
