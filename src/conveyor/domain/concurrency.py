"""Concurrency slots and the order of waiters (SPEC §3): a workflow's `max_concurrent_runs`, its
per-key cap `concurrency: {key, max_runs}`, and the trigger's `priority` and `start_at`.

A run that needs a slot waits `pending`; free slots go to the waiters with the highest priority,
then the oldest (the order of `slot_order`). With a per-key cap the key is rendered from the
run's payload once, when the run is created, and stored on it; each key has `max_runs` slots
of its own, so one busy key never holds up another. `max_concurrent_runs` applies on top.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation
from conveyor.domain.expressions import ExpressionError, find_templates, referenced_steps, render
from conveyor.domain.limits import Limits

MIN_PRIORITY, MAX_PRIORITY = -100, 100
# A rendered key is stored and indexed: longer ones are refused rather than cut (two keys cut
# to the same prefix would share their slots).
MAX_KEY_LENGTH = 200
# Written keys are templates, checked like any other; this only bounds the text itself.
MAX_KEY_TEMPLATE_LENGTH = 1000
MAX_RUNS_PER_KEY = 10_000
# How far ahead a run may be delayed.
MAX_START_DELAY = timedelta(days=366)

_KEYS = frozenset({"key", "max_runs"})
# A complete `{{ ... }}` (as expressions.py reads them): what is left once they are taken out
# must hold no "{{".
_TEMPLATE = re.compile(r"\{\{((?:(?!\}\}).)*)\}\}", re.DOTALL)
INVALID_CONCURRENCY_KEY = "INVALID_CONCURRENCY_KEY"


@dataclass(frozen=True)
class Concurrency:
    """A workflow's per-key cap: at most `max_runs` running runs per rendered `key`."""

    key: str
    max_runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "max_runs": self.max_runs}


@dataclass(frozen=True)
class Caps:
    """The slots of one workflow: `runs` over all its runs, `per_key` per concurrency key (0: none)."""

    runs: int = 0
    per_key: int = 0

    def __bool__(self) -> bool:
        return self.runs > 0 or self.per_key > 0


@dataclass(frozen=True)
class Waiter:
    """A pending run waiting for a slot, with what orders it among the others."""

    id: str
    key: str
    priority: int
    created_at: datetime

    @property
    def order(self) -> tuple[int, datetime, str]:
        return slot_order(self.priority, self.created_at, self.id)


def slot_order(priority: int, created_at: datetime, run_id: str) -> tuple[int, datetime, str]:
    """Highest priority first, then FIFO (the id breaks ties, as the indexes do)."""
    return (-priority, created_at, run_id)


def parse_concurrency(value: Any, limits: Limits) -> tuple[Concurrency | None, list[FieldViolation]]:
    """The `concurrency` field of a definition (None when absent), and what is wrong with it."""
    if value is None:
        return None, []
    if not isinstance(value, Mapping):
        return None, [FieldViolation("concurrency", "must be an object {key, max_runs}")]
    problems = [FieldViolation(f"concurrency.{k}", "unknown field") for k in value if k not in _KEYS]
    key: Any = value.get("key")
    if not isinstance(key, str) or not key.strip():
        problems.append(FieldViolation("concurrency.key",
                                       "required: a template such as '{{ payload.customer }}'"))
    elif len(key) > MAX_KEY_TEMPLATE_LENGTH:
        problems.append(FieldViolation("concurrency.key",
                                       f"must hold at most {MAX_KEY_TEMPLATE_LENGTH} characters"))
    elif (problem := _key_problem(key, limits)) is not None:
        problems.append(FieldViolation("concurrency.key", problem))
    runs: Any = value.get("max_runs")
    if not _whole(runs) or not 1 <= runs <= MAX_RUNS_PER_KEY:
        problems.append(FieldViolation("concurrency.max_runs",
                                       f"must be a whole number from 1 to {MAX_RUNS_PER_KEY}"))
    if problems:
        return None, problems
    return Concurrency(key=key, max_runs=int(runs)), []


def _key_problem(key: str, limits: Limits) -> str | None:
    """Why a key template is not valid: a template that does not compile, an unclosed one, or
    one naming a step (the key is rendered at trigger, before any step ran)."""
    for expr in find_templates(key):
        try:
            refs = referenced_steps(expr, limits=limits)
        except ExpressionError as e:
            return f"invalid template: {e.message}"
        if refs:
            return f"the key is rendered at trigger, before any step; it cannot use steps.{sorted(refs)[0]}"
    if "{{" in _TEMPLATE.sub("", key):
        return "holds an unclosed '{{'"
    return None


def render_key(concurrency: Concurrency, context: Mapping[str, Any], limits: Limits) -> str:
    """The run's key: the template rendered over its context (payload, run). A key that fails to
    render, renders to nothing usable, or is too long fails the trigger: INVALID_ARGUMENT
    INVALID_CONCURRENCY_KEY naming the field."""
    try:
        value = render(concurrency.key, context, limits=limits)
    except ExpressionError as e:
        raise _bad_key(f"could not be rendered: {e}") from e
    if isinstance(value, bool):
        value = str(value).lower()
    elif _number(value):
        value = str(_plain(value))
    if not isinstance(value, str):
        raise _bad_key(f"must render to a string or a number, not {_kind(value)}")
    if not value:
        raise _bad_key("rendered empty")
    if "\x00" in value:
        raise _bad_key("must not hold NUL characters")
    if len(value) > MAX_KEY_LENGTH:
        raise _bad_key(f"rendered {len(value)} characters; at most {MAX_KEY_LENGTH} are allowed")
    return value


def check_priority(value: Any) -> int:
    """A trigger's priority: a whole number from -100 to 100 (INVALID_ARGUMENT otherwise)."""
    if not _whole(value) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_PRIORITY",
                            f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}",
                            violations=[FieldViolation("priority", "out of range")])
    return int(value)


def effective_start(start_at: datetime | None, now: datetime) -> datetime | None:
    """When a run asked to start at `start_at` starts: None (at once) for a time not after now;
    INVALID_ARGUMENT for one more than MAX_START_DELAY ahead."""
    if start_at is None or start_at <= now:
        return None
    if start_at - now > MAX_START_DELAY:
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_START_AT",
                            "start_at must be at most a year ahead",
                            violations=[FieldViolation("start_at", "more than a year ahead")])
    return start_at


def _bad_key(description: str) -> ConveyorError:
    return ConveyorError(ErrorKind.INVALID_ARGUMENT, INVALID_CONCURRENCY_KEY,
                         f"the workflow's concurrency.key {description}",
                         violations=[FieldViolation("concurrency.key", description)])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return _number(value) and float(value).is_integer()


def _plain(value: int | float) -> int | float:
    return int(value) if isinstance(value, float) and math.isfinite(value) and value.is_integer() else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, Mapping) else type(value).__name__
