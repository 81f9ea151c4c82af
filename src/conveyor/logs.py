"""How the server's and the worker's logs are written: plain lines (the default) or, with
CONVEYOR_LOG_FORMAT=json, one JSON object per line for log collectors.

A JSON line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`, then
whatever the call passed in `extra` (e.g. `log.warning("…", extra={"run_id": r, "step_id": s})`),
and `exception` with the traceback when there is one. Imports nothing of Conveyor: the command
line configures logging before anything else is loaded.

Nothing secret is logged (SPEC §11): grpc itself logs, at ERROR with a traceback, every request
header value that is not UTF-8, whole ("Invalid encoding on b'Bearer cvk_…\\xff'"): a token
with one stray byte would be written out in full. `hide_undecodable_metadata` turns that record
into a DEBUG line that quotes nothing; the gate refuses such a token (MALFORMED_TOKEN) and counts
the refusal.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
# The logger and message of grpc's "a header value is not UTF-8" record (grpc_string.pyx.pxi).
_GRPC_LOGGER = "grpc._cython.cygrpc"
_UNDECODABLE = "Invalid encoding on %s"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from the call's `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime",
                                                                                 "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a datetime, an enum) is written as its text
        # rather than losing the whole line.
        return json.dumps(out, ensure_ascii=False, default=str)


class _UndecodableMetadata(logging.Filter):
    """Rewrites grpc's record of an undecodable header value so that it quotes nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _UNDECODABLE:
            record.msg = "a request header value is not UTF-8 (its bytes are not logged)"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def hide_undecodable_metadata() -> None:
    """Keep grpc from logging request header values that are not UTF-8 (tokens among them)."""
    logger = logging.getLogger(_GRPC_LOGGER)
    if not any(isinstance(f, _UndecodableMetadata) for f in logger.filters):
        logger.addFilter(_UndecodableMetadata())


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Route the root logger to stderr in `log_format` ("text" or "json")."""
    if log_format not in FORMATS:
        raise ValueError(f"CONVEYOR_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO; the gateway's readiness polls are not news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
