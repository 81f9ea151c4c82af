"""Limits at the edge (issue 5, item 3) through the real server: every hostile input is
INVALID_ARGUMENT naming the field, with a stable reason, and nothing is stored."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from conveyor.api.errors import MAX_ERROR_TEXT, MAX_VIOLATIONS
from conveyor.api.requests import (
    BULK_FIELDS,
    DOCUMENT_PROTOBUF_GROWTH,
    EVENT_TRIGGER_FIELDS,
    FILTER_FIELDS,
    ID_FIELDS,
    NOTIFICATION_FIELDS,
    SECRET_FIELDS,
    SHORT_TEXT_FIELDS,
    STEP_FIELDS,
    TAG_FIELDS,
    TEXT_FIELDS,
    VARIABLE_FIELDS,
    _document,
)
from conveyor.domain.limits import Limits
from conveyor.v1 import events_service_pb2 as events_pb
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, RichError, failure, gated, listed, stream_failure, two_steps

LIMITS = Limits()


async def stored_runs(api: Api) -> list[pb.WorkflowRun]:
    runs, _ = await listed(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(limit=1000)))
    return runs


async def stored_workflows(api: Api) -> list[pb.Workflow]:
    workflows, _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(limit=1000)))
    return workflows


def assert_invalid(error: RichError, reason: str, field: str) -> None:
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert error.info is not None and error.info.reason == reason, error.info
    assert field in [f for f, _ in error.violations], error.violations


def nested(depth: int) -> dict[str, Any]:
    """A JSON object `depth` levels deep ({} is 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _length_delimited(number: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (fields here are < 16 and lengths < 2**21)."""
    length, size = b"", len(payload)
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([number << 3 | 2]) + length + payload


def deep_struct_bytes(depth: int) -> bytes:
    """A serialized Struct `depth` levels deep, written by hand: protobuf's own Python API refuses
    to build one past its recursion limit, and a hostile client does not need that API."""
    struct = b""
    for _ in range(depth):
        value = _length_delimited(5, struct)  # Value.struct_value
        entry = _length_delimited(1, b"a") + _length_delimited(2, value)  # map entry: key, value
        struct = _length_delimited(1, entry)  # Struct.fields
    return struct


# --- strings -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"entity_id": "e" * 100_000}, "entity_id", "FIELD_TOO_LONG"),
    ({"run_as": "r" * (LIMITS.max_id_length + 1)}, "run_as", "FIELD_TOO_LONG"),
    ({"idempotency_key": "k" * 1000}, "idempotency_key", "FIELD_TOO_LONG"),
    ({"tags": {"k" * 1000: "v"}}, "tags[" + "k" * 40 + "…]", "FIELD_TOO_LONG"),
    ({"tags": {"k": "v" * 100_000}}, "tags[k]", "FIELD_TOO_LONG"),
    ({"entity_id": "a\x00b"}, "entity_id", "INVALID_CHARACTER"),
    ({"run_as": "\x00"}, "run_as", "INVALID_CHARACTER"),
    ({"idempotency_key": "key\x00"}, "idempotency_key", "INVALID_CHARACTER"),
    ({"tags": {"k\x00": "v"}}, "tags[k\x00]", "INVALID_CHARACTER"),
    ({"tags": {"k": "v\x00"}}, "tags[k]", "INVALID_CHARACTER"),
    ({"tags": {f"t{i}": "v" for i in range(LIMITS.max_tags + 1)}}, "tags", "TOO_MANY_VALUES"),
    ({"payload": {"x": "a\x00b"}}, "payload.x", "INVALID_CHARACTER"),
    ({"payload": {"k\x00": 1}}, "payload.k\x00", "INVALID_CHARACTER"),
    ({"payload": {"x": "p" * (LIMITS.max_payload_bytes + 1)}}, "payload", "JSON_TOO_LARGE"),
    ({"payload": nested(LIMITS.max_json_depth + 1)}, "payload", "JSON_TOO_DEEP"),
    ({"max_parallel_steps": -1}, "max_parallel_steps", "INVALID_FIELD"),
    ({"project_id": "p" * 300}, "project_id", "FIELD_TOO_LONG"),
])
async def test_hostile_triggers_are_refused_and_store_nothing(
        api: Api, fields: dict[str, Any], field: str, reason: str) -> None:
    wf = await api.create_workflow(two_steps())

    error = await failure(api.trigger(wf.id, **fields))

    assert_invalid(error, reason, field)
    assert await stored_runs(api) == []


async def test_payload_at_the_depth_limit_is_accepted(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id, payload=nested(LIMITS.max_json_depth))
    assert json_format.MessageToDict(run.payload) == nested(LIMITS.max_json_depth)


async def test_non_finite_numbers_are_refused(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    payload = struct_pb2.Struct()
    payload.fields["x"].number_value = float("nan")
    request = runs_pb.TriggerWorkflowRunRequest(workflow_id=wf.id, payload=payload)

    error = await failure(api.runs.TriggerWorkflowRun(request))

    assert_invalid(error, "INVALID_FIELD", "payload")
    assert await stored_runs(api) == []


@pytest.mark.parametrize(("depth", "reason"), [
    (33, "JSON_TOO_DEEP"),  # a trigger's payload still decodes at 33 (1 + 3 x 33 levels)
    (34, "REQUEST_UNDECODABLE"),
    (40, "REQUEST_UNDECODABLE"),
    (98, "REQUEST_UNDECODABLE"),
])
async def test_structs_nested_past_protobufs_limit_are_invalid_argument(
        api: Api, depth: int, reason: str) -> None:
    # Past protobuf's recursion limit a request cannot even be decoded; it used to be grpc's
    # UNKNOWN with the DecodeError's text (a 500 through Envoy).
    wf = await api.create_workflow(two_steps())
    request = runs_pb.TriggerWorkflowRunRequest(workflow_id=wf.id).SerializeToString()
    request += _length_delimited(3, deep_struct_bytes(depth))  # the payload field
    call = api.channel.unary_unary("/conveyor.v1.WorkflowRunsService/TriggerWorkflowRun",
                                   request_serializer=lambda raw: raw,
                                   response_deserializer=pb.WorkflowRun.FromString)

    error = await failure(call(request))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == reason
    assert "DecodeError" not in error.message and "Error parsing" not in error.message
    assert await stored_runs(api) == []


async def test_unknown_fields_on_the_grpc_wire_are_refused(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    # Field 99 (varint 1) appended to a valid request: a client built from another contract.
    raw = runs_pb.TriggerWorkflowRunRequest(workflow_id=wf.id).SerializeToString() + b"\x98\x06\x01"
    call = api.channel.unary_unary("/conveyor.v1.WorkflowRunsService/TriggerWorkflowRun",
                                   request_serializer=lambda data: data,
                                   response_deserializer=pb.WorkflowRun.FromString)

    error = await failure(call(raw))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "UNKNOWN_FIELD"
    assert error.violations == [("request", "unknown field number(s) 99")]
    assert await stored_runs(api) == []


# --- workflow definitions ------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"description": "d" * (LIMITS.max_text_length + 1)}, "workflow.description", "FIELD_TOO_LONG"),
    ({"name": "n\x00"}, "workflow.name", "INVALID_CHARACTER"),
    ({"steps": [{"ref": "a", "kind": "noop", "config": {"output": nested(LIMITS.max_json_depth)}}]},
     "workflow.steps[0].config", "JSON_TOO_DEEP"),
    ({"steps": [{"ref": "a", "kind": "noop", "when": "w" * (LIMITS.max_text_length + 1)}]},
     "workflow.steps[0].when", "FIELD_TOO_LONG"),
    ({"steps": [{"ref": "a", "kind": "noop", "queue": "q\x00"}]},
     "workflow.steps[0].queue", "INVALID_CHARACTER"),
    ({"steps": [{"ref": f"s{i}", "kind": "noop"} for i in range(LIMITS.max_steps + 1)]},
     "workflow.steps", "TOO_MANY_VALUES"),
    ({"variables": [{"name": "v", "default": nested(LIMITS.max_json_depth + 1)}]},
     "workflow.variables[0].default", "JSON_TOO_DEEP"),
])
async def test_hostile_definitions_are_refused_and_store_nothing(
        api: Api, change: dict[str, Any], field: str, reason: str) -> None:
    error = await failure(api.create_workflow({**two_steps(), **change}))

    assert_invalid(error, reason, field)
    assert await stored_workflows(api) == []


async def test_a_step_config_at_the_depth_limit_is_accepted(api: Api) -> None:
    # The step's config document counts from its own braces: {"output": <19 levels>} is 20.
    definition = {"name": "deep", "steps": [
        {"ref": "a", "kind": "noop", "config": {"output": nested(LIMITS.max_json_depth - 1)}}]}
    wf = await api.create_workflow(definition)
    assert wf.steps[0].config["output"]


# --- lists, page tokens, bulk operations, step operations ----------------------------------------

def forged(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


FORGED_TOKENS = [
    "!!!not base64!!!",
    forged({"a": 1}),
    forged([1]),
    forged(["not a time", "id"]),
    forged(["2026-01-01T00:00:00", "id"]),  # no offset
    forged(["0001-01-01T00:00:00+05:00", "id"]),  # out of range once in UTC
    forged([12, 34]),
    forged(["2026-01-01T00:00:00+00:00", 10**30]),
    forged(["2026-01-01T00:00:00+00:00", ""]),
    forged([True, "x"]),
    forged([[[[[[[[[[]]]]]]]]]]),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
]
POSITION_TOKENS = [forged(["x"]), forged([10**20]), forged([-1]), forged([1.5]), forged([True]), forged("x")]


@pytest.mark.parametrize("token", FORGED_TOKENS)
async def test_forged_run_and_workflow_page_tokens_are_invalid_page_token(api: Api, token: str) -> None:
    for call in (api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(page_token=token)),
                 api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(page_token=token))):
        error = await stream_failure(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.info is not None and error.info.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("token", POSITION_TOKENS + FORGED_TOKENS[:2])
async def test_forged_step_and_event_page_tokens_are_invalid_page_token(api: Api, token: str) -> None:
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id)
    steps = steps_pb.ListStepRunsRequest(workflow_run_id=run.id, page_token=token)
    events = runs_pb.ListRunEventsRequest(workflow_run_id=run.id, page_token=token)
    for call in (api.steps.ListStepRuns(steps), api.runs.ListRunEvents(events)):
        error = await stream_failure(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.info is not None and error.info.reason == "INVALID_PAGE_TOKEN"


async def test_a_huge_page_token_is_refused_by_length(api: Api) -> None:
    error = await stream_failure(api.runs.ListWorkflowRuns(
        runs_pb.ListWorkflowRunsRequest(page_token="A" * 100_000)))
    assert_invalid(error, "FIELD_TOO_LONG", "page_token")


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"tag": ["team:web"] * 1000}, "tag", "TOO_MANY_VALUES"),
    ({"workflow_id": ["w"] * (LIMITS.max_filter_values + 1)}, "workflow_id", "TOO_MANY_VALUES"),
    ({"status": ["running"] * (LIMITS.max_filter_values + 1)}, "status", "TOO_MANY_VALUES"),
    ({"tag": ["no-colon"]}, "tag[0]", "INVALID_TAG_FILTER"),
    ({"tag": [":value"]}, "tag[0]", "INVALID_TAG_FILTER"),
    ({"tag": ["k:\x00"]}, "tag[0]", "INVALID_CHARACTER"),
    ({"triggered_by": "x" * 1000}, "triggered_by", "FIELD_TOO_LONG"),
    ({"started_after": "0001-01-01T00:00:00Z", "limit": -5}, "limit", "INVALID_PAGE_SIZE"),
])
async def test_bad_run_filters_are_invalid_argument(
        api: Api, fields: dict[str, Any], field: str, reason: str) -> None:
    request = json_format.ParseDict(fields, runs_pb.ListWorkflowRunsRequest())
    error = await stream_failure(api.runs.ListWorkflowRuns(request))
    assert_invalid(error, reason, field)


async def test_out_of_range_timestamps_are_invalid_argument(api: Api) -> None:
    request = runs_pb.ListWorkflowRunsRequest()
    request.started_after.seconds = 10**15  # past year 9999: datetime cannot hold it
    error = await stream_failure(api.runs.ListWorkflowRuns(request))
    assert_invalid(error, "INVALID_TIME", "started_after")


async def test_too_many_bulk_ids_are_refused(api: Api) -> None:
    ids = [f"r{i}" for i in range(LIMITS.max_bulk_ids + 1)]
    error = await failure(api.runs.BulkCancelWorkflowRuns(runs_pb.BulkCancelWorkflowRunsRequest(
        workflow_run_ids=ids)))
    assert_invalid(error, "TOO_MANY_VALUES", "workflow_run_ids")


async def test_step_operations_refuse_long_text_nul_and_deep_data_and_change_nothing(api: Api) -> None:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id)
    await api.engine.tick()

    long_comment = await failure(api.steps.ApproveStep(steps_pb.ApproveStepRequest(
        workflow_run_id=run.id, step_ref="gate", comment="c" * 100_000)))
    nul_reason = await failure(api.steps.SkipStep(steps_pb.SkipStepRequest(
        workflow_run_id=run.id, step_ref="gate", reason="why\x00")))
    data = json_format.ParseDict(nested(LIMITS.max_json_depth + 1), struct_pb2.Struct())
    deep_data = await failure(api.steps.SubmitStepInput(steps_pb.SubmitStepInputRequest(
        workflow_run_id=run.id, step_ref="answer", data=data)))
    result = json_format.ParseDict({"blob": "x" * (LIMITS.max_payload_bytes + 1)}, struct_pb2.Struct())
    big_result = await failure(api.steps.ForceCompleteStep(steps_pb.ForceCompleteStepRequest(
        workflow_run_id=run.id, step_ref="gate", result=result)))

    assert_invalid(long_comment, "FIELD_TOO_LONG", "comment")
    assert_invalid(nul_reason, "INVALID_CHARACTER", "reason")
    assert_invalid(deep_data, "JSON_TOO_DEEP", "data")
    assert_invalid(big_result, "JSON_TOO_LARGE", "result")
    steps, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run.id)))
    by_ref = {s.step_ref: s for s in steps}
    assert by_ref["gate"].status == pb.StepStatus.waiting
    assert by_ref["answer"].status == pb.StepStatus.waiting


# --- the error itself stays bounded --------------------------------------------------------------

async def test_errors_quoting_client_text_stay_small(api: Api) -> None:
    # 1,000 bad tags: at most MAX_VIOLATIONS violations, each text cut, so the trailer stays under
    # grpc's 8 KB metadata limit and the client gets the error instead of a transport failure.
    tags = {f"{'k' * 150}{i}": "v\x00" for i in range(LIMITS.max_tags)}
    wf = await api.create_workflow(two_steps())
    error = await failure(api.trigger(wf.id, tags=tags))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.violations) == MAX_VIOLATIONS
    assert len(error.message) <= MAX_ERROR_TEXT
    long_filter = await stream_failure(api.runs.ListWorkflowRuns(
        runs_pb.ListWorkflowRunsRequest(tag=["x" * LIMITS.max_short_text_length])))
    assert len(long_filter.message) <= MAX_ERROR_TEXT


# --- every field has a limit ---------------------------------------------------------------------

REQUEST_MODULES = (runs_pb, steps_pb, wf_pb, workers_pb, events_pb)


def request_types() -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    pending = [message for module in REQUEST_MODULES
               for name, message in module.DESCRIPTOR.message_types_by_name.items()
               if name.endswith("Request")]
    while pending:
        message = pending.pop()
        if message.full_name in found or message.full_name.startswith("google."):
            continue
        if message.GetOptions().map_entry:
            continue  # a map's keys and values: the map's own class (checked below)
        found[message.full_name] = message
        pending.extend(f.message_type for f in message.fields if f.message_type is not None)
    return list(found.values())


def test_every_string_and_repeated_field_of_every_request_has_a_limit() -> None:
    string_classes = (ID_FIELDS, SHORT_TEXT_FIELDS, TEXT_FIELDS, SECRET_FIELDS)
    count_classes = (FILTER_FIELDS, BULK_FIELDS, STEP_FIELDS, VARIABLE_FIELDS, TAG_FIELDS,
                     NOTIFICATION_FIELDS, EVENT_TRIGGER_FIELDS)
    for message in request_types():
        for field in message.fields:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                assert field.name in TAG_FIELDS and field.name in SHORT_TEXT_FIELDS, field.full_name
            elif field.is_repeated:
                assert sum(field.name in c for c in count_classes) == 1, field.full_name
            if field.type == FieldDescriptor.TYPE_STRING:
                assert sum(field.name in c for c in string_classes) == 1, field.full_name


# --- sizes and counts refused before anything is converted (issue 5, item 4) ---------------------

def numbers_payload(count: int) -> struct_pb2.Struct:
    payload = struct_pb2.Struct()
    payload.get_or_create_list("l").extend([1.0] * count)
    return payload


async def test_a_payload_too_large_as_protobuf_is_refused_unconverted(api: Api) -> None:
    # 300,000 numbers: 3.3 MB of protobuf, over DOCUMENT_PROTOBUF_GROWTH x max_payload_bytes.
    wf = await api.create_workflow(two_steps())
    payload = numbers_payload(300_000)
    assert payload.ByteSize() > DOCUMENT_PROTOBUF_GROWTH * LIMITS.max_payload_bytes

    error = await failure(api.runs.TriggerWorkflowRun(
        runs_pb.TriggerWorkflowRunRequest(workflow_id=wf.id, payload=payload)))

    assert_invalid(error, "JSON_TOO_LARGE", "payload")
    assert "as protobuf" in error.message
    assert await stored_runs(api) == []


async def test_a_payload_too_large_only_as_json_is_refused_after_conversion(api: Api) -> None:
    # Numbers take 4 bytes as JSON ("1.0,") and 11 as protobuf: 0.26 x the limit of them is
    # over the limit as JSON and under 3 x it as protobuf.
    wf = await api.create_workflow(two_steps())
    payload = numbers_payload(int(0.26 * LIMITS.max_payload_bytes))
    assert payload.ByteSize() <= DOCUMENT_PROTOBUF_GROWTH * LIMITS.max_payload_bytes

    error = await failure(api.runs.TriggerWorkflowRun(
        runs_pb.TriggerWorkflowRunRequest(workflow_id=wf.id, payload=payload)))

    assert_invalid(error, "JSON_TOO_LARGE", "payload")
    assert "as JSON" in error.message
    assert await stored_runs(api) == []


async def test_the_largest_payload_of_numbers_is_accepted(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    count = LIMITS.max_payload_bytes // 4 - 10  # {"l":[1.0,1.0,...]} just under the limit
    run = await api.trigger(wf.id, payload={"l": [1.0] * count})
    assert len(run.payload["l"]) == count


async def test_a_force_complete_result_too_large_as_protobuf_changes_nothing(api: Api) -> None:
    wf = await api.create_workflow(gated())
    run = await api.trigger(wf.id)
    await api.engine.tick()

    error = await failure(api.steps.ForceCompleteStep(steps_pb.ForceCompleteStepRequest(
        workflow_run_id=run.id, step_ref="gate", result=numbers_payload(300_000))))

    assert_invalid(error, "JSON_TOO_LARGE", "result")
    steps, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run.id)))
    assert {s.step_ref: s.status for s in steps}["gate"] == pb.StepStatus.waiting


async def test_a_grpc_definition_over_max_definition_bytes_is_refused_by_its_size(api: Api) -> None:
    # Nine configs of 250 KB: each within max_payload_bytes, together over max_definition_bytes.
    steps = [{"ref": f"s{i}", "kind": "task", "config": {"blob": "x" * 250_000}} for i in range(9)]
    workflow = json_format.ParseDict({"name": "big", "steps": steps}, pb.Workflow())
    assert workflow.ByteSize() > LIMITS.max_definition_bytes

    error = await failure(api.workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(workflow=workflow)))

    assert_invalid(error, "REQUEST_TOO_LARGE", "workflow")
    assert await stored_workflows(api) == []


async def test_too_many_steps_are_refused_without_walking_them(api: Api) -> None:
    # Every step has a NUL in its ref: walked, each would be a problem of its own.
    steps = [{"ref": f"s{i}\x00", "kind": "noop"} for i in range(3 * LIMITS.max_steps)]

    error = await failure(api.create_workflow({"name": "many", "steps": steps}))

    assert_invalid(error, "TOO_MANY_VALUES", "workflow.steps")
    assert [f for f, _ in error.violations] == ["workflow.steps"]
    assert await stored_workflows(api) == []


@pytest.mark.parametrize("document", [
    {},
    {"a": [1, 2.5, -3e300, "x", True, False, None, {"b": []}, [[{}]]], "": {"k": "é\u2028"}},
    nested(LIMITS.max_json_depth),
])
def test_documents_are_measured_as_json_format_converts_them(document: Any) -> None:
    struct = json_format.ParseDict(document, struct_pb2.Struct())
    converted, long_key = _document(struct, LIMITS.max_json_depth, LIMITS.max_short_text_length)
    assert converted == json_format.MessageToDict(struct) and not long_key
    value = struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(number_value=1)]))
    assert _document(value, 2, 10) == ([1.0], False)
