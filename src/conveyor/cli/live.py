"""What `conveyor watch` draws: a run and its steps kept current from WatchWorkflowRun, and a
project's runs kept current from WatchProjectRuns (or polling).

Owns the reducer (`RunView.apply`: one RunEvent applied to the run and its steps, saying when the
event lacks something the view needs so the caller re-fetches the step list), the steps' DAG
order (topological order of the definition's `depends_on`, ties in definition order), the rich
renderables of both live views, and the plain one-line-per-change text printed when stdout is
not a terminal. rich is imported only by the renderables.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.cli.output import STATUS_STYLES, to_dict
from conveyor.cli.views import TERMINAL_RUN_STATUSES, duration, run_status, step_status, when
from conveyor.v1 import resources_pb2 as pb

# Step statuses an attempt has not started in: a step leaving them for another status started
# an attempt, and the event must say which (its data's "attempt"), or the view re-fetches.
_NOT_STARTED = frozenset({pb.StepStatus.pending, pb.StepStatus.queued})
_FINAL_STEP = frozenset({pb.StepStatus.completed, pb.StepStatus.failed, pb.StepStatus.timed_out,
                         pb.StepStatus.canceled, pb.StepStatus.skipped})
# Fields an event's data may carry that the views show (RunEvent.data holds the changed fields of
# the step or run after the change; anything else in it, e.g. a step's output, is not drawn).
_STEP_FIELDS = ("attempt", "error", "worker_id", "job_run_id", "deps_completed", "deps_required",
                "skip_reason", "approved_by", "started_at", "finished_at")
_RUN_FIELDS = ("error", "status_message", "started_at", "finished_at", "workflow_version")


def dag_order(refs: Sequence[str], depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """`refs` in topological order of their dependencies; among steps ready at once, the one
    listed first goes first. Dependencies outside `refs` are ignored; a cycle (which a valid
    definition cannot have) keeps its steps in listed order at the end."""
    position = {ref: i for i, ref in enumerate(refs)}
    waiting_on = {ref: {d for d in depends_on.get(ref, ()) if d in position and d != ref} for ref in refs}
    dependents: dict[str, list[str]] = {ref: [] for ref in refs}
    for ref, deps in waiting_on.items():
        for dep in deps:
            dependents[dep].append(ref)
    ready = [(position[ref], ref) for ref, deps in waiting_on.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, ref = heapq.heappop(ready)
        order.append(ref)
        for later in dependents[ref]:
            waiting_on[later].discard(ref)
            if not waiting_on[later]:
                heapq.heappush(ready, (position[later], later))
    placed = set(order)
    return order + [ref for ref in refs if ref not in placed]


def definition_deps(workflow: Any) -> dict[str, list[str]]:
    """ref -> depends_on of a Workflow message's steps, in definition order."""
    return {s.ref: list(s.depends_on) for s in workflow.steps}


def _merge(message: Any, data: Mapping[str, Any], fields: Iterable[str]) -> None:
    from google.protobuf import json_format

    known = {k: data[k] for k in fields if k in data and data[k] is not None}
    if known:
        # A value of another shape than the field's leaves the field as it was.
        with contextlib.suppress(json_format.ParseError):
            json_format.ParseDict(known, message, ignore_unknown_fields=True)


def _enum(enum: Any, name: str) -> int | None:
    try:
        return int(enum.Value(name))
    except ValueError:
        return None


def clock(ts: Any) -> str:
    """A Timestamp as local wall-clock time, HH:MM:SS."""
    return datetime.fromtimestamp(ts.ToMicroseconds() / 1e6, UTC).astimezone().strftime("%H:%M:%S")


class RunView:
    """A run and its steps as the last applied snapshot and events leave them. `lock` guards
    them against the live display's refresh thread."""

    def __init__(self, snapshot: Any, depends_on: Mapping[str, Sequence[str]] | None = None) -> None:
        self.lock = threading.Lock()
        self.depends_on: dict[str, list[str]] = {k: list(v) for k, v in (depends_on or {}).items()}
        self.run = pb.WorkflowRun()
        self.steps: dict[str, Any] = {}
        self.order: list[str] = []
        self.seq = 0
        self.last_event = ""
        # Each step's last event message ("approved by ...", "retry in 2s"), shown when the step
        # itself says nothing more.
        self.messages: dict[str, str] = {}
        self.notice = ""  # shown under the table: a lost connection being resumed
        self.reset(snapshot)

    def reset(self, snapshot: Any) -> None:
        """Start over from a snapshot."""
        with self.lock:
            self.run.CopyFrom(snapshot.run)
            self.seq = snapshot.seq
            self._set_steps(snapshot.steps)

    def replace_steps(self, steps: Iterable[Any]) -> None:
        """Take a freshly listed step list (after an event that did not say enough)."""
        with self.lock:
            self._set_steps(steps)

    def _set_steps(self, steps: Iterable[Any]) -> None:
        self.steps = {}
        for s in steps:
            copy = pb.StepRun()
            copy.CopyFrom(s)
            self.steps[s.step_ref] = copy
        self.order = dag_order(list(self.steps), self.depends_on)

    @property
    def finished(self) -> bool:
        return self.run.status in TERMINAL_RUN_STATUSES

    @property
    def completed(self) -> bool:
        return self.run.status == pb.RunStatus.completed

    def apply(self, event: Any) -> bool:
        """Apply one event; False when it lacks what the view needs to show its effect (an
        unknown step, a step reset without a status, an attempt started without its number):
        the caller then re-fetches the step list."""
        with self.lock:
            self.seq = max(self.seq, event.seq)
            self.last_event = describe_event(event)
            data = to_dict(event.data) if event.data.fields else {}
            # The record's state as the event's unit left it (RunEvent.data.change) wins over
            # the event's own details: applying it in seq order ends where the record is.
            data = {**data, **(data.get("change") or {})}
            if event.type.startswith("run."):
                return self._apply_run(event, data)
            if event.type.startswith("step."):
                return self._apply_step(event, data)
            return True

    def _apply_run(self, event: Any, data: dict[str, Any]) -> bool:
        status = _enum(pb.RunStatus.Value, event.status) if event.status else None
        if status is None:
            return True  # a comment, a retry recorded on the old run: nothing drawn changes
        run = self.run
        run.status = status  # type: ignore[assignment]
        run.status_message = event.message
        run.updated_at.CopyFrom(event.at)
        if status == pb.RunStatus.running and not run.HasField("started_at"):
            run.started_at.CopyFrom(event.at)
        if status in TERMINAL_RUN_STATUSES:
            run.finished_at.CopyFrom(event.at)
            if status != pb.RunStatus.completed and not run.error:
                run.error = event.message
        else:
            run.ClearField("finished_at")
            run.error = ""
        _merge(run, data, _RUN_FIELDS)
        return True

    def _apply_step(self, event: Any, data: dict[str, Any]) -> bool:
        step = self.steps.get(event.step_ref)
        status = _enum(pb.StepStatus.Value, event.status) if event.status else None
        if step is None or status is None:
            return False  # a step this view does not know, or a replay that reset several
        before = step.status
        step.status = status
        self.messages[step.step_ref] = event.message
        if status in _NOT_STARTED:
            step.ClearField("finished_at")
            step.error = ""
        else:
            if before in _NOT_STARTED:
                step.started_at.CopyFrom(event.at)
                step.ClearField("finished_at")
            if status in _FINAL_STEP:
                step.finished_at.CopyFrom(event.at)
            if status in (pb.StepStatus.failed, pb.StepStatus.timed_out):
                step.error = str(data.get("error") or event.message)
            if status == pb.StepStatus.skipped:
                step.skip_reason = event.message
        _merge(step, data, _STEP_FIELDS)
        # An attempt started: the event must say which one, or the attempt shown would be stale.
        return not (before in _NOT_STARTED and status not in _NOT_STARTED
                    and status != pb.StepStatus.skipped and status != pb.StepStatus.canceled
                    and "attempt" not in data)

    # -- plain text (stdout not a terminal) ---------------------------------------------------

    def snapshot_lines(self) -> list[str]:
        """The run and each step in DAG order, one line each."""
        with self.lock:
            run = self.run
            lines = [f"run {run.id} ({run.workflow_name or run.workflow_id}): {run_status(run)}"
                     + (f" {duration(run)}" if run.HasField("started_at") else "")]
            for ref in self.order:
                lines.append("  " + _step_line(self.steps[ref], self.depends_on.get(ref, ()),
                                               self.messages.get(ref, "")))
            return lines

    def event_line(self, event: Any) -> str:
        """What one applied event changed, as one line."""
        with self.lock:
            at = clock(event.at)
            step = self.steps.get(event.step_ref) if event.step_ref else None
            if event.type.startswith("step.") and step is not None and event.status:
                return f"{at} {_step_line(step, (), event.message)}"
            if event.type.startswith("run.") and event.status and _enum(pb.RunStatus.Value, event.status) \
                    is not None:
                extra = f" {duration(self.run)}" if self.run.HasField("started_at") else ""
                message = f" - {event.message}" if event.message else ""
                return f"{at} run: {event.status}{extra}{message}"
            return f"{at} {describe_event(event)}"

    # -- rich (a terminal) ----------------------------------------------------------------------

    def renderable(self) -> Any:
        """The run's header line, its steps as a table in DAG order, and the last event."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        with self.lock:
            run = self.run
            status = run_status(run)
            header = Text.assemble(
                ("run ", "bold"), (run.id, "bold"), "  ",
                (run.workflow_name or run.workflow_id, "bold"),
                f" v{run.workflow_version}  " if run.workflow_version else "  ",
                (status, STATUS_STYLES.get(status, "")),
                f"  {duration(run)}" if run.HasField("started_at") else "")
            parts: list[Any] = [header]
            if run.error or run.status_message:
                parts.append(Text(run.error or run.status_message, style="red" if run.error else "dim"))
            table = Table(box=None, header_style="bold", pad_edge=False)
            for name in ("STEP", "KIND", "STATUS", "ATTEMPT", "DURATION", "NEEDS", "MESSAGE"):
                table.add_column(name, overflow="fold")
            for ref in self.order:
                s = self.steps[ref]
                st = step_status(s)
                table.add_row(ref, s.kind, Text(st, style=STATUS_STYLES.get(st, "")), str(s.attempt),
                              duration(s), ",".join(self.depends_on.get(ref, ())),
                              _step_message(s) or self.messages.get(ref, ""))
            parts += [Text(), table, Text()]
            footer = self.notice or f"seq {self.seq}" + (f": {self.last_event}" if self.last_event else "")
            parts.append(Text(footer, style="yellow" if self.notice else "dim"))
            return Group(*parts)


def _step_message(step: Any) -> str:
    if step.error:
        return str(step.error).splitlines()[0][:120]
    if step.skip_reason:
        return str(step.skip_reason)
    if step.approved_by:
        return f"approved by {step.approved_by}"
    return ""


def _step_line(step: Any, needs: Sequence[str], message: str = "") -> str:
    parts = [f"step {step.step_ref}: {step_status(step)}", f"attempt {step.attempt}"]
    if step.HasField("started_at"):
        parts.append(duration(step))
    if needs:
        parts.append("needs " + ",".join(needs))
    if message := _step_message(step) or message:
        parts.append(f"- {message}")
    return " ".join(parts)


def describe_event(event: Any) -> str:
    """An event in a few words: its type, step, status when the type does not say it, message."""
    parts = [event.type, event.step_ref, "" if event.type.endswith("." + event.status) else event.status,
             event.message]
    if event.type == "run.comment" and event.actor:
        parts.insert(1, f"by {event.actor}:")
    return " ".join(p for p in parts if p)


class ProjectView:
    """A project's runs, newest first, as the last listing and changes leave them."""

    # The most runs kept; the oldest finished ones go first.
    KEEP = 200

    def __init__(self, project: str, workflows: Sequence[str], statuses: Sequence[str]) -> None:
        self.lock = threading.Lock()
        self.project = project
        self.workflows = set(workflows)
        self.statuses = {_enum(pb.RunStatus.Value, s) for s in statuses}
        self.runs: dict[str, Any] = {}
        self.notice = ""

    def matches(self, run: Any) -> bool:
        """Whether a run passes the --workflow and --status filters."""
        if self.workflows and not ({run.workflow_id, run.workflow_name} & self.workflows):
            return False
        return not self.statuses or run.status in self.statuses

    def update(self, run: Any) -> bool:
        """Take a run as it is now; True when it changed what the view shows."""
        with self.lock:
            old = self.runs.get(run.id)
            if not self.matches(run):
                return self.runs.pop(run.id, None) is not None
            if old is not None and old.status == run.status and old.updated_at == run.updated_at:
                return False
            copy = pb.WorkflowRun()
            copy.CopyFrom(run)
            copy.ClearField("payload")
            copy.ClearField("output")
            self.runs[run.id] = copy
            self._trim()
            return True

    def replace(self, runs: Iterable[Any]) -> list[Any]:
        """Take a whole listing as the truth; the runs that are new or changed."""
        listed = [r for r in runs if self.matches(r)]
        changed = [r for r in listed if self.update(r)]
        with self.lock:
            ids = {r.id for r in listed}
            for run_id in [i for i in self.runs if i not in ids]:
                del self.runs[run_id]
        return changed

    def _trim(self) -> None:
        if len(self.runs) <= self.KEEP:
            return
        by_age = sorted(self.runs.values(), key=lambda r: (r.status not in TERMINAL_RUN_STATUSES,
                                                           r.created_at.ToMicroseconds()))
        for run in by_age[:len(self.runs) - self.KEEP]:
            del self.runs[run.id]

    def newest(self) -> list[Any]:
        with self.lock:
            return sorted(self.runs.values(), key=lambda r: (r.created_at.ToMicroseconds(), r.id),
                          reverse=True)

    def renderable(self, height: int) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        runs = self.newest()
        shown = runs[:max(1, height - 4)]
        count = f"  {len(runs)} runs" + (f", newest {len(shown)} shown" if len(shown) < len(runs) else "")
        title = Text.assemble(("project ", "bold"), (self.project or "(default)", "bold"), count)
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("ID", "WORKFLOW", "STATUS", "STARTED", "DURATION"):
            table.add_column(name, no_wrap=name == "ID", overflow="fold")
        now = datetime.now(UTC)
        from conveyor.cli.output import age

        for r in shown:
            st = run_status(r)
            started = when(r, "started_at") or when(r, "created_at")
            table.add_row(r.id, r.workflow_name or r.workflow_id, Text(st, style=STATUS_STYLES.get(st, "")),
                          age(now - started) + " ago" if started else "", duration(r))
        parts: list[Any] = [title, table]
        if self.notice:
            parts.append(Text(self.notice, style="yellow"))
        return Group(*parts)


def run_line(run: Any) -> str:
    """A project's run change as one line."""
    at = clock(run.updated_at) if run.HasField("updated_at") else datetime.now().strftime("%H:%M:%S")
    extra = f" {duration(run)}" if run.HasField("started_at") else ""
    return f"{at} {run.id} {run.workflow_name or run.workflow_id}: {run_status(run)}{extra}"
