"""The step-kind registry (domain/kinds.py): every kind has one complete entry, every entry's
config check refuses what it does not know, the http config is checked by one definition when
written and when rendered, and nothing outside the registry branches over kinds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from conveyor.domain.checks import Problems
from conveyor.domain.kinds import KINDS, WORKER_KINDS, Start, StepKind, http_problems, kind_of, parse_config
from conveyor.domain.limits import Limits
from conveyor.domain.spec import parse_workflow

# A config each kind accepts as it is (the smallest that says something).
VALID: dict[StepKind, dict[str, Any]] = {
    StepKind.TASK: {"anything": {"the": "worker's input"}},
    StepKind.HTTP: {"url": "https://example.com/hook"},
    StepKind.APPROVAL: {"message": "ok?"},
    StepKind.INPUT: {"message": "which?", "schema": {"type": "object"}},
    StepKind.DELAY: {"seconds": 5},
    StepKind.CONDITION: {"expression": "true"},
    StepKind.WORKFLOW: {"workflow_id": "child"},
    StepKind.NOOP: {"output": {"a": 1}},
    StepKind.MAP: {"items": [1, 2], "step": {"kind": "noop", "config": {"output": {"n": "{{ item }}"}}}},
    StepKind.WAIT_EVENT: {"event": "order.paid"},
}
SRC = Path(__file__).resolve().parents[2] / "src" / "conveyor"


def problems_of(kind: StepKind, config: Any) -> list[tuple[str, str]]:
    problems = Problems(Limits())
    parse_config(kind, config, "config", problems)
    return [(v.field, v.description) for v in problems.violations]


def test_every_kind_has_one_entry_under_its_own_name() -> None:
    assert set(KINDS) == set(StepKind)
    for kind, entry in KINDS.items():
        assert entry.kind is kind
        assert kind_of(str(kind)) is entry  # records hold the kind as text


@pytest.mark.parametrize("kind", list(StepKind))
def test_each_entry_says_how_its_attempts_start(kind: StepKind) -> None:
    entry = KINDS[kind]
    # In-engine and fan-out kinds say what an attempt does; leased kinds which key wakes their
    # holders; child-run kinds neither (the runner starts the child).
    assert (entry.run is not None) == (entry.start in (Start.ENGINE, Start.FAN_OUT))
    assert (entry.inner is not None) == (entry.start is Start.FAN_OUT)  # a map's items run its step
    assert (entry.wake is not None) == (entry.start is Start.LEASED)
    assert not entry.queued or entry.start is Start.LEASED  # a queue is where holders lease from


@pytest.mark.parametrize("kind", list(StepKind))
def test_each_entry_accepts_its_valid_config_and_refuses_an_unknown_key(kind: StepKind) -> None:
    assert problems_of(kind, VALID[kind]) == []
    assert problems_of(kind, [1]) == [("config", "must be an object")]
    if KINDS[kind].config_keys is None:
        # Only a task's config is free-form: it is its worker's input (SPEC §2).
        assert kind is StepKind.TASK
        assert problems_of(kind, {**VALID[kind], "bogus": 1}) == []
    else:
        assert set(VALID[kind]) <= KINDS[kind].config_keys  # type: ignore[operator]
        assert problems_of(kind, {**VALID[kind], "bogus": 1}) == [("config.bogus", "unknown field")]


def test_the_registry_is_what_a_workflow_is_parsed_by() -> None:
    steps = [{"ref": str(k), "kind": str(k), "config": VALID[k],
              **({"queue": "q"} if KINDS[k].queued else {})} for k in StepKind]
    spec = parse_workflow({"name": "every-kind", "steps": steps})
    assert [s.kind for s in spec.steps] == list(StepKind)
    # Secrets may be named only where the config leaves the engine when an attempt starts.
    assert {k for k in StepKind if KINDS[k].secrets} == {StepKind.TASK, StepKind.HTTP}
    assert {StepKind.TASK} == WORKER_KINDS


HTTP_BAD: list[tuple[dict[str, Any], tuple[str, str]]] = [
    ({"method": "GET"}, ("url", "required (a non-empty string)")),
    ({"url": 5}, ("url", "required (a non-empty string)")),
    ({"url": "ftp://example.com/x"}, ("url", "must be an http or https URL with a host")),
    ({"url": "https://example.com", "method": "BREW"},
     ("method", "must be one of DELETE, GET, HEAD, PATCH, POST, PUT")),
    ({"url": "https://example.com", "method": ["GET"]}, ("method", "must be a string")),
    ({"url": "https://example.com", "headers": "x: y"}, ("headers", "must be an object of strings")),
    ({"url": "https://example.com", "headers": {"x": {"nested": 1}}}, ("headers.x", "must be a string")),
    ({"url": "https://example.com", "timeout_seconds": 0}, ("timeout_seconds", "must be a number > 0")),
    ({"url": "https://example.com", "timeout_seconds": True}, ("timeout_seconds", "must be a number > 0")),
    ({"url": "https://example.com", "timeout_seconds": "5"}, ("timeout_seconds", "must be a number > 0")),
]


@pytest.mark.parametrize(("config", "problem"), HTTP_BAD)
def test_an_http_config_is_checked_by_one_definition_when_written_and_when_rendered(
        config: dict[str, Any], problem: tuple[str, str]) -> None:
    if problem[0] == "url" and isinstance(config.get("url"), str):
        problem = (problem[0], _url_problem(config["url"]))
    written = list(http_problems(config, 2048, rendered=False))
    rendered = list(http_problems(config, 2048, rendered=True))
    assert written == rendered == [problem]
    assert problems_of(StepKind.HTTP, config) == [(f"config.{problem[0]}", problem[1])]


def _url_problem(url: str) -> str:
    from conveyor.domain.egress import url_problem
    problem = url_problem(url, 2048)
    assert problem is not None
    return problem


def test_templates_are_checked_once_rendered_and_rendered_headers_may_be_scalars() -> None:
    written = {"url": "{{ payload.url }}", "method": "{{ payload.method }}",
               "headers": {"x-n": "{{ payload.n }}"}}
    assert list(http_problems(written, 2048, rendered=False)) == []
    # What the templates rendered to is checked before the request, without quoting it (a
    # rendered URL may hold a secret).
    secret = "https://user:s3cr3t@10.0.0.1 /x"
    got = list(http_problems({"url": secret, "method": "brew", "headers": {"x-n": 5}}, 2048, rendered=True))
    assert [key for key, _ in got] == ["url", "method"]
    assert all("s3cr3t" not in text for _, text in got)
    # A whole-string template keeps its JSON type: a number or boolean header is sent as text.
    assert list(http_problems({"url": "https://example.com", "headers": {"a": 5, "b": True}}, 2048,
                              rendered=True)) == []
    assert list(http_problems({"url": "https://example.com", "headers": {"a": None}}, 2048,
                              rendered=True)) == [("headers.a", "must be a string")]


# Where a kind may still be named outside the registry: the http executor leasing its own kind,
# the operator actions that exist for one kind each, and the placeholder of an unknown kind.
ALLOWED = {
    "engine/http_steps.py": {"StepKind.HTTP"},
    "domain/operations.py": {"StepKind.APPROVAL", "StepKind.INPUT"},
    "domain/spec.py": {"StepKind.NOOP"},
}
_NAMED = re.compile(r"StepKind\.[A-Z_]+")
# `kind == StepKind...`, `kind in (StepKind...`, `step.kind == "http"` and the like (a bare
# `kind == "map"` may be a JSON value's kind, as in expressions.py).
_OP = r"\s*(?:==|!=|\bin\b|\bnot in\b)\s*[\(\{\[]?\s*"
_CHAIN = re.compile(r"\bkind" + _OP + r"StepKind|\.kind" + _OP + r"\"(?:"
                    + "|".join(k.value for k in StepKind) + r")\"")


# The server's packages (the SDK and the CLI are clients: their `kind` is a message's).
SERVER = {"domain", "engine", "storage", "api"}


def test_no_branch_over_kinds_outside_the_registry() -> None:
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "domain/kinds.py" or rel.split("/")[0] not in SERVER:
            continue
        text = path.read_text()
        named = set(_NAMED.findall(text)) - ALLOWED.get(rel, set())
        chains = _CHAIN.findall(text)
        if named or chains:
            found[rel] = named | set(chains)
    assert found == {}
