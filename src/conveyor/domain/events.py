"""Events (SPEC §9): what an event may be, how a repeated publish is recognised, and which of a
project's listening workflows an event starts.

Pure: storing events, finding the workflows that listen and creating their runs belong to the
engine (engine/events.py). An event is `{name, key?, payload?, id?}` in a project. Its name is
what `on_events` and `wait_event` steps name; its key (a customer, an order...) is what a wait
matches exactly and what a run it starts records as `entity_id`. A publish without an id gets a
new one; with one, publishing again is idempotent: the same body answers what the first publish
answered, another body is ALREADY_EXISTS IDEMPOTENCY_KEY_REUSED (as a trigger's key).

A workflow's `on_events: [{name, when?}]` starts one run per matching event: `when` is CEL over
`event` ({id, name, key, payload, received_at}) and nothing else. A `when` that fails to
evaluate, or a payload the workflow's variables refuse, skips that workflow only, with the
reason recorded on the event (`Skipped`).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.expressions import EVENT, ExpressionError, compile_event_expression, evaluate_bool
from conveyor.domain.limits import Limits, document_problem

# An event's name: what definitions spell in `on_events` and `wait_event` (dots, colons and
# slashes for namespaces: "payment.settled", "orders/created").
NAME_RULE = "a letter or digit, then up to 199 letters, digits, '_', '.', ':', '/' or '-'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")
# An id a client gives: printable ASCII without spaces (a UUID, "order-17:paid", a hash).
_ID = re.compile(r"[!-~]{1,200}")
# Workflows one event name may start runs of in a project (each a run in the publish's transaction).
MAX_LISTENERS = 100
# Triggers one workflow definition may hold.
MAX_ON_EVENTS = 20


@dataclass(frozen=True)
class EventTrigger:
    """One entry of a workflow's `on_events`: events of this name start a run, when `when`
    (CEL over `event`, empty: always) is true."""

    name: str
    when: str = ""


@dataclass(frozen=True)
class Skipped:
    """A listening workflow an event started no run of, and why."""

    workflow_id: str
    workflow_name: str
    reason: str


@dataclass(frozen=True)
class Event:
    """An event as stored and answered: what was published, when, and what it did."""

    project_id: str
    id: str
    name: str
    key: str
    payload: dict[str, Any]
    received_at: datetime
    # Waiting steps it completed, runs it started, listening workflows it started none of.
    resumed: int = 0
    started: int = 0
    skipped: tuple[Skipped, ...] = ()
    # Who published it (the key's name).
    created_by: str = ""
    # The body idempotency compares (request_hash); not shown.
    request_hash: str = field(default="", repr=False)

    def as_context(self) -> dict[str, Any]:
        """The event as CEL and a `wait_event` step's output see it."""
        return {"id": self.id, "name": self.name, "key": self.key, "payload": self.payload,
                "received_at": self.received_at.isoformat()}


def is_event_name(name: object) -> bool:
    """Whether `name` may name an event."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_publish(name: str, key: str, payload: Mapping[str, Any], ident: str, limits: Limits) -> None:
    """INVALID_ARGUMENT with a violation per problem unless the event may be published."""
    problems: list[FieldViolation] = []
    if not _NAME.fullmatch(name):
        problems.append(FieldViolation("name", f"must be {NAME_RULE}" if name else "required"))
    if len(key) > limits.max_id_length:
        problems.append(FieldViolation("key", f"is {len(key)} characters long; at most "
                                              f"{limits.max_id_length} are allowed"))
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in key):
        problems.append(FieldViolation("key", "must not contain control characters (NUL, line breaks...)"))
    if ident and not _ID.fullmatch(ident):
        problems.append(FieldViolation("id", "must be 1-200 printable ASCII characters without spaces"))
    problem = document_problem(dict(payload), limits.max_json_depth, limits.max_payload_bytes)
    if problem is not None:
        problems.append(FieldViolation("payload", problem))
    if problems:
        first = problems[0]
        raise invalid(f"invalid event: {first.field}: {first.description}", problems, reason="INVALID_EVENT")


def request_hash(name: str, key: str, payload: Mapping[str, Any]) -> str:
    """The body of a publish as idempotency compares it (the id and project are its identity)."""
    body = {"name": name, "key": key, "payload": payload}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def id_reused(ident: str) -> ConveyorError:
    return ConveyorError(ErrorKind.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED",
                         f"event id {ident!r} was already published with a different body")


def parse_on_events(data: Any, limits: Limits, problems: list[FieldViolation]) -> tuple[EventTrigger, ...]:
    """A definition's `on_events`, each problem appended to `problems` as a violation."""
    if data is None:
        return ()
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        problems.append(FieldViolation("on_events", "must be a list"))
        return ()
    if len(data) > MAX_ON_EVENTS:
        problems.append(FieldViolation("on_events", f"has {len(data)} entries; at most {MAX_ON_EVENTS}"))
        return ()
    out: list[EventTrigger] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(data):
        path = f"on_events[{i}]"
        if not isinstance(item, Mapping):
            problems.append(FieldViolation(path, "must be an object"))
            continue
        for unknown in sorted(set(item) - {"name", "when"}):
            problems.append(FieldViolation(f"{path}.{unknown}", "unknown field"))
        name, when = item.get("name", ""), item.get("when", "")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(FieldViolation(f"{path}.name", f"must be {NAME_RULE}" if name else "required"))
            continue
        if not isinstance(when, str):
            problems.append(FieldViolation(f"{path}.when", "must be a string"))
            continue
        if when:
            try:
                compile_event_expression(when, limits=limits)
            except ExpressionError as e:
                problems.append(FieldViolation(f"{path}.when", e.message))
                continue
        if (name, when) in seen:
            problems.append(FieldViolation(path, "repeats an earlier entry"))
            continue
        seen.add((name, when))
        out.append(EventTrigger(name, when))
    return tuple(out)


def starts(triggers: Sequence[EventTrigger], event: Event, limits: Limits) -> bool:
    """True when one of a workflow's `on_events` entries matches `event`. Raises
    ExpressionError (client-safe) when a `when` of that name fails to evaluate, unless an
    earlier entry already matched."""
    context = {EVENT: event.as_context()}
    for trigger in triggers:
        if trigger.name == event.name and (not trigger.when or evaluate_bool(trigger.when, context,
                                                                             limits=limits)):
            return True
    return False
