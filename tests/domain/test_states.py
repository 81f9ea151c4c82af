"""The state tables: complete, consistent with each other, and matching the SPEC §3 operations."""

from __future__ import annotations

import itertools

import pytest

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.states import (
    ACTIVE_RUN,
    DONE_STEP,
    FINAL_RUN,
    FINAL_STEP,
    RUN_OP_ALLOWED,
    RUN_TRANSITIONS,
    SLOT_STEP,
    STEP_OP_ALLOWED,
    STEP_OP_RUN_ALLOWED,
    STEP_OP_TARGET,
    STEP_TRANSITIONS,
    UNFINISHED_STEP,
    RunOp,
    RunStatus,
    StepOp,
    StepStatus,
    can_run,
    can_step,
    check_run_op,
    check_step_op,
    run_event_type,
    step_event_type,
)

R, S = RunStatus, StepStatus


def test_wire_spellings_are_the_seed_values() -> None:
    assert [s.value for s in RunStatus] == [
        "pending", "running", "paused", "completed", "failed", "timed_out", "canceled"]
    assert [s.value for s in StepStatus] == [
        "pending", "queued", "running", "waiting", "completed", "failed", "timed_out", "canceled",
        "skipped"]


def test_tables_cover_every_enum_member() -> None:
    assert set(RUN_TRANSITIONS) == set(RunStatus)
    assert set(STEP_TRANSITIONS) == set(StepStatus)
    assert set(RUN_OP_ALLOWED) == set(RunOp)
    assert set(STEP_OP_ALLOWED) == set(StepOp)
    assert set(STEP_OP_TARGET) == set(StepOp)
    assert set(STEP_OP_RUN_ALLOWED) == set(StepOp)


def test_run_states_split_into_active_and_final() -> None:
    assert set(RunStatus) == ACTIVE_RUN | FINAL_RUN
    assert not ACTIVE_RUN & FINAL_RUN
    assert {R.COMPLETED, R.FAILED, R.TIMED_OUT, R.CANCELED} == FINAL_RUN


def test_step_states_split_into_unfinished_and_final() -> None:
    assert set(StepStatus) == UNFINISHED_STEP | FINAL_STEP
    assert not UNFINISHED_STEP & FINAL_STEP
    assert {S.COMPLETED, S.SKIPPED} == DONE_STEP
    assert DONE_STEP <= FINAL_STEP
    assert SLOT_STEP <= UNFINISHED_STEP


@pytest.mark.parametrize("status", sorted(FINAL_RUN))
def test_a_final_run_only_reopens_to_running_or_pending(status: RunStatus) -> None:
    # Pending when its workflow caps concurrent runs: it waits for a slot like any other run.
    for target in RunStatus:
        assert can_run(status, target) is (target in (R.RUNNING, R.PENDING))


def test_no_state_transitions_to_itself() -> None:
    for status, targets in RUN_TRANSITIONS.items():
        assert status not in targets
    for step_status, step_targets in STEP_TRANSITIONS.items():
        assert step_status not in step_targets


def test_run_lifecycle_of_spec_section_3() -> None:
    assert can_run(R.PENDING, R.RUNNING)
    assert can_run(R.RUNNING, R.COMPLETED)
    assert can_run(R.RUNNING, R.PAUSED) and can_run(R.PAUSED, R.RUNNING)
    assert not can_run(R.PENDING, R.COMPLETED)
    assert not can_run(R.PAUSED, R.COMPLETED)
    for status in ACTIVE_RUN:
        assert can_run(status, R.CANCELED)


def test_every_step_can_be_reset_to_pending_by_a_replay() -> None:
    for status in set(StepStatus) - {S.PENDING}:
        assert can_step(status, S.PENDING), status


def test_can_run_and_can_step_mirror_the_tables() -> None:
    for frm, to in itertools.product(RunStatus, RunStatus):
        assert can_run(frm, to) is (to in RUN_TRANSITIONS[frm])
    for sfrm, sto in itertools.product(StepStatus, StepStatus):
        assert can_step(sfrm, sto) is (sto in STEP_TRANSITIONS[sfrm])


def test_run_operations_match_the_spec_table() -> None:
    assert RUN_OP_ALLOWED[RunOp.CANCEL] == {R.PENDING, R.RUNNING, R.PAUSED}
    assert RUN_OP_ALLOWED[RunOp.PAUSE] == {R.PENDING, R.RUNNING}
    assert RUN_OP_ALLOWED[RunOp.RESUME] == {R.PAUSED}
    assert RUN_OP_ALLOWED[RunOp.RETRY] == {R.FAILED, R.TIMED_OUT, R.CANCELED}


def test_step_operations_match_the_spec_table() -> None:
    assert STEP_OP_ALLOWED[StepOp.APPROVE] == {S.WAITING}
    assert STEP_OP_ALLOWED[StepOp.INPUT] == {S.WAITING}
    assert STEP_OP_ALLOWED[StepOp.SKIP] == set(StepStatus) - {S.COMPLETED, S.SKIPPED}
    assert STEP_OP_ALLOWED[StepOp.FORCE_COMPLETE] == set(StepStatus) - {S.COMPLETED}
    assert STEP_OP_ALLOWED[StepOp.RETRY] == {S.FAILED, S.TIMED_OUT, S.CANCELED}
    assert R.PENDING not in STEP_OP_RUN_ALLOWED[StepOp.RETRY]


def test_run_operations_lead_to_legal_transitions() -> None:
    targets = {RunOp.CANCEL: R.CANCELED, RunOp.PAUSE: R.PAUSED, RunOp.RESUME: R.RUNNING}
    for op, target in targets.items():
        for status in RUN_OP_ALLOWED[op]:
            assert can_run(status, target), (op, status)


@pytest.mark.parametrize("op", list(StepOp))
def test_step_operations_lead_to_legal_transitions(op: StepOp) -> None:
    for status in STEP_OP_ALLOWED[op]:
        assert can_step(status, STEP_OP_TARGET[op]), (op, status)


@pytest.mark.parametrize(("op", "status"), list(itertools.product(RunOp, RunStatus)))
def test_check_run_op_raises_exactly_outside_the_allowed_set(op: RunOp, status: RunStatus) -> None:
    if status in RUN_OP_ALLOWED[op]:
        check_run_op(op, status)
        return
    with pytest.raises(ConveyorError) as caught:
        check_run_op(op, status)
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert caught.value.reason == "INVALID_TRANSITION"
    assert str(status) in caught.value.message and str(op) in caught.value.message


@pytest.mark.parametrize("op", list(StepOp))
def test_check_step_op_raises_exactly_outside_the_allowed_sets(op: StepOp) -> None:
    for step_status, run_status in itertools.product(StepStatus, RunStatus):
        allowed = step_status in STEP_OP_ALLOWED[op] and run_status in STEP_OP_RUN_ALLOWED[op]
        if allowed:
            check_step_op(op, step_status, run_status)
            continue
        with pytest.raises(ConveyorError) as caught:
            check_step_op(op, step_status, run_status)
        assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
        assert caught.value.reason == "INVALID_TRANSITION"


def test_check_step_op_names_the_offending_state() -> None:
    with pytest.raises(ConveyorError, match="cannot approve a step that is running"):
        check_step_op(StepOp.APPROVE, S.RUNNING, R.RUNNING)
    with pytest.raises(ConveyorError, match="cannot approve a step of a run that is completed"):
        check_step_op(StepOp.APPROVE, S.WAITING, R.COMPLETED)


def test_event_types() -> None:
    assert run_event_type(R.TIMED_OUT) == "run.timed_out"
    assert step_event_type(S.SKIPPED) == "step.skipped"
