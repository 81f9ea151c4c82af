"""CEL expressions and {{ }} templates: compile checks, evaluation over JSON data, rendering."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.domain.expressions import (
    ExpressionError,
    compile_expression,
    evaluate,
    evaluate_bool,
    find_templates,
    render,
)

# Shaped like the engine's context; every number is a float, as it is after a protobuf Struct.
CTX: dict[str, Any] = {
    "payload": {"count": 3.0, "ratio": 0.5, "env": "prod", "items": [1.0, 2.0, 3.0],
                "obj": {"a": 1.0, "b": [True, None]}, "name": "Ada", "nothing": None},
    "steps": {
        "build": {"output": {"sha": "abc123", "ok": True, "n": 2.0}, "status": "completed"},
        "is_prod": {"output": {"result": True}, "status": "completed"},
    },
    "run": {"id": "run-1", "attempt": 1},
}


# --- compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", [
    "payload.environment != 'dev'",
    "steps.is_prod.output.result == true",
    "has(steps.build.output.sha) && size(payload.items) > 2",
    "payload.items.exists(x, x > 2) && payload.items.all(y, y > 0)",
    "payload.items.map(i, i * 2).filter(j, j > 2)",
    "type(payload.env) == string",
    "run.id.startsWith('run-') ? 'a' : 'b'",
    "timestamp('2024-01-01T00:00:00Z') + duration('1h') > timestamp('2024-01-01T00:00:00Z')",
])
def test_valid_expressions_compile(expr: str) -> None:
    compile_expression(expr)


@pytest.mark.parametrize(("expr", "fragment"), [
    ("payload.x ==", "syntax error at line 1, column"),
    ("", "empty"),
    ("   ", "empty"),
    ("paylod.x == 1", "unknown variable 'paylod'"),
    ("foo(1)", "unknown function 'foo'"),
    ("payload.items.reduce(a, b, 0, a + b)", "unknown function 'reduce'"),
    ("google.protobuf.Int32Value{value: 1}", "message construction is not supported"),
    ("google.x", "unknown variable 'google'"),
])
def test_invalid_expressions_are_rejected_with_a_clean_message(expr: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(expr)
    message = str(caught.value)
    assert fragment in message
    assert "Traceback" not in message and "<class" not in message and "celpy" not in message


def test_compile_rejects_a_non_string() -> None:
    with pytest.raises(ExpressionError, match="must be a string"):
        compile_expression(42)  # type: ignore[arg-type]


# --- evaluate --------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "expected"), [
    ("payload.count == 3", True),
    ("3 == payload.count", True),
    ("payload.count == 3.0", True),
    ("payload.count != 3", False),
    ("payload.count > 2", True),
    ("2 < payload.count", True),
    ("payload.count >= 4", False),
    ("3 in payload.items", True),
    ("[1, 2, 3] == payload.items", True),
    ("{'a': 1, 'b': [true, null]} == payload.obj", True),
    ("1u == 1", True),
    ("payload.env == 1", False),  # different types are simply unequal
    ("payload.nothing == null", True),
    ("payload.count + 1", 4.0),
    ("1 + payload.count", 4.0),
    ("payload.count / 2", 1.5),  # JSON numbers stay doubles: no integer division
    ("7 / 2", 3),  # CEL int literals keep CEL int semantics
    ("payload.items[1]", 2.0),
    ("payload.items[steps.build.output.n]", 3.0),
    ("steps.build.output.sha", "abc123"),
    ("steps.is_prod.output.result == true", True),
    ("steps.build.status == 'completed'", True),
    ("has(steps.build.output.missing)", False),
    ("run.attempt", 1),
    ("payload.obj", {"a": 1.0, "b": [True, None]}),
    ("{'k': [1, 'x', true, null, 2.5]}", {"k": [1, "x", True, None, 2.5]}),
    ("size(steps)", 2),
    ("payload.name + ' ' + run.id", "Ada run-1"),
    ("timestamp('2024-01-01T00:00:00Z') + duration('90s')", "2024-01-01T00:01:30Z"),
])
def test_evaluate_returns_plain_json_values(expr: str, expected: Any) -> None:
    result = evaluate(expr, CTX)
    assert result == expected
    assert type(result) is type(expected)
    json.dumps(result)


def test_evaluate_results_contain_no_cel_types() -> None:
    result = evaluate("{'a': [1, 2.5, 'x', true, {'b': null}]}", CTX)
    stack: list[Any] = [result]
    while stack:
        value = stack.pop()
        assert type(value) in (dict, list, str, int, float, bool, type(None))
        if isinstance(value, dict):
            assert all(type(k) is str for k in value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


@pytest.mark.parametrize(("expr", "fragment"), [
    ("steps.build.output.missing", "no such key 'missing'"),
    ("steps.nope.output.x", "no such key 'nope'"),
    ("payload['absent']", "no such key 'absent'"),
    ("payload.items[10]", "index out of range"),
    ("payload.items[-1]", "index out of range"),  # celpy alone would wrap around
    ("payload.items[0.5]", "no matching overload for (list, double)"),
    ("1 / 0", "division by zero"),
    ("payload.env + 1", "no matching overload for (string, int)"),
    ("payload.env.x", "not a map"),
    ("1.0 / 0.0", "not a finite number"),
    ("9223372036854775807 + 1", "overflow"),
])
def test_evaluation_errors_are_client_safe(expr: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate(expr, CTX)
    message = str(caught.value)
    assert fragment in message
    assert expr.split()[0][:10] in message  # names the failing expression
    for leak in ("Traceback", "<class", "celpy", "Activation", "NameContainer"):
        assert leak not in message


def test_unknown_root_at_evaluation_is_client_safe() -> None:
    # `steps` is a valid root but absent from a trigger-time context.
    with pytest.raises(ExpressionError) as caught:
        evaluate("steps.a.output", {"payload": {}})
    assert str(caught.value) == "expression 'steps.a.output': unknown variable 'steps'"


def test_only_referenced_steps_matter() -> None:
    # A step the expression does not name may hold anything, even values CEL cannot represent.
    ctx = {"steps": {"a": {"output": {"x": 1.0}}, "b": {"output": {"x": object()}}}}
    assert evaluate("steps.a.output.x == 1", ctx) is True
    with pytest.raises(ExpressionError, match="unsupported type"):
        evaluate("size(steps) == 2", ctx)


def test_short_circuit_skips_missing_data() -> None:
    assert evaluate("has(steps.x) && steps.x.output.y == 1", CTX) is False
    assert evaluate("false && steps.x.output.y", CTX) is False


def test_evaluate_bool() -> None:
    assert evaluate_bool("payload.env != 'dev'", CTX) is True
    assert evaluate_bool("payload.count < 3", CTX) is False
    with pytest.raises(ExpressionError, match="must be a bool, got number"):
        evaluate_bool("payload.count", CTX)
    with pytest.raises(ExpressionError, match="must be a bool, got string"):
        evaluate_bool("payload.env", CTX)


def test_large_integers_outside_int64_become_doubles() -> None:
    assert evaluate("payload.big > 1.0", {"payload": {"big": 2**70}}) is True


# --- templates -------------------------------------------------------------------------------

def test_find_templates_walks_dicts_and_lists_in_order() -> None:
    config = {"url": "http://h/{{ payload.a }}/{{payload.b}}", "n": 5, "flag": True,
              "body": {"list": ["{{ steps.x.output }}", {"deep": "x{{ run.id }}"}], "plain": "text"},
              "{{ keys.are.not.templates }}": "no"}
    assert find_templates(config) == ["payload.a", "payload.b", "steps.x.output", "run.id"]
    assert find_templates("no templates { here }") == []
    assert find_templates(None) == []


def test_whole_string_template_keeps_the_json_type() -> None:
    assert render("{{ payload.count }}", CTX) == 3.0
    assert render("  {{ payload.obj }}\n", CTX) == {"a": 1.0, "b": [True, None]}
    assert render("{{ steps.is_prod.output.result }}", CTX) is True
    assert render("{{ payload.nothing }}", CTX) is None
    assert render("{{ payload.items }}", CTX) == [1.0, 2.0, 3.0]


def test_embedded_templates_are_stringified() -> None:
    text = ("n={{ payload.count }} r={{ payload.ratio }} o={{ payload.obj }} b={{ true }} "
            "z={{ null }} s={{ payload.name }} l={{ [1, 2] }}")
    assert render(text, CTX) == 'n=3 r=0.5 o={"a":1,"b":[true,null]} b=true z=null s=Ada l=[1,2]'


def test_two_templates_are_not_one() -> None:
    assert render("{{ payload.count }}{{ payload.count }}", CTX) == "33"
    assert render("{{ payload.name }} and {{ run.id }}", CTX) == "Ada and run-1"


def test_render_recurses_and_leaves_non_strings_alone() -> None:
    config = {"body": {"sha": "{{ steps.build.output.sha }}", "n": 5, "ok": False,
                       "items": ["{{ payload.count }}", "lit", 1.5]},
              "{{ key }}": "kept"}
    assert render(config, CTX) == {"body": {"sha": "abc123", "n": 5, "ok": False,
                                            "items": [3.0, "lit", 1.5]},
                                   "{{ key }}": "kept"}
    assert render(config, CTX) is not config


def test_render_failures_raise_expression_error() -> None:
    with pytest.raises(ExpressionError, match="no such key 'sha'"):
        render({"a": ["{{ steps.is_prod.output.sha }}"]}, CTX)
    with pytest.raises(ExpressionError, match="empty"):
        render("x{{ }}", CTX)


def test_render_without_templates_returns_equal_value() -> None:
    assert render("just text {not a template}", {}) == "just text {not a template}"


json_scalars = (st.none() | st.booleans() | st.text(max_size=20)
                | st.integers(min_value=-(2**63), max_value=2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_whole_template_round_trips_any_json_value(value: Any) -> None:
    assert render("{{ payload.v }}", {"payload": {"v": value}}) == value


def _normalise(value: Any) -> Any:
    """JSON equality where 5 and 5.0 are the same number."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return [_normalise(v) for v in value]


@given(json_values)
def test_embedded_template_is_the_value_as_json_text(value: Any) -> None:
    out = render("<{{ payload.v }}>", {"payload": {"v": value}})
    assert out.startswith("<") and out.endswith(">")
    inner = out[1:-1]
    if isinstance(value, str):
        assert inner == value
    else:
        assert _normalise(json.loads(inner)) == _normalise(value)
        if isinstance(value, float) and value.is_integer():
            assert "." not in inner and "e" not in inner.lower()


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_number_equality_ignores_int_double_split(x: float) -> None:
    ctx = {"payload": {"x": x}}
    if x.is_integer() and abs(x) < 2**63:
        assert evaluate(f"payload.x == {int(x)}", ctx) is True
        assert evaluate(f"{int(x)} == payload.x", ctx) is True
        assert evaluate(f"payload.x >= {int(x)} && payload.x <= {int(x)}", ctx) is True
    assert evaluate("payload.x == payload.x", ctx) is (not math.isnan(x))
