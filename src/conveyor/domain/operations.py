"""Operator actions on runs and steps (SPEC §3 table), as pure functions over Changes.

Each checks the state table first and changes nothing when the action is not allowed
(INVALID_TRANSITION); the engine loads the run under its lock, calls one of these and saves.
Actions that leave work for the engine set the run's wake_at to now.
"""

from __future__ import annotations

from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind, invalid_transition, not_found
from conveyor.domain.planner import CONDITION_FALSE, finish_run
from conveyor.domain.records import StepRecord
from conveyor.domain.spec import StepKind, WorkflowSpec
from conveyor.domain.states import (
    FINAL_RUN,
    RunOp,
    RunStatus,
    StepOp,
    StepStatus,
    check_run_op,
    check_step_op,
)


def _follow_up(c: Changes) -> None:
    """Ask the engine to look at the run at once."""
    c.run.wake_at = c.now
    c.touch_run()


def cancel_run(c: Changes, steps: list[StepRecord]) -> None:
    """Run → canceled; unfinished steps → canceled (their leases revoked)."""
    check_run_op(RunOp.CANCEL, c.run.status)
    finish_run(c, steps, RunStatus.CANCELED, f"canceled by {c.actor}", "")


def pause_run(c: Changes) -> None:
    """Run → paused: the engine starts no new step until it is resumed."""
    check_run_op(RunOp.PAUSE, c.run.status)
    c.run_to(RunStatus.PAUSED, f"paused by {c.actor}")


def resume_run(c: Changes) -> None:
    """Run → running, or → pending when its workflow caps concurrent runs (the engine then
    starts it when a slot is free)."""
    check_run_op(RunOp.RESUME, c.run.status)
    c.run_to(_live_status(c), f"resumed by {c.actor}")
    _follow_up(c)


def _live_status(c: Changes) -> RunStatus:
    """Where a run that goes on again goes: running, or pending when it needs a slot first."""
    return RunStatus.PENDING if c.capped else RunStatus.RUNNING


def find_step(steps: list[StepRecord], ref: str) -> StepRecord:
    """The step `ref` names. A map's item (`ref[i]`) is steered only while its map runs: once
    the map has ended, its items are settled with it (retry or replay the map instead)."""
    for s in steps:
        if s.step_ref == ref:
            if s.parent_step_id:
                parent = next(p for p in steps if p.id == s.parent_step_id)
                if parent.status != StepStatus.RUNNING:
                    raise invalid_transition(f"step {ref!r} is an item of map {parent.step_ref!r}, which is "
                                             f"{parent.status}: retry or replay the map")
            return s
    raise not_found("step", ref)


def find_step_by_id(steps: list[StepRecord], step_id: str) -> StepRecord:
    for s in steps:
        if s.id == step_id:
            return s
    raise not_found("task", step_id)


def _reopen(c: Changes, steps: list[StepRecord], target: StepRecord | None = None) -> None:
    """Reopen a finished run for an operation on one of its steps. The steps its end canceled
    (steps are only ever canceled by their run ending) become pending again, so the run can go
    on; a deadline that ended it is spent, so the reopened run has none."""
    if c.run.status not in FINAL_RUN:
        return
    if c.run.status == RunStatus.TIMED_OUT:
        c.run.expires_at = None
    c.run_to(_live_status(c), f"reopened by {c.actor}")
    for step in steps:
        if step.status == StepStatus.CANCELED and step is not target:
            _reset(c, step)


def _check_kind(step: StepRecord, kind: StepKind, op: StepOp) -> None:
    if step.kind != kind:
        raise invalid_transition(f"cannot {op} step {step.step_ref!r}: it is a {step.kind} step, not {kind}")


def approve_step(c: Changes, steps: list[StepRecord], ref: str, comment: str) -> None:
    step = find_step(steps, ref)
    check_step_op(StepOp.APPROVE, step.status, c.run.status)
    _check_kind(step, StepKind.APPROVAL, StepOp.APPROVE)
    step.approved_by = c.actor
    step.output = {"approved_by": c.actor, "comment": comment}
    c.step_to(step, StepStatus.COMPLETED, f"approved by {c.actor}", data={"comment": comment})
    _follow_up(c)


def submit_input(c: Changes, steps: list[StepRecord], ref: str, data: dict[str, Any]) -> None:
    step = find_step(steps, ref)
    check_step_op(StepOp.INPUT, step.status, c.run.status)
    _check_kind(step, StepKind.INPUT, StepOp.INPUT)
    step.output = data
    c.step_to(step, StepStatus.COMPLETED, f"input from {c.actor}", data={"output": data})
    _follow_up(c)


def skip_step(c: Changes, steps: list[StepRecord], ref: str, reason: str) -> None:
    """An operator skip: the step counts as done and its dependents run normally."""
    step = find_step(steps, ref)
    check_step_op(StepOp.SKIP, step.status, c.run.status)
    _reopen(c, steps, step)
    step.skip_reason = reason or f"skipped by {c.actor}"
    if step.skip_reason == CONDITION_FALSE:
        # That reason is reserved for `when` skips, which propagate to dependents.
        step.skip_reason = f"{CONDITION_FALSE} (skipped by {c.actor})"
    c.step_to(step, StepStatus.SKIPPED, step.skip_reason)
    _follow_up(c)


def force_complete_step(c: Changes, steps: list[StepRecord], ref: str, result: dict[str, Any]) -> None:
    step = find_step(steps, ref)
    check_step_op(StepOp.FORCE_COMPLETE, step.status, c.run.status)
    _reopen(c, steps, step)
    step.output = result
    c.step_to(step, StepStatus.COMPLETED, f"force-completed by {c.actor}", data={"output": result})
    _follow_up(c)


def retry_step(c: Changes, steps: list[StepRecord], spec: WorkflowSpec, ref: str) -> StepRecord:
    """The same step runs again with attempt+1. Downstream steps skipped because of it (a false
    `when` it decided) are reset with it; steps its run's end canceled are reset by `_reopen`."""
    step = find_step(steps, ref)
    check_step_op(StepOp.RETRY, step.status, c.run.status)
    _reopen(c, steps, step)
    step.ready_at = None
    step.loss_streak = 0  # an operator's fresh start
    c.step_to(step, StepStatus.QUEUED, f"retried by {c.actor}")
    by_ref = {s.step_ref: s for s in steps}
    for child_ref in spec.descendants(ref)[1:]:
        child = by_ref[child_ref]
        if child.status == StepStatus.SKIPPED and child.skip_reason == CONDITION_FALSE:
            _reset(c, child)
    _follow_up(c)
    return step


def replay_subtree(c: Changes, steps: list[StepRecord], spec: WorkflowSpec, ref: str) -> int:
    """Reset the step and all its descendants to pending; returns how many were reset."""
    find_step(steps, ref)
    if c.run.status == RunStatus.PENDING:
        raise invalid_transition("cannot replay a subtree of a run that is pending")
    _reopen(c, steps)
    by_ref = {s.step_ref: s for s in steps}
    refs = spec.descendants(ref)
    for r in refs:
        _reset(c, by_ref[r])
    if not c.events:
        # Every step of the subtree was pending already: nothing changed state, but the
        # operation is still recorded with who asked for it.
        c.event("step.replayed", step_ref=ref, message=f"replayed by {c.actor}: nothing to reset")
    _follow_up(c)
    return len(refs)


def replay_run(c: Changes, steps: list[StepRecord]) -> None:
    """A finished run runs again in place: every step reset to pending, the run reopened."""
    check_run_op(RunOp.REPLAY, c.run.status)
    _reopen(c, steps)
    c.run.output = None
    for step in steps:
        _reset(c, step)
    _follow_up(c)


def _reset(c: Changes, step: StepRecord) -> None:
    step.output = None
    step.error = ""
    step.skip_reason = ""
    step.ready_at = step.due_at = None
    step.deps_completed = 0
    step.loss_streak = 0  # an operator's fresh start
    if step.status == StepStatus.PENDING:
        c.touch_step(step)
    else:
        c.step_to(step, StepStatus.PENDING, f"reset by {c.actor}")


def check_retryable_run(status: RunStatus) -> None:
    check_run_op(RunOp.RETRY, status)


def workflow_archived(name: str) -> ConveyorError:
    return ConveyorError(ErrorKind.FAILED_PRECONDITION, "WORKFLOW_ARCHIVED",
                         f"workflow {name!r} is archived: it takes no new runs")
