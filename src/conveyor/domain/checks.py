"""The building blocks of definition checks, shared by the workflow spec (spec.py) and the step
kinds' config checks (kinds.py): a `Problems` collector of field violations, and the checks of
values, unknown keys, CEL expressions and `{{ }}` templates every part of a definition uses.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from conveyor.domain.errors import FieldViolation
from conveyor.domain.expressions import ExpressionError, find_templates, referenced_steps
from conveyor.domain.limits import Limits


class Problems:
    """Collects one FieldViolation per problem, so a client sees everything wrong at once; also
    carries what the checks need besides the data: the limits, and the `steps.<ref>` each
    expression names (checked against the DAG once every step is parsed)."""

    def __init__(self, limits: Limits) -> None:
        self.violations: list[FieldViolation] = []
        self.limits = limits
        # (path of the expression or template, the refs it names)
        self.references: list[tuple[str, set[str]]] = []
        # The checks are inside a map's inner step, whose expressions may name `item`, `index`.
        self.in_map = False

    def add(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path, description))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def has_template(value: Any) -> bool:
    return isinstance(value, str) and bool(find_templates(value))


def unknown_keys(data: Mapping[str, Any], known: frozenset[str], path: str,
                 problems: Problems) -> None:
    for key in data:
        if key not in known:
            problems.add(f"{path}.{key}", "unknown field")


def check_expression(expr: str, path: str, problems: Problems, what: str = "",
                     secrets: bool = False, events: bool = False) -> None:
    """Compile `expr` (within the expression limits; `secrets`: it may name secrets; `events`:
    it may read `event`) and note the steps it names."""
    try:
        # Compiles it too: an invalid expression raises here.
        refs = referenced_steps(expr, limits=problems.limits, secrets=secrets, events=events,
                                items=problems.in_map)
    except ExpressionError as exc:
        problems.add(path, f"{what}{exc.message}")
        return
    if refs:
        problems.references.append((path, refs))


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every string inside `value` with its field path (`config.body.items[0]`)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")


def check_templates(config: Mapping[str, Any], path: str, problems: Problems, secrets: bool) -> None:
    for leaf_path, text in _leaves(config, path):
        for expr in find_templates(text):
            check_expression(expr, leaf_path, problems, what="invalid template: ", secrets=secrets)
        # What is left once every complete template is taken out must hold no "{{": an unclosed
        # one would otherwise be sent as literal text, silently.
        if "{{" in _TEMPLATE_TEXT.sub("", text):
            problems.add(leaf_path, "unclosed template: '{{' without its '}}'")


# A complete `{{ ... }}` (the same tempered form the expression module renders).
_TEMPLATE_TEXT = re.compile(r"\{\{(?:(?!\}\}).)*\}\}", re.DOTALL)


def is_rfc3339(text: str) -> bool:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return False
    # RFC 3339 requires an offset; a naive time would be read in the server's zone.
    return "T" in text.upper() and moment.tzinfo is not None
