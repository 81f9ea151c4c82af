"""Changes: the one way a unit of work changes a run and its steps.

Every status change goes through `Changes.run_to` / `Changes.step_to`, which check the
transition table, stamp timestamps, record the change as a RunEvent with the next seq, and
remember each record's fence as loaded so storage applies the change as a compare-and-set: a run
is fenced by (status, last_seq), a step by (status, attempt, lease_expires_at), so a stale save,
a report for an old attempt or an expiry racing a heartbeat changes nothing.

One event per state change, counted per unit of work: a state a record enters and leaves inside
the same transaction is never visible to anyone, so it is not recorded. A step that is queued,
started and finished by one planning pass gets one event (`step.completed`, with the attempt); a
run created and started by one transaction gets one (`run.running`). A failed attempt is never
folded away: the next attempt starts a new event, so every attempt stays visible (SPEC §4.4).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.feed import Key
from conveyor.domain.kinds import Start, kind_of
from conveyor.domain.records import EventRecord, RunFence, RunRecord, StepFence, StepRecord
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

# Statuses a record passes through on its way somewhere within one unit of work; a later change
# in the same unit replaces their event instead of adding one.
_TRANSIENT_RUN = frozenset({RunStatus.PENDING})
_TRANSIENT_STEP = frozenset({StepStatus.PENDING, StepStatus.QUEUED, StepStatus.RUNNING})


class Changes:
    """The pending changes of one run within one transaction."""

    def __init__(self, run: RunRecord, now: datetime, actor: str, capped: bool = False) -> None:
        self.run = run
        self.now = now
        self.actor = actor
        # The run's workflow caps concurrent runs: a run resumed or reopened waits for a slot.
        self.capped = capped
        # The run as loaded, for the compare-and-set; None while untouched.
        self.run_fence: RunFence | None = None
        # Steps touched in this unit, by id, with each one's fence as loaded.
        self.steps: dict[str, StepRecord] = {}
        self.step_fences: dict[str, StepFence] = {}
        self.events: list[EventRecord] = []
        # The event of this unit each record's last status change wrote, while it may still be
        # replaced (see the module docstring); keyed by step id, "" for the run.
        self._open_event: dict[str, tuple[EventRecord, str | None]] = {}
        # The run entered running in this unit (so it holds a concurrency slot now or held one).
        self._started = False
        # Leases this unit ended: (step, the attempt whose lease it was, holder, why). The
        # holder's own report ends its lease too (why ""); anything else is a revocation its
        # holder must be told about. The attempt and holder are taken as the lease ends, not
        # read from the step later: the unit may still change the step.
        self.revoked: list[tuple[StepRecord, int, str, str]] = []
        # Set while the holder of a lease reports it: its lease ends by its own report, which
        # is no revocation to tell it about.
        self.reporter: str | None = None
        # Queued steps of leased kinds whose slot is ready, with the feed key their lease
        # holders wait on (domain/kinds.py): those are woken after commit.
        self.announced: dict[str, tuple[StepRecord, Key]] = {}
        # Other runs this unit's changes concern, to be woken (not locked): a child run whose
        # step stopped waiting for it, a parent whose child run ended.
        self.signals: set[str] = set()
        # Steps whose running attempt this unit counted as lost (SPEC §4.3), for the metrics.
        self.lost: list[StepRecord] = []
        # Step rows this unit creates (a map's items): inserted, not compare-and-set, on save.
        self.added: dict[str, StepRecord] = {}

    @property
    def dirty(self) -> bool:
        return self.run_fence is not None or bool(self.steps) or bool(self.events)

    @property
    def run_loaded_status(self) -> RunStatus | None:
        return self.run_fence.status if self.run_fence is not None else None

    @property
    def left_running(self) -> bool:
        """True when the run held a concurrency slot (when loaded, or by starting in this unit)
        and no longer does."""
        held = self.run_loaded_status == RunStatus.RUNNING or self._started
        return held and self.run.status != RunStatus.RUNNING

    def touch_run(self) -> None:
        """Mark the run as changed without a status change (wake_at, output…)."""
        if self.run_fence is None:
            self.run_fence = self.run.fence or RunFence(self.run.status, self.run.last_seq)
        self.run.updated_at = self.now

    def touch_step(self, step: StepRecord) -> None:
        """Mark a step as changed without a status change (deps_completed…)."""
        if step.id not in self.steps:
            self.steps[step.id] = step
            self.step_fences[step.id] = step.fence or StepFence(step.status, step.attempt,
                                                                step.lease_expires_at)
        step.updated_at = self.now

    def add_step(self, step: StepRecord) -> None:
        """A step row this unit creates (a map's item), in the status it is created in."""
        self.added[step.id] = step
        self.touch_step(step)

    def pin(self, step: StepRecord) -> None:
        """Keep the step's last event of this unit as recorded: its next change records its own.
        For a reset that must stay visible (a map item run again in the unit that resets it
        would otherwise read as going from completed straight to running)."""
        self._open_event.pop(step.id, None)

    def announce(self, step: StepRecord, key: Key) -> None:
        """A queued step of a leased kind is ready for its lease holders, who wait on `key`."""
        self.announced[step.id] = (step, key)

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

    def describe(self, steps: Iterable[StepRecord] = ()) -> None:
        """Stamp every event of this unit with what a live view needs to apply it without a
        re-fetch (`data.change`): its step's (or, for a run event, the run's) fields as this
        unit leaves them. A view applying the events in seq order ends where the records are.
        `steps`: a new run's steps, which no transition touched."""
        by_ref = {s.step_ref: s for s in (*steps, *self.steps.values())}
        run = self.run
        run_change = {"status": str(run.status), "error": run.error, "message": run.status_message,
                      "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at)}
        for ev in self.events:
            if not ev.step_ref:
                change: dict[str, Any] = run_change
            elif (step := by_ref.get(ev.step_ref)) is not None:
                change = {"status": str(step.status), "attempt": step.attempt,
                          "deps_completed": step.deps_completed, "worker_id": step.worker_id,
                          "error": step.error[:_CHANGE_TEXT], "has_output": step.output is not None,
                          "started_at": _iso(step.started_at), "finished_at": _iso(step.finished_at)}
            else:
                continue
            ev.data = {**(ev.data or {}), "change": change}

    def opened(self, message: str = "", data: dict[str, Any] | None = None) -> None:
        """Record event 1 of a new run: it entered its first status."""
        status = self.run.status
        self._record("", None, run_event_type(status), status, "", message or self.run.status_message, data,
                     status in _TRANSIENT_RUN)

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
            if run.parent_workflow_run_id:
                self.signals.add(run.parent_workflow_run_id)  # its step takes the outcome
        elif run.status in FINAL_RUN:
            run.finished_at = None
            run.error = ""
        before = run.status
        run.status = status
        run.status_message = message
        self._started |= status == RunStatus.RUNNING
        self._record("", before, run_event_type(status), status, "", message, data, status in _TRANSIENT_RUN)

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
        if step.status == StepStatus.RUNNING and step.lease_expires_at is not None:
            # Any exit from running ends the attempt's lease: its holder is told and any report
            # it sends later fails the step's fence.
            step.lease_expires_at = None
            mine = self.reporter is not None and self.reporter == step.worker_id
            why = "" if mine else message or f"step {status}"
            self.revoked.append((step, step.attempt, step.worker_id, why))
        if step.status == StepStatus.RUNNING and kind_of(step.kind).start is Start.CHILD and step.job_run_id:
            self.signals.add(step.job_run_id)  # the child run it waited for is not awaited any more
        retry = status == StepStatus.QUEUED and bool(step.error)
        before = step.status
        step.status = status
        self._record(step.id, before, step_event_type(status), status, step.step_ref, message, data,
                     status in _TRANSIENT_STEP and not retry)

    def _record(self, key: str, before: str | None, type_: str, status: str, step_ref: str, message: str,
                data: dict[str, Any] | None, transient: bool) -> None:
        """Write the event of a status change, or fold it into this unit's open event of the
        same record when that one recorded a transient status, unless the fold would bring the
        record back to where it stood before that event (an attempt that fails back into the
        queue it started from is recorded, not folded away)."""
        opened = self._open_event.pop(key, None)
        if opened is not None and opened[1] != status:
            ev, before = opened
            # A new record's opening message (who started it, why) outlives a silent fold.
            ev.type, ev.status, ev.message = type_, status, message or (ev.message if before is None else "")
            ev.data = {**(ev.data or {}), **(data or {})} or None
        else:
            ev = self.event(type_, step_ref=step_ref, status=status, message=message, data=data)
        if transient:
            self._open_event[key] = (ev, before)


# An error's first characters travel in events' `change` (the step holds it whole).
_CHANGE_TEXT = 500


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None
