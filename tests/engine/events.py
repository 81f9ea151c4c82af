"""Helpers for tests that read events."""

from __future__ import annotations

from typing import Any


def without_change(data: dict[str, Any] | None) -> dict[str, Any]:
    """An event's data without the record state every event carries (`change`)."""
    return {k: v for k, v in (data or {}).items() if k != "change"}
