"""Limits: every size, length, count and cost bound Conveyor enforces, in one place.

The API checks requests against them at the edge (a clear INVALID_ARGUMENT and nothing stored),
the planner checks what steps produce (a step whose output is too large fails with
OUTPUT_TOO_LARGE), and the expression engine bounds what one CEL evaluation may cost. Settings
holds one `Limits`; the defaults below are the documented defaults (README, "Limits").
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client or a step may send, store or make the engine compute."""

    # Identifiers and short names: ids, workflow names, step refs, queues, idempotency keys,
    # entity_id, run_as, tag keys, project ids, page tokens.
    max_id_length: int = 200
    # Tag values and other short free text (a comment, a skip reason).
    max_short_text_length: int = 1000
    # Long free text: descriptions, status messages, error messages.
    max_text_length: int = 10_000
    # Tags on one run.
    max_tags: int = 64
    # Nesting depth of any JSON document (payload, output, config, result, data, a variable's
    # default); `{}` is 1. Each JSON level costs protobuf three levels (Struct, map entry, Value)
    # against its recursion limit of 100, and the deepest message that carries a document (a
    # watch snapshot's run output: response, snapshot, run, output, step ref) adds five more: at
    # 32 a stored output could no longer be decoded by clients (measured: 32 fails). 20 leaves
    # room for every wrapper.
    max_json_depth: int = 20
    # Serialized size of a run's payload, and of a step's input/result/data. 64 KiB keeps the
    # worst case (a payload of nothing but small numbers, ~30,000 values) within ~100 ms of
    # decoding and checking on the event loop; 256 KiB took ~400 ms (bench/hostile.py).
    max_payload_bytes: int = 64 * 1024
    # Serialized size of one step's output (a larger one fails the step, OUTPUT_TOO_LARGE) and
    # of a run's output (the outputs of its steps).
    max_output_bytes: int = 256 * 1024
    max_run_output_bytes: int = 1024 * 1024
    # Steps in one workflow definition (also caps a step's depends_on).
    max_steps: int = 1000
    # Variables declared by one workflow definition.
    max_variables: int = 200
    # Values of one repeated list filter (status=, workflow_id=, tag=).
    max_filter_values: int = 50
    # Length of one CEL expression or template expression.
    max_expression_length: int = 2000
    # Work one CEL evaluation may do, in cost units of ~1 µs of CPU each (expressions.py meters
    # them): the worst evaluation stays near 100 ms.
    max_expression_cost: int = 100_000
    # Webhook notifications one workflow definition, and one trigger, may name (README
    # "Notifications"), and the length of each one's URL.
    max_notifications: int = 10
    max_url_length: int = 2048
    # Items one `map` step may spread into (SPEC §2.1): more fail the step, TOO_MANY_ITEMS.
    max_map_items: int = 10_000
    # Ids in one bulk operation.
    max_bulk_ids: int = 1000
    # Size of one workflow definition as sent: its REST body (JSON, whitespace and all), or its
    # gRPC `Workflow` message (protobuf). Checked on the bytes before anything is converted, so
    # an oversized definition costs nothing to refuse. A 1,000-step chain is ~57 KB of JSON;
    # 2 MiB leaves room for steps with large configs.
    max_definition_bytes: int = 2 * 1024 * 1024
    # A project secret's value, as UTF-8 (SPEC §11): room for a private key or a service
    # account's JSON; and how many secrets one project may hold.
    max_secret_bytes: int = 64 * 1024
    max_secrets: int = 1000


def json_depth(value: object, stop_at: int) -> int:
    """How deeply `value` nests (a scalar is 0, `{}` and `[]` are 1), counted iteratively so a
    hostile document cannot exhaust the stack; counting stops once `stop_at` is exceeded."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list | tuple):
            children = list(item)
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > stop_at:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def json_size(value: object) -> int:
    """Bytes of `value` as compact UTF-8 JSON (how it is stored and sent)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def document_problem(value: object, max_depth: int, max_bytes: int) -> str | None:
    """Why a JSON document may not be stored (too deep, too large, or holding a NUL character,
    which PostgreSQL's jsonb refuses), or None when it may."""
    if not value:
        return None  # {}, [], "" or None: the output of most steps
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except RecursionError:
        return f"nested deeper than {max_depth} levels"
    size = len(text.encode())
    if size > max_bytes:
        return f"{size} bytes, over the limit of {max_bytes}"
    # Each level of nesting takes two characters at least, so short documents need no walk.
    if len(text) > 2 * max_depth and json_depth(value, max_depth) > max_depth:
        return f"nested deeper than {max_depth} levels"
    if "\\u0000" in text:  # json escapes every control character, NUL included
        return "contains a NUL character"
    return None


# --- request sizes --------------------------------------------------------------------------------
# Bounds on a request's bytes, checked before anything in it is converted: parsing and checking
# cost time per JSON value (json_format ~1-1.5 µs each), so a body must be refused by its length
# while that is still a `len()`. They sit here, in the domain, because the API (api/bodies.py,
# api/server.py) and the gateway (Envoy's body limit) both derive their numbers from them.

# How much longer than its compact JSON a REST body may be: whitespace (pretty-printed with
# indentation), `\uXXXX` escapes (6 bytes for a character of 1-3), spaces after `,` and `:`.
BODY_SLACK = 4
# A gRPC message can be this many times larger than the compact JSON it stands for: a JSON array
# of single-digit numbers ("1," is 2 bytes) becomes protobuf Values of 11 bytes each (5.5x, the
# worst case; objects, strings, bools and nulls grow less).
JSON_TO_PROTOBUF_GROWTH = 6


def trigger_body_bytes(limits: Limits) -> int:
    """The longest REST body of a trigger: BODY_SLACK times the largest payload plus the largest
    tags and every other field at its longest."""
    tags = limits.max_tags * (limits.max_id_length + limits.max_short_text_length)
    others = 8 * limits.max_id_length  # project_id, idempotency_key, entity_id, run_as, numbers
    return BODY_SLACK * (limits.max_payload_bytes + tags + others)


def document_body_bytes(limits: Limits) -> int:
    """The longest REST body holding one JSON document and a few short fields (a step's
    force-complete result, an input's data), which Envoy transcodes."""
    return BODY_SLACK * (limits.max_payload_bytes + limits.max_short_text_length)


def largest_body_bytes(limits: Limits) -> int:
    """The longest REST body any legitimate request needs: a workflow definition, by default
    (max_definition_bytes, 2 MiB), against ~580 KiB for a trigger and ~260 KiB for a document."""
    return max(limits.max_definition_bytes, trigger_body_bytes(limits), document_body_bytes(limits))
