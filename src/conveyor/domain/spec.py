"""Workflow definitions: the immutable spec, its DAG queries, its validation and its payload rules.

Owns what a workflow definition means (SPEC §2): `parse_workflow` turns the JSON shape of the
`Workflow` proto message into a `WorkflowSpec`, reporting every problem at once as field
violations; `WorkflowSpec` answers the DAG questions the engine asks on its hot path (step by
ref, direct dependents, descendants, topological order) from indexes built once per spec;
`to_dict`/`from_dict` are the storage form; `apply_variables` checks a trigger's payload.
Retry math lives on `RetryPolicy`.
"""

from __future__ import annotations

import copy
import functools
import heapq
import re
import uuid
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from croniter import croniter

from conveyor.domain.checks import Problems, check_expression, has_template, is_number, unknown_keys
from conveyor.domain.concurrency import Caps, Concurrency, parse_concurrency
from conveyor.domain.errors import ConveyorError, ErrorKind, invalid
from conveyor.domain.events import EventTrigger, parse_on_events
from conveyor.domain.expressions import find_templates, referenced_secrets
from conveyor.domain.kinds import KINDS, Start, StepKind, parse_config
from conveyor.domain.limits import Limits
from conveyor.domain.notifications import check_notifications

__all__ = [
    "RetryPolicy",
    "Schedule",
    "StepKind",
    "StepSpec",
    "Variable",
    "WorkflowSpec",
    "apply_variables",
    "parse_workflow",
]


# Longest a workflow may keep its finished runs, in days (ten years).
MAX_RETENTION_DAYS = 3650
# Most losses in a row a retry policy may allow: a poison task must end while it is news.
MAX_LOSSES = 100


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed step is tried again (Temporal's shape and defaults)."""

    max_attempts: int = 1
    initial_interval_seconds: float = 1.0
    backoff_coefficient: float = 2.0
    # 0 means 100 times the initial interval.
    max_interval_seconds: float = 0.0
    # Attempts in a row that may end with no verdict (lost) before the step fails LOST (SPEC §4.3).
    max_losses: int = 5

    @property
    def effective_max_interval_seconds(self) -> float:
        """The cap on a single wait."""
        return self.max_interval_seconds or 100 * self.initial_interval_seconds

    def backoff_seconds(self, failed_attempt: int) -> float:
        """The wait after attempt `failed_attempt` (1-based) failed, before the next attempt."""
        if failed_attempt < 1:
            raise ValueError("attempts are numbered from 1")
        cap = self.effective_max_interval_seconds
        try:
            wait = self.initial_interval_seconds * self.backoff_coefficient ** (failed_attempt - 1)
        except OverflowError:  # the exponential outgrew floats long after it passed the cap
            return cap
        return min(wait, cap)

    def has_attempts_left(self, failures: int) -> bool:
        """True when a step whose attempts have failed `failures` times (losses not counted) may
        be tried again."""
        return failures < self.max_attempts


@dataclass(frozen=True)
class StepSpec:
    """One node of a workflow's DAG."""

    ref: str
    kind: StepKind
    depends_on: tuple[str, ...] = ()
    queue: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = RetryPolicy()
    timeout_seconds: int = 0
    when: str = ""
    description: str = ""

    @functools.cached_property
    def secrets(self) -> frozenset[str]:
        """The NAME of every `secrets.NAME` its config's templates name (http and task steps),
        or its inner step's."""
        if self.item is not None:
            return self.item.secrets
        if not KINDS[self.kind].secrets:
            return frozenset()
        return frozenset().union(*(referenced_secrets(e) for e in find_templates(self.config)))

    @functools.cached_property
    def item(self) -> StepSpec | None:
        """The step each item of a `map` runs (SPEC §2.1), as `ref[]`; None for other kinds."""
        key = KINDS[self.kind].inner
        if key is None:
            return None
        return _step_from_dict({**self.config[key], "ref": f"{self.ref}[]"})


@dataclass(frozen=True)
class Variable:
    """A payload key that runs of a workflow accept."""

    name: str
    required: bool = False
    default: Any = None
    # Separate from `default` because null is a legitimate default value.
    has_default: bool = False
    description: str = ""


@dataclass(frozen=True)
class Schedule:
    """A cron schedule that triggers runs, read in an IANA time zone."""

    cron: str
    timezone: str = "UTC"


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated workflow definition; the DAG indexes are built once, on first use."""

    name: str
    description: str = ""
    max_parallel_steps: int = 0
    max_concurrent_runs: int = 0
    timeout_seconds: int = 0
    # Days a finished run is kept before retention deletes it (SPEC §11); 0: the server's default.
    retention_days: int = 0
    condition: str = ""
    schedule: Schedule | None = None
    variables: tuple[Variable, ...] = ()
    steps: tuple[StepSpec, ...] = ()
    # Webhooks told about chosen run events (domain/notifications.py), as stored: {url, events}.
    notifications: tuple[dict[str, Any], ...] = ()
    # At most `max_runs` running runs per rendered key (SPEC §3, domain/concurrency.py).
    concurrency: Concurrency | None = None
    # Events that start a run of it (SPEC §9, domain/events.py).
    on_events: tuple[EventTrigger, ...] = ()

    # cached_property stores into the instance __dict__ directly, so it works on a frozen
    # dataclass and stays out of the fields (equality, repr, to_dict).
    @functools.cached_property
    def _by_ref(self) -> dict[str, StepSpec]:
        return {s.ref: s for s in self.steps}

    @functools.cached_property
    def _children(self) -> dict[str, tuple[str, ...]]:
        children: dict[str, list[str]] = {s.ref: [] for s in self.steps}
        for s in self.steps:
            for parent in s.depends_on:
                children[parent].append(s.ref)
        return {ref: tuple(refs) for ref, refs in children.items()}

    @functools.cached_property
    def _order(self) -> tuple[str, ...]:
        return tuple(_topological_order(self.steps))

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        return {ref: i for i, ref in enumerate(self._order)}

    def step(self, ref: str) -> StepSpec:
        """The step with this ref, or the inner step of a map's item `ref[i]`; KeyError if
        there is none."""
        found = self._by_ref.get(ref)
        if found is not None:
            return found
        parent, bracket, _ = ref.partition("[")
        found = self._by_ref[parent].item if bracket and ref.endswith("]") else None
        if found is None:
            raise KeyError(ref)
        return found

    def dependents(self, ref: str) -> tuple[str, ...]:
        """The steps that depend directly on `ref`, in definition order; KeyError if unknown."""
        return self._children[ref]

    def descendants(self, ref: str) -> list[str]:
        """`ref` and every step downstream of it, in topological order; KeyError if unknown.
        A map's item has none: its map's dependents wait for the map."""
        if ref not in self._children:
            self.step(ref)
            return [ref]
        seen = {ref}
        stack = [ref]
        while stack:
            for child in self._children[stack.pop()]:
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return sorted(seen, key=self._position.__getitem__)

    @functools.cached_property
    def evaluates(self) -> bool:
        """True when running this workflow evaluates CEL: a condition, a `when`, a step config
        (which may hold templates), a condition step's expression or a concurrency key."""
        return bool(self.condition or self.concurrency) or any(s.when or s.config for s in self.steps)

    @functools.cached_property
    def secret_names(self) -> frozenset[str]:
        """The secrets any of its steps names."""
        return frozenset().union(*(s.secrets for s in self.steps))

    @functools.cached_property
    def child_workflows(self) -> tuple[str, ...]:
        """The workflows (ids or names) its `workflow` steps start, where the definition says
        so (a templated `workflow_id` is known only when the step runs)."""
        out = []
        for s in (*self.steps, *(s.item for s in self.steps if s.item is not None)):
            ident = s.config.get("workflow_id") if KINDS[s.kind].start is Start.CHILD else None
            if isinstance(ident, str) and ident and not has_template(ident):
                out.append(ident)
        return tuple(dict.fromkeys(out))

    def topological_order(self) -> list[str]:
        """Every ref, dependencies first; ties keep definition order (deterministic)."""
        return list(self._order)

    @property
    def caps(self) -> Caps:
        """Its concurrency slots; a run of a workflow with any waits for the runner to start it."""
        return Caps(self.max_concurrent_runs, self.concurrency.max_runs if self.concurrency else 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable storage form; also a valid `parse_workflow` input."""
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "max_parallel_steps": self.max_parallel_steps,
            "max_concurrent_runs": self.max_concurrent_runs,
            "timeout_seconds": self.timeout_seconds,
            "retention_days": self.retention_days,
            "condition": self.condition,
            "variables": [_variable_to_dict(v) for v in self.variables],
            "steps": [_step_to_dict(s) for s in self.steps],
        }
        if self.schedule is not None:
            data["schedule"] = {"cron": self.schedule.cron, "timezone": self.schedule.timezone}
        if self.notifications:  # absent when none, as definitions stored before they existed
            data["notifications"] = copy.deepcopy(list(self.notifications))
        if self.on_events:  # absent when none, as definitions stored before they existed
            data["on_events"] = [{"name": t.name, "when": t.when} for t in self.on_events]
        if self.concurrency is not None:  # absent when none, as definitions stored before it existed
            data["concurrency"] = self.concurrency.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowSpec:
        """The inverse of `to_dict`, for trusted (already validated) stored data."""
        schedule = data.get("schedule")
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            max_parallel_steps=data.get("max_parallel_steps", 0),
            max_concurrent_runs=data.get("max_concurrent_runs", 0),
            timeout_seconds=data.get("timeout_seconds", 0),
            retention_days=data.get("retention_days", 0),
            condition=data.get("condition", ""),
            schedule=Schedule(schedule["cron"], schedule.get("timezone", "UTC")) if schedule else None,
            variables=tuple(
                Variable(name=v["name"], required=v.get("required", False), default=v.get("default"),
                         has_default="default" in v, description=v.get("description", ""))
                for v in data.get("variables", ())),
            steps=tuple(_step_from_dict(s) for s in data.get("steps", ())),
            notifications=tuple(copy.deepcopy(list(data.get("notifications", ())))),
            on_events=tuple(EventTrigger(t["name"], t.get("when", "")) for t in data.get("on_events", ())),
            concurrency=Concurrency(**data["concurrency"]) if data.get("concurrency") else None,
        )


def _variable_to_dict(v: Variable) -> dict[str, Any]:
    data: dict[str, Any] = {"name": v.name, "required": v.required, "description": v.description}
    if v.has_default:
        data["default"] = copy.deepcopy(v.default)
    return data


def _step_from_dict(s: Mapping[str, Any]) -> StepSpec:
    return StepSpec(
        ref=s["ref"], kind=StepKind(s["kind"]), depends_on=tuple(s.get("depends_on", ())),
        queue=s.get("queue", ""), config=copy.deepcopy(s.get("config", {})),
        retry=RetryPolicy(**s["retry"]) if "retry" in s else RetryPolicy(),
        timeout_seconds=s.get("timeout_seconds", 0), when=s.get("when", ""),
        description=s.get("description", ""))


def _step_to_dict(s: StepSpec) -> dict[str, Any]:
    return {
        "ref": s.ref,
        "kind": str(s.kind),
        "depends_on": list(s.depends_on),
        "queue": s.queue,
        "config": copy.deepcopy(s.config),
        "retry": {
            "max_attempts": s.retry.max_attempts,
            "initial_interval_seconds": s.retry.initial_interval_seconds,
            "backoff_coefficient": s.retry.backoff_coefficient,
            "max_interval_seconds": s.retry.max_interval_seconds,
            "max_losses": s.retry.max_losses,
        },
        "timeout_seconds": s.timeout_seconds,
        "when": s.when,
        "description": s.description,
    }


def _topological_order(steps: tuple[StepSpec, ...]) -> list[str]:
    """Kahn's algorithm over an acyclic DAG; among ready steps the earliest defined goes first."""
    index = {s.ref: i for i, s in enumerate(steps)}
    waiting = {s.ref: len(set(s.depends_on)) for s in steps}
    children: dict[str, list[str]] = {s.ref: [] for s in steps}
    for s in steps:
        for parent in set(s.depends_on):
            children[parent].append(s.ref)
    ready = [index[ref] for ref, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        ref = steps[heapq.heappop(ready)].ref
        order.append(ref)
        for child in children[ref]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, index[child])
    return order


# ---------------------------------------------------------------------------------------------
# Validation.

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# Refs appear in CEL as steps.<ref>, so they must be CEL identifiers.
_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

_STEP_KEYS = frozenset({"ref", "kind", "depends_on", "queue", "config", "retry", "timeout_seconds",
                        "when", "description"})
_RETRY_KEYS = frozenset({"max_attempts", "initial_interval_seconds", "backoff_coefficient",
                         "max_interval_seconds", "max_losses"})
_VARIABLE_KEYS = frozenset({"name", "required", "default", "description"})
_SCHEDULE_KEYS = frozenset({"cron", "timezone"})


def _string(data: Mapping[str, Any], key: str, path: str, problems: Problems) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        problems.add(path, "must be a string")
        return ""
    return value


def _integer(data: Mapping[str, Any], key: str, path: str, problems: Problems) -> int:
    """A non-negative whole number (JSON may spell it 5.0)."""
    value = data.get(key, 0)
    if not is_number(value) or not float(value).is_integer():
        problems.add(path, "must be a whole number")
        return 0
    if value < 0:
        problems.add(path, "must not be negative")
        return 0
    return int(value)


def _retention_days(data: Mapping[str, Any], problems: Problems) -> int:
    """`retention_days`: absent or 0 for the server's default, else 1 to MAX_RETENTION_DAYS."""
    days = _integer(data, "retention_days", "retention_days", problems)
    if days > MAX_RETENTION_DAYS:
        problems.add("retention_days", f"must be at most {MAX_RETENTION_DAYS} (ten years); "
                                       f"0 keeps runs for the server's default")
        return 0
    return days


def _number(data: Mapping[str, Any], key: str, path: str, problems: Problems) -> float:
    value = data.get(key, 0)
    if not is_number(value):
        problems.add(path, "must be a number")
        return 0.0
    return float(value)


def _mapping(data: Mapping[str, Any], key: str, path: str, problems: Problems) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, "must be an object")
        return {}
    return value


def _parse_retry(data: Any, path: str, problems: Problems) -> RetryPolicy:
    if data is None:
        return RetryPolicy()
    if not isinstance(data, Mapping):
        problems.add(path, "must be an object")
        return RetryPolicy()
    unknown_keys(data, _RETRY_KEYS, path, problems)
    attempts = data.get("max_attempts", 0)
    if not is_number(attempts) or not float(attempts).is_integer() or attempts < 0:
        problems.add(f"{path}.max_attempts", "must be a whole number >= 1")
        attempts = 1
    initial = _number(data, "initial_interval_seconds", f"{path}.initial_interval_seconds", problems)
    coefficient = _number(data, "backoff_coefficient", f"{path}.backoff_coefficient", problems)
    maximum = _number(data, "max_interval_seconds", f"{path}.max_interval_seconds", problems)
    losses = data.get("max_losses", 0)
    if not is_number(losses) or not float(losses).is_integer() or not 0 <= losses <= MAX_LOSSES:
        problems.add(f"{path}.max_losses", f"must be a whole number from 1 to {MAX_LOSSES}")
        losses = 0
    if initial < 0:
        problems.add(f"{path}.initial_interval_seconds", "must not be negative")
    if coefficient != 0 and coefficient < 1:
        problems.add(f"{path}.backoff_coefficient", "must be >= 1")
    if maximum < 0:
        problems.add(f"{path}.max_interval_seconds", "must not be negative")
    # proto3 cannot tell 0 from unset, so 0 takes the documented default.
    policy = RetryPolicy(
        max_attempts=int(attempts) or 1,
        initial_interval_seconds=initial if initial > 0 else 1.0,
        backoff_coefficient=coefficient if coefficient >= 1 else 2.0,
        max_interval_seconds=max(maximum, 0.0),
        max_losses=int(losses) or RetryPolicy.max_losses,
    )
    if 0 < policy.max_interval_seconds < policy.initial_interval_seconds:
        problems.add(f"{path}.max_interval_seconds", "must not be less than initial_interval_seconds")
    return policy


def _parse_step(data: Any, path: str, problems: Problems) -> StepSpec | None:
    """One step, with the checks that need no other step; None if it is not an object."""
    if not isinstance(data, Mapping):
        problems.add(path, "must be an object")
        return None
    unknown_keys(data, _STEP_KEYS, path, problems)
    ref = _string(data, "ref", f"{path}.ref", problems)
    if not _REF.fullmatch(ref):
        problems.add(f"{path}.ref", "required; a letter or _ then up to 63 letters, digits or _")
    raw_kind = data.get("kind", "")
    kind: StepKind | None
    try:
        kind = StepKind(raw_kind)
    except ValueError:
        kind = None
        problems.add(f"{path}.kind", f"must be one of {', '.join(k.value for k in StepKind)}")
    depends_on = data.get("depends_on", [])
    if not isinstance(depends_on, list | tuple) or not all(isinstance(d, str) for d in depends_on):
        problems.add(f"{path}.depends_on", "must be a list of step refs")
        depends_on = []
    queue = _string(data, "queue", f"{path}.queue", problems)
    if kind is not None and KINDS[kind].queued and not queue.strip():
        problems.add(f"{path}.queue", f"required for {kind} steps")
    elif kind is not None and not KINDS[kind].queued and queue:
        problems.add(f"{path}.queue", "only task steps have a queue")
    config = (parse_config(kind, data.get("config"), f"{path}.config", problems)
              if kind is not None else {})
    inner = KINDS[kind].inner if kind is not None else None
    if inner is not None and isinstance(config.get(inner), Mapping):
        config[inner] = _parse_inner(config[inner], f"{path}.config.{inner}", problems)
    retry = _parse_retry(data.get("retry"), f"{path}.retry", problems)
    timeout = _integer(data, "timeout_seconds", f"{path}.timeout_seconds", problems)
    when = _string(data, "when", f"{path}.when", problems)
    if when:
        check_expression(when, f"{path}.when", problems)
    # An unknown kind has been reported; the placeholder never leaves parse_workflow.
    return StepSpec(
        ref=ref, kind=kind or StepKind.NOOP, depends_on=tuple(depends_on), queue=queue,
        config=config, retry=retry, timeout_seconds=timeout, when=when,
        description=_string(data, "description", f"{path}.description", problems),
    )


# What an inner step (a map's `step`) may not say: it is no node of the DAG.
_NOT_INNER = ("ref", "depends_on", "when")


def _parse_inner(data: Mapping[str, Any], path: str, problems: Problems) -> dict[str, Any]:
    """A map's inner step: a step of any kind without an inner step of its own, with no ref,
    dependencies or `when`; returns its normalised storage form (without a ref)."""
    for key in _NOT_INNER:
        if key in data:
            problems.add(f"{path}.{key}", "not allowed in a map's step (each item is its map's)")
    problems.in_map, outer = True, problems.in_map
    try:
        spec = _parse_step({**data, "ref": "item"}, path, problems)
    finally:
        problems.in_map = outer
    if spec is None:
        return {}
    if KINDS[spec.kind].inner is not None and "kind" in data:
        problems.add(f"{path}.kind", f"a map's step may be of any kind but {spec.kind}")
    stored = _step_to_dict(spec)
    for key in _NOT_INNER:
        stored.pop(key, None)
    return stored


def _check_dependencies(steps: list[tuple[int, StepSpec]], problems: Problems) -> dict[str, list[str]]:
    """Unique refs; known, non-self, non-duplicate dependencies. Returns the graph of valid edges.

    A malformed ref still counts as known here: its own violation already says what is wrong,
    and its dependents should not each add an "unknown step" for the same problem.
    """
    first_index: dict[str, int] = {}
    for i, step in steps:
        if step.ref in first_index:
            problems.add(f"steps[{i}].ref",
                         f"duplicate ref {step.ref!r} (already used by steps[{first_index[step.ref]}])")
        elif step.ref:
            first_index[step.ref] = i
    graph: dict[str, list[str]] = {ref: [] for ref in first_index}
    for i, step in steps:
        seen: set[str] = set()
        for j, dep in enumerate(step.depends_on):
            path = f"steps[{i}].depends_on[{j}]"
            if dep == step.ref:
                problems.add(path, "a step cannot depend on itself")
            elif dep in seen:
                problems.add(path, f"duplicate dependency {dep!r}")
            elif dep not in first_index:
                problems.add(path, f"unknown step {dep!r}")
            elif first_index.get(step.ref) == i:
                graph[step.ref].append(dep)
            seen.add(dep)
    return graph


def _check_cycles(steps: list[tuple[int, StepSpec]], graph: dict[str, list[str]],
                  problems: Problems) -> None:
    """Report each dependency cycle once, with its path, at the edge that closes it."""
    index: dict[str, int] = {}
    for i, step in steps:
        index.setdefault(step.ref, i)
    state: dict[str, int] = {}  # 1: on the current DFS path, 2: fully explored
    path: list[str] = []

    # Iterative DFS: a definition may be deep enough to exhaust Python's recursion limit.
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        path.append(root)
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            ref, j = stack[-1]
            deps = graph[ref]
            if j == len(deps):
                stack.pop()
                path.pop()
                state[ref] = 2
                continue
            stack[-1] = (ref, j + 1)
            dep = deps[j]
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep]
                position = list(_step_by_ref(steps, ref).depends_on).index(dep)
                problems.add(f"steps[{index[ref]}].depends_on[{position}]",
                             f"dependency cycle: {' -> '.join(cycle)} (each step depends on the next)")
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                stack.append((dep, 0))


def _check_references(steps: list[tuple[int, StepSpec]], graph: dict[str, list[str]],
                      problems: Problems) -> None:
    """Each `steps.<ref>` a step's expressions or templates name must be a step it depends on,
    directly or through others: only those are guaranteed finished (their output set) when it
    is evaluated. Anything else would fail, or depend on timing, at run time.

    Ancestor sets are int bitsets built in topological order, so the check is linear in steps
    and edges even for a 1,000-step chain.
    """
    if not problems.references:
        return
    bit = {ref: 1 << i for i, ref in enumerate(graph)}
    ancestors: dict[str, int] = {}
    for ref in _topological_order(tuple(step for _, step in steps if step.ref in graph)):
        mask = 0
        for dep in graph[ref]:
            mask |= ancestors[dep] | bit[dep]
        ancestors[ref] = mask
    index_ref = {f"steps[{i}]": step.ref for i, step in steps}
    for path, refs in problems.references:
        owner = index_ref.get(path.split(".", 1)[0])
        if owner is None or owner not in ancestors:
            continue  # a step whose own ref or dependencies are already reported
        for ref in sorted(refs):
            if ref not in bit:
                problems.add(path, f"unknown step {ref!r} (steps.{ref})")
            elif not ancestors[owner] & bit[ref]:
                problems.add(path, f"steps.{ref} is not a dependency of this step (add it to "
                                   f"depends_on, directly or through another step)")


def _step_by_ref(steps: list[tuple[int, StepSpec]], ref: str) -> StepSpec:
    return next(step for _, step in steps if step.ref == ref)


def _parse_variables(data: Any, problems: Problems) -> tuple[Variable, ...]:
    if data is None:
        return ()
    if not isinstance(data, list | tuple):
        problems.add("variables", "must be a list")
        return ()
    variables: list[Variable] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data):
        path = f"variables[{i}]"
        if not isinstance(item, Mapping):
            problems.add(path, "must be an object")
            continue
        unknown_keys(item, _VARIABLE_KEYS, path, problems)
        name = _string(item, "name", f"{path}.name", problems)
        if not name.strip():
            problems.add(f"{path}.name", "required")
        elif name in seen:
            problems.add(f"{path}.name", f"duplicate variable {name!r} (already variables[{seen[name]}])")
        else:
            seen[name] = i
        required = item.get("required", False)
        if not isinstance(required, bool):
            problems.add(f"{path}.required", "must be a boolean")
            required = False
        has_default = "default" in item
        if required and has_default:
            problems.add(f"{path}.default", "a required variable cannot have a default")
        variables.append(Variable(
            name=name, required=required, default=copy.deepcopy(item.get("default")),
            has_default=has_default,
            description=_string(item, "description", f"{path}.description", problems)))
    return tuple(variables)


def _parse_schedule(data: Any, problems: Problems) -> Schedule | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        problems.add("schedule", "must be an object")
        return None
    unknown_keys(data, _SCHEDULE_KEYS, "schedule", problems)
    cron = _string(data, "cron", "schedule.cron", problems).strip()
    # Five fields (or an @alias): croniter would also take a sixth field, read as seconds.
    if not cron or not (len(cron.split()) == 5 or cron.startswith("@")) or not croniter.is_valid(cron):
        problems.add("schedule.cron", "must be a valid five-field cron expression")
    timezone = _string(data, "timezone", "schedule.timezone", problems) or "UTC"
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.add("schedule.timezone", f"unknown time zone {timezone!r}")
    return Schedule(cron=cron, timezone=timezone)


def _looks_like_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def parse_workflow(data: Mapping[str, Any], limits: Limits | None = None) -> WorkflowSpec:
    """Validate a workflow definition (the `Workflow` message as JSON) and build its spec.

    Every problem is collected; if there is any, raises INVALID_ARGUMENT with reason
    INVALID_WORKFLOW and one field violation per problem. `limits` bounds the step count and
    each expression (Limits() when not given).
    """
    problems = Problems(limits or Limits())
    name = _string(data, "name", "name", problems)
    if not name:
        problems.add("name", "required")
    elif not _NAME.fullmatch(name):
        problems.add("name", "must start with a letter or digit and hold at most 200 letters, "
                             "digits, '_', '.' or '-'")
    elif _looks_like_uuid(name):
        problems.add("name", "must not look like a UUID (names and ids share the same paths)")
    caps = {key: _integer(data, key, key, problems)
            for key in ("max_parallel_steps", "max_concurrent_runs", "timeout_seconds")}
    caps["retention_days"] = _retention_days(data, problems)
    description = _string(data, "description", "description", problems)
    condition = _string(data, "condition", "condition", problems)
    if condition:
        check_expression(condition, "condition", problems)
        # The workflow's condition is evaluated when a run is triggered, before any step ran.
        for path, refs in problems.references:
            problems.add(path, f"the workflow condition runs before any step; it cannot use "
                               f"steps.{sorted(refs)[0]}")
        problems.references.clear()
    schedule = _parse_schedule(data.get("schedule"), problems)
    concurrency, wrong = parse_concurrency(data.get("concurrency"), problems.limits)
    problems.violations += wrong
    variables = _parse_variables(data.get("variables"), problems)
    on_events = parse_on_events(data.get("on_events"), problems.limits, problems.violations)
    notifications = check_notifications(data.get("notifications"), "notifications", problems.limits,
                                        problems.violations)

    raw_steps = data.get("steps") or []
    steps: list[tuple[int, StepSpec]] = []
    if not isinstance(raw_steps, list | tuple):
        problems.add("steps", "must be a list")
    elif not raw_steps:
        problems.add("steps", "at least one step is required")
    elif len(raw_steps) > problems.limits.max_steps:
        # Not parsed further: checking each of them is the cost the cap is there to bound.
        problems.add("steps", f"has {len(raw_steps)} steps; at most {problems.limits.max_steps} are allowed")
    else:
        for i, raw in enumerate(raw_steps):
            step = _parse_step(raw, f"steps[{i}]", problems)
            if step is not None:
                steps.append((i, step))
    graph = _check_dependencies(steps, problems)
    cycles_before = len(problems.violations)
    _check_cycles(steps, graph, problems)
    if len(problems.violations) == cycles_before:
        _check_references(steps, graph, problems)

    if problems.violations:
        first = problems.violations[0]
        more = len(problems.violations) - 1
        summary = f"invalid workflow definition: {first.field}: {first.description}"
        if more:
            summary += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_WORKFLOW", summary,
                            violations=problems.violations)
    return WorkflowSpec(
        name=name,
        description=description,
        condition=condition,
        schedule=schedule,
        variables=variables,
        steps=tuple(step for _, step in steps),
        notifications=tuple(notifications),
        on_events=on_events,
        concurrency=concurrency,
        **caps,
    )


def apply_variables(spec: WorkflowSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """A trigger's payload checked against the declared variables, with defaults filled in.

    With no variables declared any payload is accepted and returned as is.
    """
    if not spec.variables:
        return payload
    problems = Problems(Limits())
    declared = {v.name for v in spec.variables}
    for v in spec.variables:
        if v.required and v.name not in payload:
            problems.add(f"payload.{v.name}", "required variable missing")
    for key in payload:
        if key not in declared:
            problems.add(f"payload.{key}", "undeclared variable")
    if problems.violations:
        raise invalid(f"payload does not match the workflow's variables ({len(problems.violations)} "
                      f"problem{'s' if len(problems.violations) > 1 else ''})",
                      problems.violations, reason="INVALID_PAYLOAD")
    result = dict(payload)
    for v in spec.variables:
        if v.name not in result and v.has_default:
            result[v.name] = copy.deepcopy(v.default)
    return result
