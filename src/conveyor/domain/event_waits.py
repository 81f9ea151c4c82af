"""Waits for events (SPEC §9), derived from what a unit of work did to its steps: a step of a
kind that waits for events (its registry entry has `arrived`) starts waiting with its event's
name and rendered key, or stops waiting — having consumed an event, or not (timed out, canceled,
skipped, its run ended).

Pure: storage writes these as indexed rows (storage/event_waits.py) in the transaction of the
change, so a publish finds the runs to signal by (project, name, key), never by scanning runs.
A wait matches events received at or after its run was created and after the last event the
step consumed (so a step waiting again, replayed or retried, does not take the same event twice).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from conveyor.domain.kinds import kind_of
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.states import StepStatus


@dataclass(frozen=True)
class WaitChange:
    """A step started (`waiting`) or stopped waiting; `consumed`: the (received_at, id) of the
    event that completed it."""

    run_id: str
    step_id: str
    project_id: str
    name: str
    key: str
    since: datetime
    waiting: bool
    consumed: tuple[datetime, str] | None = None


def wait_changes(moves: Iterable[tuple[RunRecord, StepRecord, StepStatus | None]]) -> list[WaitChange]:
    """The waits these step moves (run, step as it is now, its status before; None: new) start
    or end."""
    out = []
    for run, step, before in moves:
        if kind_of(step.kind).arrived is None:
            continue
        now_waiting, was_waiting = step.status == StepStatus.WAITING, before == StepStatus.WAITING
        if now_waiting == was_waiting:
            continue
        config = step.input or {}
        consumed = _consumed(step) if was_waiting else None
        out.append(WaitChange(run.id, step.id, run.project_id, str(config.get("event", "")),
                              str(config.get("key", "")), run.created_at, now_waiting, consumed))
    return out


def _consumed(step: StepRecord) -> tuple[datetime, str] | None:
    """The event a step that stopped waiting completed with (its output is the event)."""
    out = step.output or {}
    if step.status != StepStatus.COMPLETED or not isinstance(out.get("id"), str):
        return None
    try:
        return datetime.fromisoformat(str(out.get("received_at"))), out["id"]
    except ValueError:
        return None  # force-completed with an output of the operator's
