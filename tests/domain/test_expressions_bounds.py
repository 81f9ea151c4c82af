"""CEL bounds: every adversarial expression a client can write within the length limit is stopped
by a bound (parse depth, evaluation cost, value size) with a clean ExpressionError, or is allowed
and provably metered within the cost budget.

These tests check behaviour only. How much CPU a compile or an evaluation actually takes (the
~100 ms target the cost units are calibrated to) is measured by `bench/cel.py`, which runs these
same cases (`HOSTILE`, `BIG`) and prints the CPU of each next to the target: timed assertions
fail at random on a loaded machine.
"""

from __future__ import annotations

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

LIMITS = Limits()
FORTY = ",".join(str(i) for i in range(40))

# At the size limits a client can reach: a 256 KB payload, and many steps with outputs.
BIG: dict[str, Any] = {
    "payload": {"items": [0.0] * 20_000, "text": "x" * 200_000, "ints": list(range(5_000)),
                "obj": {str(i): i for i in range(5_000)}},
    "steps": {f"s{i}": {"output": {"v": [0.0] * 100}} for i in range(300)},
    "run": {"id": "run-1"},
}

# What stops each case (the end of its ExpressionError), or ALLOWED: it runs within the budget.
DEPTH = "nested too deeply (too many parentheses, brackets or chained operators)"
COST = f"exceeded its cost limit ({LIMITS.max_expression_cost} units)"
SIZE = f"built a value larger than {LIMITS.max_output_bytes} bytes"
ALLOWED = ""

# Each refused at compile time (depth) or while evaluating over BIG (cost, size), or allowed.
HOSTILE: dict[str, tuple[str, str]] = {
    "nested parentheses": ("(" * 999 + "1" + ")" * 999, DEPTH),
    "nested lists": ("[" * 999 + "]" * 999, DEPTH),
    "long + chain": ("+".join(["1"] * 1000), DEPTH),
    "unary chain": ("-" * 1999 + "1", DEPTH),
    "member chain": ("payload" + ".a" * 996, DEPTH),
    "huge list literal": ("[" + ",".join(["1"] * 999) + "]", ALLOWED),
    "nested map 40^3": (f"[{FORTY}].map(x, [{FORTY}].map(y, [{FORTY}].map(z, x*y*z)))", COST),
    "nested map over data": ("payload.items.map(x, payload.items.map(y, x + y))", COST),
    "all inside all": ("payload.ints.all(x, payload.ints.all(y, x != -1))", COST),
    "map over map keys": ("payload.obj.map(k, payload.obj.map(j, k + j))", COST),
    "string growth in map": ("payload.ints.map(x, payload.text + payload.text).size()", SIZE),
    "string concat chain": ("+".join(["payload.text"] * 150), DEPTH),
    "list concat": (" + ".join(["payload.items"] * 5), COST),
    "deep equality in map": ("payload.ints.map(x, payload.items == payload.items)", COST),
    "in over big list in map": ("payload.ints.map(x, 1.5 in payload.items)", COST),
    "one big value many times": ("payload.ints.map(x, payload.text)", COST),
    "string() copies in map": ("payload.ints.map(x, string(payload.text))", COST),
    "timestamp parsing in map":
        ("payload.ints.map(x, timestamp('2024-01-01T00:00:00Z') + duration('1h'))", COST),
    "catastrophic regex": ("payload.text.matches('(x+x+)+y')", ALLOWED),
    "regex in map": ("payload.ints.map(x, payload.text.matches('(x+x+)+y'))", COST),
    "whole payload": ("size(payload) > 0", ALLOWED),
    "whole steps": ("size(steps) > 0", ALLOWED),
}
REFUSED = {name: case for name, case in HOSTILE.items() if case[1] != ALLOWED}
RUNS = {name: case[0] for name, case in HOSTILE.items() if case[1] == ALLOWED}
# Far below what any allowed case costs over BIG (the cheapest, the regex over a 200 KB string,
# is charged ~3,400 units for its operand): an unmetered evaluation would pass under it.
SMALL_BUDGET = Limits(max_expression_cost=1_000)
# The 100,000-term expression of issue 5 that froze the server for 12 s.
HUNDRED_THOUSAND_TERMS = "+".join(["1"] * 100_000)


def test_every_hostile_case_fits_the_length_limit() -> None:
    # So it is the depth, cost or size bound that stops each one, not the length check.
    for expr, _ in HOSTILE.values():
        assert len(expr) <= LIMITS.max_expression_length


@pytest.mark.parametrize(("expr", "bound"), list(REFUSED.values()), ids=list(REFUSED))
def test_each_refused_case_is_stopped_by_its_bound(expr: str, bound: str) -> None:
    if bound == DEPTH:
        with pytest.raises(ExpressionError) as at_compile:
            compile_expression(expr)
        assert str(at_compile.value).endswith(bound)
    else:
        compile_expression(expr)  # valid CEL: only evaluating it costs too much
    with pytest.raises(ExpressionError) as caught:
        evaluate(expr, BIG)
    message = str(caught.value)
    assert message.endswith(bound), message
    assert "Traceback" not in message and "celpy" not in message


@pytest.mark.parametrize("expr", list(RUNS.values()), ids=list(RUNS))
def test_each_allowed_case_runs_within_the_default_cost_budget_and_is_metered(expr: str) -> None:
    # Within the default budget (<= max_expression_cost units) ...
    compile_expression(expr)
    evaluate(expr, BIG)
    # ... and charged for its work: the same evaluation is refused on a small budget.
    with pytest.raises(ExpressionError) as caught:
        evaluate(expr, BIG, limits=SMALL_BUDGET)
    assert str(caught.value).endswith(f"exceeded its cost limit ({SMALL_BUDGET.max_expression_cost} units)")


def test_the_issue_cases_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The 100,000-term expression: refused by its length before the parser sees it (parsing is
    # what cost 12 s of CPU and ~1 GB).
    expressions._program.cache_clear()
    parsed: list[str] = []
    real_compile = expressions._ENV.compile

    def compile_spy(text: str) -> Any:
        parsed.append(text)
        return real_compile(text)

    monkeypatch.setattr(expressions._ENV, "compile", compile_spy)
    with pytest.raises(ExpressionError, match="longer than 2000 characters"):
        evaluate(HUNDRED_THOUSAND_TERMS, {})
    with pytest.raises(ExpressionError, match="longer than 2000 characters"):
        compile_expression(HUNDRED_THOUSAND_TERMS)
    assert parsed == []
    # The nested map over 40 items that froze it for 9 s: 64,000 iterations, refused by cost.
    with pytest.raises(ExpressionError) as caught:
        evaluate(HOSTILE["nested map 40^3"][0], {})
    assert str(caught.value).endswith(COST)


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


def test_matches_uses_re2() -> None:
    # RE2 semantics: linear time, no backtracking, whatever the pattern. A backtracking engine
    # (Python's `re`) would accept a lookahead; RE2 refuses it.
    ctx = {"payload": {"s": "a" * 5_000 + "!"}}
    assert evaluate("payload.s.matches('^(a+)+$')", ctx) is False
    assert evaluate("'ab'.matches('^a(b|c)$')", {}) is True
    with pytest.raises(ExpressionError, match="evaluation failed"):
        evaluate("'ab'.matches('a(?=b)')", {})
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
