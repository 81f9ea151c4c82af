"""The step kinds: one registry entry per `StepKind`, saying everything that differs by kind.

An entry owns a kind's config (the keys it accepts and their checks when a workflow is written),
how an attempt starts — run by the planner inside its pass (`Start.ENGINE`), leased by a holder
that reports it (`Start.LEASED`: external workers for `task`, the engine's http executor for
`http`), by starting a child run (`Start.CHILD`), or by spreading its items into item steps
whose ends end it (`Start.FAN_OUT`, `map`) — the key whose waiters learn that a leased
step is ready (domain/feed.py), what an in-engine attempt does, and what a WAITING step's timer
means. Leaving RUNNING ends the attempt's lease whatever the kind (changes.py); a child-run kind
also signals the child run it stops waiting for.

Everything else reads this table: spec.py (config parsing, secrets, queues), planner.py (which
steps it starts, which it announces, which the runner starts), changes.py (revocations), the
engine's executors. A new kind is one new entry (and, when leased, one executor in the engine).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from conveyor.domain.checks import (
    Problems,
    check_expression,
    check_templates,
    has_template,
    is_number,
    is_rfc3339,
    unknown_keys,
)
from conveyor.domain.egress import url_problem
from conveyor.domain.events import NAME_RULE, is_event_name
from conveyor.domain.expressions import EVENT, ExpressionError, evaluate, evaluate_bool
from conveyor.domain.feed import HTTP_KEY, Key, queue_key
from conveyor.domain.limits import Limits

if TYPE_CHECKING:
    from conveyor.domain.records import StepRecord
    from conveyor.domain.spec import StepSpec


class StepKind(enum.StrEnum):
    """What a step does (SPEC §2 step kinds)."""

    TASK = "task"
    HTTP = "http"
    APPROVAL = "approval"
    INPUT = "input"
    DELAY = "delay"
    CONDITION = "condition"
    WORKFLOW = "workflow"
    NOOP = "noop"
    MAP = "map"
    WAIT_EVENT = "wait_event"


class Start(enum.Enum):
    """Who starts (and ends) an attempt of a kind."""

    ENGINE = "engine"  # the planner, inside its pass: a chain of them finishes in one transaction
    LEASED = "leased"  # a lease holder: the planner gives the step a slot and announces it
    CHILD = "child"  # the runner, by creating a child run in the same unit (engine/children.py)
    # The planner spreads its items into item steps (`ref[i]`), each run as its inner step's kind;
    # it ends when they have (domain/fanout.py). It holds no slot of its own: its items do.
    FAN_OUT = "fan_out"


# -- what an in-engine attempt does --------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """What an in-engine attempt sees: its rendered config, its spec, the expression context
    (built on demand), the pass's time and limits."""

    config: dict[str, Any]
    spec: StepSpec
    context: Callable[[], dict[str, Any]]
    now: datetime
    limits: Limits


@dataclass(frozen=True)
class Done:
    """The attempt completed with this output."""

    output: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """The attempt failed (retried per the step's policy, when `retryable`)."""

    error: str
    retryable: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Waiting:
    """The step waits (WAITING) with this message, until `due_at` when given (else the
    attempt's timeout, if any), for an operator, or for its timer."""

    message: str
    due_at: datetime | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Spread:
    """A map's attempt: one item step per element of `items`, in order."""

    items: list[Any]


Outcome = Done | Failed | Waiting | Spread

# Why a map's `items` fail its attempt (SPEC §2.1), for good: the same render gives the same list.
MAP_ITEMS_INVALID = "MAP_ITEMS_INVALID"
TOO_MANY_ITEMS = "TOO_MANY_ITEMS"


def _noop(a: Attempt) -> Outcome:
    out = a.config.get("output", {})
    return Done(out if isinstance(out, dict) else {"value": out})


def _condition(a: Attempt) -> Outcome:
    try:
        return Done({"result": evaluate(str(a.spec.config["expression"]), a.context(), limits=a.limits)})
    except ExpressionError as e:
        return Failed(f"expression: {e}")


def _delay(a: Attempt) -> Outcome:
    until = _delay_until(a.config, a.now)
    if until is None:
        return Failed("delay: `seconds` or `until` did not resolve to a time")
    if until <= a.now:
        return Done({"until": until.isoformat()})
    return Waiting(f"until {until.isoformat()}", until, {"until": until.isoformat()})


def _delay_until(config: Mapping[str, Any], now: datetime) -> datetime | None:
    if "seconds" in config:
        try:
            return now + timedelta(seconds=float(config["seconds"]))
        except (TypeError, ValueError, OverflowError):
            return None
    try:
        until = datetime.fromisoformat(str(config.get("until", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return until if until.tzinfo is not None else None


def _delay_over(step: StepRecord) -> dict[str, Any]:
    return {"until": step.due_at.isoformat() if step.due_at else ""}


def _map(a: Attempt) -> Outcome:
    items = a.config.get("items")
    if not isinstance(items, list):
        return Failed(f"{MAP_ITEMS_INVALID}: items must be a JSON array, not {_json_type(items)}",
                      retryable=False, reason=MAP_ITEMS_INVALID)
    if len(items) > a.limits.max_map_items:
        return Failed(f"{TOO_MANY_ITEMS}: {len(items)} items, over the limit of {a.limits.max_map_items}",
                      retryable=False, reason=TOO_MANY_ITEMS)
    return Spread(items)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an object"


def _operator(a: Attempt) -> Outcome:
    """Approval and input wait for an operator (bounded by the attempt's timeout)."""
    return Waiting(str(a.config.get("message", "")))


def _wait_event(a: Attempt) -> Outcome:
    """A wait_event step waits for its event (SPEC §9), its key rendered now; the events that
    arrive are looked at by `_event_arrived` on the passes its signals cause."""
    key = a.config.get("key", "")
    if isinstance(key, int | float) and not isinstance(key, bool):
        key = str(int(key)) if float(key).is_integer() else str(key)
    if not isinstance(key, str):
        return Failed("config: key must render to a string")
    if len(key) > a.limits.max_id_length or any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        return Failed(f"config: key must render to at most {a.limits.max_id_length} characters "
                      "without control characters")
    a.config["key"] = key
    timeout = a.config.get("timeout_seconds")
    due = a.now + timedelta(seconds=float(timeout)) if timeout else None
    name = a.config["event"]
    return Waiting(f"event {name!r}" + (f" with key {key!r}" if key else ""), due,
                   {"event": name, "key": key})


def _event_arrived(step: StepRecord, arrived: list[dict[str, Any]], context: Callable[[], dict[str, Any]],
                   limits: Limits) -> Outcome | None:
    """The first of the events that arrived for a waiting wait_event step (oldest first) that
    its `match` accepts completes it with that event; a `match` that fails to evaluate fails
    the step; None when none matches (it waits on)."""
    match = (step.input or {}).get("match", "")
    for event in arrived:
        if match:
            try:
                if not evaluate_bool(match, {**context(), EVENT: event}, limits=limits):
                    continue
            except ExpressionError as e:
                return Failed(f"match: {e}")
        return Done(dict(event))
    return None


# -- config checks (when a workflow is written) --------------------------------------------------

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"})
# A header value as sent: a whole-string template keeps its JSON type when rendered.
_HEADER_SCALARS = (str, bool, int, float)


def http_problems(config: Mapping[str, Any], max_url_length: int,
                  rendered: bool) -> Iterator[tuple[str, str]]:
    """What is wrong with an http step's config, as (key, description): as written (`rendered`
    False: a value holding a `{{ }}` template is checked once rendered), or as rendered for the
    request. The one definition of an http config both times."""

    def later(value: Any) -> bool:
        return not rendered and has_template(value)

    url = config.get("url")
    if not isinstance(url, str) or not url.strip():
        yield "url", "required (a non-empty string)"
    elif not later(url) and (problem := url_problem(url, max_url_length)):
        yield "url", problem  # never quoting the URL: a rendered one may hold a secret
    method = config.get("method", "GET")
    if not isinstance(method, str):
        yield "method", "must be a string"
    elif not later(method) and method.upper() not in HTTP_METHODS:
        yield "method", f"must be one of {', '.join(sorted(HTTP_METHODS))}"
    headers = config.get("headers")
    if headers is not None:
        if not isinstance(headers, Mapping):
            yield "headers", "must be an object of strings"
        else:
            for name, value in headers.items():
                if not isinstance(value, _HEADER_SCALARS if rendered else str):
                    yield f"headers.{name}", "must be a string"
    if "timeout_seconds" in config:
        timeout = config["timeout_seconds"]
        if not is_number(timeout) or timeout <= 0:
            yield "timeout_seconds", "must be a number > 0"


def _check_http(config: dict[str, Any], path: str, problems: Problems) -> None:
    for key, problem in http_problems(config, problems.limits.max_url_length, rendered=False):
        problems.add(f"{path}.{key}", problem)
    method = config.get("method", "GET")
    if isinstance(method, str) and not has_template(method):
        config["method"] = method.upper()


def _optional(config: Mapping[str, Any], path: str, problems: Problems, key: str, kind: type,
              what: str) -> None:
    if key in config and not isinstance(config[key], kind):
        problems.add(f"{path}.{key}", f"must be {what}")


def _required_string(config: Mapping[str, Any], path: str, problems: Problems, key: str) -> str | None:
    value = config.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.add(f"{path}.{key}", "required (a non-empty string)")
        return None
    return value


def _check_approval(config: dict[str, Any], path: str, problems: Problems) -> None:
    _optional(config, path, problems, "message", str, "a string")


def _check_input(config: dict[str, Any], path: str, problems: Problems) -> None:
    _optional(config, path, problems, "message", str, "a string")
    _optional(config, path, problems, "schema", Mapping, "an object")


def _check_delay(config: dict[str, Any], path: str, problems: Problems) -> None:
    if sum(key in config for key in ("seconds", "until")) != 1:
        problems.add(path, "exactly one of seconds or until is required")
    if "seconds" in config:
        seconds = config["seconds"]
        if has_template(seconds):
            pass
        elif not is_number(seconds):
            problems.add(f"{path}.seconds", "must be a number or a {{ }} template")
        elif seconds < 0:
            problems.add(f"{path}.seconds", "must not be negative")
    if "until" in config:
        until = config["until"]
        if not isinstance(until, str) or not (has_template(until) or is_rfc3339(until)):
            problems.add(f"{path}.until", "must be an RFC 3339 timestamp or a {{ }} template")


def _check_condition(config: dict[str, Any], path: str, problems: Problems) -> None:
    expression = _required_string(config, path, problems, "expression")
    if expression is not None:
        check_expression(expression, f"{path}.expression", problems)


def _check_workflow(config: dict[str, Any], path: str, problems: Problems) -> None:
    _required_string(config, path, problems, "workflow_id")
    _optional(config, path, problems, "payload", Mapping, "an object")


def _check_wait_event(config: dict[str, Any], path: str, problems: Problems) -> None:
    if not is_event_name(config.get("event")):
        problems.add(f"{path}.event", f"required: {NAME_RULE}")
    if "key" in config and not isinstance(config["key"], str | int | float):
        problems.add(f"{path}.key", "must be a string (a {{ }} template) or a number")
    match = config.get("match")
    if match is not None:
        if not isinstance(match, str) or not match.strip():
            problems.add(f"{path}.match", "must be a CEL expression")
        else:
            check_expression(match, f"{path}.match", problems, events=True)
    if "timeout_seconds" in config:
        timeout = config["timeout_seconds"]
        if not is_number(timeout) or timeout <= 0:
            problems.add(f"{path}.timeout_seconds", "must be a number > 0")


# A map item's parallelism when the map does not say (SPEC §2.1).
DEFAULT_MAP_PARALLEL = 10


def _check_map(config: dict[str, Any], path: str, problems: Problems) -> None:
    items = config.get("items")
    if isinstance(items, list):
        if len(items) > problems.limits.max_map_items:
            problems.add(f"{path}.items", f"at most {problems.limits.max_map_items} items")
    elif not (isinstance(items, str) and has_template(items)):
        problems.add(f"{path}.items", "required: a JSON array or a {{ }} template that renders one")
    for key, least in (("max_parallel", 1), ("tolerate_failures", 0)):
        value = config.get(key, least)
        if not is_number(value) or not float(value).is_integer() or value < least:
            problems.add(f"{path}.{key}", f"must be a whole number >= {least}")
    if not isinstance(config.get("step"), Mapping):
        problems.add(f"{path}.step", "required: the step each item runs (an object)")


def map_parallel(config: Mapping[str, Any]) -> int:
    """How many of a map's items may run at once."""
    return int(config.get("max_parallel", DEFAULT_MAP_PARALLEL))


def _no_check(config: dict[str, Any], path: str, problems: Problems) -> None:
    pass


# -- the registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """One step kind's entry."""

    kind: StepKind
    start: Start
    # The config keys it accepts; None: free-form (a task's config is its worker's input).
    config_keys: frozenset[str] | None
    # Checks a config (a private copy, which it may normalise) when the workflow is written.
    check: Callable[[dict[str, Any], str, Problems], None] = _no_check
    # Its config templates may name `secrets.NAME` (SPEC §11): it goes out of the engine, to a
    # worker or in a request, when an attempt starts.
    secrets: bool = False
    # It names a `queue` (its workers lease from it); no other kind may.
    queued: bool = False
    # Start.ENGINE: what an attempt does with its rendered config.
    run: Callable[[Attempt], Outcome] | None = None
    # Start.LEASED: the feed key its lease holders wait on for a ready step.
    wake: Callable[[StepRecord], Key] | None = None
    # A WAITING step's `due_at` passed: the output it completes with; None: it timed out.
    timer_output: Callable[[StepRecord], dict[str, Any]] | None = None
    # A WAITING step of a kind that waits for events (SPEC §9): given the events that arrived
    # for it (oldest first, as `Event.as_context`), the context and limits, what comes of it
    # (None: it waits on). Its waits are indexed rows (storage/event_waits.py).
    arrived: Callable[[StepRecord, list[dict[str, Any]], Callable[[], dict[str, Any]], Limits],
                      Outcome | None] | None = None
    # The config keys rendered when an attempt starts; None: all of them.
    renders: frozenset[str] | None = None
    # The config key holding an inner step definition (spec.py parses it as a step), if any.
    inner: str | None = None


def _queue_of(step: StepRecord) -> Key:
    return queue_key(step.project_id, step.queue)


def _http(step: StepRecord) -> Key:
    return HTTP_KEY


KINDS: dict[StepKind, Kind] = {e.kind: e for e in (
    Kind(StepKind.TASK, Start.LEASED, None, secrets=True, queued=True, wake=_queue_of),
    Kind(StepKind.HTTP, Start.LEASED, frozenset({"url", "method", "headers", "body", "timeout_seconds"}),
         _check_http, secrets=True, wake=_http),
    Kind(StepKind.APPROVAL, Start.ENGINE, frozenset({"message"}), _check_approval, run=_operator),
    Kind(StepKind.INPUT, Start.ENGINE, frozenset({"message", "schema"}), _check_input, run=_operator),
    Kind(StepKind.DELAY, Start.ENGINE, frozenset({"seconds", "until"}), _check_delay, run=_delay,
         timer_output=_delay_over),
    Kind(StepKind.CONDITION, Start.ENGINE, frozenset({"expression"}), _check_condition, run=_condition),
    Kind(StepKind.WORKFLOW, Start.CHILD, frozenset({"workflow_id", "payload"}), _check_workflow),
    Kind(StepKind.NOOP, Start.ENGINE, frozenset({"output"}), run=_noop),
    Kind(StepKind.MAP, Start.FAN_OUT, frozenset({"items", "max_parallel", "tolerate_failures", "step"}),
         _check_map, run=_map, renders=frozenset({"items"}), inner="step"),
    Kind(StepKind.WAIT_EVENT, Start.ENGINE, frozenset({"event", "key", "match", "timeout_seconds"}),
         _check_wait_event, run=_wait_event, arrived=_event_arrived),
)}

# The kinds external workers lease (on their step's queue), as opposed to an engine executor.
WORKER_KINDS = frozenset(k for k, e in KINDS.items() if e.start is Start.LEASED and e.queued)


def kind_of(kind: str) -> Kind:
    """The entry of a step's kind (records hold it as text)."""
    return KINDS[StepKind(kind)]


def parse_config(kind: StepKind, data: Any, path: str, problems: Problems) -> dict[str, Any]:
    """Check a step's config for its kind; returns a private, normalised copy."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.add(path, "must be an object")
        return {}
    config = copy.deepcopy(dict(data))
    entry = KINDS[kind]
    if entry.config_keys is not None:
        unknown_keys(config, entry.config_keys, path, problems)
    # An inner step's templates are its own (spec.py checks them with the step).
    own = {k: v for k, v in config.items() if k != entry.inner}
    check_templates(own, path, problems, secrets=entry.secrets)
    entry.check(config, path, problems)
    return config
