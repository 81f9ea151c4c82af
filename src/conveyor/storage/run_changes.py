"""Statements of the project watch's feed: run status changes recorded with the unit of work
that made them, and read back after a cursor in an order every replica agrees on.

A mixin of `Repository` (same connection, same transaction). The order (models.RunChangeRow):
SQLite's one writer commits in id order, so `id` is the cursor. On PostgreSQL ids and xids are
handed out before commit, not in commit order; a row is read only once every transaction older
than the reader's snapshot has ended (`txid < pg_snapshot_xmin(pg_current_snapshot())`), and
below that bound nothing can still appear, so (txid, id) is a cursor that never skips a row
committed late nor repeats one. The price: a change waits for the transactions that began
before it to end (milliseconds; `held` tells the watcher to look again soon).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Table, Text, delete, func, insert, select, tuple_
from sqlalchemy import cast as sql_cast
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.changes import Changes
from conveyor.domain.errors import invalid
from conveyor.domain.feed import ChangesPage, RunChange
from conveyor.domain.records import RunRecord
from conveyor.storage.models import RunChangeRow

changes_t = cast(Table, RunChangeRow.__table__)

# The current transaction's id, and the oldest still running, as bigints (xid8 has no cast).
_TXID = sql_cast(sql_cast(func.pg_current_xact_id(), Text), BigInteger)
_XMIN = sql_cast(sql_cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)
_MAX_CURSOR = 2**63 - 1
# The columns `status_changes` fills (txid stays NULL on SQLite).
_ROW_NAMES = ["project_id", "run_id", "workflow_id", "status", "at"]


def _cursor(txid: int | None, ident: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([txid or 0, ident]).encode()).decode().rstrip("=")


def _position(cursor: str) -> tuple[int, int]:
    try:
        if len(cursor) > 100:
            raise ValueError("too long")
        parts = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if (not isinstance(parts, list) or len(parts) != 2
                or not all(type(p) is int and 0 <= p <= _MAX_CURSOR for p in parts)):
            raise ValueError("not a cursor")
        return parts[0], parts[1]
    except (ValueError, TypeError, RecursionError) as e:
        raise invalid("cursor is not valid", reason="INVALID_CURSOR") from e


def status_changes(runs: Sequence[RunRecord], units: Sequence[Changes]) -> list[dict[str, Any]]:
    """The rows of these new runs and of the units whose run changed status."""
    rows = [{"project_id": r.project_id, "run_id": r.id, "workflow_id": r.workflow_id,
             "status": str(r.status), "at": r.created_at} for r in runs]
    rows += [{"project_id": u.run.project_id, "run_id": u.run.id, "workflow_id": u.run.workflow_id,
              "status": str(u.run.status), "at": u.now}
             for u in units if u.run_fence is not None and u.run.status != u.run_fence.status]
    return rows


class RunChangeStatements:
    """Run change statements over the repository's connection."""

    conn: AsyncConnection
    dialect: str
    # Repository's insert (on SQLite straight to the driver, the trigger path's own).
    _insert: Callable[[Table, list[str], Sequence[Any]], Awaitable[None]]

    async def record_changes(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.dialect == "postgresql":
            # txid is the same for every row: this transaction's.
            await self.conn.execute(insert(changes_t).values(txid=_TXID), rows)
        else:
            # A trigger batch writes one row per new run: the SQLite hot path's own insert.
            await self._insert(changes_t, _ROW_NAMES, rows)

    async def head_cursor(self, project: str) -> str:
        """The position after every change of the project committed so far."""
        stmt = select(changes_t.c.txid, changes_t.c.id).where(changes_t.c.project_id == project)
        if self.dialect == "postgresql":
            stmt = stmt.where(changes_t.c.txid < _XMIN).order_by(changes_t.c.txid.desc(),
                                                                  changes_t.c.id.desc())
        else:
            stmt = stmt.order_by(changes_t.c.id.desc())
        row = (await self.conn.execute(stmt.limit(1))).first()
        return _cursor(row[0], row[1]) if row is not None else _cursor(0, 0)

    async def changes_after(self, project: str, cursor: str, workflow_ids: Sequence[str],
                            statuses: Sequence[str], limit: int) -> ChangesPage:
        txid, ident = _position(cursor)
        stmt = select(changes_t).where(changes_t.c.project_id == project)
        if self.dialect == "postgresql":
            after = tuple_(changes_t.c.txid, changes_t.c.id) > tuple_(txid, ident)
            stmt = stmt.where(after).order_by(changes_t.c.txid, changes_t.c.id)
        else:
            stmt = stmt.where(changes_t.c.id > ident).order_by(changes_t.c.id)
        if workflow_ids:
            stmt = stmt.where(changes_t.c.workflow_id.in_(workflow_ids))
        if statuses:
            stmt = stmt.where(changes_t.c.status.in_(statuses))
        held = False
        if self.dialect == "postgresql":
            bound = (await self.conn.execute(select(_XMIN))).scalar_one()
            below = stmt.where(changes_t.c.txid < bound).limit(limit)
            rows = (await self.conn.execute(below)).mappings().all()
            if len(rows) < limit:
                later = stmt.where(changes_t.c.txid >= bound).with_only_columns(changes_t.c.id).limit(1)
                held = (await self.conn.execute(later)).first() is not None
        else:
            rows = (await self.conn.execute(stmt.limit(limit))).mappings().all()
        return ChangesPage([RunChange(_cursor(m["txid"], m["id"]), m["run_id"], m["workflow_id"],
                                      m["status"], m["at"]) for m in rows], held)

    async def purge_changes(self, before: datetime, batch: int) -> int:
        """Drop up to `batch` changes older than `before` (a watch resumes within a day)."""
        oldest = (select(changes_t.c.id).where(changes_t.c.at < before)
                  .order_by(changes_t.c.at).limit(batch))
        result = await self.conn.execute(delete(changes_t).where(changes_t.c.id.in_(oldest)))
        return int(result.rowcount or 0)

