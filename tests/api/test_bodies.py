"""Raw REST bodies parsed strictly (api/bodies.py): what Envoy hands over for Create/Update/Trigger
becomes the typed request a gRPC client would send, or INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.api import httpbody_pb2

from conveyor.api.bodies import body_bytes, has_raw_body, take_raw_body
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.limits import Limits, largest_body_bytes, trigger_body_bytes
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb

LIMITS = Limits()


def trigger(raw: bytes, **bound: Any) -> runs_pb.TriggerWorkflowRunRequest:
    request = runs_pb.TriggerWorkflowRunRequest(
        workflow_id="wf", body=httpbody_pb2.HttpBody(content_type="application/json", data=raw), **bound)
    assert has_raw_body(request)
    parsed = take_raw_body(request, LIMITS)
    assert isinstance(parsed, runs_pb.TriggerWorkflowRunRequest)
    return parsed


def refused(raw: bytes, **bound: Any) -> tuple[str, list[tuple[str, str]]]:
    with pytest.raises(ConveyorError) as caught:
        trigger(raw, **bound)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    return caught.value.reason, [(v.field, v.description) for v in caught.value.violations]


def test_a_body_becomes_the_typed_request_with_the_path_and_query_fields() -> None:
    parsed = trigger(b'{"payload": {"a": [1, "x"]}, "tags": {"t": "v"}, "maxParallelSteps": "3",'
                     b' "check_conditions": true, "entity_id": null}', project_id="p")
    assert (parsed.workflow_id, parsed.project_id, parsed.max_parallel_steps) == ("wf", "p", 3)
    assert dict(parsed.tags) == {"t": "v"} and parsed.check_conditions
    assert parsed.payload["a"][1] == "x" and parsed.entity_id == ""
    assert not parsed.HasField("body")


def test_an_empty_body_is_an_empty_object() -> None:
    assert trigger(b"").workflow_id == "wf"
    assert trigger(b"  {} ").workflow_id == "wf"


@pytest.mark.parametrize(("raw", "reason", "field"), [
    (b'{"payload": {"a": 1}', "INVALID_JSON", "body"),
    (b"[1]", "INVALID_JSON", "body"),
    (b'{"payload": {"a": NaN}}', "INVALID_JSON", "body"),
    (b'{"payload": {"a": Infinity}}', "INVALID_JSON", "body"),
    (b'\xff{"a": 1}', "INVALID_JSON", "body"),
    (b'{"timeout_second": 5}', "UNKNOWN_FIELD", "timeout_second"),
    (b'{"workflow_id": "other"}', "UNKNOWN_FIELD", "workflow_id"),
    (b'{"body": {}}', "UNKNOWN_FIELD", "body"),
    (b'{"immediate": "true"}', "INVALID_FIELD", "immediate"),
    (b'{"immediate": 1}', "INVALID_FIELD", "immediate"),
    (b'{"max_parallel_steps": 1.5}', "INVALID_FIELD", "max_parallel_steps"),
    (b'{"max_parallel_steps": 4294967296}', "INVALID_FIELD", "max_parallel_steps"),
    (b'{"max_parallel_steps": true}', "INVALID_FIELD", "max_parallel_steps"),
    (b'{"entity_id": 5}', "INVALID_FIELD", "entity_id"),
    (b'{"tags": {"t": 1}}', "INVALID_FIELD", "tags[t]"),
    (b'{"tags": ["t"]}', "INVALID_FIELD", "tags"),
    (b'{"payload": "text"}', "INVALID_FIELD", "payload"),
    (b'{"payload": ' + b'{"a": ' * 25 + b"1" + b"}" * 26, "JSON_TOO_DEEP", "payload"),
    (b'[' * 100_000 + b']' * 100_000, "INVALID_JSON", "body"),
])
def test_bad_bodies_name_the_field(raw: bytes, reason: str, field: str) -> None:
    got_reason, violations = refused(raw)
    assert got_reason == reason
    assert field in [f for f, _ in violations], violations


def test_every_problem_is_reported_at_once() -> None:
    reason, violations = refused(b'{"colour": 1, "immediate": "yes", "run_as": []}')
    assert reason == "UNKNOWN_FIELD"
    assert [f for f, _ in violations] == ["colour", "immediate", "run_as"]


def test_a_field_given_in_the_url_and_the_body_must_agree() -> None:
    assert trigger(b'{"project_id": "p"}', project_id="p").project_id == "p"
    reason, violations = refused(b'{"project_id": "q"}', project_id="p")
    assert reason == "INVALID_FIELD"
    assert violations == [("project_id", "given in both the URL and the body, differently")]


def test_a_workflow_body_fills_the_workflow_field() -> None:
    request = wf_pb.UpdateWorkflowRequest(
        workflow_id="deploy",
        body=httpbody_pb2.HttpBody(data=b'{"name": "deploy", "steps": [{"ref": "a", "kind": "noop",'
                                        b' "timeoutSeconds": 5}]}'))
    parsed = take_raw_body(request, LIMITS)
    assert isinstance(parsed, wf_pb.UpdateWorkflowRequest)
    assert parsed.workflow_id == "deploy" and parsed.workflow.steps[0].timeout_seconds == 5
    misspelt = wf_pb.CreateWorkflowRequest(body=httpbody_pb2.HttpBody(
        data=b'{"name": "x", "steps": [{"ref": "a", "retry": {"max_attempt": 3}}]}'))
    with pytest.raises(ConveyorError) as caught:
        take_raw_body(misspelt, LIMITS)
    assert caught.value.reason == "UNKNOWN_FIELD"
    assert [v.field for v in caught.value.violations] == ["steps[0].retry.max_attempt"]


def test_typed_requests_are_not_raw() -> None:
    assert not has_raw_body(runs_pb.TriggerWorkflowRunRequest(workflow_id="wf"))
    assert not has_raw_body(wf_pb.GetWorkflowRequest(workflow_id="wf"))


# --- sizes and counts, before anything is converted ------------------------------------------------

def test_a_trigger_body_longer_than_its_bound_is_refused_before_parsing() -> None:
    cap = body_bytes("conveyor.v1.TriggerWorkflowRunRequest", LIMITS)
    assert cap == trigger_body_bytes(LIMITS)
    # Not even valid JSON: the length alone refuses it, nothing is parsed.
    reason, violations = refused(b"[" * (cap + 1))
    assert reason == "REQUEST_TOO_LARGE"
    assert [f for f, _ in violations] == ["body"]


def test_a_definition_body_longer_than_max_definition_bytes_is_refused_before_parsing() -> None:
    request = wf_pb.CreateWorkflowRequest(body=httpbody_pb2.HttpBody(
        data=b" " * LIMITS.max_definition_bytes + b"{}"))
    with pytest.raises(ConveyorError) as caught:
        take_raw_body(request, LIMITS)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert caught.value.reason == "REQUEST_TOO_LARGE"
    assert [v.field for v in caught.value.violations] == ["body"]


def test_a_payload_over_max_payload_bytes_as_compact_json_is_json_too_large() -> None:
    numbers = b",".join([b"1"] * (LIMITS.max_payload_bytes // 2 + 10))
    reason, violations = refused(b'{"payload": {"l": [' + numbers + b"]}}")
    assert (reason, [f for f, _ in violations]) == ("JSON_TOO_LARGE", ["payload"])


def test_whitespace_does_not_count_against_the_payload() -> None:
    # Pretty-printed: the body is ~3x the payload's compact size, which is under the limit.
    payload = {"l": [1] * (LIMITS.max_payload_bytes // 8)}
    raw = json.dumps({"payload": payload}, indent=4).encode()
    assert len(raw) > LIMITS.max_payload_bytes
    assert len(trigger(raw).payload["l"]) == len(payload["l"])


def test_too_many_steps_are_refused_without_checking_each() -> None:
    # Every step is wrong, but the count refuses them before any is looked at: one problem.
    steps = [{"bogus": i} for i in range(LIMITS.max_steps + 1)]
    request = wf_pb.CreateWorkflowRequest(body=httpbody_pb2.HttpBody(
        data=json.dumps({"name": "x", "steps": steps}).encode()))
    with pytest.raises(ConveyorError) as caught:
        take_raw_body(request, LIMITS, {"steps": LIMITS.max_steps})
    assert caught.value.reason == "TOO_MANY_VALUES"
    assert [v.field for v in caught.value.violations] == ["steps"]


def test_too_many_tags_are_refused_by_count() -> None:
    tags = {f"t{i}": 1 for i in range(LIMITS.max_tags + 1)}  # wrong type too: not looked at
    request = runs_pb.TriggerWorkflowRunRequest(workflow_id="wf", body=httpbody_pb2.HttpBody(
        data=json.dumps({"tags": tags}).encode()))
    with pytest.raises(ConveyorError) as caught:
        take_raw_body(request, LIMITS, {"tags": LIMITS.max_tags})
    assert caught.value.reason == "TOO_MANY_VALUES"
    assert [v.field for v in caught.value.violations] == ["tags"]


def test_the_largest_rest_body_is_what_the_largest_request_needs() -> None:
    assert largest_body_bytes(LIMITS) == LIMITS.max_definition_bytes == 2 * 1024 * 1024
    assert trigger_body_bytes(LIMITS) <= largest_body_bytes(LIMITS)
    bigger = Limits(max_payload_bytes=1024 * 1024)
    assert largest_body_bytes(bigger) == trigger_body_bytes(bigger) > bigger.max_definition_bytes
