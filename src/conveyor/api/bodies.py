"""Raw REST bodies, parsed strictly.

Envoy's transcoder drops unknown JSON fields without a word (a misspelt `"timeout_second": 60`
would be stored as no timeout), and has no option to refuse them. So the REST bindings of
CreateWorkflow, UpdateWorkflow and TriggerWorkflowRun put the body in a `google.api.HttpBody`
field named `body`, and this module parses it: every key must name a field of the message, every
value must have the field's JSON type (a bool is `true`/`false`, never `"true"`), and every
problem is one field violation. gRPC clients send the typed fields and never set `body`.
DeliverWebhook's body is its payload, one JSON object with any keys: anything else (null, a list,
a number, a string, invalid JSON) is refused instead of transcoded into an empty payload.

The result is the same typed request a gRPC client would have sent, so everything after this
(limits, conversion, the engine) has one path.

Cost is bounded before it is spent: parsing costs time per JSON value, so a body longer than its
method allows (`body_bytes`) is refused on its length before json.loads; a repeated field over
its count (`counts`, e.g. 3,000 steps) is refused before its items are looked at; and a JSON
document's size is measured (C-fast json.dumps) before its depth is walked or protobuf sees it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation
from conveyor.domain.limits import Limits, document_body_bytes, json_depth, json_size, trigger_body_bytes

# Request type -> the field its REST body stands for ("" for the request itself, as `body: "*"`
# would bind it). The request's own `body` field and its path variables are not body fields.
BODY_TARGETS: dict[str, str] = {
    "conveyor.v1.CreateWorkflowRequest": "workflow",
    "conveyor.v1.UpdateWorkflowRequest": "workflow",
    "conveyor.v1.TriggerWorkflowRunRequest": "",
    "conveyor.v1.DeliverWebhookRequest": "payload",
    "conveyor.v1.PublishEventRequest": "",
}
# Requests whose body is one JSON document (a Struct field), not a message's fields.
_DOCUMENT_BODIES = frozenset({"conveyor.v1.DeliverWebhookRequest"})
# Fields that travel in the path, never in the body.
_PATH_FIELDS = frozenset({"workflow_id", "body"})

_JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
# Keys quoted in a field path are cut to this length (the path goes back to the client).
_KEY_IN_PATH = 40
# Parsing stops reporting after this many problems.
_MAX_PROBLEMS = 20


class _Caps(NamedTuple):
    """What the shape checks hold values to."""

    limits: Limits
    counts: Mapping[str, int]


class _Problem(NamedTuple):
    """One problem with the body; the error's reason is its first problem's."""

    field: str
    description: str
    reason: str = "INVALID_FIELD"


def has_raw_body(request: Message) -> bool:
    """True when `request` came over REST with its body in the `body` HttpBody field."""
    return request.DESCRIPTOR.full_name in BODY_TARGETS and request.HasField("body")


def body_bytes(request_type: str, limits: Limits) -> int:
    """The longest raw body a request of `request_type` (a full name in BODY_TARGETS) may have:
    a workflow definition max_definition_bytes, a trigger room for its largest payload and
    fields (domain.limits.trigger_body_bytes), a document its largest payload."""
    if request_type in _DOCUMENT_BODIES:
        return document_body_bytes(limits)
    if BODY_TARGETS[request_type]:
        return limits.max_definition_bytes
    return trigger_body_bytes(limits)


def take_raw_body(request: Message, limits: Limits, counts: Mapping[str, int] | None = None) -> Message:
    """The request with its raw JSON body parsed into its typed fields and `body` cleared.

    Fields bound from the path or query string (workflow_id, project_id) are kept; one given
    both there and in the body with different values is INVALID_ARGUMENT. `counts` caps the
    number of values of repeated fields and maps, by field name (api.requests' count classes);
    one over its cap is refused without looking at its values.
    """
    name = request.DESCRIPTOR.full_name
    target_name = BODY_TARGETS[name]
    raw = request.body.data
    cap = body_bytes(name, limits)
    if len(raw) > cap:
        # Before json.loads: a body of 1.9M small numbers cost seconds to parse and check.
        what = "a workflow definition" if target_name else "a trigger"
        raise _invalid([_Problem("body", f"is {len(raw)} bytes; {what} may be at most {cap}",
                                 "REQUEST_TOO_LARGE")])
    data = _load(raw)
    result = type(request)()
    result.CopyFrom(request)
    result.ClearField("body")
    if name in _DOCUMENT_BODIES:
        problems: list[_Problem] = []
        _check_document(data, "body", limits, problems)
        if problems:
            raise _invalid(problems)
        json_format.ParseDict(data, getattr(result, target_name))
        return result
    if target_name:
        template = getattr(request, target_name)
        target = getattr(result, target_name)
        target.Clear()
        excluded: frozenset[str] = frozenset()
        prefix = ""
    else:
        template = request
        target = type(request)()
        excluded = _PATH_FIELDS
        prefix = ""
    problems = []
    _check_object(data, target.DESCRIPTOR, prefix, excluded, _Caps(limits, counts or {}), problems)
    if problems:
        raise _invalid(problems)
    try:
        json_format.ParseDict(data, target, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        # Every shape problem was reported above; this is a value protobuf refuses that the
        # checks do not foresee. Its text describes internals, so it is not passed on.
        raise _invalid([_Problem("body", "is not a valid JSON form of the request")]) from None
    _merge_bound(template, target, excluded, problems)
    if problems:
        raise _invalid(problems)
    if not target_name:
        result = target
    return result


def _load(raw: bytes) -> Any:
    """The JSON document in `raw`; {} for an empty body (a POST without one)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise _invalid([_Problem("body", f"is not valid JSON ({where})", "INVALID_JSON")]) from None
    except (ValueError, RecursionError):  # bad UTF-8, NaN/Infinity, nesting past the stack
        raise _invalid([_Problem("body", "is not valid JSON", "INVALID_JSON")]) from None
    if not isinstance(data, dict):
        raise _invalid([_Problem("body", "must be a JSON object", "INVALID_JSON")])
    return data


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which JSON (and PostgreSQL's jsonb) does not.
    raise ValueError(name)


def _invalid(problems: list[_Problem]) -> ConveyorError:
    first = problems[0]
    message = f"invalid request body: {first.field}: {first.description}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    violations = [FieldViolation(p.field, p.description) for p in problems[:_MAX_PROBLEMS]]
    return ConveyorError(ErrorKind.INVALID_ARGUMENT, first.reason, message, violations=violations,
                         metadata={"field": first.field})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _key(key: str) -> str:
    return key if len(key) <= _KEY_IN_PATH else key[:_KEY_IN_PATH] + "…"


def _check_object(data: Any, descriptor: Descriptor, path: str, excluded: frozenset[str],
                  caps: _Caps, problems: list[_Problem]) -> None:
    """Check a JSON object against a message type: known keys, values of the right JSON type."""
    if not isinstance(data, Mapping):
        problems.append(_Problem(path or "body", "must be an object"))
        return
    for key, value in data.items():
        if len(problems) >= _MAX_PROBLEMS:
            return
        # protobuf's JSON names (lowerCamel) and the proto names (snake_case) are both accepted.
        field = descriptor.fields_by_name.get(key) or _by_json_name(descriptor).get(key)
        where = _join(path, _key(key))
        if field is None:
            problems.append(_Problem(where, "unknown field", "UNKNOWN_FIELD"))
        elif field.name in excluded:
            problems.append(_Problem(where, "not a body field (it is taken from the path)", "UNKNOWN_FIELD"))
        elif value is not None:  # null means "not set" in protobuf's JSON mapping
            _check_field(value, field, _join(path, field.name), caps, problems)


@functools.cache
def _by_json_name(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {f.json_name: f for f in descriptor.fields}


def _check_field(value: Any, field: FieldDescriptor, path: str, caps: _Caps,
                 problems: list[_Problem]) -> None:
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        if not isinstance(value, Mapping):
            problems.append(_Problem(path, "must be an object"))
        elif not _too_many(len(value), field, path, caps, problems):
            value_field = message_type.fields_by_name["value"]
            for key, item in value.items():
                _check_single(item, value_field, f"{path}[{_key(key)}]", caps, problems)
        return
    if field.is_repeated:
        if not isinstance(value, list):
            problems.append(_Problem(path, "must be a list"))
        elif not _too_many(len(value), field, path, caps, problems):
            for i, item in enumerate(value):
                _check_single(item, field, f"{path}[{i}]", caps, problems)
        return
    _check_single(value, field, path, caps, problems)


def _too_many(count: int, field: FieldDescriptor, path: str, caps: _Caps, problems: list[_Problem]) -> bool:
    """True (and a problem) when a repeated field or map holds more values than its cap; its
    values are then not checked one by one: that is the cost the cap is there to bound."""
    cap = caps.counts.get(field.name)
    if cap is None or count <= cap:
        return False
    problems.append(_Problem(path, f"has {count} values; at most {cap} are allowed", "TOO_MANY_VALUES"))
    return True


def _check_single(value: Any, field: FieldDescriptor, path: str, caps: _Caps,
                  problems: list[_Problem]) -> None:
    """One value (not a list or map) of `field`'s type."""
    message_type = field.message_type
    limits = caps.limits
    if message_type is not None:
        if message_type.full_name in _JSON_TYPES:
            if message_type.full_name == "google.protobuf.Struct" and not isinstance(value, Mapping):
                problems.append(_Problem(path, "must be an object"))
            else:
                _check_document(value, path, limits, problems)
        elif message_type.full_name.startswith("google.protobuf."):
            pass  # other well-known types have their own JSON forms; ParseDict checks them
        else:
            _check_object(value, message_type, path, frozenset(), caps, problems)
        return
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            problems.append(_Problem(path, "must be a boolean (true or false, without quotes)"))
    elif kind in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        if not isinstance(value, str):
            problems.append(_Problem(path, "must be a string"))
    elif kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        number = _whole_number(value)
        if number is None:
            problems.append(_Problem(path, "must be a whole number"))
        elif not low <= number <= high:
            problems.append(_Problem(path, f"must be between {low} and {high}"))
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(_Problem(path, "must be a number"))
    elif kind == FieldDescriptor.TYPE_ENUM and (not isinstance(value, str | int) or isinstance(value, bool)):
        problems.append(_Problem(path, "must be an enum value name"))


def _check_document(value: Any, path: str, limits: Limits, problems: list[_Problem]) -> None:
    """A JSON document's size, then its depth, before protobuf sees it (a document deeper than
    protobuf's recursion limit would fail to parse with an internal error). The size comes first:
    json.dumps is C (~0.1 µs a value), the depth walk Python; json.loads has bounded the
    nesting already, so json.dumps cannot recurse past it."""
    try:
        size = json_size(value)
    except RecursionError:
        size = -1
    if size > limits.max_payload_bytes:
        problems.append(_Problem(path, f"is {size} bytes as JSON; at most {limits.max_payload_bytes} "
                                       "are allowed", "JSON_TOO_LARGE"))
    elif size < 0 or json_depth(value, limits.max_json_depth) > limits.max_json_depth:
        problems.append(_Problem(path, f"nests deeper than {limits.max_json_depth} levels", "JSON_TOO_DEEP"))


def _whole_number(value: Any) -> int | None:
    """An integer field's value: a JSON number without a fraction, or (as protobuf's JSON mapping
    allows for 64-bit values) a string of digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) <= 25:
        return int(value)
    return None


def _merge_bound(bound: Message, parsed: Message, excluded: frozenset[str],
                 problems: list[_Problem]) -> None:
    """Copy the fields the transcoder bound from the path or query string into the parsed body;
    a field given in both places with different values is a problem."""
    for field, value in bound.ListFields():
        if field.name == "body":
            continue
        if field.name not in excluded and _is_set(parsed, field):
            if getattr(parsed, field.name) != value:
                problems.append(_Problem(field.name, "given in both the URL and the body, differently"))
            continue
        if field.message_type is not None and not field.is_repeated:
            getattr(parsed, field.name).CopyFrom(value)
        elif field.is_repeated:
            target = getattr(parsed, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target.update(value)
            else:
                target.extend(value)
        else:
            setattr(parsed, field.name, value)


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    if field.is_repeated:
        return len(getattr(message, field.name)) > 0
    if field.message_type is not None or field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name) != field.default_value)
