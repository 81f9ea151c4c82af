"""Workflow specs: validation with one violation per problem, DAG queries, storage form, variables."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.limits import Limits
from conveyor.domain.spec import (
    RetryPolicy,
    Schedule,
    StepKind,
    StepSpec,
    Variable,
    WorkflowSpec,
    apply_variables,
    parse_workflow,
)
from conveyor.v1 import resources_pb2

# The example definition of SPEC §2, verbatim.
SPEC_EXAMPLE: dict[str, Any] = json.loads("""
{
  "project_id": "acme",
  "name": "deploy-service",
  "description": "Build, approve, deploy",
  "max_parallel_steps": 4,
  "max_concurrent_runs": 5,
  "timeout_seconds": 3600,
  "condition": "payload.environment != 'dev'",
  "schedule": {"cron": "0 9 * * 1-5", "timezone": "UTC"},
  "variables": [{"name": "environment", "required": true}, {"name": "region", "default": "eu"}],
  "steps": [
    {"ref": "build", "kind": "task", "queue": "builds",
     "config": {"commit": "{{ payload.commit }}"},
     "retry": {"max_attempts": 3, "initial_interval_seconds": 1, "backoff_coefficient": 2,
               "max_interval_seconds": 60},
     "timeout_seconds": 600},
    {"ref": "gate", "kind": "approval", "depends_on": ["build"]},
    {"ref": "is_prod", "kind": "condition", "depends_on": ["build"],
     "config": {"expression": "payload.environment == 'prod'"}},
    {"ref": "deploy", "kind": "http", "depends_on": ["gate", "is_prod"],
     "when": "steps.is_prod.output.result == true",
     "config": {"method": "POST", "url": "http://127.0.0.1:9000/deploy",
                "body": {"sha": "{{ steps.build.output.sha }}"}}},
    {"ref": "notify", "kind": "workflow", "depends_on": ["deploy"],
     "config": {"workflow_id": "notify-team", "payload": {"text": "deployed"}}}
  ]
}
""")


def as_from_proto(definition: dict[str, Any]) -> dict[str, Any]:
    """What the API layer hands to parse_workflow: the proto message as MessageToDict gives it."""
    message = json_format.ParseDict(definition, resources_pb2.Workflow())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "wf", "steps": [{"ref": "a", "kind": "noop"}]}
    data.update(overrides)
    return data


def violations_of(data: dict[str, Any], limits: Limits | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConveyorError) as caught:
        parse_workflow(data, limits)
    err = caught.value
    assert err.kind is ErrorKind.INVALID_ARGUMENT
    assert err.reason == "INVALID_WORKFLOW"
    return [(v.field, v.description) for v in err.violations]


def fields_of(data: dict[str, Any]) -> list[str]:
    return sorted(field for field, _ in violations_of(data))


def one_step(**step: Any) -> dict[str, Any]:
    return minimal(steps=[{"ref": "s", **step}])


# --- the SPEC example ------------------------------------------------------------------------

@pytest.mark.parametrize("source", [SPEC_EXAMPLE, as_from_proto(SPEC_EXAMPLE)], ids=["json", "proto"])
def test_spec_example_parses(source: dict[str, Any]) -> None:
    spec = parse_workflow(source)
    assert spec.name == "deploy-service"
    assert (spec.max_parallel_steps, spec.max_concurrent_runs, spec.timeout_seconds) == (4, 5, 3600)
    assert spec.condition == "payload.environment != 'dev'"
    assert spec.schedule == Schedule("0 9 * * 1-5", "UTC")
    assert spec.variables == (Variable("environment", required=True),
                              Variable("region", default="eu", has_default=True))
    assert [s.ref for s in spec.steps] == ["build", "gate", "is_prod", "deploy", "notify"]
    build = spec.step("build")
    assert build.kind is StepKind.TASK and build.queue == "builds" and build.timeout_seconds == 600
    assert build.retry == RetryPolicy(3, 1.0, 2.0, 60.0)
    deploy = spec.step("deploy")
    assert deploy.depends_on == ("gate", "is_prod")
    assert deploy.when == "steps.is_prod.output.result == true"
    assert deploy.config["method"] == "POST"
    assert spec.step("notify").config == {"workflow_id": "notify-team", "payload": {"text": "deployed"}}
    assert spec.topological_order() == ["build", "gate", "is_prod", "deploy", "notify"]


def test_parse_copies_config_so_callers_cannot_mutate_the_spec() -> None:
    data = copy.deepcopy(SPEC_EXAMPLE)
    spec = parse_workflow(data)
    data["steps"][3]["config"]["body"]["sha"] = "changed"
    assert spec.step("deploy").config["body"]["sha"] == "{{ steps.build.output.sha }}"


# --- one violation per problem ---------------------------------------------------------------

def test_several_problems_yield_one_violation_each_with_field_paths() -> None:
    data = {
        "name": "bad name!",
        "max_concurrent_runs": -1,
        "condition": "payload.x ==",
        "schedule": {"cron": "not a cron", "timezone": "Nowhere/Special"},
        "variables": [{"name": "a"}, {"name": "a"}, {"name": ""}],
        "steps": [
            {"ref": "a", "kind": "task", "queue": "q", "depends_on": ["a", "ghost"]},
            {"ref": "b", "kind": "http", "depends_on": ["a", "a"],
             "config": {"url": "http://x/{{ 1 + }}", "method": "FETCH", "extra": 1}},
            {"ref": "a", "kind": "teleport"},
            {"ref": "c", "kind": "condition", "when": "nope == 1", "config": {}},
            {"ref": "d", "kind": "noop", "retry": {"max_attempts": -2, "backoff_coefficient": 0.5}},
        ],
    }
    assert sorted(violations_of(data)) == sorted([
        ("name", "must start with a letter or digit and hold at most 200 letters, digits, '_', '.' or '-'"),
        ("max_concurrent_runs", "must not be negative"),
        ("condition", "expression 'payload.x ==': syntax error at line 1, column 11"),
        ("schedule.cron", "must be a valid five-field cron expression"),
        ("schedule.timezone", "unknown time zone 'Nowhere/Special'"),
        ("variables[1].name", "duplicate variable 'a' (already variables[0])"),
        ("variables[2].name", "required"),
        ("steps[0].depends_on[0]", "a step cannot depend on itself"),
        ("steps[0].depends_on[1]", "unknown step 'ghost'"),
        ("steps[1].depends_on[1]", "duplicate dependency 'a'"),
        ("steps[1].config.url", "invalid template: expression '1 +': syntax error at line 1, column 3"),
        ("steps[1].config.method", "must be one of DELETE, GET, HEAD, PATCH, POST, PUT"),
        ("steps[1].config.extra", "unknown field"),
        ("steps[2].ref", "duplicate ref 'a' (already used by steps[0])"),
        ("steps[2].kind", "must be one of " + ", ".join(StepKind)),
        ("steps[3].when", "expression 'nope == 1': unknown variable 'nope' (use payload, steps or run)"),
        ("steps[3].config.expression", "required (a non-empty string)"),
        ("steps[4].retry.max_attempts", "must be a whole number >= 1"),
        ("steps[4].retry.backoff_coefficient", "must be >= 1"),
    ])


def test_error_message_summarises_the_first_problem_and_counts_the_rest() -> None:
    with pytest.raises(ConveyorError) as caught:
        parse_workflow({"name": "", "steps": []})
    assert caught.value.message == "invalid workflow definition: name: required (and 1 more problem)"
    assert [v.field for v in caught.value.violations] == ["name", "steps"]


# --- workflow-level rules ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "deploy-service", "v1.2_x", "9lives", "x" * 200])
def test_good_names(name: str) -> None:
    assert parse_workflow(minimal(name=name)).name == name


@pytest.mark.parametrize("name", ["", "-lead", ".dot", "has space", "slash/y", "x" * 201, "ok\n",
                                  "0b6e1c8e-3c5a-4a8e-9d3f-1f2e3d4c5b6a",
                                  "0b6e1c8e3c5a4a8e9d3f1f2e3d4c5b6a"])
def test_bad_names(name: str) -> None:
    assert fields_of(minimal(name=name)) == ["name"]


def test_uuid_like_name_says_why() -> None:
    [(_, description)] = violations_of(minimal(name="0b6e1c8e-3c5a-4a8e-9d3f-1f2e3d4c5b6a"))
    assert "UUID" in description


def test_missing_name_and_steps() -> None:
    assert violations_of({}) == [("name", "required"), ("steps", "at least one step is required")]


@pytest.mark.parametrize("key", ["max_parallel_steps", "max_concurrent_runs", "timeout_seconds"])
def test_workflow_limits(key: str) -> None:
    assert getattr(parse_workflow(minimal(**{key: 7})), key) == 7
    assert getattr(parse_workflow(minimal(**{key: 7.0})), key) == 7
    assert fields_of(minimal(**{key: -1})) == [key]
    assert fields_of(minimal(**{key: 1.5})) == [key]
    assert fields_of(minimal(**{key: "3"})) == [key]


@pytest.mark.parametrize("cron", ["0 9 * * 1-5", "*/5 * * * *", "@daily"])
def test_good_schedules(cron: str) -> None:
    spec = parse_workflow(minimal(schedule={"cron": cron, "timezone": "Europe/Paris"}))
    assert spec.schedule == Schedule(cron, "Europe/Paris")


def test_schedule_timezone_defaults_to_utc() -> None:
    assert parse_workflow(minimal(schedule={"cron": "0 0 * * *"})).schedule == Schedule("0 0 * * *")


@pytest.mark.parametrize(("schedule", "fields"), [
    ({"cron": "61 * * * *"}, ["schedule.cron"]),
    ({"cron": "0 0 * * * *"}, ["schedule.cron"]),  # six fields would be read as seconds
    ({"cron": ""}, ["schedule.cron"]),
    ({}, ["schedule.cron"]),
    ({"cron": "0 0 * * *", "timezone": "Mars/Olympus"}, ["schedule.timezone"]),
    ({"cron": "0 0 * * *", "timezone": "../../etc/passwd"}, ["schedule.timezone"]),
    ({"cron": "0 0 * * *", "every": 5}, ["schedule.every"]),
])
def test_bad_schedules(schedule: dict[str, Any], fields: list[str]) -> None:
    assert fields_of(minimal(schedule=schedule)) == fields


# --- steps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["a", "_x", "Build_2", "x" * 64])
def test_good_refs(ref: str) -> None:
    assert parse_workflow(minimal(steps=[{"ref": ref, "kind": "noop"}])).steps[0].ref == ref


@pytest.mark.parametrize("ref", ["", "2fast", "has-dash", "dot.ted", "x" * 65, "trailing\n"])
def test_bad_refs(ref: str) -> None:
    assert fields_of(minimal(steps=[{"ref": ref, "kind": "noop"}])) == ["steps[0].ref"]


def test_malformed_ref_is_reported_once_not_again_by_its_dependents() -> None:
    data = minimal(steps=[{"ref": "bad-ref", "kind": "noop"},
                          {"ref": "b", "kind": "noop", "depends_on": ["bad-ref"]}])
    assert fields_of(data) == ["steps[0].ref"]


def test_missing_kind_and_unknown_step_field() -> None:
    assert fields_of(minimal(steps=[{"ref": "a", "kind": "noop", "needs": ["b"]}])) == ["steps[0].needs"]
    assert fields_of(minimal(steps=[{"ref": "a"}])) == ["steps[0].kind"]


def test_task_needs_a_queue_and_only_tasks_have_one() -> None:
    assert fields_of(one_step(kind="task")) == ["steps[0].queue"]
    assert fields_of(one_step(kind="noop", queue="q")) == ["steps[0].queue"]
    config = {"anything": {"goes": [1, "{{ payload.x }}"]}}
    assert parse_workflow(one_step(kind="task", queue="q", config=config)).steps[0].config == config


def test_task_config_templates_must_compile() -> None:
    data = one_step(kind="task", queue="q", config={"a": {"b": ["ok", "{{ payload. }}"]}})
    assert fields_of(data) == ["steps[0].config.a.b[1]"]


def test_step_timeout_and_when() -> None:
    spec = parse_workflow(one_step(kind="noop", timeout_seconds=30, when="payload.go == true"))
    assert spec.steps[0].timeout_seconds == 30 and spec.steps[0].when == "payload.go == true"
    assert fields_of(one_step(kind="noop", timeout_seconds=-5)) == ["steps[0].timeout_seconds"]
    assert fields_of(one_step(kind="noop", when="payload.go ==")) == ["steps[0].when"]


def test_http_config() -> None:
    spec = parse_workflow(one_step(kind="http", config={
        "url": "https://example.com/x", "method": "patch", "headers": {"X-A": "{{ run.id }}"},
        "body": [1, {"a": None}], "timeout_seconds": 2.5}))
    assert spec.steps[0].config == {"url": "https://example.com/x", "method": "PATCH",
                                    "headers": {"X-A": "{{ run.id }}"}, "body": [1, {"a": None}],
                                    "timeout_seconds": 2.5}
    # The method defaults to GET; a templated url or method is checked when rendered.
    assert parse_workflow(one_step(kind="http", config={"url": "{{ payload.url }}"})).steps[0].config == {
        "url": "{{ payload.url }}", "method": "GET"}
    assert parse_workflow(one_step(kind="http", config={
        "url": "http://h", "method": "{{ payload.m }}"})).steps[0].config["method"] == "{{ payload.m }}"


@pytest.mark.parametrize(("config", "fields"), [
    ({}, ["steps[0].config.url"]),
    ({"url": 5}, ["steps[0].config.url"]),
    ({"url": "ftp://h/x"}, ["steps[0].config.url"]),
    ({"url": "/relative"}, ["steps[0].config.url"]),
    ({"url": "http://h", "method": "TRACE"}, ["steps[0].config.method"]),
    ({"url": "http://h", "headers": {"a": 1, "b": "ok"}}, ["steps[0].config.headers.a"]),
    ({"url": "http://h", "headers": ["a"]}, ["steps[0].config.headers"]),
    ({"url": "http://h", "timeout_seconds": 0}, ["steps[0].config.timeout_seconds"]),
    ({"url": "http://h", "timeout_seconds": "5"}, ["steps[0].config.timeout_seconds"]),
    ({"url": "http://h", "retries": 3}, ["steps[0].config.retries"]),
])
def test_bad_http_config(config: dict[str, Any], fields: list[str]) -> None:
    assert fields_of(one_step(kind="http", config=config)) == fields


@pytest.mark.parametrize(("kind", "config"), [
    ("approval", {}),
    ("approval", {"message": "Deploy {{ payload.version }}?"}),
    ("input", {"message": "Pick", "schema": {"type": "object"}}),
    ("delay", {"seconds": 5.0}),
    ("delay", {"seconds": 0}),
    ("delay", {"seconds": "{{ payload.wait }}"}),
    ("delay", {"until": "2030-01-01T00:00:00Z"}),
    ("delay", {"until": "2030-01-01T09:00:00+02:00"}),
    ("delay", {"until": "{{ payload.at }}"}),
    ("condition", {"expression": "payload.n > 3"}),
    ("workflow", {"workflow_id": "child"}),
    ("workflow", {"workflow_id": "{{ payload.child }}", "payload": {"a": "{{ payload.a }}"}}),
    ("noop", {}),
    ("noop", {"output": {"anything": ["{{ payload }}", 1]}}),
    ("noop", {"output": 3.0}),
])
def test_good_kind_configs(kind: str, config: dict[str, Any]) -> None:
    assert parse_workflow(one_step(kind=kind, config=config)).steps[0].config == config


@pytest.mark.parametrize(("kind", "config", "fields"), [
    ("approval", {"message": 5}, ["steps[0].config.message"]),
    ("approval", {"approvers": ["x"]}, ["steps[0].config.approvers"]),
    ("input", {"schema": "object"}, ["steps[0].config.schema"]),
    ("delay", {}, ["steps[0].config"]),
    ("delay", {"seconds": 5, "until": "2030-01-01T00:00:00Z"}, ["steps[0].config"]),
    ("delay", {"seconds": -1}, ["steps[0].config.seconds"]),
    ("delay", {"seconds": "five"}, ["steps[0].config.seconds"]),
    ("delay", {"seconds": True}, ["steps[0].config.seconds"]),
    ("delay", {"until": "tomorrow"}, ["steps[0].config.until"]),
    ("delay", {"until": "2030-01-01T00:00:00"}, ["steps[0].config.until"]),  # no offset
    ("delay", {"seconds": "{{ payload. }}"}, ["steps[0].config.seconds"]),
    ("condition", {}, ["steps[0].config.expression"]),
    ("condition", {"expression": "payload.n >"}, ["steps[0].config.expression"]),
    ("condition", {"expression": "true", "else": 1}, ["steps[0].config.else"]),
    ("workflow", {}, ["steps[0].config.workflow_id"]),
    ("workflow", {"workflow_id": "c", "payload": [1]}, ["steps[0].config.payload"]),
    ("noop", {"output": 1, "extra": 2}, ["steps[0].config.extra"]),
    ("noop", {"output": "{{ nope }}"}, ["steps[0].config.output"]),
])
def test_bad_kind_configs(kind: str, config: dict[str, Any], fields: list[str]) -> None:
    assert fields_of(one_step(kind=kind, config=config)) == fields


# --- retry ------------------------------------------------------------------------------------

def test_retry_defaults_when_absent_or_zero() -> None:
    assert parse_workflow(one_step(kind="noop")).steps[0].retry == RetryPolicy()
    zero = {"max_attempts": 0, "initial_interval_seconds": 0, "backoff_coefficient": 0,
            "max_interval_seconds": 0}
    assert parse_workflow(one_step(kind="noop", retry=zero)).steps[0].retry == RetryPolicy(1, 1.0, 2.0, 0.0)


@pytest.mark.parametrize(("retry", "fields"), [
    ({"max_attempts": -1}, ["steps[0].retry.max_attempts"]),
    ({"max_attempts": 2.5}, ["steps[0].retry.max_attempts"]),
    ({"initial_interval_seconds": -1}, ["steps[0].retry.initial_interval_seconds"]),
    ({"max_interval_seconds": -1}, ["steps[0].retry.max_interval_seconds"]),
    ({"backoff_coefficient": 0.9}, ["steps[0].retry.backoff_coefficient"]),
    ({"backoff_coefficient": -2}, ["steps[0].retry.backoff_coefficient"]),
    ({"initial_interval_seconds": 10, "max_interval_seconds": 5}, ["steps[0].retry.max_interval_seconds"]),
    ({"initial_interval_seconds": "1"}, ["steps[0].retry.initial_interval_seconds"]),
    ({"jitter": 0.1}, ["steps[0].retry.jitter"]),
])
def test_bad_retry(retry: dict[str, Any], fields: list[str]) -> None:
    assert fields_of(one_step(kind="noop", retry=retry)) == fields


def test_backoff_follows_the_policy() -> None:
    policy = RetryPolicy(max_attempts=5, initial_interval_seconds=1, backoff_coefficient=2,
                         max_interval_seconds=5)
    assert [policy.backoff_seconds(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert RetryPolicy(initial_interval_seconds=2).effective_max_interval_seconds == 200
    assert RetryPolicy(initial_interval_seconds=2).backoff_seconds(100) == 200
    assert RetryPolicy().backoff_seconds(10_000) == 100  # no float overflow
    with pytest.raises(ValueError):
        policy.backoff_seconds(0)


def test_attempts_left() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.has_attempts_left(n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert RetryPolicy().has_attempts_left(1) is False


@given(initial=st.floats(0.001, 1000), coefficient=st.floats(1, 10), maximum=st.floats(0, 10_000),
       attempts=st.lists(st.integers(1, 2000), min_size=2, max_size=10))
def test_backoff_is_monotonic_and_capped(initial: float, coefficient: float, maximum: float,
                                         attempts: list[int]) -> None:
    policy = RetryPolicy(10, initial, coefficient, maximum)
    cap = maximum or 100 * initial
    waits = [policy.backoff_seconds(n) for n in sorted(attempts)]
    assert waits == sorted(waits)
    assert all(0 < w <= cap for w in waits)
    assert policy.backoff_seconds(1) == min(initial, cap)


# --- dependencies and cycles ------------------------------------------------------------------

def chain(*edges: tuple[str, list[str]]) -> dict[str, Any]:
    return minimal(steps=[{"ref": ref, "kind": "noop", "depends_on": deps} for ref, deps in edges])


def test_two_step_cycle_is_reported_once_with_its_path() -> None:
    assert violations_of(chain(("a", ["b"]), ("b", ["a"]))) == [
        ("steps[1].depends_on[0]", "dependency cycle: a -> b -> a (each step depends on the next)")]


def test_long_cycle_reports_the_whole_path() -> None:
    data = chain(("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", ["a"]))
    [(field, description)] = violations_of(data)
    assert field == "steps[1].depends_on[0]"
    assert description == "dependency cycle: a -> c -> b -> a (each step depends on the next)"


def test_separate_cycles_are_separate_problems() -> None:
    data = chain(("a", ["b"]), ("b", ["a"]), ("c", ["d"]), ("d", ["c"]), ("e", ["a", "c"]))
    assert fields_of(data) == ["steps[1].depends_on[0]", "steps[3].depends_on[0]"]


def test_deep_chains_do_not_hit_the_recursion_limit() -> None:
    n = 3000
    limits = Limits(max_steps=n)
    steps = [{"ref": f"s{i}", "kind": "noop", "depends_on": [f"s{i - 1}"] if i else []} for i in range(n)]
    spec = parse_workflow(minimal(steps=steps), limits)
    assert spec.descendants("s0") == [f"s{i}" for i in range(n)]
    steps[0]["depends_on"] = [f"s{n - 1}"]
    [(field, description)] = violations_of(minimal(steps=steps), limits)
    assert field == "steps[1].depends_on[0]"  # s1 -> s0 closes the loop found from s0
    assert description.startswith("dependency cycle: s0 -> s2999 -> s2998")


# --- DAG queries ------------------------------------------------------------------------------

DIAMOND = chain(("d", ["b", "c"]), ("b", ["a"]), ("c", ["a"]), ("a", []), ("e", []))


def test_dag_queries() -> None:
    spec = parse_workflow(DIAMOND)
    assert spec.topological_order() == ["a", "b", "c", "d", "e"]
    assert spec.dependents("a") == ("b", "c")
    assert spec.dependents("d") == ()
    assert spec.descendants("a") == ["a", "b", "c", "d"]
    assert spec.descendants("c") == ["c", "d"]
    assert spec.descendants("e") == ["e"]
    assert spec.step("c").depends_on == ("a",)
    for query in (spec.step, spec.dependents, spec.descendants):
        with pytest.raises(KeyError):
            query("zz")


def test_topological_order_returns_a_fresh_list() -> None:
    spec = parse_workflow(DIAMOND)
    spec.topological_order().clear()
    assert len(spec.topological_order()) == 5


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[str, list[str]]]:
    """Random DAGs: each step depends on a subset of earlier ones, then the list is shuffled."""
    n = draw(st.integers(1, 12))
    refs = [f"s{i}" for i in range(n)]
    edges = [(ref, sorted(draw(st.sets(st.sampled_from(refs[:i]), max_size=3))) if i else [])
             for i, ref in enumerate(refs)]
    return draw(st.permutations(edges))


@given(dags())
def test_dag_queries_agree_with_brute_force(edges: list[tuple[str, list[str]]]) -> None:
    spec = parse_workflow(chain(*edges))
    order = spec.topological_order()
    assert sorted(order) == sorted(ref for ref, _ in edges)
    position = {ref: i for i, ref in enumerate(order)}
    deps = dict(edges)
    for ref, parents in edges:
        assert all(position[p] < position[ref] for p in parents)
        assert spec.dependents(ref) == tuple(r for r, ps in edges if ref in ps)
        reachable = {ref}
        changed = True
        while changed:
            grown = reachable | {r for r, ps in deps.items() if set(ps) & reachable}
            changed, reachable = grown != reachable, grown
        assert spec.descendants(ref) == [r for r in order if r in reachable]


# --- storage form -----------------------------------------------------------------------------

def test_to_dict_is_json_and_round_trips() -> None:
    spec = parse_workflow(SPEC_EXAMPLE)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert WorkflowSpec.from_dict(stored) == spec
    assert parse_workflow(stored) == spec
    assert WorkflowSpec.from_dict(stored).topological_order() == spec.topological_order()


def test_null_default_survives_storage() -> None:
    spec = parse_workflow(minimal(variables=[{"name": "x", "default": None}, {"name": "y"}]))
    assert spec.variables == (Variable("x", default=None, has_default=True), Variable("y"))
    assert WorkflowSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


json_values = st.recursive(
    st.none() | st.booleans() | st.text(max_size=10) | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def specs(draw: st.DrawFn) -> WorkflowSpec:
    edges = draw(dags())
    steps = tuple(
        StepSpec(
            ref=ref, kind=draw(st.sampled_from(StepKind)), depends_on=tuple(deps),
            queue=draw(st.text(max_size=5)),
            config=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
            retry=RetryPolicy(draw(st.integers(1, 9)), draw(st.floats(0.1, 60)),
                              draw(st.floats(1, 4)), draw(st.floats(0, 600))),
            timeout_seconds=draw(st.integers(0, 10**6)), when=draw(st.text(max_size=8)),
            description=draw(st.text(max_size=8)))
        for ref, deps in edges)
    variables = tuple(
        Variable(name, draw(st.booleans()), default, has_default=has_default,
                 description=draw(st.text(max_size=5)))
        for name in draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=3))
        for has_default in [draw(st.booleans())]
        for default in [draw(json_values) if has_default else None])
    schedule = draw(st.none() | st.builds(Schedule, st.text(max_size=9), st.text(max_size=9)))
    return WorkflowSpec(
        name=draw(st.text(min_size=1, max_size=10)), description=draw(st.text(max_size=10)),
        max_parallel_steps=draw(st.integers(0, 99)), max_concurrent_runs=draw(st.integers(0, 99)),
        timeout_seconds=draw(st.integers(0, 10**6)), condition=draw(st.text(max_size=10)),
        schedule=schedule, variables=variables, steps=steps)


@given(specs())
def test_storage_round_trip(spec: WorkflowSpec) -> None:
    stored = json.loads(json.dumps(spec.to_dict()))
    assert WorkflowSpec.from_dict(stored) == spec


# --- variables --------------------------------------------------------------------------------

VARS = parse_workflow(minimal(variables=[
    {"name": "environment", "required": True},
    {"name": "region", "default": "eu"},
    {"name": "tags", "default": {"a": [1.0]}},
    {"name": "note"},
]))


def test_apply_variables_fills_defaults_and_keeps_given_values() -> None:
    payload = {"environment": "prod", "region": "us"}
    result = apply_variables(VARS, payload)
    assert result == {"environment": "prod", "region": "us", "tags": {"a": [1.0]}}
    assert payload == {"environment": "prod", "region": "us"}  # the input is not modified
    result["tags"]["a"].append(2.0)
    assert apply_variables(VARS, {"environment": "x"})["tags"] == {"a": [1.0]}  # defaults are copied


def test_apply_variables_reports_each_problem() -> None:
    with pytest.raises(ConveyorError) as caught:
        apply_variables(VARS, {"regoin": "eu", "extra": 1})
    err = caught.value
    assert (err.kind, err.reason) == (ErrorKind.INVALID_ARGUMENT, "INVALID_PAYLOAD")
    assert [(v.field, v.description) for v in err.violations] == [
        ("payload.environment", "required variable missing"),
        ("payload.regoin", "undeclared variable"),
        ("payload.extra", "undeclared variable"),
    ]


def test_required_variable_may_be_null_but_must_be_present() -> None:
    assert apply_variables(VARS, {"environment": None})["environment"] is None


def test_without_variables_any_payload_passes_unchanged() -> None:
    spec = parse_workflow(minimal())
    payload = {"anything": [1, 2]}
    assert apply_variables(spec, payload) is payload


@pytest.mark.parametrize(("variables", "fields"), [
    ([{"name": "a", "required": True, "default": 1}], ["variables[0].default"]),
    ([{"name": "a", "required": "yes"}], ["variables[0].required"]),
    ([{"name": "a", "type": "string"}], ["variables[0].type"]),
    (["a"], ["variables[0]"]),
    ({"a": 1}, ["variables"]),
])
def test_bad_variables(variables: Any, fields: list[str]) -> None:
    assert fields_of(minimal(variables=variables)) == fields


# --- limits and references (issue 5, item 3) -----------------------------------------------------


def test_steps_above_the_cap_are_one_violation() -> None:
    steps = [{"ref": f"s{i}", "kind": "noop"} for i in range(6)]
    assert violations_of(minimal(steps=steps), Limits(max_steps=5)) == [
        ("steps", "has 6 steps; at most 5 are allowed")]
    assert len(parse_workflow(minimal(steps=steps[:5]), Limits(max_steps=5)).steps) == 5
    assert Limits().max_steps == 1000


def test_expressions_longer_than_the_cap_are_violations() -> None:
    limits = Limits(max_expression_length=50)
    long = " || ".join(["payload.x == 1"] * 10)
    found = violations_of(minimal(condition=long, steps=[
        {"ref": "a", "kind": "noop", "when": long},
        {"ref": "b", "kind": "noop", "config": {"output": "{{ " + long + " }}"}}]), limits)
    assert [field for field, _ in found] == ["condition", "steps[0].when", "steps[1].config.output"]
    assert all("longer than 50" in description for _, description in found)


@pytest.mark.parametrize("text", ["{{ payload.x ", "ok {{ payload.x }} then {{ broken", "{{"])
def test_unclosed_templates_are_violations(text: str) -> None:
    step = {"ref": "a", "kind": "noop", "config": {"output": {"t": text}}}
    assert violations_of(minimal(steps=[step])) == [
        ("steps[0].config.output.t", "unclosed template: '{{' without its '}}'")]


def test_closed_templates_and_lone_closing_braces_are_fine() -> None:
    parse_workflow(minimal(steps=[{"ref": "a", "kind": "noop", "config": {
        "output": {"t": "{{ payload.x }} and {{ payload.y }}", "u": "a }} b", "v": "{ not a template }"}}}]))


def test_unknown_steps_in_expressions_and_templates_are_violations() -> None:
    found = violations_of(minimal(steps=[
        {"ref": "a", "kind": "noop"},
        {"ref": "b", "kind": "noop", "depends_on": ["a"], "when": "steps.nope.output.ok",
         "config": {"output": {"x": "{{ steps.ghost.output }}"}}},
        {"ref": "c", "kind": "condition", "depends_on": ["a"],
         "config": {"expression": "steps.missing.status == 'completed'"}},
    ]))
    assert sorted(found) == [
        ("steps[1].config.output.x", "unknown step 'ghost' (steps.ghost)"),
        ("steps[1].when", "unknown step 'nope' (steps.nope)"),
        ("steps[2].config.expression", "unknown step 'missing' (steps.missing)"),
    ]


def test_a_step_may_only_use_steps_it_depends_on() -> None:
    # build -> test -> ship; lint beside them. ship may use build (through test), not lint.
    definition = minimal(steps=[
        {"ref": "build", "kind": "noop"},
        {"ref": "lint", "kind": "noop"},
        {"ref": "test", "kind": "noop", "depends_on": ["build"]},
        {"ref": "ship", "kind": "noop", "depends_on": ["test"], "when": "steps.build.output.ok",
         "config": {"output": "{{ steps.lint.output }}"}},
    ])
    [(field, description)] = violations_of(definition)
    assert field == "steps[3].config.output"
    assert description.startswith("steps.lint is not a dependency of this step")
    definition["steps"][3]["depends_on"].append("lint")
    assert parse_workflow(definition).step("ship").when == "steps.build.output.ok"
    # Itself is not a dependency either: its output does not exist while it is evaluated.
    own = minimal(steps=[{"ref": "a", "kind": "noop", "when": "steps.a.status == 'completed'"}])
    assert violations_of(own)[0][1].startswith("steps.a is not a dependency")


def test_the_workflow_condition_cannot_use_steps() -> None:
    [(field, description)] = violations_of(minimal(condition="steps.a.output.ok"))
    assert field == "condition" and "cannot use steps.a" in description


def test_references_are_checked_in_linear_time_on_a_long_chain() -> None:
    # 1,000 steps, each reading the previous one's output: ancestors are bitsets, not a walk
    # per reference (this took seconds with a walk per reference).
    steps = [{"ref": f"s{i}", "kind": "noop", "depends_on": [f"s{i - 1}"] if i else [],
              "when": f"steps.s{i - 1}.status == 'completed'" if i else ""} for i in range(1000)]
    spec = parse_workflow(minimal(steps=steps))
    assert len(spec.steps) == 1000
