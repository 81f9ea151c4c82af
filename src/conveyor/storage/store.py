"""SqlStore: the storage adapter the engine's ports describe — a Database whose transactions
hand out Repositories."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from conveyor.storage.db import Database
from conveyor.storage.repository import Repository


class SqlStore:
    """Opens read/write units of work on a Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Repository]:
        async with self.db.read() as conn:
            yield Repository(conn, self.db.dialect)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Repository]:
        async with self.db.write() as conn:
            yield Repository(conn, self.db.dialect)
