"""Statements of a workflow's stored versions: one by number, and a page of them newest first.

A mixin of `Repository` (same connection, same transaction). Both take the workflow as already
found (and scoped to the caller's project) by `find_workflow`, and answer it as it stands with
the definition of the version asked for: the spec, the version's number and id, and when it
was written (`updated_at`). Which of the workflow's own fields an older version keeps is the
engine's call, not storage's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.records import Page, WorkflowRecord
from conveyor.domain.spec import WorkflowSpec
from conveyor.storage.models import WorkflowVersionRow
from conveyor.storage.paging import decode_cursor, encode_cursor, page_size

versions_t = cast(Table, WorkflowVersionRow.__table__)
_COLUMNS = (versions_t.c.id, versions_t.c.version, versions_t.c.spec, versions_t.c.created_at)


def _at_version(wf: WorkflowRecord, m: Any) -> WorkflowRecord:
    return dataclasses.replace(wf, version=m.version, version_id=m.id, spec=WorkflowSpec.from_dict(m.spec),
                               updated_at=m.created_at)


class VersionStatements:
    """Workflow version statements over the repository's connection."""

    conn: AsyncConnection

    async def workflow_version(self, wf: WorkflowRecord, version: int) -> WorkflowRecord | None:
        """`wf` with the definition of its version `version`; None when it has no such version."""
        row = (await self.conn.execute(select(*_COLUMNS).where(
            versions_t.c.workflow_id == wf.id, versions_t.c.version == version))).first()
        return None if row is None else _at_version(wf, row)

    async def list_workflow_versions(self, wf: WorkflowRecord, limit: int,
                                     token: str) -> Page[WorkflowRecord]:
        """A page of `wf` at each of its versions, newest first (ux_workflow_versions_wf_version
        walked backwards); the cursor is the last version listed."""
        n = page_size(limit)
        stmt = select(*_COLUMNS).where(versions_t.c.workflow_id == wf.id)
        if token:
            (before,) = decode_cursor(token, 1)
            stmt = stmt.where(versions_t.c.version < before)
        rows = (await self.conn.execute(stmt.order_by(versions_t.c.version.desc()).limit(n + 1))).all()
        items = [_at_version(wf, m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].version) if len(rows) > n else "")
