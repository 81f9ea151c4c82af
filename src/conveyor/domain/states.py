"""The one table of run and step states and their legal transitions.

Every status change anywhere (API operation, engine pass, worker report, timer) is checked
against these tables and applied as a compare-and-set on the stored status; no other module
spells a status string.
"""

from __future__ import annotations

import enum

from conveyor.domain.errors import invalid_transition


class RunStatus(enum.StrEnum):
    """A run's lifecycle state; values are the wire spellings of seed 003."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"


class StepStatus(enum.StrEnum):
    """A step run's lifecycle state; values are the wire spellings of seed 003."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    SKIPPED = "skipped"


R, S = RunStatus, StepStatus

FINAL_RUN: frozenset[RunStatus] = frozenset({R.COMPLETED, R.FAILED, R.TIMED_OUT, R.CANCELED})
ACTIVE_RUN: frozenset[RunStatus] = frozenset({R.PENDING, R.RUNNING, R.PAUSED})

# A run reopened by a step retry or a subtree replay goes from any final state back to running,
# or to pending when its workflow caps concurrent runs (it then waits for a slot).
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    R.PENDING: frozenset({R.RUNNING, R.PAUSED, R.CANCELED, R.TIMED_OUT}),
    R.RUNNING: frozenset({R.PAUSED, R.COMPLETED, R.FAILED, R.TIMED_OUT, R.CANCELED}),
    R.PAUSED: frozenset({R.RUNNING, R.PENDING, R.CANCELED, R.TIMED_OUT}),
    R.COMPLETED: frozenset({R.RUNNING, R.PENDING}),
    R.FAILED: frozenset({R.RUNNING, R.PENDING}),
    R.TIMED_OUT: frozenset({R.RUNNING, R.PENDING}),
    R.CANCELED: frozenset({R.RUNNING, R.PENDING}),
}

# Steps "done" for their dependents: completed, or skipped (see SPEC §2 for how a skip by a
# false `when` propagates differently from an operator skip; the planner tells them apart by
# skip_reason).
DONE_STEP: frozenset[StepStatus] = frozenset({S.COMPLETED, S.SKIPPED})
FINAL_STEP: frozenset[StepStatus] = frozenset(
    {S.COMPLETED, S.FAILED, S.TIMED_OUT, S.CANCELED, S.SKIPPED})
UNFINISHED_STEP: frozenset[StepStatus] = frozenset(
    {S.PENDING, S.QUEUED, S.RUNNING, S.WAITING})
# Steps that occupy one of the run's max_parallel_steps slots.
SLOT_STEP: frozenset[StepStatus] = frozenset({S.RUNNING, S.WAITING})

_ALL_STEP = frozenset(S)
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    # Any step may be reset to pending by a subtree replay; the rest is the forward lifecycle
    # plus operator moves (skip, force-complete, cancel) and retries (back to queued). A pending
    # or queued step may also reach waiting or failed directly: an in-engine step started and
    # stopped by one transaction records only where it ended (see domain/changes.py), and a
    # `when` that cannot be evaluated fails its step before it is queued. A pending step may be
    # recorded running too: a `workflow` step queued and started with its child in one pass.
    S.PENDING: frozenset({S.QUEUED, S.SKIPPED, S.CANCELED, S.COMPLETED, S.WAITING, S.FAILED, S.RUNNING}),
    S.QUEUED: frozenset({S.RUNNING, S.SKIPPED, S.CANCELED, S.COMPLETED, S.PENDING, S.TIMED_OUT,
                         S.WAITING, S.FAILED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.TIMED_OUT, S.WAITING, S.QUEUED, S.CANCELED,
                          S.SKIPPED, S.PENDING}),
    # A waiting step whose timeout passes is retried like any attempt (back to queued).
    S.WAITING: frozenset({S.COMPLETED, S.FAILED, S.TIMED_OUT, S.CANCELED, S.SKIPPED, S.PENDING,
                          S.QUEUED}),
    S.COMPLETED: frozenset({S.PENDING}),
    S.FAILED: frozenset({S.QUEUED, S.COMPLETED, S.SKIPPED, S.PENDING}),
    S.TIMED_OUT: frozenset({S.QUEUED, S.COMPLETED, S.SKIPPED, S.PENDING}),
    S.CANCELED: frozenset({S.QUEUED, S.COMPLETED, S.SKIPPED, S.PENDING}),
    S.SKIPPED: frozenset({S.COMPLETED, S.PENDING}),
}


class RunOp(enum.StrEnum):
    """Run-level operations of SPEC §3."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    RETRY = "retry"
    REPLAY = "replay"


class StepOp(enum.StrEnum):
    """Step-level operations of SPEC §3."""

    APPROVE = "approve"
    INPUT = "input"
    SKIP = "skip"
    FORCE_COMPLETE = "force-complete"
    RETRY = "retry"


# The run states in which each run operation is allowed (SPEC §3 table).
RUN_OP_ALLOWED: dict[RunOp, frozenset[RunStatus]] = {
    RunOp.CANCEL: ACTIVE_RUN,
    RunOp.PAUSE: frozenset({R.PENDING, R.RUNNING}),
    RunOp.RESUME: frozenset({R.PAUSED}),
    RunOp.RETRY: frozenset({R.FAILED, R.TIMED_OUT, R.CANCELED}),
    # Bulk replay re-runs a finished run in place, every step from the start.
    RunOp.REPLAY: FINAL_RUN,
}

# The step states in which each step operation is allowed, and the state it leads to.
STEP_OP_ALLOWED: dict[StepOp, frozenset[StepStatus]] = {
    StepOp.APPROVE: frozenset({S.WAITING}),
    StepOp.INPUT: frozenset({S.WAITING}),
    StepOp.SKIP: _ALL_STEP - {S.COMPLETED, S.SKIPPED},
    StepOp.FORCE_COMPLETE: _ALL_STEP - {S.COMPLETED},
    StepOp.RETRY: frozenset({S.FAILED, S.TIMED_OUT, S.CANCELED}),
}
STEP_OP_TARGET: dict[StepOp, StepStatus] = {
    StepOp.APPROVE: S.COMPLETED,
    StepOp.INPUT: S.COMPLETED,
    StepOp.SKIP: S.SKIPPED,
    StepOp.FORCE_COMPLETE: S.COMPLETED,
    StepOp.RETRY: S.QUEUED,
}
# Step operations on a step of a finished run reopen the run (approve/input need a live run).
STEP_OP_RUN_ALLOWED: dict[StepOp, frozenset[RunStatus]] = {
    StepOp.APPROVE: frozenset({R.RUNNING, R.PAUSED}),
    StepOp.INPUT: frozenset({R.RUNNING, R.PAUSED}),
    StepOp.SKIP: frozenset(R) - {R.COMPLETED},
    StepOp.FORCE_COMPLETE: frozenset(R) - {R.COMPLETED},
    StepOp.RETRY: frozenset(R) - {R.PENDING},
}


def can_run(frm: RunStatus, to: RunStatus) -> bool:
    """True when a run may move from `frm` to `to`."""
    return to in RUN_TRANSITIONS[frm]


def can_step(frm: StepStatus, to: StepStatus) -> bool:
    """True when a step may move from `frm` to `to`."""
    return to in STEP_TRANSITIONS[frm]


def check_run_op(op: RunOp, status: RunStatus) -> None:
    """Raise INVALID_TRANSITION unless `op` is allowed on a run in `status`."""
    if status not in RUN_OP_ALLOWED[op]:
        raise invalid_transition(f"cannot {op} a run that is {status}")


def check_step_op(op: StepOp, step_status: StepStatus, run_status: RunStatus) -> None:
    """Raise INVALID_TRANSITION unless `op` is allowed on a step (and its run) in these states."""
    if step_status not in STEP_OP_ALLOWED[op]:
        raise invalid_transition(f"cannot {op} a step that is {step_status}")
    if run_status not in STEP_OP_RUN_ALLOWED[op]:
        raise invalid_transition(f"cannot {op} a step of a run that is {run_status}")


def run_event_type(status: RunStatus) -> str:
    """The RunEvent type recorded when a run enters `status`."""
    return f"run.{status}"


def step_event_type(status: StepStatus) -> str:
    """The RunEvent type recorded when a step enters `status`."""
    return f"step.{status}"
