"""Statements of tenancy and access: API keys and the audit log.

A mixin of `Repository` (same connection, same transaction), kept apart because nothing here
touches runs. Every list is keyset-paged, newest first; every query a client reaches is scoped
by the caller's project (`scope` None: every project).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.access import ALL_PROJECTS, ApiKey, AuditEntry, AuditQuery, Role
from conveyor.domain.errors import ConveyorError, ErrorKind, not_found
from conveyor.domain.records import Page
from conveyor.storage.models import ApiKeyRow, AuditRow, RunRow, WorkflowRow
from conveyor.storage.paging import cursor_time, decode_cursor, encode_cursor, page_size

keys_t = cast(Table, ApiKeyRow.__table__)
audit_t = cast(Table, AuditRow.__table__)
runs_t = cast(Table, RunRow.__table__)
workflows_t = cast(Table, WorkflowRow.__table__)
_AUDIT_TEXT = ("actor", "project_id", "method", "resource_id", "code", "reason", "message")


def _fit(text: str, column: str) -> str:
    """`text` as the audit column can hold it: no NUL bytes, at most the column's length."""
    length = getattr(audit_t.c[column].type, "length", None)
    text = text.replace("\x00", "")
    return text[:length] if length else text


def _key(m: Any) -> ApiKey:
    return ApiKey(id=m["id"], name=m["name"], project_id=m["project_id"], role=Role[m["role"].upper()],
                  token_hash=m["token_hash"], token_prefix=m["token_prefix"], created_at=m["created_at"],
                  created_by=m["created_by"], rate_limit=m["rate_limit"], expires_at=m["expires_at"],
                  last_used_at=m["last_used_at"], revoked_at=m["revoked_at"])


class AccessStatements:
    """Key and audit statements over the repository's connection."""

    conn: AsyncConnection

    # -- keys -----------------------------------------------------------------------------------

    async def insert_key(self, key: ApiKey) -> None:
        try:
            await self.conn.execute(insert(keys_t).values(
                id=key.id, name=key.name, project_id=key.project_id, role=key.role.label,
                token_hash=key.token_hash, token_prefix=key.token_prefix, rate_limit=key.rate_limit,
                created_by=key.created_by, created_at=key.created_at, expires_at=key.expires_at))
        except IntegrityError as e:
            raise ConveyorError(ErrorKind.ALREADY_EXISTS, "KEY_ALREADY_EXISTS",
                                f"a key named {key.name!r} already exists") from e

    async def key_by_hash(self, token_hash: str) -> ApiKey | None:
        stmt = select(keys_t).where(keys_t.c.token_hash == token_hash)
        m = (await self.conn.execute(stmt)).mappings().first()
        return None if m is None else _key(m)

    async def keys_by_id(self, ids: Sequence[str]) -> dict[str, ApiKey]:
        """The keys of these ids that exist (by the primary key; open streams re-check theirs)."""
        if not ids:
            return {}
        rows = (await self.conn.execute(select(keys_t).where(keys_t.c.id.in_(list(ids))))).mappings().all()
        return {m["id"]: _key(m) for m in rows}

    async def find_key(self, ident: str, scope: str | None, lock: bool = False) -> ApiKey:
        """A key by id or name; NOT_FOUND outside the caller's scope (a project's keys)."""
        cond = or_(keys_t.c.id == ident, keys_t.c.name == ident)
        if scope is not None:
            cond = and_(keys_t.c.project_id == scope, cond)
        m = (await self.conn.execute(select(keys_t).where(cond))).mappings().first()
        if m is None:
            raise not_found("key", ident)
        return _key(m)

    async def list_keys(self, scope: str | None, project_id: str, include_revoked: bool, limit: int,
                        token: str) -> Page[ApiKey]:
        n = page_size(limit)
        stmt = select(keys_t)
        if scope is not None:
            stmt = stmt.where(keys_t.c.project_id == scope)
        if project_id:
            stmt = stmt.where(keys_t.c.project_id == project_id)
        if not include_revoked:
            stmt = stmt.where(keys_t.c.revoked_at.is_(None))
        if token:
            at, ident = decode_cursor(token, 2)
            ts = cursor_time(at)
            stmt = stmt.where(or_(keys_t.c.created_at < ts,
                                  and_(keys_t.c.created_at == ts, keys_t.c.id < ident)))
        rows = (await self.conn.execute(
            stmt.order_by(keys_t.c.created_at.desc(), keys_t.c.id.desc()).limit(n + 1))).mappings().all()
        items = [_key(m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > n else "")

    async def revoke_key(self, key_id: str, now: datetime) -> None:
        await self.conn.execute(update(keys_t).where(keys_t.c.id == key_id, keys_t.c.revoked_at.is_(None))
                                .values(revoked_at=now))

    async def has_admin_key(self) -> bool:
        """True when some usable admin key of every project exists (first-start bootstrap)."""
        stmt = select(func.count()).select_from(keys_t).where(
            keys_t.c.role == Role.ADMIN.label, keys_t.c.project_id == ALL_PROJECTS,
            keys_t.c.revoked_at.is_(None))
        return bool((await self.conn.execute(stmt)).scalar_one())

    async def touch_keys(self, used: Mapping[str, datetime]) -> None:
        """Record when keys were last used: one batched UPDATE, never moving a time backwards."""
        if not used:
            return
        await self.conn.execute(
            update(keys_t).where(keys_t.c.id == bindparam("b_id"),
                                 or_(keys_t.c.last_used_at.is_(None),
                                     keys_t.c.last_used_at < bindparam("b_at")))
            .values(last_used_at=bindparam("b_at")),
            [{"b_id": k, "b_at": at} for k, at in used.items()])

    # -- audit ----------------------------------------------------------------------------------

    async def insert_audit(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        # Refused calls (no token, role too low) are recorded before their request was checked:
        # what they named is cut to its column and rid of NUL bytes, or PostgreSQL would refuse
        # the whole batch, again at every flush, and every later entry with it.
        texts = [{name: _fit(getattr(e, name), name) for name in _AUDIT_TEXT} for e in entries]
        # Calls naming a run or a workflow by id alone (cancel, approve... by a key of every
        # project) carry no project: they belong to the project of what they named, so that
        # project's admins see them.
        named = sorted({t["resource_id"] for t in texts if not t["project_id"] and t["resource_id"]})
        owners: dict[str, str] = {}
        for i in range(0, len(named), 500):
            for table in (runs_t, workflows_t):
                found = await self.conn.execute(
                    select(table.c.id, table.c.project_id).where(table.c.id.in_(named[i:i + 500])))
                owners.update({ident: project for ident, project in found.all()})
        for t in texts:
            t["project_id"] = t["project_id"] or owners.get(t["resource_id"], "")
        await self.conn.execute(insert(audit_t),
                                [{"at": e.at, **t} for e, t in zip(entries, texts, strict=True)])

    async def list_audit(self, query: AuditQuery, scope: str | None, limit: int,
                         token: str) -> Page[AuditEntry]:
        n = page_size(limit)
        stmt = select(audit_t)
        if scope is not None:
            stmt = stmt.where(audit_t.c.project_id == scope)
        if query.project_id:
            stmt = stmt.where(audit_t.c.project_id == query.project_id)
        if query.actor:
            stmt = stmt.where(audit_t.c.actor == query.actor)
        if query.failures_only:
            stmt = stmt.where(audit_t.c.code != "OK")
        if token:
            (before,) = decode_cursor(token, 1)
            stmt = stmt.where(audit_t.c.id < before)
        rows = (await self.conn.execute(stmt.order_by(audit_t.c.id.desc()).limit(n + 1))).mappings().all()
        items = [AuditEntry(id=m["id"], at=m["at"], actor=m["actor"], project_id=m["project_id"],
                            method=m["method"], resource_id=m["resource_id"], code=m["code"],
                            reason=m["reason"], message=m["message"]) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].id) if len(rows) > n else "")
