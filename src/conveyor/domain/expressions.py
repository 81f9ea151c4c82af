"""CEL expressions and `{{ expr }}` templates: compiling, evaluating and rendering.

Owns every use of cel-python in Conveyor. Expressions (a workflow's `condition`, a step's `when`,
a condition step's `expression`) and templates inside step config are evaluated over
`{"payload": ..., "steps": {"<ref>": {"output": ..., "status": ...}}, "run": ...}` and give back
plain JSON-like Python values. Errors are `ExpressionError`s whose message is safe to show to a
client: cel-python's own messages embed Python class reprs and whole activations, so they are
rewritten here and never passed through.

Numbers: every JSON number reaching us through a protobuf Struct is a double (`3` arrives as
`3.0`), while CEL literals like `3` are ints and CEL refuses to compare or combine the two. So
equality, ordering, `in`, `+ - * /` and list indexing accept an int and a double together and
compare/compute them as numbers (modern CEL has heterogeneous numeric comparison; the arithmetic
promotion to double is our leniency for JSON data). Values from the context stay doubles rather
than being turned into ints, so that `payload.total / payload.n` divides the same way whatever
the values happen to be.
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
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, base_functions, tree_dump

__all__ = [
    "ExpressionError",
    "compile_expression",
    "evaluate",
    "evaluate_bool",
    "find_templates",
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

# The variables an expression may start from (SPEC §2).
_ROOTS = frozenset({"payload", "steps", "run"})
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
    """CEL equality where numbers compare by value across int/uint/double, deep into containers."""
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


# ---------------------------------------------------------------------------------------------
# Compilation.


@dataclass(frozen=True)
class _Program:
    """A compiled expression and the `steps.<ref>` it reads (None: it uses `steps` as a whole)."""

    runner: celpy.Runner
    step_refs: frozenset[str] | None


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


def _analyse(expr: str, tree: lark.Tree) -> frozenset[str] | None:
    """Reject unknown functions and variables (CEL's checker would); find the steps read.

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

    step_refs: set[str] = set()
    steps_mentions = 0
    steps_selections = 0
    for node in tree.iter_subtrees_topdown():
        if node.data in ("ident", "dot_ident"):
            name = _token(node.children[0])
            if name not in _ROOTS and name not in bound and name not in _TYPE_NAMES:
                raise ExpressionError(
                    f"expression {_short(expr)!r}: unknown variable {name!r} "
                    "(use payload, steps or run)")
            if name == "steps" and "steps" not in bound:
                steps_mentions += 1
        elif node.data == "member_object":
            raise ExpressionError(
                f"expression {_short(expr)!r}: message construction is not supported")
        elif node.data == "member_dot":
            # member_dot(member(primary(ident("steps"))), ref): a plain `steps.<ref>` selection.
            inner = node.children[0]
            if (isinstance(inner, lark.Tree) and len(inner.children) == 1
                    and isinstance(inner.children[0], lark.Tree)
                    and inner.children[0].data == "primary"
                    and isinstance(inner.children[0].children[0], lark.Tree)
                    and inner.children[0].children[0].data == "ident"
                    and _token(inner.children[0].children[0].children[0]) == "steps"):
                steps_selections += 1
                step_refs.add(_token(node.children[1]))
    # Only when every use of `steps` selects a named step can the rest be left out of the
    # activation; `size(steps)` or `steps[x]` need all of it.
    if "steps" in bound or steps_selections != steps_mentions:
        return None
    return frozenset(step_refs)


@functools.lru_cache(maxsize=2048)
def _program(expr: str) -> _Program:
    """Parse, check and prepare `expr` once; the engine evaluates the same strings repeatedly."""
    if not expr.strip():
        raise ExpressionError("expression is empty")
    try:
        tree = _ENV.compile(expr)
    except CELParseError as exc:
        where = f" at line {exc.line}, column {exc.column}" if exc.line else ""
        raise ExpressionError(f"expression {_short(expr)!r}: syntax error{where}") from None
    except Exception:  # lark/recursion failures on pathological input
        raise ExpressionError(f"expression {_short(expr)!r}: cannot be parsed") from None
    step_refs = _analyse(expr, tree)
    return _Program(_ENV.program(tree, functions=_OVERRIDES), step_refs)


def compile_expression(expr: str) -> None:
    """Raise ExpressionError unless `expr` is a valid CEL expression over payload/steps/run."""
    if not isinstance(expr, str):
        raise ExpressionError("expression must be a string")
    _program(expr)


# ---------------------------------------------------------------------------------------------
# Evaluation.


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _to_cel(value: Any) -> Any:
    """A JSON-like Python value as CEL values (numbers keep their int/double nature)."""
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
        return celtypes.MapType({celtypes.StringType(str(k)): _to_cel(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return celtypes.ListType([_to_cel(v) for v in value])
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


def _from_cel(value: Any, expr: str) -> Any:
    """A CEL result as plain JSON-like Python (bool, int, float, str, None, list, dict)."""
    if value is None:
        return None
    if isinstance(value, bool | celtypes.BoolType):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExpressionError(f"expression {_short(expr)!r}: result is not a finite number")
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.datetime | datetime.timedelta):
        # celpy renders timestamps as RFC 3339 and durations like "90s", as proto3 JSON does.
        return str(value)
    if isinstance(value, Mapping):
        return {_key(k): _from_cel(v, expr) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_from_cel(v, expr) for v in value]
    raise ExpressionError(f"expression {_short(expr)!r}: result is not a JSON value")


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


def evaluate(expr: str, context: Mapping[str, Any]) -> Any:
    """Evaluate CEL `expr` over `context` and return a plain JSON-like Python value."""
    if not isinstance(expr, str):
        raise ExpressionError("expression must be a string")
    program = _program(expr)
    activation: dict[str, Any] = {}
    for name, value in context.items():
        if name == "steps" and program.step_refs is not None and isinstance(value, Mapping):
            # Convert only the steps the expression reads: runs can hold many large outputs.
            value = {ref: value[ref] for ref in program.step_refs if ref in value}
        activation[name] = _to_cel(value)
    try:
        result = program.runner.evaluate(activation)
    except CELEvalError as exc:
        raise ExpressionError(f"expression {_short(expr)!r}: {_describe(exc)}") from None
    except Exception:  # a cel-python internal failure; its text is not for clients
        raise ExpressionError(f"expression {_short(expr)!r}: evaluation failed") from None
    return _from_cel(result, expr)


def evaluate_bool(expr: str, context: Mapping[str, Any]) -> bool:
    """Evaluate `expr` and require a boolean result (for conditions and `when`)."""
    result = evaluate(expr, context)
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


def _render_string(text: str, context: Mapping[str, Any]) -> Any:
    whole = _WHOLE_TEMPLATE.fullmatch(text)
    if whole:
        # The whole string is one template: keep the value's JSON type.
        return evaluate(whole.group(1).strip(), context)
    if "{{" not in text:
        return text
    return _TEMPLATE.sub(lambda m: _stringify(evaluate(m.group(1).strip(), context)), text)


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """`value` with every `{{ expr }}` in its strings resolved over `context` (keys untouched)."""
    if isinstance(value, str):
        return _render_string(value, context)
    if isinstance(value, Mapping):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render(v, context) for v in value]
    return value
