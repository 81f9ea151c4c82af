"""Changes: the one way a unit of work changes a run and its steps.

Every status change goes through `Changes.run_to` / `Changes.step_to`, which check the
transition table, stamp timestamps, append exactly one RunEvent with the next seq, and remember
each record's status as loaded so storage can apply the change as a compare-and-set.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import EventRecord, RunRecord, StepRecord
from conveyor.domain.states import (
    FINAL_RUN,
    FINAL_STEP,
    RunStatus,
    StepStatus,
    can_run,
    can_step,
    run_event_type,
    step_event_type,
)


class Changes:
    """The pending changes of one run within one transaction."""

    def __init__(self, run: RunRecord, now: datetime, actor: str) -> None:
        self.run = run
        self.now = now
        self.actor = actor
        # Status of the run as loaded, for the compare-and-set; None while untouched.
        self.run_loaded_status: RunStatus | None = None
        # Steps touched in this unit, by id, with the status each had when loaded.
        self.steps: dict[str, StepRecord] = {}
        self.step_loaded_status: dict[str, StepStatus] = {}
        self.events: list[EventRecord] = []
        # Steps whose task lease this unit revoked: workers holding them must be told.
        self.revoked: list[StepRecord] = []

    @property
    def dirty(self) -> bool:
        return self.run_loaded_status is not None or bool(self.steps) or bool(self.events)

    @property
    def left_running(self) -> bool:
        """True when the run held a concurrency slot when loaded and no longer does."""
        return self.run_loaded_status == RunStatus.RUNNING and self.run.status != RunStatus.RUNNING

    def touch_run(self) -> None:
        """Mark the run as changed without a status change (wake_at, output…)."""
        if self.run_loaded_status is None:
            self.run_loaded_status = self.run.status
        self.run.updated_at = self.now

    def touch_step(self, step: StepRecord) -> None:
        """Mark a step as changed without a status change (deps_completed…)."""
        if step.id not in self.steps:
            self.steps[step.id] = step
            self.step_loaded_status[step.id] = step.status
        step.updated_at = self.now

    def event(self, type_: str, *, step_ref: str = "", status: str = "", message: str = "",
              data: dict[str, Any] | None = None, actor: str | None = None) -> EventRecord:
        """Append one event with the run's next seq."""
        self.touch_run()
        self.run.last_seq += 1
        ev = EventRecord(
            workflow_run_id=self.run.id, seq=self.run.last_seq, project_id=self.run.project_id,
            type=type_, at=self.now, step_ref=step_ref, status=status, message=message,
            data=data, actor=self.actor if actor is None else actor,
        )
        self.events.append(ev)
        return ev

    def run_to(self, status: RunStatus, message: str = "", data: dict[str, Any] | None = None) -> None:
        """Move the run to `status` (checked against the table) and record the event."""
        run = self.run
        if not can_run(run.status, status):
            raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "INVALID_TRANSITION",
                                f"run cannot go from {run.status} to {status}")
        self.touch_run()
        if status == RunStatus.RUNNING and run.started_at is None:
            run.started_at = self.now
        if status in FINAL_RUN:
            run.finished_at = self.now
            run.wake_at = None
        elif run.status in FINAL_RUN:
            run.finished_at = None
            run.error = ""
        run.status = status
        run.status_message = message
        self.event(run_event_type(status), status=status, message=message, data=data)

    def step_to(self, step: StepRecord, status: StepStatus, message: str = "",
                data: dict[str, Any] | None = None) -> None:
        """Move a step to `status` (checked against the table) and record the event."""
        if not can_step(step.status, status):
            raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "INVALID_TRANSITION",
                                f"step {step.step_ref!r} cannot go from {step.status} to {status}")
        self.touch_step(step)
        if status == StepStatus.RUNNING:
            step.started_at = self.now
            step.finished_at = None
        if status in (StepStatus.QUEUED, StepStatus.PENDING):
            step.finished_at = None  # queued again (retry, reset): no longer finished
        if status in FINAL_STEP:
            step.finished_at = self.now
            step.due_at = None
            step.ready_at = None
            if step.lease_expires_at is not None:
                step.lease_expires_at = None
                self.revoked.append(step)
        step.status = status
        self.event(step_event_type(status), step_ref=step.step_ref, status=status,
                   message=message, data=data)
