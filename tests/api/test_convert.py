"""Unit tests of api/convert.py: records to protos and request decoding, without a server."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.api import convert
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import EventRecord, RunRecord, StepRecord, WorkflowRecord
from conveyor.domain.spec import parse_workflow
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def run_record(**fields: object) -> RunRecord:
    base: dict[str, object] = {
        "id": "r1", "project_id": "acme", "workflow_id": "w1", "workflow_name": "deploy",
        "workflow_version": 3, "workflow_version_id": "v3", "status": RunStatus.RUNNING,
        "created_at": T0, "updated_at": T0}
    base.update(fields)
    return RunRecord(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", list(RunStatus))
def test_every_run_status_has_its_lowercase_enum_value(status: RunStatus) -> None:
    msg = convert.run_to_proto(run_record(status=status), T0)

    assert pb.RunStatus.Value.Name(msg.status) == status.value
    assert convert.run_statuses([msg.status]) == [status]


@pytest.mark.parametrize("status", list(StepStatus))
def test_every_step_status_has_its_lowercase_enum_value(status: StepStatus) -> None:
    step = StepRecord(id="s1", workflow_run_id="r1", project_id="acme", position=0, step_ref="build",
                      workflow_step_id="ws1", kind="noop", status=status, created_at=T0, updated_at=T0)

    assert pb.StepStatus.Value.Name(convert.step_to_proto(step).status) == status.value


def test_run_fields_and_json_shape() -> None:
    run = run_record(payload={"n": 1, "nested": {"ok": True}}, tags={"env": "prod"}, triggered_by="alice",
                     created_by="key-1", max_parallel_steps=4, output={"build": {"sha": "x"}},
                     error="", entity_id="e1", idempotency_key="k", retry_of_run_id="r0",
                     parent_workflow_run_id="p1", parent_step_run_id="ps1", status_message="hi",
                     started_at=T0, expires_at=T0 + timedelta(hours=1))

    data = json_format.MessageToDict(convert.run_to_proto(run, T0 + timedelta(seconds=90)),
                                     preserving_proto_field_name=True)

    assert data == {
        "id": "r1", "workflow_id": "w1", "project_id": "acme", "status": "running", "triggered_by": "alice",
        "workflow_version": 3, "max_parallel_steps": 4, "payload": {"n": 1, "nested": {"ok": True}},
        "started_at": "2026-01-01T12:00:00Z", "expires_at": "2026-01-01T13:00:00Z",
        "retry_of_run_id": "r0", "parent_workflow_run_id": "p1", "parent_step_run_id": "ps1",
        "tags": {"env": "prod"}, "workflow_version_id": "v3", "created_by": "key-1",
        "created_at": "2026-01-01T12:00:00Z", "workflow_name": "deploy", "status_message": "hi",
        "output": {"build": {"sha": "x"}}, "entity_id": "e1", "idempotency_key": "k",
        "updated_at": "2026-01-01T12:00:00Z", "duration_in_seconds": 90.0,
    }


def test_unset_times_and_output_stay_absent_and_an_empty_payload_is_present() -> None:
    msg = convert.run_to_proto(run_record(status=RunStatus.PENDING), T0)

    assert not msg.HasField("started_at")
    assert not msg.HasField("finished_at")
    assert not msg.HasField("expires_at")
    assert not msg.HasField("output")
    assert msg.HasField("payload")
    assert msg.duration_in_seconds == 0


@pytest.mark.parametrize("at", [
    T0, datetime(2026, 11, 3, 12, 34, 56, 789123, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 6, 1, 8, 0, 0, 1, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
    datetime(2026, 6, 1, 8, 0, 0, 1),  # naive: UTC, as Timestamp.FromDatetime reads it
])
def test_times_are_what_timestamp_from_datetime_makes(at: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(at)

    msg = convert.run_to_proto(run_record(created_at=at, updated_at=at, started_at=at, finished_at=at,
                                          expires_at=at), T0)

    for field in ("created_at", "updated_at", "started_at", "finished_at", "expires_at"):
        assert getattr(msg, field) == expected, field
    event = EventRecord(workflow_run_id="r1", seq=1, project_id="acme", type="run.created", at=at)
    assert convert.event_to_proto(event).at == expected


def test_duration_runs_to_finished_at_once_finished() -> None:
    run = run_record(status=RunStatus.COMPLETED, started_at=T0, finished_at=T0 + timedelta(seconds=2.5))

    assert convert.duration_seconds(run, T0 + timedelta(days=1)) == 2.5
    assert convert.duration_seconds(run_record(started_at=T0), T0 + timedelta(seconds=7)) == 7


def test_event_fields() -> None:
    event = EventRecord(workflow_run_id="r1", seq=3, project_id="acme", type="step.completed", at=T0,
                        step_ref="build", status="completed", message="done", data={"attempt": 1},
                        actor="engine")

    msg = convert.event_to_proto(event)

    assert (msg.seq, msg.type, msg.step_ref, msg.status, msg.actor) == (
        3, "step.completed", "build", "completed", "engine")
    assert json_format.MessageToDict(msg.data) == {"attempt": 1}
    assert msg.at.ToDatetime(tzinfo=UTC) == T0


def test_workflow_round_trips_through_the_proto() -> None:
    definition = {
        "name": "deploy", "description": "d", "max_parallel_steps": 2, "max_concurrent_runs": 1,
        "timeout_seconds": 60, "condition": "payload.env != 'dev'",
        "schedule": {"cron": "0 9 * * 1-5", "timezone": "UTC"},
        "variables": [{"name": "env", "required": True}, {"name": "region", "default": "eu"},
                      {"name": "nothing", "default": None}],
        "steps": [
            {"ref": "build", "kind": "task", "queue": "builds", "config": {"commit": "{{ payload.env }}"},
             "retry": {"max_attempts": 3, "initial_interval_seconds": 1.5}, "timeout_seconds": 600},
            {"ref": "gate", "kind": "approval", "depends_on": ["build"], "when": "true"},
        ],
    }
    spec = parse_workflow(definition)
    record = WorkflowRecord(id="w1", project_id="acme", name="deploy", version=2, version_id="v2",
                            spec=spec, created_by="admin", created_at=T0, updated_at=T0,
                            archived_at=T0)

    msg = convert.workflow_to_proto(record)

    assert (msg.id, msg.project_id, msg.version, msg.workflow_version_id, msg.archived, msg.created_by) == (
        "w1", "acme", 2, "v2", True, "admin")
    assert msg.variables[1].default.string_value == "eu"
    assert msg.variables[2].HasField("default") and msg.variables[2].default.HasField("null_value")
    assert not msg.variables[0].HasField("default")
    data = convert.workflow_data(msg)
    assert "id" not in data and "version" not in data and "archived" not in data
    assert data["project_id"] == "acme"
    assert parse_workflow(data) == spec


def test_workflow_data_always_carries_the_project() -> None:
    assert convert.workflow_data(pb.Workflow(name="x"))["project_id"] == ""


def test_trigger_request_decoding() -> None:
    request = json_format.ParseDict(
        {"workflow_id": "deploy", "project_id": "acme", "payload": {"a": [1, "b"]}, "tags": {"t": "v"},
         "entity_id": "e", "run_as": "bob", "max_parallel_steps": 2, "timeout_seconds": 30,
         "check_conditions": True, "immediate": True},
        runs_pb.TriggerWorkflowRunRequest())

    req = convert.trigger_request(request, [("idempotency-key", "k1"), ("other", "x")])

    assert req.workflow_id == "deploy" and req.project_id == "acme"
    assert req.payload == {"a": [1, "b"]}
    assert req.tags == {"t": "v"}
    assert req.idempotency_key == "k1"
    assert (req.entity_id, req.run_as, req.max_parallel_steps, req.timeout_seconds) == ("e", "bob", 2, 30)
    assert req.check_conditions and req.immediate
    assert convert.trigger_request(runs_pb.TriggerWorkflowRunRequest(workflow_id="w"), None).payload == {}


def test_idempotency_key_header_wins_over_an_empty_body_field() -> None:
    assert convert.idempotency_key("", [("idempotency-key", "h")]) == "h"
    assert convert.idempotency_key("b", []) == "b"
    assert convert.idempotency_key("same", [("idempotency-key", "same")]) == "same"
    assert convert.idempotency_key("", None) == ""
    with pytest.raises(ConveyorError) as caught:
        convert.idempotency_key("b", [("idempotency-key", "h")])
    assert caught.value.kind == ErrorKind.INVALID_ARGUMENT
    assert caught.value.reason == "IDEMPOTENCY_KEY_MISMATCH"


def test_tag_filters() -> None:
    assert convert.tag_filters(["env:prod", "url:http://x:1", "empty:"]) == [
        ("env", "prod"), ("url", "http://x:1"), ("empty", "")]
    for bad in ("env", ":prod"):
        with pytest.raises(ConveyorError) as caught:
            convert.tag_filters(["ok:1", bad])
        assert caught.value.reason == "INVALID_TAG_FILTER"
        assert caught.value.violations[0].field == "tag[1]"


def test_status_filters() -> None:
    assert convert.run_statuses([]) == []
    assert convert.run_statuses([pb.RunStatus.running, pb.RunStatus.unspecified]) == [RunStatus.RUNNING]
    assert convert.run_statuses([pb.RunStatus.unspecified]) is None
    with pytest.raises(ConveyorError) as caught:
        convert.run_statuses([99])
    assert caught.value.reason == "INVALID_STATUS_FILTER"


def test_run_query_decoding() -> None:
    request = json_format.ParseDict(
        {"project_id": "acme", "status": ["failed", "canceled"], "workflow_id": ["a", "b"],
         "triggered_by": "alice", "started_after": "2026-01-01T12:00:00Z", "tag": ["k:v"]},
        runs_pb.ListWorkflowRunsRequest())

    query = convert.run_query(request)

    assert query is not None
    assert query.project_id == "acme"
    assert query.statuses == [RunStatus.FAILED, RunStatus.CANCELED]
    assert query.workflow_ids == ["a", "b"]
    assert query.triggered_by == "alice"
    assert query.started_after == T0
    assert query.started_before is None
    assert query.tags == [("k", "v")]
    assert convert.run_query(runs_pb.ListWorkflowRunsRequest(status=[pb.RunStatus.unspecified])) is None


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-(2**63), 2**63)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40)


@given(st.dictionaries(st.text(max_size=10), _json_values, max_size=8))
@settings(max_examples=300, deadline=None)
def test_documents_become_the_struct_that_struct_update_builds(document: dict[str, object]) -> None:
    expected = struct_pb2.Struct()
    expected.update(document)

    msg = convert.run_to_proto(run_record(payload=document, output=document), T0)

    assert msg.payload == expected
    assert msg.output == expected
    assert msg.HasField("payload") and msg.HasField("output")


def test_document_edge_values() -> None:
    document = {"": None, "f": False, "t": True, "zero": 0, "neg": -1.5, "big": 2**70, "inf": math.inf,
                "nan": math.nan, "s": "é✓\U0001f600" * 50, "long": [1] * 200, "empty": {}, "none": [],
                "nested": [[], {}, [{"a": [None, "x", 2]}]], "k" * 300: "v" * 300}
    expected = struct_pb2.Struct()
    expected.update(document)

    got = convert.run_to_proto(run_record(payload=document), T0).payload

    assert math.isnan(got.fields["nan"].number_value)
    del document["nan"], expected.fields["nan"], got.fields["nan"]
    assert got == expected
    del expected.fields["inf"], got.fields["inf"]  # JSON printing refuses infinities
    assert json_format.MessageToDict(got) == json_format.MessageToDict(expected)
    with pytest.raises(ValueError):
        convert.run_to_proto(run_record(payload={"x": object()}), T0)
