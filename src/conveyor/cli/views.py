"""What each resource shows in tables and tab-separated rows: the columns of workflows, runs,
steps and run events, and the id `-o name` prints for each."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from conveyor.cli.output import Cell, Column, View, age, to_dict
from conveyor.v1 import resources_pb2 as pb

TERMINAL_RUN_STATUSES = frozenset({pb.RunStatus.completed, pb.RunStatus.failed, pb.RunStatus.timed_out,
                                   pb.RunStatus.canceled})


def run_status(run: Any) -> str:
    return str(pb.RunStatus.Value.Name(run.status))


def step_status(step: Any) -> str:
    return str(pb.StepStatus.Value.Name(step.status))


def when(message: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware datetime; None when unset."""
    if not message.HasField(name):
        return None
    return datetime.fromtimestamp(getattr(message, name).ToMicroseconds() / 1e6, UTC)


def duration(message: Any) -> str:
    """How long it ran: until it finished, or until now while it runs (340ms, 2.5s, 3m12s)."""
    started = when(message, "started_at")
    if started is None:
        return ""
    delta = (when(message, "finished_at") or datetime.now(UTC)) - started
    seconds = delta.total_seconds()
    # Most steps and many runs take well under a second: "0s" would say nothing.
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    return age(delta)


def _tags(tags: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _started(message: Any) -> Cell:
    return when(message, "started_at") or when(message, "created_at")


RUN = View(columns=[
    Column("ID", lambda r: r.id),
    Column("WORKFLOW", lambda r: r.workflow_name or r.workflow_id),
    Column("STATUS", run_status, status=True),
    Column("STARTED", _started),
    Column("DURATION", duration),
    Column("TRIGGERED BY", lambda r: r.triggered_by, wide=True),
    Column("PROJECT", lambda r: r.project_id, wide=True),
    Column("TAGS", lambda r: _tags(r.tags), wide=True),
    Column("MESSAGE", lambda r: r.error or r.status_message, wide=True),
], name=lambda r: r.id)

WORKFLOW = View(columns=[
    Column("ID", lambda w: w.id),
    Column("NAME", lambda w: w.name),
    Column("VERSION", lambda w: str(w.version)),
    Column("STEPS", lambda w: str(len(w.steps))),
    Column("SCHEDULE", lambda w: (w.schedule.cron + (" (paused)" if w.schedule_paused else ""))
           if w.HasField("schedule") and w.schedule.cron else ""),
    Column("UPDATED", lambda w: when(w, "updated_at")),
    Column("PROJECT", lambda w: w.project_id, wide=True),
    Column("CREATED BY", lambda w: w.created_by, wide=True),
    Column("ARCHIVED", lambda w: "yes" if w.archived else "", wide=True),
    Column("DESCRIPTION", lambda w: w.description, wide=True),
], name=lambda w: w.id)

STEP = View(columns=[
    Column("STEP", lambda s: s.step_ref),
    Column("KIND", lambda s: s.kind),
    Column("STATUS", step_status, status=True),
    Column("ATTEMPT", lambda s: str(s.attempt)),
    Column("STARTED", lambda s: when(s, "started_at")),
    Column("DURATION", duration),
    Column("QUEUE", lambda s: s.queue, wide=True),
    Column("WORKER", lambda s: s.worker_id, wide=True),
    Column("ID", lambda s: s.id, wide=True),
    Column("MESSAGE", lambda s: s.error or s.skip_reason or
           (f"approved by {s.approved_by}" if s.approved_by else ""), wide=True),
], name=lambda s: s.step_ref)

EVENT = View(columns=[
    Column("SEQ", lambda e: str(e.seq)),
    Column("AT", lambda e: when(e, "at"), clock=True),
    Column("TYPE", lambda e: e.type),
    Column("STEP", lambda e: e.step_ref),
    Column("STATUS", lambda e: e.status, status=True),
    Column("MESSAGE", lambda e: e.message),
    Column("ACTOR", lambda e: e.actor, wide=True),
    Column("DATA", lambda e: json.dumps(to_dict(e.data), separators=(",", ":")) if e.data.fields else "",
           wide=True),
], name=lambda e: str(e.seq))

API_KEY = View(columns=[
    Column("NAME", lambda k: k.name),
    Column("PROJECT", lambda k: k.project_id),
    Column("ROLE", lambda k: k.role),
    Column("TOKEN", lambda k: k.token_prefix + "…"),
    Column("CREATED", lambda k: when(k, "created_at")),
    Column("LAST USED", lambda k: when(k, "last_used_at")),
    Column("EXPIRES", lambda k: when(k, "expires_at"), clock=True),
    Column("REVOKED", lambda k: when(k, "revoked_at"), clock=True, wide=True),
    Column("RATE LIMIT", lambda k: str(k.rate_limit) if k.rate_limit else "", wide=True),
    Column("CREATED BY", lambda k: k.created_by, wide=True),
    Column("ID", lambda k: k.id, wide=True),
], name=lambda k: k.name)

AUDIT_ENTRY = View(columns=[
    Column("AT", lambda a: when(a, "at"), clock=True),
    Column("ACTOR", lambda a: a.actor),
    Column("METHOD", lambda a: a.method.rsplit("/", 1)[-1]),
    Column("RESOURCE", lambda a: a.resource_id),
    Column("CODE", lambda a: a.code),
    Column("REASON", lambda a: a.reason),
    Column("PROJECT", lambda a: a.project_id, wide=True),
    Column("MESSAGE", lambda a: a.message, wide=True),
], name=lambda a: a.id)

SECRET = View(columns=[
    Column("NAME", lambda s: s.name),
    Column("PROJECT", lambda s: s.project_id),
    Column("CREATED", lambda s: when(s, "created_at")),
    Column("UPDATED", lambda s: when(s, "updated_at")),
], name=lambda s: s.name)

PUBLISHED = View(columns=[
    Column("ID", lambda e: e.id),
    Column("NAME", lambda e: e.name),
    Column("KEY", lambda e: e.key),
    Column("RECEIVED", lambda e: when(e, "received_at"), clock=True),
    Column("STARTED", lambda e: str(e.started)),
    Column("RESUMED", lambda e: str(e.resumed)),
    Column("SKIPPED", lambda e: str(len(e.skipped)), wide=True),
    Column("PROJECT", lambda e: e.project_id, wide=True),
    Column("BY", lambda e: e.created_by, wide=True),
    Column("PAYLOAD", lambda e: json.dumps(to_dict(e.payload), separators=(",", ":"))
           if e.payload.fields else "", wide=True),
], name=lambda e: e.id)

COMMENT = View(columns=[
    Column("SEQ", lambda c: str(c.seq)),
    Column("AT", lambda c: when(c, "created_at"), clock=True),
    Column("BY", lambda c: c.created_by),
    Column("COMMENT", lambda c: c.content),
], name=lambda c: str(c.seq))
