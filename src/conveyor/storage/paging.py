"""Pages of lists: page sizes and the opaque keyset cursors every list hands out and takes back.

A cursor is base64 of a small JSON array. A forged one is INVALID_PAGE_TOKEN before it reaches SQL.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from conveyor.domain.errors import invalid

MAX_PAGE = 1000
DEFAULT_PAGE = 50


def page_size(limit: int) -> int:
    """The page size for a request's `limit` (default 50, at most 1000)."""
    if limit < 0:
        raise invalid("limit must not be negative", reason="INVALID_PAGE_SIZE")
    return min(limit or DEFAULT_PAGE, MAX_PAGE)


def encode_cursor(*parts: Any) -> str:
    """An opaque page token for a keyset position."""
    raw = json.dumps([p.isoformat() if isinstance(p, datetime) else p for p in parts])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# The two shapes of our cursors: a position or seq (n=1: one int), and a newest-first keyset
# (n=2: an ISO timestamp with its offset, and an id). A forged token of any other shape, type or
# size is INVALID_PAGE_TOKEN: it must never reach SQL, where it would fail as a 500 (a string
# compared to an integer column on PostgreSQL, a naive time, an integer past BIGINT).
_MAX_CURSOR_INT = 2**31 - 1
_MAX_CURSOR_ID = 200
_MAX_TOKEN_CHARS = 1000


def decode_cursor(token: str, n: int) -> list[Any]:
    """The keyset position in a page token; INVALID_ARGUMENT when it is not one of ours."""
    try:
        if len(token) > _MAX_TOKEN_CHARS:
            raise ValueError("too long")
        parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(parts, list) or len(parts) != n:
            raise ValueError("wrong shape")
        if n == 1:
            (pos,) = parts
            if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= _MAX_CURSOR_INT:
                raise ValueError("not a position")
        else:
            at, ident = parts
            if not isinstance(ident, str) or not 0 < len(ident) <= _MAX_CURSOR_ID or "\x00" in ident:
                raise ValueError("not an id")
            cursor_time(at)
        return parts
    except (ValueError, TypeError, RecursionError) as e:
        raise invalid("page_token is not valid", reason="INVALID_PAGE_TOKEN") from e


def cursor_time(at: Any) -> datetime:
    """The timestamp of a keyset cursor; ValueError unless it is an ISO time with an offset."""
    if not isinstance(at, str) or len(at) > 40:
        raise ValueError("not a time")
    ts = datetime.fromisoformat(at)
    if ts.tzinfo is None:
        raise ValueError("a time without offset")
    try:
        return ts.astimezone(UTC)  # what the column stores; year 1 or 9999 may not convert
    except OverflowError as e:
        raise ValueError("a time out of range") from e
