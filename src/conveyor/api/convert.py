"""Conversion between the wire (generated protos) and the engine's records.

Owns both directions: records -> `WorkflowRun`, `StepRun`, `RunEvent`, `Workflow` messages;
request messages -> the plain values and records the engine takes (JSON dicts, `TriggerRequest`,
`RunQuery`); and how a list stream announces its next page's cursor. Decoding
problems a client can fix are raised as INVALID_ARGUMENT `ConveyorError`s with a field
violation, like any other domain error.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from conveyor.domain.access import ApiKey, AuditEntry
from conveyor.domain.errors import FieldViolation, invalid
from conveyor.domain.events import Event
from conveyor.domain.limits import Limits
from conveyor.domain.notifications import WEBHOOK_PATH, validated_notifications
from conveyor.domain.records import (
    EventRecord,
    RunQuery,
    RunRecord,
    StepRecord,
    TriggerRequest,
    WorkflowRecord,
)
from conveyor.domain.secrets import Secret
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.leases import Lease
from conveyor.v1 import events_service_pb2 as events_pb
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import secrets_service_pb2 as secrets_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

# The gRPC metadata key Envoy forwards the `Idempotency-Key` HTTP header as.
IDEMPOTENCY_METADATA_KEY = "idempotency-key"

# Workflow fields the server assigns; a client's values for them are ignored on create/update.
_WORKFLOW_OUTPUT_ONLY = frozenset(
    {"id", "version", "workflow_version_id", "archived", "created_by", "created_at", "updated_at",
     "next_fire_at", "schedule_paused", "webhook_enabled", "webhook_url_hint", "webhook_rotated_at"})


# --- records -> protos ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Wire values of the domain's statuses, looked up once (a dict hit instead of a descriptor search).
_RUN_STATUS_VALUES = {str(s): cast(pb.RunStatus.Value, pb.RunStatus.Value.Value(str(s)))
                      for s in RunStatus}
_STEP_STATUS_VALUES = {str(s): cast(pb.StepStatus.Value, pb.StepStatus.Value.Value(str(s)))
                       for s in StepStatus}


def _set_time(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    # Unset Timestamps are omitted from JSON; a zero Timestamp would print as 1970.
    if value is not None:
        # What Timestamp.FromDatetime computes (naive = UTC, nanos never negative), in integer
        # arithmetic on one timedelta: ~5x cheaper, and a list page sets ~200 of them.
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        delta = value - _EPOCH
        target.seconds = delta.days * 86400 + delta.seconds
        target.nanos = delta.microseconds * 1000


def _set_struct(target: struct_pb2.Struct, value: Mapping[str, Any] | None) -> None:
    if value is not None:
        # SetInParent marks the field present even for {}, so it prints as {} rather than vanishing.
        target.SetInParent()
        if value:
            # Parsed from its wire bytes, which is what Struct.update builds, node by node in
            # Python: ~10 % faster on ordinary documents, ~6x on long lists (128k numbers: 14 ms
            # instead of 89), so a run at the size limits converts well within the loop's budget.
            target.MergeFromString(_struct_bytes(value))


# google.protobuf.Struct / Value / ListValue wire bytes of a JSON document (struct.proto: Struct
# `fields` = 1, a map entry's key = 1 and value = 2; Value null = 1, number = 2 (double), string
# = 3, bool = 4, struct = 5, list = 6; ListValue `values` = 1). Values are typed as Struct.update
# types them (bool before int; any int or float is a double) and fail where it fails.
_pack_double = struct.Struct("<d").pack
_SMALL_VARINTS = [bytes((n,)) for n in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _value_bytes(value: Any) -> bytes:
    """A serialized Value (without its own tag and length)."""
    kind = type(value)
    if kind is str:
        data = value.encode()
        return b"\x1a" + _varint(len(data)) + data
    if kind is bool:
        return b"\x20\x01" if value else b"\x20\x00"
    if kind is int or kind is float:
        return b"\x11" + _pack_double(value)
    if value is None:
        return b"\x08\x00"
    if kind is dict:
        data = _struct_bytes(value)
        return b"\x2a" + _varint(len(data)) + data
    if kind is list:
        data = _list_bytes(value)
        return b"\x32" + _varint(len(data)) + data
    # Subclasses, in Struct.update's order of checks.
    if isinstance(value, bool):
        return b"\x20\x01" if value else b"\x20\x00"
    if isinstance(value, str):
        return _value_bytes(str(value))
    if isinstance(value, (int, float)):
        return b"\x11" + _pack_double(value)
    if isinstance(value, Mapping):
        return _value_bytes(dict(value))
    if isinstance(value, (list, tuple)):
        return _value_bytes(list(value))
    raise ValueError(f"unexpected type {kind.__name__} in a JSON document")


def _list_bytes(items: Sequence[Any]) -> bytes:
    parts = []
    for item in items:
        kind = type(item)
        if kind is int or kind is float:  # the common long list: one concatenation per number
            parts.append(b"\x0a\x09\x11" + _pack_double(item))
        else:
            data = _value_bytes(item)
            parts.append(b"\x0a" + _varint(len(data)) + data)
    return b"".join(parts)


def _struct_bytes(fields: Mapping[str, Any]) -> bytes:
    parts = []
    for key, item in fields.items():
        name = key.encode()
        data = _value_bytes(item)
        entry = b"\x0a" + _varint(len(name)) + name + b"\x12" + _varint(len(data)) + data
        parts.append(b"\x0a" + _varint(len(entry)) + entry)
    return b"".join(parts)


def run_to_proto(run: RunRecord, now: datetime) -> pb.WorkflowRun:
    """A run as the wire shows it; `now` (the engine's clock) ends the duration of a live run."""
    msg = pb.WorkflowRun(
        id=run.id,
        workflow_id=run.workflow_id,
        project_id=run.project_id,
        status=_RUN_STATUS_VALUES[run.status],
        triggered_by=run.triggered_by,
        workflow_version=run.workflow_version,
        max_parallel_steps=run.max_parallel_steps,
        error=run.error,
        retry_of_run_id=run.retry_of_run_id,
        parent_workflow_run_id=run.parent_workflow_run_id,
        parent_step_run_id=run.parent_step_run_id,
        tags=run.tags,
        workflow_version_id=run.workflow_version_id,
        created_by=run.created_by,
        workflow_name=run.workflow_name,
        status_message=run.status_message,
        entity_id=run.entity_id,
        idempotency_key=run.idempotency_key,
        duration_in_seconds=duration_seconds(run, now),
        notifications=[pb.Notification(url=n["url"], events=n["events"]) for n in run.notifications or ()],
        priority=run.priority,
        concurrency_key=run.concurrency_key,
    )
    _set_time(msg.start_at, run.start_at)
    _set_struct(msg.payload, run.payload)
    _set_struct(msg.output, run.output)
    _set_time(msg.started_at, run.started_at)
    _set_time(msg.finished_at, run.finished_at)
    _set_time(msg.expires_at, run.expires_at)
    _set_time(msg.created_at, run.created_at)
    _set_time(msg.updated_at, run.updated_at)
    return msg


def duration_seconds(run: RunRecord, now: datetime) -> float:
    """Seconds from started_at to finished_at, or to `now` while the run goes on; 0 before it starts."""
    if run.started_at is None:
        return 0.0
    end = run.finished_at or now
    return max(0.0, (end - run.started_at).total_seconds())


def step_to_proto(step: StepRecord, progress: dict[str, int] | None = None) -> pb.StepRun:
    """A step run as the wire shows it; `progress`: a map step's item counts."""
    msg = pb.StepRun(
        id=step.id,
        workflow_run_id=step.workflow_run_id,
        workflow_step_id=step.workflow_step_id,
        step_ref=step.step_ref,
        job_run_id=step.job_run_id,
        attempt=step.attempt,
        status=_STEP_STATUS_VALUES[step.status],
        deps_completed=step.deps_completed,
        deps_required=step.deps_required,
        error=step.error,
        kind=step.kind,
        queue=step.queue,
        skip_reason=step.skip_reason,
        approved_by=step.approved_by,
        worker_id=step.worker_id,
        parent_ref=step.step_ref.rpartition("[")[0] if step.parent_step_id else "",
        map_index=step.map_index,
        progress=pb.MapProgress(**progress) if progress is not None else None,
    )
    _set_struct(msg.output, step.output)
    _set_time(msg.started_at, step.started_at)
    _set_time(msg.finished_at, step.finished_at)
    _set_time(msg.created_at, step.created_at)
    return msg


def heartbeat_to_proto(at: datetime) -> pb.Heartbeat:
    """What a stream sends while nothing else happens."""
    beat = pb.Heartbeat()
    _set_time(beat.at, at)
    return beat


def task_to_proto(lease: Lease) -> pb.Task:
    """A leased step as its worker sees it: the rendered config (with the secrets it names,
    which only this message carries), the run's payload, the lease."""
    step, run = lease.step, lease.run
    # The number of the last attempt the policy allows: lost attempts spent none of it.
    last = lease.spec.retry.max_attempts + step.losses
    task = pb.Task(task_id=step.id, attempt=step.attempt, workflow_run_id=run.id, step_ref=step.step_ref,
                   queue=step.queue, project_id=run.project_id, max_attempts=last,
                   timeout_seconds=lease.spec.timeout_seconds)
    _set_struct(task.config, lease.config)
    _set_struct(task.payload, run.payload)
    if lease.index is not None:
        task.index = lease.index
        json_format.ParseDict(lease.item, task.item)
    _set_time(task.lease_expires_at, step.lease_expires_at)
    return task


def event_to_proto(event: EventRecord) -> pb.RunEvent:
    """A run event as the wire shows it."""
    msg = pb.RunEvent(
        seq=event.seq,
        workflow_run_id=event.workflow_run_id,
        type=event.type,
        step_ref=event.step_ref,
        status=event.status,
        message=event.message,
        actor=event.actor,
    )
    _set_struct(msg.data, event.data)
    _set_time(msg.at, event.at)
    return msg


def workflow_to_proto(wf: WorkflowRecord) -> pb.Workflow:
    """A workflow at its current version: the spec's definition fields plus the server's own."""
    # The spec's dict form is the Workflow message's JSON shape; parsing it strictly makes a
    # drift between the two fail loudly instead of dropping a field.
    msg = json_format.ParseDict(wf.spec.to_dict(), pb.Workflow(), ignore_unknown_fields=False)
    msg.id = wf.id
    msg.project_id = wf.project_id
    msg.version = wf.version
    msg.workflow_version_id = wf.version_id
    msg.archived = wf.archived
    msg.created_by = wf.created_by
    _set_time(msg.created_at, wf.created_at)
    _set_time(msg.updated_at, wf.updated_at)
    _set_time(msg.next_fire_at, wf.next_fire_at)
    msg.schedule_paused = wf.schedule_paused
    msg.webhook_enabled = wf.webhook_enabled
    if wf.webhook_enabled:
        msg.webhook_url_hint = f"{WEBHOOK_PATH}{wf.webhook_hint}…"
        _set_time(msg.webhook_rotated_at, wf.webhook_rotated_at)
    return msg


def key_to_proto(key: ApiKey) -> pb.ApiKey:
    msg = pb.ApiKey(id=key.id, name=key.name, project_id=key.project_id, role=key.role.label,
                    token_prefix=key.token_prefix, rate_limit=key.rate_limit, created_by=key.created_by)
    _set_time(msg.created_at, key.created_at)
    _set_time(msg.expires_at, key.expires_at)
    _set_time(msg.last_used_at, key.last_used_at)
    _set_time(msg.revoked_at, key.revoked_at)
    return msg


def published_to_proto(event: Event) -> events_pb.Event:
    """A published event, with what its publish did."""
    msg = events_pb.Event(
        id=event.id, project_id=event.project_id, name=event.name, key=event.key, resumed=event.resumed,
        started=event.started, created_by=event.created_by,
        skipped=[events_pb.SkippedWorkflow(workflow_id=s.workflow_id, workflow_name=s.workflow_name,
                                           reason=s.reason) for s in event.skipped])
    _set_struct(msg.payload, event.payload)
    _set_time(msg.received_at, event.received_at)
    return msg


def secret_to_proto(secret: Secret) -> secrets_pb.Secret:
    """A secret as the API lists it: never its value."""
    msg = secrets_pb.Secret(project_id=secret.project_id, name=secret.name)
    _set_time(msg.created_at, secret.created_at)
    _set_time(msg.updated_at, secret.updated_at)
    return msg


def audit_to_proto(entry: AuditEntry) -> pb.AuditEntry:
    msg = pb.AuditEntry(id=str(entry.id), actor=entry.actor, project_id=entry.project_id, method=entry.method,
                        resource_id=entry.resource_id, code=entry.code, reason=entry.reason,
                        message=entry.message)
    _set_time(msg.at, entry.at)
    return msg


def comment_to_proto(event: EventRecord) -> pb.RunComment:
    msg = pb.RunComment(seq=event.seq, workflow_run_id=event.workflow_run_id, content=event.message,
                        created_by=event.actor)
    _set_time(msg.created_at, event.at)
    return msg


# --- requests -> engine values -------------------------------------------------------------------

def struct_to_dict(msg: Any, field: str) -> dict[str, Any]:
    """The JSON object in Struct field `field` of `msg`; {} when the field is absent. Protobuf
    holds every number as a double: whole ones come back as ints, as the same JSON sent over
    REST would (so a payload's 5 is rendered, stored and sent on as 5, not 5.0)."""
    if not msg.HasField(field):
        return {}
    return cast(dict[str, Any], _whole_numbers(json_format.MessageToDict(getattr(msg, field))))


# Doubles within this magnitude are exact integers when whole.
_EXACT_INTEGERS = 2 ** 53


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= _EXACT_INTEGERS else value
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def workflow_data(msg: pb.Workflow) -> dict[str, Any]:
    """A Workflow message as the JSON dict the engine validates, without output-only fields."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    for key in _WORKFLOW_OUTPUT_ONLY:
        data.pop(key, None)
    # Always present, so the engine need not know that JSON printing omits empty strings.
    data["project_id"] = msg.project_id
    return data


def idempotency_key(body_key: str, metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The trigger's idempotency key: the `Idempotency-Key` header wins over an empty body field;
    both given and different is INVALID_ARGUMENT (IDEMPOTENCY_KEY_MISMATCH)."""
    header = ""
    for key, value in metadata or ():
        if key == IDEMPOTENCY_METADATA_KEY:
            header = value
            break
    if header and body_key and header != body_key:
        raise invalid("the Idempotency-Key header and the idempotency_key field differ",
                      [FieldViolation("idempotency_key", "differs from the Idempotency-Key header")],
                      reason="IDEMPOTENCY_KEY_MISMATCH")
    return header or body_key


def trigger_request(request: runs_pb.TriggerWorkflowRunRequest,
                    metadata: Sequence[tuple[str, Any]] | None,
                    limits: Limits | None = None) -> TriggerRequest:
    """A TriggerWorkflowRunRequest (plus the call's metadata) as the engine's TriggerRequest."""
    return TriggerRequest(
        workflow_id=request.workflow_id,
        project_id=request.project_id,
        payload=struct_to_dict(request, "payload"),
        tags=dict(request.tags),
        idempotency_key=idempotency_key(request.idempotency_key, metadata),
        entity_id=request.entity_id,
        run_as=request.run_as,
        max_parallel_steps=request.max_parallel_steps,
        timeout_seconds=request.timeout_seconds,
        check_conditions=request.check_conditions,
        immediate=request.immediate,
        notifications=validated_notifications(
            [{"url": n.url, "events": list(n.events)} for n in request.notifications], "notifications",
            limits or Limits()),
        priority=request.priority,
        start_at=time_or_none(request, "start_at"),
    )


def run_statuses(values: Sequence[int]) -> list[RunStatus] | None:
    """A status filter as RunStatus values; None when the filter can match no run (every value
    given is `unspecified`, which matches nothing)."""
    statuses: list[RunStatus] = []
    for i, value in enumerate(values):
        if value not in pb.RunStatus.Value.values():
            raise invalid(f"unknown run status {value}",
                          [FieldViolation(f"status[{i}]", f"unknown run status {value}")],
                          reason="INVALID_STATUS_FILTER")
        if value != pb.RunStatus.unspecified:
            statuses.append(RunStatus(pb.RunStatus.Value.Name(value)))
    if values and not statuses:
        return None
    return statuses


def tag_filters(values: Sequence[str]) -> list[tuple[str, str]]:
    """`key:value` tag filters as (key, value) pairs; the value may itself hold colons."""
    pairs: list[tuple[str, str]] = []
    for i, text in enumerate(values):
        key, colon, value = text.partition(":")
        if not colon or not key:
            raise invalid(f"tag filter {text!r} is not written key:value",
                          [FieldViolation(f"tag[{i}]", "must be written key:value")],
                          reason="INVALID_TAG_FILTER")
        pairs.append((key, value))
    return pairs


def time_or_none(msg: Any, field: str) -> datetime | None:
    """The time in Timestamp field `field` of `msg`; None when the field is absent."""
    if not msg.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(msg, field)
    return stamp.ToDatetime(tzinfo=UTC)


def run_query(request: runs_pb.ListWorkflowRunsRequest) -> RunQuery | None:
    """The filters of a ListWorkflowRunsRequest; None when they can match no run."""
    # Every filter is decoded (and so validated) before deciding nothing can match.
    statuses = run_statuses(request.status)
    tags = tag_filters(request.tag)
    if statuses is None:
        return None
    return RunQuery(
        project_id=request.project_id,
        statuses=statuses,
        workflow_ids=list(request.workflow_id),
        triggered_by=request.triggered_by,
        started_after=time_or_none(request, "started_after"),
        started_before=time_or_none(request, "started_before"),
        tags=tags,
        search=request.search,
    )


# --- pages ---------------------------------------------------------------------------------------

# The initial-metadata key (and, through Envoy, the REST response header) of the next page's cursor.
NEXT_PAGE_TOKEN_KEY = "x-next-page-token"


async def send_next_page_token(context: grpc.aio.ServicerContext, token: str) -> None:
    """Announce the next page's cursor before the first item of a list stream; the last page
    sends nothing, so the REST header is absent there (SPEC §1.1)."""
    if token:
        await context.send_initial_metadata([(NEXT_PAGE_TOKEN_KEY, token)])
