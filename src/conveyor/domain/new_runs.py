"""New runs: the one way a run comes into being, whoever starts it (a trigger, a run retry, a
schedule or a `workflow` step's child run).

`open_run` takes the run record its caller filled in (status pending; who, what payload, which
version) and builds the rest: one step row per step of the spec in topological order (a retry
keeps the completed steps of the run it retries), the run's opening event, and, when the workflow
declares a `condition` the caller asked to check, the `canceled` outcome. With a per-key cap its
concurrency key is rendered here, once (domain/concurrency.py); a delayed run (`start_at`) is due
then. The engine then plans the new run in the same unit of work (`planner.plan`) when it needs
no concurrency slot and is not delayed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.concurrency import render_key
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.expressions import ExpressionError, evaluate_bool
from conveyor.domain.limits import Limits
from conveyor.domain.notifications import merge_targets
from conveyor.domain.planner import expression_context
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.spec import WorkflowSpec
from conveyor.domain.states import RunStatus, StepStatus

CONDITIONS_NOT_MET = "conditions not met"


@dataclass
class NewRun:
    """A run ready to be inserted: its record, its steps and the unit holding its first events."""

    run: RunRecord
    steps: list[StepRecord]
    changes: Changes


def open_run(run: RunRecord, spec: WorkflowSpec, actor: str, new_id: Callable[[], str], limits: Limits, *,
             check_condition: bool = False, kept: Mapping[str, StepRecord] | None = None,
             message: str = "", data: dict[str, Any] | None = None) -> NewRun:
    """Build a new run's steps and opening event. `kept` are completed steps (by ref) of an
    earlier run that the new one starts from. A false workflow condition, when checked, records
    the run as canceled with no steps; one that cannot be evaluated is FAILED_PRECONDITION; a
    concurrency key that cannot be rendered is INVALID_ARGUMENT INVALID_CONCURRENCY_KEY."""
    now = run.created_at
    if spec.concurrency is not None:
        run.concurrency_key = render_key(spec.concurrency, expression_context(run, []), limits)
    # The workflow's notification targets first, then those the caller gave the run (a trigger's,
    # or a retried run's own), each once.
    run.notifications = merge_targets(spec.notifications, run.notifications)
    c = Changes(run, now, actor)
    if check_condition and spec.condition and not _condition_holds(spec.condition, run, limits):
        run.status = RunStatus.CANCELED
        run.status_message = CONDITIONS_NOT_MET
        run.finished_at = now
        c.opened(message, data)
        return NewRun(run, [], c)
    run.wake_at = run.start_at if run.start_at is not None and run.start_at > now else now
    c.opened(message, data)
    steps = []
    for position, ref in enumerate(spec.topological_order()):
        s = spec.step(ref)
        old = (kept or {}).get(ref)
        step = StepRecord(
            id=new_id(), workflow_run_id=run.id, project_id=run.project_id, position=position,
            step_ref=ref, workflow_step_id=f"{run.workflow_version_id}/{ref}", kind=str(s.kind),
            status=StepStatus.PENDING, created_at=now, updated_at=now, queue=s.queue,
            deps_required=len(s.depends_on), priority=run.priority)
        if old is not None and old.status == StepStatus.COMPLETED:
            step.status, step.attempt, step.output = old.status, old.attempt, old.output
            step.started_at, step.finished_at = old.started_at, old.finished_at
        steps.append(step)
    return NewRun(run, steps, c)


def _condition_holds(condition: str, run: RunRecord, limits: Limits) -> bool:
    try:
        return evaluate_bool(condition, expression_context(run, []), limits=limits)
    except ExpressionError as e:
        raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "CONDITION_ERROR",
                            f"workflow condition could not be evaluated: {e}") from e
