"""Statements of project secrets: set (insert or replace), list, delete, and the sealed values of
named secrets. Values arrive and leave sealed (engine/cipher.py); nothing here sees one in the
clear.

A mixin of `Repository` (same connection, same transaction). Every statement is scoped by the
project the engine resolved from the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.records import Page
from conveyor.domain.secrets import Secret
from conveyor.storage.models import SecretRow
from conveyor.storage.paging import cursor_time, decode_cursor, encode_cursor, page_size

secrets_t = cast(Table, SecretRow.__table__)
_LISTED = (secrets_t.c.project_id, secrets_t.c.name, secrets_t.c.created_at, secrets_t.c.updated_at)


def _secret(m: Any) -> Secret:
    return Secret(project_id=m.project_id, name=m.name, created_at=m.created_at, updated_at=m.updated_at)


class SecretStatements:
    """Secret statements over the repository's connection."""

    conn: AsyncConnection

    async def put_secret(self, project: str, name: str, sealed: bytes, now: datetime,
                         most: int) -> Secret | None:
        """Replace the secret's value, or insert it while the project holds fewer than `most`
        (None when it is full). A concurrent insert of the same name (PostgreSQL) makes this a
        replace."""
        if (replaced := await self._replace(project, name, sealed, now)) is not None:
            return replaced
        count = (await self.conn.execute(select(func.count()).select_from(secrets_t).where(
            secrets_t.c.project_id == project))).scalar_one()
        if count >= most:
            return None
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(insert(secrets_t).values(
                    project_id=project, name=name, ciphertext=sealed, created_at=now, updated_at=now))
        except IntegrityError:
            replaced = await self._replace(project, name, sealed, now)
            assert replaced is not None  # the row that refused the insert is there
            return replaced
        return Secret(project_id=project, name=name, created_at=now, updated_at=now)

    async def _replace(self, project: str, name: str, sealed: bytes, now: datetime) -> Secret | None:
        row = (await self.conn.execute(
            update(secrets_t).where(secrets_t.c.project_id == project, secrets_t.c.name == name)
            .values(ciphertext=sealed, updated_at=now).returning(*_LISTED))).first()
        return None if row is None else _secret(row)

    async def list_secrets(self, project: str, limit: int, token: str) -> Page[Secret]:
        """A page of the project's secrets, newest first (ix_secrets_project_created)."""
        n = page_size(limit)
        stmt = select(*_LISTED).where(secrets_t.c.project_id == project)
        if token:
            at, name = decode_cursor(token, 2)
            ts = cursor_time(at)
            stmt = stmt.where(or_(secrets_t.c.created_at < ts,
                                  and_(secrets_t.c.created_at == ts, secrets_t.c.name < name)))
        rows = (await self.conn.execute(
            stmt.order_by(secrets_t.c.created_at.desc(), secrets_t.c.name.desc()).limit(n + 1))).all()
        items = [_secret(m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].created_at, items[-1].name) if len(rows) > n else "")

    async def delete_secret(self, project: str, name: str) -> bool:
        """True when there was such a secret."""
        result = await self.conn.execute(
            delete(secrets_t).where(secrets_t.c.project_id == project, secrets_t.c.name == name))
        return bool(result.rowcount)

    async def sealed_secrets(self, project: str, names: Sequence[str]) -> dict[str, bytes]:
        """The sealed values of those of `names` the project holds."""
        rows = await self.conn.execute(select(secrets_t.c.name, secrets_t.c.ciphertext).where(
            secrets_t.c.project_id == project, secrets_t.c.name.in_(names)))
        return {name: bytes(sealed) for name, sealed in rows.all()}
