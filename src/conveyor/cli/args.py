"""Values given on the command line: JSON objects (inline or `@file`), `key=value` pairs, moments
(RFC 3339, or `+30s`/`+10m`/`+2h`/`+1d` from now), and workflow definition files (.json, .yaml,
.yml). A value that does not parse is a usage error
(exit 2) naming the option, before anything is sent."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click


class JsonObject(click.ParamType):
    """A JSON object written inline, or `@path` to a file holding one (`@-`: standard input)."""

    name = "JSON|@FILE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        text = str(value)
        if text.startswith("@"):
            text = read_text(text[1:], self, param, ctx)
        try:
            data = json.loads(text)
        except ValueError as e:
            self.fail(f"not JSON: {e}", param, ctx)
        if not isinstance(data, dict):
            self.fail("must be a JSON object ({...})", param, ctx)
        return data


class KeyValue(click.ParamType):
    """`key=value` (the value may hold '=')."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, val = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not written key=value", param, ctx)
        return key, val


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RELATIVE = re.compile(r"\+(\d{1,7})([smhd])")


class Moment(click.ParamType):
    """A point in time: RFC 3339 with its offset (`2026-12-24T18:00:00Z`), or `+N` seconds,
    minutes, hours or days from now (`+10m`)."""

    name = "TIME|+DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        relative = _RELATIVE.fullmatch(text)
        if relative:
            return datetime.now(UTC) + timedelta(seconds=int(relative[1]) * _UNITS[relative[2]])
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is neither an RFC 3339 time nor +N[s|m|h|d]", param, ctx)
        if moment.tzinfo is None:
            self.fail(f"{value!r} has no offset: write Z or +HH:MM", param, ctx)
        return moment.astimezone(UTC)


def read_text(path: str, kind: click.ParamType, param: click.Parameter | None,
              ctx: click.Context | None) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as e:
        kind.fail(f"cannot read {path}: {e.strerror}", param, ctx)


def load_definition(path: str) -> dict[str, Any]:
    """A workflow definition from a .json, .yaml or .yml file (`-`: JSON or YAML on stdin)."""
    source = sys.stdin.read() if path == "-" else _read(path)
    if path.endswith((".yaml", ".yml")) or (path == "-" and not source.lstrip().startswith("{")):
        import yaml  # only `apply` of a YAML file pays for it

        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as e:
            raise click.BadParameter(f"not YAML: {e}", param_hint="-f") from e
    elif path.endswith(".json") or path == "-":
        try:
            data = json.loads(source)
        except ValueError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="-f") from e
    else:
        raise click.BadParameter(f"{path}: expected a .json, .yaml or .yml file", param_hint="-f")
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: a workflow definition is an object", param_hint="-f")
    return data


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="-f") from e


JSON_OBJECT = JsonObject()
KEY_VALUE = KeyValue()
