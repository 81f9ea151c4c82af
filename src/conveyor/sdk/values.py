"""JSON values across the wire: protobuf `Struct` <-> plain Python dicts for handlers.

`Struct` stores every number as a double, so a handler would see `3.0` for a config's `3`;
integral numbers that a double holds exactly come back as `int` (JSON has one number type, so
nothing is lost). A handler's return value becomes the step's output, which must be a JSON
object: a dict is sent as it is, `None` as `{}`, anything else as `{"value": v}`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

# Doubles hold every integer up to 2**53 exactly; beyond it an int would be a guess.
_EXACT_INT = 2**53


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _EXACT_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict (integral numbers as ints)."""
    result: dict[str, Any] = _plain(json_format.MessageToDict(message))
    return result


def value_to_python(message: struct_pb2.Value) -> Any:
    """A Value as a plain JSON value (integral numbers as ints)."""
    return _plain(json_format.MessageToDict(message))


def result_to_struct(value: Any) -> struct_pb2.Struct:
    """A handler's return value as the step's output object.

    Raises TypeError when it is not JSON (a datetime, a set, an object...): retrying would
    produce the same value, so the SDK reports that as a non-retryable failure.
    """
    if value is None:
        value = {}
    elif not isinstance(value, dict):
        value = {"value": value}
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise TypeError(f"task result is not a JSON object: {e}") from e
    return struct
