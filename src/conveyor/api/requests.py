"""What a request may hold: the one check every Conveyor request passes before its handler runs.

`RequestChecker.prepare` is the interceptor's `prepare` hook (`conveyor.api.errors`), so no
servicer checks sizes by hand. It turns a raw REST body into the typed request
(`conveyor.api.bodies`), then walks the whole message against `Limits`:

- every string: no NUL byte (PostgreSQL refuses them, SQLite would store them), and at most the
  length of its class — identifiers, short text or long text, chosen by field name below;
- every repeated field and map: at most its count (filter values, bulk ids, tags, steps...);
- every JSON document (Struct/Value fields: payload, config, data, result, a variable's
  default): finite numbers, at most `max_json_depth` deep and `max_payload_bytes` as JSON, keys
  and strings under the same rules as strings;
- integers are not negative (every integer of the API is a count, a size or seconds);
  timestamps are within 0001-9999;
- fields protobuf did not recognise on the gRPC wire (unknown fields) are refused, naming them.

Every problem is a field violation; the error's reason is the first problem's. Nothing reaches
the engine, so nothing is stored.

Sizes and counts are checked before anything is converted, so a refusal costs little whatever
the request holds: a repeated field over its count is refused without walking its items (3,000
steps); a JSON document whose protobuf encoding (`ByteSize()`, C) is larger than the largest
document within `max_payload_bytes` could be is refused before it is converted to Python; a
gRPC workflow definition over `max_definition_bytes` is refused on its size alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from conveyor.api.bodies import has_raw_body, take_raw_body
from conveyor.api.convert import IDEMPOTENCY_METADATA_KEY
from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation
from conveyor.domain.events import MAX_ON_EVENTS
from conveyor.domain.limits import Limits

# String fields by length class (field names, over every request message and the messages they
# hold). A test checks that every string field of the API is in exactly one class, so a new
# field forces a decision.
ID_FIELDS = frozenset({
    "id", "workflow_id", "workflow_run_id", "workflow_run_ids", "step_ref", "project_id", "name",
    "ref", "kind", "queue", "depends_on", "idempotency_key", "entity_id", "run_as", "triggered_by",
    "page_token", "workflow_version_id", "created_by", "cron", "timezone", "content_type",
    "task_id", "worker_id", "role", "key_id", "token", "token_prefix", "actor", "method", "resource_id",
    "code", "webhook_url_hint", "cursor", "events",
    # An event's key (PublishEvent, ListEvents): as long as the entity_id it becomes.
    "key",
    # A list's text filter (ListWorkflowRuns): as long as the names it searches.
    "search",
    # ListStepRuns' map filter, and a map item's map on StepRun: a step ref.
    "parent_ref",
})
# "tags" here is the length of a tag's value (its key is an identifier).
SHORT_TEXT_FIELDS = frozenset({"comment", "reason", "tag", "tags", "message"})
# "url": a notification's webhook (the domain holds it to max_url_length).
TEXT_FIELDS = frozenset({"description", "when", "condition", "error", "content", "webhook_url", "url"})
# A secret's value (PutSecret): up to max_secret_bytes (the domain also holds its UTF-8 bytes to it).
SECRET_FIELDS = frozenset({"value"})

# Repeated fields (and maps) by count class.
# "events": the event types a notification asks for (a filter of the run's events).
FILTER_FIELDS = frozenset({"status", "workflow_id", "tag", "events"})
BULK_FIELDS = frozenset({"workflow_run_ids", "leases"})
STEP_FIELDS = frozenset({"steps", "depends_on"})
VARIABLE_FIELDS = frozenset({"variables"})
TAG_FIELDS = frozenset({"tags"})
NOTIFICATION_FIELDS = frozenset({"notifications"})
# A workflow's `on_events` (domain/events.py MAX_ON_EVENTS).
EVENT_TRIGGER_FIELDS = frozenset({"on_events"})

_JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})
# JSON fields that become a step's output, bounded by max_output_bytes (a worker's result);
# every other document by max_payload_bytes.
_STEP_OUTPUT_FIELDS = frozenset({"conveyor.v1.CompleteTaskRequest.result"})
# Requests whose `workflow` field is a definition, bounded as a whole by max_definition_bytes.
_DEFINITION_REQUESTS = frozenset({"conveyor.v1.CreateWorkflowRequest", "conveyor.v1.UpdateWorkflowRequest"})
_TIMESTAMP = "google.protobuf.Timestamp"
# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: what RFC 3339 and Python's datetime can hold.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# Integer fields that may be negative (checked by the engine: a priority is -100..100); every
# other integer of the API is a count, a size or a number of seconds.
SIGNED_FIELDS = frozenset({"priority"})
_INT_TYPES = frozenset({FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64,
                        FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64})
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
# How many times larger than the JSON it is measured as (compact, numbers as doubles: "1.0") a
# JSON document can be as protobuf: 2.75 for a list of numbers (a Value of 11 bytes per "1.0,"),
# less for everything else (strings 1.33, objects' entries 2.1, nested containers 1.9; measured).
# A document larger than this times max_payload_bytes as protobuf is refused unconverted.
DOCUMENT_PROTOBUF_GROWTH = 3
# A walk stops after this many problems (the error carries at most 20 anyway).
_MAX_PROBLEMS = 20
# Keys quoted in a field path are cut to this length (the path goes back to the client).
_KEY_IN_PATH = 40


@dataclass(frozen=True)
class _Problem:
    field: str
    description: str
    reason: str


class RequestChecker:
    """Checks (and, for raw REST bodies, builds) every Conveyor request against `limits`."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        lim = limits
        self._string_limits = {
            **dict.fromkeys(ID_FIELDS, lim.max_id_length),
            **dict.fromkeys(SHORT_TEXT_FIELDS, lim.max_short_text_length),
            **dict.fromkeys(TEXT_FIELDS, lim.max_text_length),
            **dict.fromkeys(SECRET_FIELDS, lim.max_secret_bytes),
        }
        self._count_limits = {
            **dict.fromkeys(FILTER_FIELDS, lim.max_filter_values),
            **dict.fromkeys(BULK_FIELDS, lim.max_bulk_ids),
            **dict.fromkeys(STEP_FIELDS, lim.max_steps),
            **dict.fromkeys(VARIABLE_FIELDS, lim.max_variables),
            **dict.fromkeys(TAG_FIELDS, lim.max_tags),
            **dict.fromkeys(NOTIFICATION_FIELDS, lim.max_notifications),
            **dict.fromkeys(EVENT_TRIGGER_FIELDS, MAX_ON_EVENTS),
        }

    def prepare(self, request: Any, metadata: Sequence[tuple[str, Any]] = ()) -> Any:
        """The request the handler gets; raises INVALID_ARGUMENT listing every problem.

        `metadata` is the call's: the values the API reads from it (the Idempotency-Key header)
        are held to the limits of the fields they stand for.
        """
        if not isinstance(request, Message) or not request.DESCRIPTOR.full_name.startswith("conveyor."):
            return request  # health, reflection: grpc's own services
        if has_raw_body(request):
            # Bounded by the raw body's length (api/bodies.py), so not by its size as protobuf.
            request = take_raw_body(request, self._limits, self._count_limits)
        elif request.DESCRIPTOR.full_name in _DEFINITION_REQUESTS:
            self._check_definition_size(request)
        problems: list[_Problem] = []
        for key, value in metadata:
            if key == IDEMPOTENCY_METADATA_KEY and isinstance(value, str):
                problems.extend(self._string(value, "Idempotency-Key", self._limits.max_id_length))
        for problem in self._message(request, ""):
            problems.append(problem)
            if len(problems) >= _MAX_PROBLEMS:
                break
        if problems:
            raise _error(problems)
        return request

    def _check_definition_size(self, request: Message) -> None:
        """A gRPC definition over max_definition_bytes as protobuf is refused before it is
        walked or converted (REST definitions are held to it as JSON, in api/bodies.py)."""
        size = request.workflow.ByteSize()
        cap = self._limits.max_definition_bytes
        if size > cap:
            raise _error([_Problem("workflow", f"is {size} bytes; a workflow definition may be at most {cap}",
                                   "REQUEST_TOO_LARGE")])

    # -- the walk -----------------------------------------------------------------------------

    def _message(self, msg: Message, path: str) -> Iterator[_Problem]:
        unknown = unknown_fields.UnknownFieldSet(msg)
        if len(unknown):
            numbers = sorted({field.field_number for field in unknown})
            yield _Problem(path or "request", f"unknown field number(s) {', '.join(map(str, numbers))}",
                           "UNKNOWN_FIELD")
        for field, value in msg.ListFields():
            where = f"{path}.{field.name}" if path else field.name
            yield from self._field(field, value, where)

    def _field(self, field: FieldDescriptor, value: Any, path: str) -> Iterator[_Problem]:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if (problem := self._count(field, len(value), path)) is not None:
                yield problem
                return  # its values are not walked: that is the cost the cap bounds
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                where = f"{path}[{_key(key)}]"
                yield from self._string(key, where, self._limits.max_id_length, what="key")
                yield from self._single(value_field, item, where, name=field.name)
        elif field.is_repeated:
            if (problem := self._count(field, len(value), path)) is not None:
                yield problem
                return
            for i, item in enumerate(value):
                yield from self._single(field, item, f"{path}[{i}]", name=field.name)
        else:
            yield from self._single(field, value, path, name=field.name)

    def _count(self, field: FieldDescriptor, count: int, path: str) -> _Problem | None:
        cap = self._count_limits.get(field.name)
        if cap is None:
            raise AssertionError(f"repeated field {field.full_name} has no count limit")
        if count > cap:
            return _Problem(path, f"has {count} values; at most {cap} are allowed", "TOO_MANY_VALUES")
        return None

    def _single(self, field: FieldDescriptor, value: Any, path: str, name: str) -> Iterator[_Problem]:
        message_type = field.message_type
        if message_type is not None:
            if message_type.full_name in _JSON_TYPES:
                size = (self._limits.max_output_bytes if field.full_name in _STEP_OUTPUT_FIELDS
                        else self._limits.max_payload_bytes)
                yield from self._json(value, path, size)
            elif message_type.full_name == _TIMESTAMP:
                if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 10**9):
                    yield _Problem(path, "must be a time between years 1 and 9999", "INVALID_TIME")
            elif message_type.full_name == "google.api.HttpBody":
                pass  # a raw body of a request that takes none is ignored, like an unused field
            else:
                yield from self._message(value, path)
        elif field.type == FieldDescriptor.TYPE_STRING:
            cap = self._string_limits.get(name)
            if cap is None:
                raise AssertionError(f"string field {field.full_name} has no length class")
            yield from self._string(value, path, cap)
        elif field.type in _INT_TYPES and value < 0 and name not in SIGNED_FIELDS:
            yield _Problem(path, "must not be negative",
                           "INVALID_PAGE_SIZE" if name == "limit" else "INVALID_FIELD")
        elif field.type in _FLOAT_TYPES and not math.isfinite(value):
            yield _Problem(path, "must be a finite number", "INVALID_FIELD")

    def _string(self, text: str, path: str, cap: int, what: str = "") -> Iterator[_Problem]:
        subject = f"{what} " if what else ""
        if len(text) > cap:
            yield _Problem(path, f"{subject}is {len(text)} characters long; at most {cap} are allowed",
                           "FIELD_TOO_LONG")
        if "\x00" in text:
            yield _Problem(path, f"{subject}must not contain NUL characters", "INVALID_CHARACTER")
        elif not _is_utf8(text):
            yield _Problem(path, f"{subject}must be valid Unicode (no lone surrogates)", "INVALID_CHARACTER")

    def _json(self, msg: Message, path: str, cap: int) -> Iterator[_Problem]:
        """A Struct/Value/ListValue as the JSON document it stands for, at most `cap` bytes."""
        limits = self._limits
        # Converting costs ~0.3 µs a value; the encoded size ~3 ns a byte (C). A document within
        # max_payload_bytes as JSON is at most DOCUMENT_PROTOBUF_GROWTH times that as protobuf,
        # so anything larger is refused unconverted (1M numbers, 11 MB: 2.4-3.7 s before).
        encoded = msg.ByteSize()
        if encoded > DOCUMENT_PROTOBUF_GROWTH * cap:
            yield _Problem(path, f"is {encoded} bytes as protobuf, more than any document of at most "
                                 f"{cap} bytes as JSON", "JSON_TOO_LARGE")
            return
        try:
            document, long_key = _document(msg, limits.max_json_depth, limits.max_short_text_length)
        except _TooDeep:
            yield _Problem(path, f"nests deeper than {limits.max_json_depth} levels", "JSON_TOO_DEEP")
            return
        except _NotFinite:
            # NaN and Infinity, which JSON (and jsonb) cannot hold.
            yield _Problem(path, "numbers must be finite", "INVALID_FIELD")
            return
        # One C pass finds the size and whether any string may be bad (a NUL prints as \u0000,
        # a lone surrogate fails to encode); only then is every string walked for its path.
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        try:
            size, suspect = len(text.encode()), "\\u0000" in text
        except UnicodeEncodeError:
            size, suspect = len(text.encode(errors="surrogatepass")), True
        if long_key or suspect:
            for where, string, is_key in _strings(document, path):
                # A string value is bounded by the document's size; a key also by its own length.
                cap = limits.max_short_text_length if is_key else len(string)
                yield from self._string(string, where, cap, what="key" if is_key else "")
        if size > cap:
            yield _Problem(path, f"is {size} bytes as JSON; at most {cap} are allowed", "JSON_TOO_LARGE")


class _TooDeep(Exception):
    """A document nests deeper than max_json_depth."""


class _NotFinite(Exception):
    """A document holds NaN or an infinity."""


def _document(msg: Message, max_depth: int, max_key: int) -> tuple[Any, bool]:
    """A Struct, ListValue or Value as the Python value json_format.MessageToDict makes of it,
    ~4x faster (130,000 numbers: 42 ms against 180 ms), and whether some key is longer than
    `max_key`. Raises _TooDeep past `max_depth` levels (`{}` is 1), before converting deeper,
    and _NotFinite for NaN and infinities."""
    isfinite = math.isfinite
    long_key = False

    def value(item: Any, depth: int) -> Any:  # depth: the levels around `item`
        kind = item.WhichOneof("kind")
        if kind == "number_value":
            number = item.number_value
            if not isfinite(number):
                raise _NotFinite
            return number
        if kind == "string_value":
            return item.string_value
        if kind == "bool_value":
            return item.bool_value
        if kind == "struct_value":
            return struct(item.struct_value, depth + 1)
        if kind == "list_value":
            return values(item.list_value, depth + 1)
        return None  # null_value, or no kind set (MessageToDict's null too)

    def struct(fields: Any, depth: int) -> dict[str, Any]:
        nonlocal long_key
        if depth > max_depth:
            raise _TooDeep
        result = {key: value(item, depth) for key, item in fields.fields.items()}
        if result and max(map(len, result)) > max_key:
            long_key = True
        return result

    def values(items: Any, depth: int) -> list[Any]:
        if depth > max_depth:
            raise _TooDeep
        return [value(item, depth) for item in items.values]

    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        document: Any = struct(msg, 1)
    elif name == "google.protobuf.ListValue":
        document = values(msg, 1)
    else:
        document = value(msg, 0)
    return document, long_key


def _strings(document: Any, path: str) -> Iterator[tuple[str, str, bool]]:
    """Every key and string value in a JSON document, with its path; iterative (depth is
    bounded already, but a wide document is walked without recursion all the same)."""
    stack: list[tuple[Any, str]] = [(document, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            yield where, item, False
        elif isinstance(item, dict):
            for key, value in item.items():
                inner = f"{where}.{_key(key)}"
                yield inner, key, True
                stack.append((value, inner))
        elif isinstance(item, list):
            stack.extend((value, f"{where}[{i}]") for i, value in enumerate(item))


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _key(key: str) -> str:
    return key if len(key) <= _KEY_IN_PATH else key[:_KEY_IN_PATH] + "…"


def _error(problems: list[_Problem]) -> ConveyorError:
    first = problems[0]
    message = f"invalid request: {first.field}: {first.description}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return ConveyorError(ErrorKind.INVALID_ARGUMENT, first.reason, message,
                         violations=[FieldViolation(p.field, p.description) for p in problems],
                         metadata={"field": first.field})
