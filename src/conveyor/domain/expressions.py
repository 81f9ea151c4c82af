"""CEL expressions and `{{ expr }}` templates: compiling, evaluating and rendering.

Owns every use of cel-python in Conveyor, and the bounds on what an expression may cost.
Expressions (a workflow's `condition`, a step's `when`, a condition step's `expression`) and
templates inside step config are evaluated over
`{"payload": ..., "steps": {"<ref>": {"output": ..., "status": ...}}, "run": ...}` and give back
plain JSON-like Python values. The templates of http and task configs may also name
`secrets.NAME` (domain/secrets.py), rendered only when an attempt starts. Errors are
`ExpressionError`s whose message is safe to show to a client: cel-python's own messages embed
Python class reprs and whole activations, so they are rewritten here and never passed through.

Numbers: every JSON number reaching us through a protobuf Struct is a double (`3` arrives as
`3.0`), while CEL literals like `3` are ints and CEL refuses to compare or combine the two. So
equality, ordering, `in`, `+ - * /` and list indexing accept an int and a double together and
compare/compute them as numbers (modern CEL has heterogeneous numeric comparison; the arithmetic
promotion to double is our leniency for JSON data). Values from the context stay doubles rather
than being turned into ints, so that `payload.total / payload.n` divides the same way whatever
the values happen to be.

Bounds (SPEC §2 leaves them to us; README "CEL"): definitions and run data come from clients, so no
expression may hold the event loop. An expression longer than `Limits.max_expression_length` or
nested deeper than `_MAX_DEPTH` is refused before it is parsed or walked. Every evaluation draws on
a meter of `Limits.max_expression_cost` units: each step of the interpreter, each context value
converted, and each operation in proportion to the size of its operands (concatenation, equality,
`in`, `matches`...) costs units, and the evaluation stops with "exceeded its cost limit" when the
meter runs out. A unit is calibrated to about a microsecond of CPU on the reference machine, so the
default bound keeps any evaluation near 100 ms. No value an operation builds, and no result, may
exceed `Limits.max_output_bytes`. `matches` uses RE2 (linear time), never Python's backtracking `re`.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, Evaluator, base_functions, tree_dump

from conveyor.domain.limits import Limits

__all__ = [
    "ExpressionError",
    "compile_event_expression",
    "compile_expression",
    "evaluate",
    "evaluate_bool",
    "find_templates",
    "referenced_secrets",
    "referenced_steps",
    "render",
]


class ExpressionError(Exception):
    """An expression or template that does not compile or evaluate; the message is client-safe."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# `{{ expr }}`: the tempered token keeps one template from swallowing the next one
# ("{{ a }} and {{ b }}"), so an expression inside a template cannot itself contain "}}".
_TEMPLATE = re.compile(r"\{\{((?:(?!\}\}).)*)\}\}", re.DOTALL)
_WHOLE_TEMPLATE = re.compile(r"\s*\{\{((?:(?!\}\}).)*)\}\}\s*", re.DOTALL)

# The variables an expression may start from (SPEC §2), and `secrets` (SPEC §11): allowed only
# where the caller says so (the config of http and task steps), only as `secrets.NAME`, and
# available only when the context holds them (when an attempt starts).
SECRETS = "secrets"
# `event` (SPEC §9): an event being matched; allowed only where the caller says so (an
# `on_events` entry's `when`, a `wait_event` step's `match`), and available only when the
# context holds it.
EVENT = "event"
# `item` and `index` (SPEC §2.1): a map item's element and position; allowed only in a map's
# inner step, and available only when the context holds them (an item's attempt).
ITEM, INDEX = "item", "index"
_ROOTS = frozenset({"payload", "steps", "run", SECRETS, EVENT, ITEM, INDEX})
# Type names CEL lets an expression mention as values, as in `type(x) == string`.
_TYPE_NAMES = frozenset({"bool", "bytes", "double", "int", "list", "map", "null_type", "string",
                         "type", "uint"})
# Standard CEL macros; cel-python's non-standard `reduce`/`min` are deliberately left out so
# definitions stay portable to any CEL implementation.
_COMPREHENSIONS = frozenset({"all", "exists", "exists_one", "filter", "map"})
_FUNCTIONS = frozenset(
    {name for name in base_functions if name.isidentifier()} | {"has", "dyn"} | _COMPREHENSIONS)

# cel-python's parser is a process-wide singleton tied to the runner class of the first
# Environment built, so everything here uses the default interpreted runner. (Constructing the
# Environment also raises the interpreter's recursion limit to 2500, as CEL nesting requires.)
_ENV = celpy.Environment()

# Deepest parse tree accepted. celpy's interpreter recurses about four Python frames per tree
# level and the recursion limit is 2500, so 250 levels leave the caller's own stack plenty of
# room. A tree level is finer than CEL nesting: this allows ~24 nested parentheses or brackets,
# or a chain of ~120 `+` terms, where typical expressions stay under 50 levels.
_MAX_DEPTH = 250


# ---------------------------------------------------------------------------------------------
# Cost: the meter every evaluation draws on.

# Units, calibrated with bench/cel.py's adversarial cases to about a microsecond of CPU each on
# the reference machine (README "CEL"): a step of celpy's tree-walking interpreter (one node of
# the parse tree evaluated), one iteration of a comprehension (celpy clones its activation for
# each), a call of a named function or method (parsing a timestamp, compiling a regex), a pair of
# values compared for equality, one context value converted. Besides, every call and operator
# costs one unit per 64 bytes of its string or bytes operands (and of a concatenation's result)
# and one per element of its list or map operands, so work in proportion to data is paid too.
_UNITS_PER_STEP = 6
_UNITS_PER_ITERATION = 35
_UNITS_PER_CALL = 60
_UNITS_PER_COMPARISON = 2
_UNITS_PER_VALUE = 2
_BYTES_PER_UNIT = 64


class _Exceeded(Exception):
    """An evaluation ran out of its budget; `reason` completes "expression '...' ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Meter:
    """What one evaluation (or one `render` of a whole config) may still spend."""

    __slots__ = ("cost_limit", "left", "max_bytes")

    def __init__(self, limits: Limits) -> None:
        self.cost_limit = limits.max_expression_cost
        self.left = limits.max_expression_cost
        self.max_bytes = limits.max_output_bytes

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _Exceeded(f"exceeded its cost limit ({self.cost_limit} units)")

    def check_size(self, value: Any) -> None:
        """Refuse a built value whose length alone exceeds the output size limit."""
        if isinstance(value, str | bytes | list | dict) and len(value) > self.max_bytes:
            raise _Exceeded(f"built a value larger than {self.max_bytes} bytes")


# The meter of the evaluation in progress, for the functions celpy calls (they get only their
# operands). Evaluation is synchronous, so a context variable set around it is exact.
_METER: ContextVar[_Meter] = ContextVar("conveyor_cel_meter")


def _weight(value: Any) -> int:
    """Units an operation on `value` costs beyond its interpreter step: its size."""
    if isinstance(value, str | bytes):
        return len(value) // _BYTES_PER_UNIT
    if isinstance(value, list | dict):
        return len(value)
    return 0


class _BoundedEvaluator(Evaluator):
    """celpy's interpreter, charging the meter for every tree node it evaluates.

    `_visit_tree` is the one method lark's Interpreter funnels every node through (`visit` and
    `visit_children` both call it), so a comprehension's body is charged once per iteration.
    """

    def _visit_tree(self, tree: lark.Tree) -> Any:
        _METER.get().charge(_UNITS_PER_STEP)
        return super()._visit_tree(tree)

    def sub_evaluator(self, ast: lark.Tree) -> Evaluator:
        return _BoundedEvaluator(ast, activation=self.activation)

    def set_activation(self, values: Any) -> Evaluator:
        # Called once per evaluation and once per comprehension iteration, to bind its variable.
        _METER.get().charge(_UNITS_PER_ITERATION)
        return super().set_activation(values)

    # Named functions are charged here rather than by wrapping them: type names such as `string`
    # or `int` are both conversion functions and values (`type(x) == string`), so they must stay
    # the very types celpy compares.
    def function_eval(self, name_token: lark.Token, exprlist: Any = None) -> Any:
        _charge_call(exprlist)
        return super().function_eval(name_token, exprlist)

    def method_eval(self, object: Any, method_ident: lark.Token, exprlist: Any = None) -> Any:
        _charge_call([object, *exprlist] if isinstance(exprlist, list) else [object])
        return super().method_eval(object, method_ident, exprlist)


def _charge_call(args: Any) -> None:
    operands = args if isinstance(args, list) else []
    _METER.get().charge(_UNITS_PER_CALL + sum(_weight(arg) for arg in operands))


# ---------------------------------------------------------------------------------------------
# Numeric leniency: operator overrides handed to every program.


def _number(value: Any) -> int | float | None:
    """The value as a plain Python number if it is a CEL int, uint or double (never a bool).

    Plain, because celpy's own number types refuse to compare with one another.
    """
    if isinstance(value, bool | celtypes.BoolType):
        return None
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return None


def _numeric_type(value: Any) -> str:
    if isinstance(value, float):
        return "double"
    return "uint" if isinstance(value, celtypes.UintType) else "int"


def _mixed_numbers(a: Any, b: Any) -> tuple[int | float, int | float] | None:
    """Both values as plain numbers when they are numbers of different CEL types."""
    na, nb = _number(a), _number(b)
    if na is None or nb is None or _numeric_type(a) == _numeric_type(b):
        return None
    return na, nb


def _kind(value: Any) -> str:
    """A value's CEL type family, for heterogeneous equality (different families are unequal)."""
    if value is None:
        return "null"
    if isinstance(value, bool | celtypes.BoolType):
        return "bool"
    if _number(value) is not None:
        return "number"
    for kind, types in (("string", str), ("bytes", bytes), ("timestamp", datetime.datetime),
                        ("duration", datetime.timedelta), ("list", list), ("map", dict)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _equal(a: Any, b: Any) -> bool:
    """CEL equality where numbers compare by value across int/uint/double, deep into containers.

    Charged one unit per pair compared: deep equality of large documents is real work.
    """
    _METER.get().charge(_UNITS_PER_COMPARISON)
    kind = _kind(a)
    if kind != _kind(b):
        return False
    if kind == "number":
        # Python compares an int and a float exactly, without rounding the int to a double.
        return bool(_number(a) == _number(b))
    if kind == "list":
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if kind == "map":
        try:
            return len(a) == len(b) and all(k in b and _equal(v, b[k]) for k, v in a.items())
        except TypeError:  # keys of different CEL types
            return False
    return bool(a == b)


def _eq(a: Any, b: Any) -> Any:
    if isinstance(a, CELEvalError):
        return a
    if isinstance(b, CELEvalError):
        return b
    return celtypes.BoolType(_equal(a, b))


def _ne(a: Any, b: Any) -> Any:
    result = _eq(a, b)
    return result if isinstance(result, CELEvalError) else celtypes.BoolType(not result)


def _in(item: Any, container: Any) -> Any:
    if isinstance(container, list) and not isinstance(item, CELEvalError):
        return celtypes.BoolType(any(_equal(item, x) for x in container))
    return base_functions["_in_"](item, container)


def _ordering(name: str, op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    base = base_functions[name]

    def compare(a: Any, b: Any) -> Any:
        pair = _mixed_numbers(a, b)
        return base(a, b) if pair is None else celtypes.BoolType(op(*pair))

    return compare


def _arithmetic(name: str) -> Callable[[Any, Any], Any]:
    base = base_functions[name]

    def compute(a: Any, b: Any) -> Any:
        pair = _mixed_numbers(a, b)
        if pair is None or not (isinstance(a, float) or isinstance(b, float)):
            return base(a, b)
        # CEL double semantics (e.g. x / 0.0 is infinity, not an exception).
        return celtypes.DoubleType(base(celtypes.DoubleType(pair[0]), celtypes.DoubleType(pair[1])))

    return compute


def _index(container: Any, index: Any) -> Any:
    """List indexing by any whole number; negative indexes are errors (celpy lets them wrap)."""
    number = _number(index)
    if not isinstance(container, list) or number is None:
        return base_functions["_[_]"](container, index)
    if isinstance(number, float) and not number.is_integer():
        raise TypeError("list index must be a whole number")
    position = int(number)
    if not 0 <= position < len(container):
        raise IndexError("list index out of range")
    return container[position]


_OVERRIDES: dict[str, Any] = {
    "_==_": _eq,
    "_!=_": _ne,
    "_in_": _in,
    "_<_": _ordering("_<_", operator.lt),
    "_<=_": _ordering("_<=_", operator.le),
    "_>_": _ordering("_>_", operator.gt),
    "_>=_": _ordering("_>=_", operator.ge),
    "_+_": _arithmetic("_+_"),
    "_-_": _arithmetic("_-_"),
    "_*_": _arithmetic("_*_"),
    "_/_": _arithmetic("_/_"),
    "_[_]": _index,
}


def _charged(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Operator `function` charging the meter for the size of its operands (and, for `+`, of its
    result, which is also held to the output size limit)."""
    builds = name == "_+_"  # the one operator that makes a value larger than its operands

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        meter = _METER.get()
        meter.charge(sum(_weight(arg) for arg in args))
        result = function(*args)
        if builds:
            meter.check_size(result)
            meter.charge(_weight(result))
        return result

    return call


# The functions a program resolves, with the operators (`_+_`, `!_`...) charged; celpy calls
# operators directly rather than through `function_eval`.
_PROGRAM_FUNCTIONS: dict[str, Any] = {
    name: function if name.isidentifier() else _charged(name, function)
    for name, function in {**base_functions, **_OVERRIDES}.items()
}


# ---------------------------------------------------------------------------------------------
# Compilation.


@dataclass(frozen=True)
class _Program:
    """A parsed, checked expression.

    `reads` maps each root variable the expression selects fields of to the names it selects
    (`payload.env` reads {"payload": {"env"}}), or to None when it uses the root as a whole
    (`size(steps)`, `steps[x]`): only what is read is converted for an evaluation. `named_steps`
    is every `steps.<ref>` the expression names.
    """

    tree: lark.Tree
    runner: celpy.Runner
    reads: Mapping[str, frozenset[str] | None]
    named_steps: frozenset[str]


def _short(expr: str) -> str:
    text = " ".join(expr.split())
    return text if len(text) <= 120 else text[:117] + "..."


def _token(node: Any) -> str:
    return str(node) if isinstance(node, lark.Token) else ""


def _bound_variable(exprlist: Any) -> str | None:
    """The variable a comprehension macro binds: its first argument, when that is a bare name."""
    if not isinstance(exprlist, lark.Tree) or not exprlist.children:
        return None
    idents = [t for t in exprlist.children[0].iter_subtrees() if t.data == "ident"]
    return _token(idents[0].children[0]) if len(idents) == 1 else None


def _selected_root(member: Any) -> str:
    """The root variable `member` is, when it is a bare one: member(primary(ident(root)))."""
    if (isinstance(member, lark.Tree) and len(member.children) == 1
            and isinstance(member.children[0], lark.Tree)
            and member.children[0].data == "primary"
            and isinstance(member.children[0].children[0], lark.Tree)
            and member.children[0].children[0].data == "ident"):
        name = _token(member.children[0].children[0].children[0])
        return name if name in _ROOTS else ""
    return ""


def _depth(tree: lark.Tree) -> int:
    """How deep `tree` nests, counted without recursion (this is what guards recursion)."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return deepest


def _analyse(expr: str, tree: lark.Tree) -> tuple[dict[str, frozenset[str] | None], frozenset[str]]:
    """Reject unknown functions and variables (CEL's checker would); find what is read.

    cel-python has no type checker, so without this a typo such as `paylod.x` or `sise(x)`
    would only surface when a run evaluates it. Macro-bound names are collected for the whole
    expression rather than per scope, which errs on the side of accepting.
    """
    # First pass: functions (an unknown one explains its odd arguments better than they would)
    # and the names comprehension macros bind.
    bound: set[str] = set()
    for node in tree.iter_subtrees_topdown():
        if node.data in ("ident_arg", "dot_ident_arg", "member_dot_arg"):
            name = _token(node.children[1 if node.data == "member_dot_arg" else 0])
            if name not in _FUNCTIONS:
                raise ExpressionError(f"expression {_short(expr)!r}: unknown function {name!r}")
            if name in _COMPREHENSIONS and node.data == "member_dot_arg":
                variable = _bound_variable(node.children[2] if len(node.children) > 2 else None)
                if variable:
                    bound.add(variable)

    mentions: dict[str, int] = {}
    selections: dict[str, set[str]] = {}
    selection_count: dict[str, int] = {}
    for node in tree.iter_subtrees_topdown():
        if node.data in ("ident", "dot_ident"):
            name = _token(node.children[0])
            if name not in _ROOTS and name not in bound and name not in _TYPE_NAMES:
                raise ExpressionError(
                    f"expression {_short(expr)!r}: unknown variable {name!r} "
                    "(use payload, steps or run)")
            if name in _ROOTS:
                mentions[name] = mentions.get(name, 0) + 1
        elif node.data == "member_object":
            raise ExpressionError(
                f"expression {_short(expr)!r}: message construction is not supported")
        elif node.data == "member_dot":
            root = _selected_root(node.children[0])
            if root:
                selection_count[root] = selection_count.get(root, 0) + 1
                selections.setdefault(root, set()).add(_token(node.children[1]))
    named_steps = frozenset(selections.get("steps", ()))
    # Only when every mention of a root selects a named field can the rest of it be left out of
    # the activation; `size(steps)` or `steps[x]` need all of it, and so does a root name that a
    # macro rebinds.
    reads: dict[str, frozenset[str] | None] = {}
    for root, count in mentions.items():
        whole = root in bound or selection_count.get(root, 0) != count
        reads[root] = None if whole else frozenset(selections.get(root, ()))
    return reads, named_steps


@functools.lru_cache(maxsize=2048)
def _program(expr: str) -> _Program:
    """Parse, check and prepare `expr` once; the engine evaluates the same strings repeatedly.

    Callers check the length first: parsing is linear in it (~30 µs a character).
    """
    if not expr.strip():
        raise ExpressionError("expression is empty")
    try:
        tree = _ENV.compile(expr)
    except CELParseError as exc:
        where = f" at line {exc.line}, column {exc.column}" if exc.line else ""
        raise ExpressionError(f"expression {_short(expr)!r}: syntax error{where}") from None
    except Exception:  # lark/recursion failures on pathological input
        raise ExpressionError(f"expression {_short(expr)!r}: cannot be parsed") from None
    if _depth(tree) > _MAX_DEPTH:
        raise ExpressionError(
            f"expression {_short(expr)!r}: nested too deeply (too many parentheses, brackets or "
            "chained operators)")
    reads, named_steps = _analyse(expr, tree)
    return _Program(tree, _ENV.program(tree, functions=_PROGRAM_FUNCTIONS), reads, named_steps)


_DEFAULT_LIMITS = Limits()


def _checked(expr: Any, limits: Limits, secrets: bool = False, events: bool = False,
             items: bool = False) -> _Program:
    if not isinstance(expr, str):
        raise ExpressionError("expression must be a string")
    if len(expr) > limits.max_expression_length:
        raise ExpressionError(
            f"expression {_short(expr)!r}: longer than {limits.max_expression_length} characters")
    program = _program(expr)
    if EVENT in program.reads and not events:
        raise ExpressionError(f"expression {_short(expr)!r}: `event` may be used only in on_events' when "
                              "and a wait_event step's match")
    if not items and (ITEM in program.reads or INDEX in program.reads):
        raise ExpressionError(f"expression {_short(expr)!r}: `item` and `index` may be used only in a "
                              "map's step")
    if SECRETS in program.reads:
        if not secrets:
            raise ExpressionError(f"expression {_short(expr)!r}: secrets may be used only in the config "
                                  "of http and task steps")
        if program.reads[SECRETS] is None:
            # The names a step needs must be known from its definition: they alone are loaded,
            # handed out and redacted.
            raise ExpressionError(f"expression {_short(expr)!r}: a secret must be named as secrets.NAME")
    return program


def compile_event_expression(expr: str, *, limits: Limits | None = None) -> None:
    """Raise ExpressionError unless `expr` is a valid CEL expression over `event` alone (an
    `on_events` entry's `when`: no run exists yet)."""
    program = _checked(expr, limits or _DEFAULT_LIMITS, events=True)
    others = sorted(set(program.reads) - {EVENT})
    if others:
        raise ExpressionError(f"expression {_short(expr)!r}: only `event` can be used here, "
                              f"not {others[0]!r}")


def compile_expression(expr: str, *, limits: Limits | None = None, secrets: bool = False) -> None:
    """Raise ExpressionError unless `expr` is a valid CEL expression over payload/steps/run
    (and, with `secrets`, `secrets.NAME`)."""
    _checked(expr, limits or _DEFAULT_LIMITS, secrets)


def referenced_steps(expr: str, *, limits: Limits | None = None, secrets: bool = False,
                     events: bool = False, items: bool = False) -> set[str]:
    """The `<ref>` of every `steps.<ref>` that `expr` names (raises ExpressionError if invalid;
    `secrets`: as compile_expression; `events`: it may read `event`, as a wait_event's match;
    `items`: it may name `item` and `index`).

    Only names written out count: `steps[name]` or `size(steps)` name no step. For a template
    string, apply it to each expression `find_templates` gives.
    """
    return set(_checked(expr, limits or _DEFAULT_LIMITS, secrets, events, items).named_steps)


def referenced_secrets(expr: str, *, limits: Limits | None = None) -> frozenset[str]:
    """The NAME of every `secrets.NAME` that `expr` names (raises ExpressionError if invalid)."""
    program = _checked(expr, limits or _DEFAULT_LIMITS, secrets=True, items=True)
    return program.reads.get(SECRETS) or frozenset()


# ---------------------------------------------------------------------------------------------
# Evaluation.


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _to_cel(value: Any, meter: _Meter) -> Any:
    """A JSON-like Python value as CEL values (numbers keep their int/double nature)."""
    meter.charge(_UNITS_PER_VALUE)
    if value is None or isinstance(value, celtypes.BoolType):
        return value
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        # Beyond int64 a JSON number can only be a double in CEL.
        return celtypes.IntType(value) if _INT64_MIN <= value <= _INT64_MAX else celtypes.DoubleType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, Mapping):
        return celtypes.MapType(
            {celtypes.StringType(str(k)): _to_cel(v, meter) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(v, meter) for v in value])
    if isinstance(value, datetime.datetime):
        return celtypes.TimestampType(value)
    if isinstance(value, datetime.timedelta):
        return celtypes.DurationType(value)
    if isinstance(value, bytes):
        return celtypes.BytesType(value)
    raise ExpressionError(f"context holds a value of unsupported type {type(value).__name__}")


def _key(value: Any) -> str:
    if isinstance(value, bool | celtypes.BoolType):
        return "true" if value else "false"
    return str(value)


def _from_cel(value: Any, expr: str, meter: _Meter) -> Any:
    """A CEL result as plain JSON-like Python (bool, int, float, str, None, list, dict).

    A result may share one large value many times over (`l.map(x, payload.text)`), so its size
    is counted as it is unfolded, roughly as JSON bytes, and refused past the output limit.
    """
    room = meter.max_bytes

    def spend(size: int) -> None:
        nonlocal room
        room -= size
        meter.charge(1)
        if room < 0:
            raise _Exceeded(f"result is larger than {meter.max_bytes} bytes")

    def convert(value: Any) -> Any:
        if value is None:
            spend(4)
            return None
        if isinstance(value, bool | celtypes.BoolType):
            spend(5)
            return bool(value)
        if isinstance(value, int):
            spend(8)
            return int(value)
        if isinstance(value, float):
            spend(8)
            if not math.isfinite(value):
                raise ExpressionError(f"expression {_short(expr)!r}: result is not a finite number")
            return float(value)
        if isinstance(value, str):
            spend(len(value) + 2)
            return str(value)
        if isinstance(value, bytes):
            spend(len(value) * 4 // 3 + 2)
            return base64.b64encode(value).decode("ascii")
        if isinstance(value, datetime.datetime | datetime.timedelta):
            spend(32)
            # celpy renders timestamps as RFC 3339 and durations like "90s", as proto3 JSON does.
            return str(value)
        if isinstance(value, Mapping):
            spend(2)
            return {_key(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            spend(2)
            return [convert(v) for v in value]
        raise ExpressionError(f"expression {_short(expr)!r}: result is not a JSON value")

    return convert(value)


_QUOTED = re.compile(r"'([^']*)'")
_CEL_TYPE = re.compile(r"celtypes\.(\w+?)Type'|'NoneType'")


def _describe(err: CELEvalError) -> str:
    """A client-safe description of a cel-python evaluation error.

    cel-python's messages embed Python class reprs (and, for unknown names, a dump of the whole
    activation), so the message is rebuilt from the exception class it records instead.
    """
    text = str(err.args[0]) if err.args else ""
    cause = err.args[1] if len(err.args) > 1 else None
    details = err.args[2] if len(err.args) > 2 else None
    where = ""
    if err.tree is not None:
        try:
            where = f" in {_short(tree_dump(err.tree))!r}"
        except Exception:  # tree_dump does not know every node shape
            where = ""
    if text.startswith("undeclared reference"):
        name = _QUOTED.search(text)
        return f"unknown variable {name.group(1) if name else ''!r}"
    if cause is KeyError:
        found = _QUOTED.search(text)
        if found:
            key = found.group(1)
        elif isinstance(details, tuple) and details:
            key = str(details[0])
        else:
            key = ""
        return f"no such key {key!r}{where}"
    if cause is TypeError:
        types = [m.group(1).lower() if m.group(1) else "null" for m in _CEL_TYPE.finditer(text)]
        if "does not support field selection" in text:
            return f"field selection on a value that is not a map{where}"
        operands = f" for ({', '.join(types)})" if types else ""
        return f"no matching overload{operands}{where}"
    if cause is ZeroDivisionError:
        return f"division by zero{where}"
    if cause is IndexError:
        return f"index out of range{where}"
    if cause is ValueError:
        return f"invalid value or overflow{where}"
    return f"evaluation failed{where}"


def _activation(program: _Program, context: Mapping[str, Any], meter: _Meter) -> dict[str, Any]:
    """The context as CEL values, converting only what the program reads.

    Runs can hold many large step outputs and payloads up to their size limit: converting all of
    it for `payload.env == 'prod'` would cost more than the evaluation itself.
    """
    activation: dict[str, Any] = {}
    for name, reads in program.reads.items():
        if name not in context:
            continue  # evaluation then reports it as an unknown variable
        value = context[name]
        if reads is not None and isinstance(value, Mapping):
            value = {key: value[key] for key in reads if key in value}
        activation[name] = _to_cel(value, meter)
    return activation


def _evaluate(expr: Any, context: Mapping[str, Any], limits: Limits, meter: _Meter) -> Any:
    # Secrets are for the expressions whose context holds them: an attempt's config.
    program = _checked(expr, limits, secrets=SECRETS in context, events=EVENT in context,
                       items=ITEM in context)
    token = _METER.set(meter)
    try:
        evaluator = _BoundedEvaluator(program.tree, program.runner.new_activation())
        return _from_cel(evaluator.evaluate(_activation(program, context, meter)), expr, meter)
    except _Exceeded as exc:
        raise ExpressionError(f"expression {_short(expr)!r} {exc.reason}") from None
    except CELEvalError as exc:
        raise ExpressionError(f"expression {_short(expr)!r}: {_describe(exc)}") from None
    except ExpressionError:
        raise
    except Exception:  # a cel-python internal failure; its text is not for clients
        raise ExpressionError(f"expression {_short(expr)!r}: evaluation failed") from None
    finally:
        _METER.reset(token)


def evaluate(expr: str, context: Mapping[str, Any], *, limits: Limits | None = None) -> Any:
    """Evaluate CEL `expr` over `context` and return a plain JSON-like Python value."""
    limits = limits or _DEFAULT_LIMITS
    return _evaluate(expr, context, limits, _Meter(limits))


def evaluate_bool(expr: str, context: Mapping[str, Any], *, limits: Limits | None = None) -> bool:
    """Evaluate `expr` and require a boolean result (for conditions and `when`)."""
    result = evaluate(expr, context, limits=limits)
    if not isinstance(result, bool):
        raise ExpressionError(
            f"expression {_short(expr)!r}: result must be a bool, got {_json_type(result)}")
    return result


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for name, types in (("bool", bool), ("number", int | float), ("string", str), ("list", list),
                        ("object", dict)):
        if isinstance(value, types):
            return name
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Templates.


def find_templates(value: Any) -> list[str]:
    """Every expression inside `{{ ... }}` in any string of `value`, recursively, in order."""
    found: list[str] = []
    if isinstance(value, str):
        found.extend(m.group(1).strip() for m in _TEMPLATE.finditer(value))
    elif isinstance(value, Mapping):
        for item in value.values():
            found.extend(find_templates(item))
    elif isinstance(value, list | tuple):
        for item in value:
            found.extend(find_templates(item))
    return found


def _plain_numbers(value: Any) -> Any:
    """Integral floats as ints, deep, so that 5.0 is written "5" when stringified."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


def _stringify(value: Any) -> str:
    """How a value reads when embedded in a longer string: strings as-is, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(_plain_numbers(value), separators=(",", ":"), ensure_ascii=False)


def _render(value: Any, context: Mapping[str, Any], limits: Limits, meter: _Meter) -> Any:
    if isinstance(value, Mapping):
        return {k: _render(v, context, limits, meter) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_render(v, context, limits, meter) for v in value]
    if not isinstance(value, str) or "{{" not in value:
        return value
    whole = _WHOLE_TEMPLATE.fullmatch(value)
    if whole:
        # The whole string is one template: keep the value's JSON type.
        return _evaluate(whole.group(1).strip(), context, limits, meter)
    return _TEMPLATE.sub(
        lambda m: _stringify(_evaluate(m.group(1).strip(), context, limits, meter)), value)


def render(value: Any, context: Mapping[str, Any], *, limits: Limits | None = None) -> Any:
    """`value` with every `{{ expr }}` in its strings resolved over `context` (keys untouched).

    All the templates of `value` share one cost budget: a step's config is one unit of work.
    """
    limits = limits or _DEFAULT_LIMITS
    return _render(value, context, limits, _Meter(limits))
