"""Fixtures of the fault-injection tests: the database taken away and given back for real.

`outage` is the backend's own way to lose the database: on SQLite another process (a real
child) holds the file's exclusive lock; on PostgreSQL the server reaches the database through a
`FaultProxy` that can drop, black-hole or delay its connections. Either way `outage.url` is what
the server under test connects to and `outage.cut(mode)` / `outage.heal()` move it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from conveyor.settings import Settings
from conveyor.storage.db import normalize_url
from tests.faults.proxy import FaultProxy, Mode
from tests.system.conftest import spawn  # noqa: F401  (the real-process fixture, shared)

# Short bounds, so a test's outage is answered in a fraction of a second: the mechanisms are the
# server's defaults' (README "Database outages"), only the numbers are smaller.
SHORT: dict[str, Any] = {"db_busy_timeout_ms": 300, "db_pool_timeout_seconds": 0.6,
                         "db_connect_timeout_seconds": 0.3, "db_command_timeout_seconds": 0.3}
# How long a request may take to be refused during an outage: the longest bound above plus
# room for a loaded machine (the README's promise is ~1 s with the default bounds).
ANSWERED_WITHIN = 1.5

# Holds the SQLite file's write lock until told to let go on stdin (a process of its own: the
# lock another program, e.g. a backup or a DBA's sqlite3 shell, would hold).
_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@dataclass
class Outage:
    """The database, taken away (`cut`) and given back (`heal`) on demand."""

    backend: str
    url: str  # what the server connects to
    real_url: str  # the database itself, not through any proxy (to check what was written)
    proxy: FaultProxy | None = None
    _locker: asyncio.subprocess.Process | None = field(default=None, repr=False)

    async def cut(self, mode: Mode = "drop", delay: float = 0.0) -> None:
        """PostgreSQL: the proxy's `mode`. SQLite has one outage whatever the mode: the file
        locked by another process."""
        if self.proxy is not None:
            self.proxy.set_mode(mode, delay)
            return
        assert self._locker is None
        path = normalize_url(self.url).database or ""
        self._locker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LOCKER, path, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert self._locker.stdout is not None
        assert (await self._locker.stdout.readline()).strip() == b"locked"

    async def heal(self) -> None:
        if self.proxy is not None:
            self.proxy.set_mode("pass")
            return
        if self._locker is not None:
            assert self._locker.stdin is not None
            self._locker.stdin.write(b"\n")
            await self._locker.stdin.drain()
            await self._locker.wait()
            self._locker = None


@pytest.fixture
async def outage(db_url: str, backend: str) -> AsyncIterator[Outage]:
    if backend == "sqlite":
        out = Outage(backend, db_url, db_url)
        try:
            yield out
        finally:
            await out.heal()
        return
    async with FaultProxy(5432) as proxy:
        url = make_url(db_url).set(port=proxy.port).render_as_string(hide_password=False)
        yield Outage(backend, url, db_url, proxy)


@pytest.fixture
def fault_settings(outage: Outage) -> Settings:
    """A server's settings over the outage's URL, with the short bounds."""
    return Settings(db_url=outage.url, grpc_host="127.0.0.1", grpc_port=0, envoy_enabled=False, **SHORT)
