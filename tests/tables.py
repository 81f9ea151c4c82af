"""Every row of every table of a Conveyor database as text, for tests that look for what must
not be stored anywhere (a secret's value: tests/engine/test_secret_steps.py, tests/system/)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy import MetaData, select

from conveyor.storage.db import Database


def _text(value: Any) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


async def every_row_as_text(database: Database) -> dict[str, str]:
    """Table name -> every column of every row of it, as text (JSON documents as their JSON,
    bytes as latin-1): the whole database, whatever tables it holds."""
    meta = MetaData()
    async with database.read() as conn:
        await conn.run_sync(meta.reflect)
        return {table.name: "\n".join(" | ".join(_text(v) for v in row)
                                      for row in (await conn.execute(select(table))).all())
                for table in meta.sorted_tables}


def spellings(value: str) -> set[str]:
    """The ways a value may be written into text: as is, JSON-escaped, quoted (repr),
    percent-encoded."""
    return {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], repr(value)[1:-1],
            quote(value, safe=""), quote_plus(value)}


def found_in(texts: dict[str, str], value: str) -> dict[str, list[str]]:
    """Where any spelling of `value` occurs: table -> the spellings found there."""
    return {name: sorted(s for s in spellings(value) if s in text)
            for name, text in texts.items() if any(s in text for s in spellings(value))}
