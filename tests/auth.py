"""Credentials for the tests' clients: keys created through the engine, and call metadata naming
one (channels use `conveyor.sdk.auth.bearer_interceptors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conveyor.domain.records import Caller
from conveyor.engine.facade import Engine
from conveyor.sdk.auth import bearer_interceptors

__all__ = ["TEST_ADMIN", "FirstStartAdmin", "bearer", "bearer_interceptors", "key"]

# Who creates the keys tests use (the engine records it as the keys' creator).
TEST_ADMIN = Caller(name="test-setup", project=None, role="admin")


async def key(engine: Engine, name: str, project: str = "*", role: str = "admin", **extra: Any) -> str:
    """The token of a new key."""
    _, token = await engine.keys.create(TEST_ADMIN, name, project, role, **extra)
    return token


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata naming `token`."""
    return (("authorization", f"Bearer {token}"),)


class FirstStartAdmin:
    """The admin key a served Conveyor created on its first start over `data_dir` (mixed into
    the test launchers' records of a running server)."""

    data_dir: Path

    @property
    def token(self) -> str:
        """The admin token the server wrote on its first start over this data directory."""
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers authenticating as that admin."""
        return {"authorization": f"Bearer {self.token}"}
