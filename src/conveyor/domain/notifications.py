"""Outbound notifications: which webhook URLs a run tells about which of its events, and what it
sends them (Cortex's `notificationRecipients`; README "Notifications").

Owns the notification shape a workflow definition or a trigger names (`{url, events}`) and its
validation as field violations, how a run's targets are merged (the workflow's, then the
trigger's), which of a unit of work's events become outbox entries (`outbox_entries`: pure, so
storage calls it inside the transaction that writes the events), the JSON body each entry
carries, and the HMAC-SHA256 signature receivers verify; and how a delivery recognises this
server's own webhooks: a target URL under the server's REST address (`own_webhook_token`), and a
webhook's refusal in a response (`conveyor_refusal`). Sending (I/O, retries, the clock) is the
engine's (engine/notify.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from conveyor.domain.egress import url_problem
from conveyor.domain.errors import ERROR_DOMAIN, FieldViolation, invalid
from conveyor.domain.families import Cause
from conveyor.domain.limits import Limits

if TYPE_CHECKING:  # records import the spec, which imports this module
    from conveyor.domain.records import EventRecord, RunRecord

__all__ = [
    "NOTIFY_EVENTS",
    "OutboxEntry",
    "check_notifications",
    "conveyor_refusal",
    "merge_targets",
    "outbox_entries",
    "own_webhook_token",
    "signature",
    "validated_notifications",
    "verify_signature",
]

# The run events a notification may ask for, with what each means to a receiver.
NOTIFY_EVENTS: dict[str, str] = {
    "run.completed": "the run completed",
    "run.failed": "the run failed",
    "run.timed_out": "the run passed its timeout",
    "run.canceled": "the run was canceled",
    "run.paused": "an operator paused the run",
    "step.waiting": "an approval or input step waits for a person",
    "step.failed": "a step failed for good (its retries, if any, used up)",
}
# Step kinds whose `waiting` is a person's turn; a delay also waits, but for time alone.
_PERSON_KINDS = frozenset({"approval", "input"})

# The run events that record deliveries (engine/notify.py writes them).
DELIVERED = "notification.delivered"
FAILED = "notification.failed"
ABANDONED = "notification.abandoned"

# The request headers of a delivery.
SIGNATURE_HEADER = "X-Conveyor-Signature"
DELIVERY_HEADER = "X-Conveyor-Delivery"
EVENT_HEADER = "X-Conveyor-Event"
# A receiver that honors it (a Conveyor webhook does) starts one run per delivery, however often
# an at-least-once delivery is sent; its value is the delivery id.
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Where a workflow's webhook URL lives under the server's REST address (webhooks_service.proto's
# path, before the token).
WEBHOOK_PATH = "/v1/webhooks/"
_DEFAULT_PORTS = {"http": 80, "https": 443}

_KEYS = frozenset({"url", "events"})


@dataclass
class OutboxEntry:
    """One notification to send: a row of the outbox, written with the event that causes it."""

    # "<run id>/<event seq>/<target index>": unique per (event, target), so a receiver can
    # de-duplicate at-least-once deliveries by it (it is also the X-Conveyor-Delivery header).
    id: str
    run_id: str
    project_id: str
    url: str
    event_type: str
    event_seq: int
    body: dict[str, Any]
    created_at: datetime
    # Attempts claimed so far, this one included once claimed (0 while only written).
    attempt: int = 0
    # The run that causes it as its family's loop rules see it (domain/families.py): filled in
    # by the notifier when it claims the entry, not stored.
    cause: Cause | None = None


def check_notifications(data: Any, path: str, limits: Limits,
                        violations: list[FieldViolation]) -> list[dict[str, Any]]:
    """The notification targets in `data` (the JSON list a definition or a trigger holds) in
    their stored form `[{"url", "events"}]`; every problem is appended to `violations`."""
    if data is None:
        return []
    if not isinstance(data, list | tuple):
        violations.append(FieldViolation(path, "must be a list"))
        return []
    if len(data) > limits.max_notifications:
        violations.append(FieldViolation(path, f"has {len(data)} notifications; at most "
                                               f"{limits.max_notifications} are allowed"))
        return []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            violations.append(FieldViolation(where, "must be an object"))
            continue
        for key in item:
            if key not in _KEYS:
                violations.append(FieldViolation(f"{where}.{key}", "unknown field"))
        url = item.get("url", "")
        if not isinstance(url, str) or not url:
            violations.append(FieldViolation(f"{where}.url", "required (an http or https URL)"))
            url = ""
        elif problem := _url_problem(url, limits):
            violations.append(FieldViolation(f"{where}.url", problem))
        events = item.get("events")
        names: list[str] = []
        if not isinstance(events, list | tuple) or not events:
            violations.append(FieldViolation(f"{where}.events", f"required: a list of event types "
                                                                f"({', '.join(NOTIFY_EVENTS)})"))
        else:
            for j, name in enumerate(events):
                if not isinstance(name, str) or name not in NOTIFY_EVENTS:
                    shown = name[:40] if isinstance(name, str) else type(name).__name__
                    known = ", ".join(NOTIFY_EVENTS)
                    violations.append(FieldViolation(f"{where}.events[{j}]",
                                                     f"unknown event {shown!r}; one of {known}"))
                elif name in names:
                    violations.append(FieldViolation(f"{where}.events[{j}]", f"duplicate event {name!r}"))
                else:
                    names.append(name)
        out.append({"url": url, "events": names})
    return out


def validated_notifications(data: Any, path: str, limits: Limits) -> list[dict[str, Any]]:
    """`check_notifications`, raising INVALID_ARGUMENT (INVALID_NOTIFICATION) on any problem."""
    violations: list[FieldViolation] = []
    targets = check_notifications(data, path, limits, violations)
    if violations:
        first = violations[0]
        raise invalid(f"invalid notifications: {first.field}: {first.description}", violations,
                      reason="INVALID_NOTIFICATION")
    return targets


def _url_problem(url: str, limits: Limits) -> str | None:
    if problem := url_problem(url, limits.max_url_length):
        return problem
    if "@" in urlsplit(url).netloc:
        # Credentials in a URL end up in logs and events; receivers check the signature instead.
        return "must not hold a user name or password"
    return None


def merge_targets(*groups: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The targets of several sources in order (the workflow's, then the trigger's), each one
    once; None when there are none (the run column stays NULL: no cost for runs without)."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for group in groups:
        for target in group or ():
            key = (target["url"], tuple(target["events"]))
            if key not in seen:
                seen.add(key)
                out.append({"url": target["url"], "events": list(target["events"])})
    return out or None


def outbox_entries(run: RunRecord, events: Sequence[EventRecord],
                   step_kinds: Mapping[str, str]) -> list[OutboxEntry]:
    """The notifications `events` (of `run`, as its unit of work saves them) cause: one per
    (event, target asking for its type). `step_kinds` maps the step refs of the events to their
    kinds (a delay's `waiting` is not a person's turn)."""
    targets = run.notifications
    if not targets:
        return []
    out: list[OutboxEntry] = []
    for ev in events:
        if ev.type not in NOTIFY_EVENTS:
            continue
        if ev.type == "step.waiting" and step_kinds.get(ev.step_ref) not in _PERSON_KINDS:
            continue
        for i, target in enumerate(targets):
            if ev.type not in target["events"]:
                continue
            ident = f"{run.id}/{ev.seq}/{i}"
            out.append(OutboxEntry(
                id=ident, run_id=run.id, project_id=run.project_id, url=target["url"], event_type=ev.type,
                event_seq=ev.seq, body=body_of(ident, run, ev), created_at=ev.at))
    return out


def body_of(ident: str, run: RunRecord, ev: EventRecord) -> dict[str, Any]:
    """The JSON a delivery POSTs: which run, which workflow and project, the event type, the
    run's status when it was recorded, when, and the event itself."""
    return {
        "id": ident,
        "type": ev.type,
        "workflow_run_id": run.id,
        "workflow_id": run.workflow_id,
        "workflow_name": run.workflow_name,
        "project_id": run.project_id,
        "status": str(run.status),
        "at": _rfc3339(ev.at),
        "event": {"seq": ev.seq, "type": ev.type, "step_ref": ev.step_ref, "status": ev.status,
                  "message": ev.message, "data": ev.data or {}, "at": _rfc3339(ev.at)},
    }


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Conveyor-Signature value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does (README has the same lines): recompute the HMAC over the raw body,
    compare in constant time, and refuse a timestamp too far from now (a replayed delivery)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance and hmac.compare_digest(expected, fields.get("v1", ""))


def own_webhook_token(url: str, bases: Iterable[str]) -> str | None:
    """The webhook token of `url` when it is one of this server's webhook URLs: the webhook path
    under one of `bases` (where REST clients reach this server: scheme, host and port compared,
    a base's path as prefix); None for any other URL."""
    try:
        target = urlsplit(url)
        origin = _origin(target)
    except ValueError:
        return None
    for base in bases:
        try:
            parts = urlsplit(base)
            if not parts.hostname or _origin(parts) != origin:
                continue
        except ValueError:
            continue
        prefix = parts.path.rstrip("/") + WEBHOOK_PATH
        if target.path.startswith(prefix):
            token = unquote(target.path[len(prefix):])
            if token and "/" not in token:
                return token
    return None


def _origin(parts: Any) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower().rstrip("."), parts.port or _DEFAULT_PORTS.get(scheme)


def conveyor_refusal(body: bytes) -> tuple[str, str] | None:
    """(reason, message) when a response body is a Conveyor server's error (the JSON its REST
    gateway answers: an ErrorInfo of our domain among `details`); None for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("details"), list):
        return None
    for detail in doc["details"]:
        if (isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo")
                and detail.get("domain") == ERROR_DOMAIN and isinstance(detail.get("reason"), str)):
            return detail["reason"], str(doc.get("message", ""))
    return None
