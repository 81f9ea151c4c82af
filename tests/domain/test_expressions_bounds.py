"""CEL bounds: no input within the length limit makes one compile or evaluation cost more than
~100 ms of CPU or build an oversized value; every refusal is a clean ExpressionError."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from conveyor.domain import expressions
from conveyor.domain.expressions import (
    ExpressionError,
    compile_expression,
    evaluate,
    referenced_steps,
    render,
)
from conveyor.domain.limits import Limits

# CPU time, so that other processes on a shared machine do not make a bound look broken. The
# target is ~100 ms; the measured worst case is ~80 ms (README "CEL"), so 150 leaves headroom
# for slower machines without letting an unbounded case (seconds) through.
CPU_BUDGET_S = 0.150

FORTY = ",".join(str(i) for i in range(40))

# At the size limits a client can reach: a 256 KB payload, and many steps with outputs.
BIG: dict[str, Any] = {
    "payload": {"items": [0.0] * 20_000, "text": "x" * 200_000, "ints": list(range(5_000)),
                "obj": {str(i): i for i in range(5_000)}},
    "steps": {f"s{i}": {"output": {"v": [0.0] * 100}} for i in range(300)},
    "run": {"id": "run-1"},
}


def _cpu(call: Callable[[], Any], *, fresh: bool = True) -> tuple[float, Any]:
    """CPU seconds `call` took, and what it returned or raised (`fresh`: nothing compiled yet)."""
    if fresh:
        expressions._program.cache_clear()
    start = time.process_time()
    try:
        outcome: Any = call()
    except ExpressionError as exc:
        outcome = exc
    return time.process_time() - start, outcome


# Each refused or bounded at compile time (length, depth) or while evaluating (cost, size).
HOSTILE = {
    "nested parentheses": "(" * 999 + "1" + ")" * 999,
    "nested lists": "[" * 999 + "]" * 999,
    "long + chain": "+".join(["1"] * 1000),
    "unary chain": "-" * 1999 + "1",
    "member chain": "payload" + ".a" * 996,
    "huge list literal": "[" + ",".join(["1"] * 999) + "]",
    "nested map 40^3": f"[{FORTY}].map(x, [{FORTY}].map(y, [{FORTY}].map(z, x*y*z)))",
    "nested map over data": "payload.items.map(x, payload.items.map(y, x + y))",
    "all inside all": "payload.ints.all(x, payload.ints.all(y, x != -1))",
    "map over map keys": "payload.obj.map(k, payload.obj.map(j, k + j))",
    "string growth in map": "payload.ints.map(x, payload.text + payload.text).size()",
    "string concat chain": "+".join(["payload.text"] * 150),
    "list concat": " + ".join(["payload.items"] * 5),
    "deep equality in map": "payload.ints.map(x, payload.items == payload.items)",
    "in over big list in map": "payload.ints.map(x, 1.5 in payload.items)",
    "one big value many times": "payload.ints.map(x, payload.text)",
    "string() copies in map": "payload.ints.map(x, string(payload.text))",
    "timestamp parsing in map":
        "payload.ints.map(x, timestamp('2024-01-01T00:00:00Z') + duration('1h'))",
    "catastrophic regex": "payload.text.matches('(x+x+)+y')",
    "regex in map": "payload.ints.map(x, payload.text.matches('(x+x+)+y'))",
    "whole payload": "size(payload) > 0",
    "whole steps": "size(steps) > 0",
}


@pytest.mark.parametrize("expr", list(HOSTILE.values()), ids=list(HOSTILE))
def test_no_compile_or_evaluation_exceeds_its_cpu_budget(expr: str) -> None:
    assert len(expr) <= Limits().max_expression_length
    compile_seconds, _ = _cpu(lambda: compile_expression(expr))
    # As at run time: the definition was compiled when it was stored.
    evaluate_seconds, outcome = _cpu(lambda: evaluate(expr, BIG), fresh=False)
    assert compile_seconds < CPU_BUDGET_S
    assert evaluate_seconds < CPU_BUDGET_S
    if isinstance(outcome, ExpressionError):
        assert "Traceback" not in str(outcome) and "celpy" not in str(outcome)


def test_the_issue_cases_are_refused_quickly() -> None:
    # The 100,000-term expression that froze the server for 12 s.
    seconds, outcome = _cpu(lambda: evaluate("+".join(["1"] * 100_000), {}))
    assert isinstance(outcome, ExpressionError)
    assert "longer than 2000 characters" in str(outcome)
    assert seconds < 0.01
    # The nested map over 40 items that froze it for 9 s.
    seconds, outcome = _cpu(lambda: evaluate(HOSTILE["nested map 40^3"], {}))
    assert isinstance(outcome, ExpressionError)
    assert str(outcome).endswith("exceeded its cost limit (100000 units)")
    assert seconds < CPU_BUDGET_S


def test_length_is_checked_before_parsing() -> None:
    limits = Limits(max_expression_length=10)
    compile_expression("1 + 2 == 3", limits=limits)
    with pytest.raises(ExpressionError, match="longer than 10 characters"):
        compile_expression("1 + 2 == 3 ", limits=limits)
    with pytest.raises(ExpressionError, match="longer than 10 characters"):
        evaluate("payload.x == 1", {"payload": {"x": 1}}, limits=limits)
    with pytest.raises(ExpressionError, match="longer than 10 characters"):
        render({"a": "{{ payload.x + 1 }}"}, {"payload": {"x": 1}}, limits=limits)


def test_nesting_depth_is_refused_at_compile_time() -> None:
    compile_expression("(" * 20 + "1" + ")" * 20)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression("(" * 30 + "1" + ")" * 30)
    compile_expression(" + ".join(["payload.a"] * 100))


def test_cost_limit_is_the_configured_one() -> None:
    expr = "payload.ints.map(x, x * 2)"
    ctx = {"payload": {"ints": list(range(100))}}
    assert len(evaluate(expr, ctx)) == 100
    with pytest.raises(ExpressionError) as caught:
        evaluate(expr, ctx, limits=Limits(max_expression_cost=1_000))
    assert str(caught.value) == (
        "expression 'payload.ints.map(x, x * 2)' exceeded its cost limit (1000 units)")


def test_results_and_built_values_are_capped_at_the_output_limit() -> None:
    limits = Limits(max_output_bytes=1_000)
    ctx = {"payload": {"text": "x" * 600, "ints": list(range(10))}}
    assert len(evaluate("payload.text", ctx, limits=limits)) == 600
    with pytest.raises(ExpressionError, match="built a value larger than 1000 bytes"):
        evaluate("size(payload.text + payload.text) > 0", ctx, limits=limits)
    with pytest.raises(ExpressionError, match="result is larger than 1000 bytes"):
        evaluate("payload.ints.map(x, payload.text)", ctx, limits=limits)


def test_one_render_shares_one_budget() -> None:
    ctx = {"payload": {"ints": list(range(100))}}
    one = {"a": "{{ payload.ints.map(x, x * 2) }}"}
    cost = Limits(max_expression_cost=15_000)
    assert len(render(one, ctx, limits=cost)["a"]) == 100
    with pytest.raises(ExpressionError, match="exceeded its cost limit"):
        render({f"k{i}": one["a"] for i in range(5)}, ctx, limits=cost)


def test_catastrophic_regex_is_linear() -> None:
    # RE2 semantics: no backtracking, whatever the pattern.
    ctx = {"payload": {"s": "a" * 5_000 + "!"}}
    seconds, outcome = _cpu(lambda: evaluate("payload.s.matches('^(a+)+$')", ctx))
    assert outcome is False
    assert seconds < 0.05
    with pytest.raises(ExpressionError, match=r"evaluation failed|invalid"):
        evaluate("'abc'.matches('(')", {})


def test_only_the_fields_read_are_converted() -> None:
    # A payload near its size limit costs nothing to an expression that reads one field of it.
    limits = Limits(max_expression_cost=2_000)
    assert evaluate("payload.env == 'prod'", {**BIG, "payload": {**BIG["payload"], "env": "prod"}},
                    limits=limits) is True
    with pytest.raises(ExpressionError, match="exceeded its cost limit"):
        evaluate("size(payload) > 0", BIG, limits=limits)


@pytest.mark.parametrize(("expr", "refs"), [
    ("steps.build.output.sha == 'x'", {"build"}),
    ("has(steps.a.output) && steps.b.status == 'completed'", {"a", "b"}),
    ("payload.steps.x", set()),
    ("size(steps) > 1", set()),
    ("steps['dyn'].output", set()),
    ("[1].map(steps, steps)", set()),
])
def test_referenced_steps(expr: str, refs: set[str]) -> None:
    assert referenced_steps(expr) == refs


def test_referenced_steps_rejects_an_invalid_expression() -> None:
    with pytest.raises(ExpressionError, match="syntax error"):
        referenced_steps("steps.a ==")
