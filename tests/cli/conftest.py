"""Fixtures for CLI tests: one real `conveyor serve` per test module, and the real `conveyor`
command run as a child process against it.

Each module gets its own database (SQLite file, or a fresh PostgreSQL database when the suite
runs with CONVEYOR_TEST_DB=postgresql) and server; tests in a module share them, so each test
names its own workflows. `Cli.run` passes the server's address and, once the server has written
its first admin key to `<data-dir>/admin.token`, that token (as --token and CONVEYOR_TOKEN).
Commands run in an empty directory with their own XDG_CONFIG_HOME, so neither a developer's
config nor the checkout's `.conveyor/admin.token` reaches them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import BACKEND, PG_ADMIN_DSN, PG_URL_PREFIX


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The command is a gRPC client: what it does does not depend on the server's database, so
    its tests run in the SQLite pass only (`make test`; keys over PostgreSQL are tests/api's)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.client_only)


# A cold start (migrations) takes about a second; leave room for a loaded machine.
START_TIMEOUT = 30.0
# One command: a --wait follows a run for at most a few seconds.
COMMAND_TIMEOUT = 60.0


@dataclass
class Result:
    """How a command ended: exit code, stdout, stderr."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def rows(self) -> list[dict[str, str]]:
        """Tab-separated output as dicts keyed by the header line."""
        lines = self.out.splitlines()
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


@dataclass
class Cli:
    """The `conveyor` command, pointed at a running server."""

    address: str
    data_dir: Path
    home: Path  # the commands' working directory and XDG_CONFIG_HOME
    server: subprocess.Popen[str]
    log_path: Path
    db_url: str  # the server's database (`conveyor keys` opens it directly)

    @property
    def token(self) -> str | None:
        path = self.data_dir / "admin.token"
        return path.read_text().strip() if path.exists() else None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env["XDG_CONFIG_HOME"] = str(self.home / "config")
        return env

    def raw(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Result:
        """The command exactly as given: no address or token added."""
        proc = subprocess.run([sys.executable, "-m", "conveyor.cli", *args], input=input or "",
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              env=env if env is not None else self.env(), cwd=cwd or self.home)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def run(self, *args: str, input: str | None = None) -> Result:
        """`conveyor --address A [--token T] ARGS...`."""
        env = self.env()
        options = ["--address", self.address]
        if (token := self.token) is not None:
            options += ["--token", token]
            env["CONVEYOR_TOKEN"] = token
        return self.raw(*options, *args, input=input, env=env)

    def ok(self, *args: str, input: str | None = None) -> Result:
        """Run a command that must succeed."""
        result = self.run(*args, input=input)
        assert result.code == 0, (f"conveyor {' '.join(args)} exited {result.code}: {result.err}"
                                  f"{self.health()}")
        return result

    def health(self) -> str:
        """Why a command may have failed beyond its own output: the server is gone."""
        if self.server.poll() is None:
            return ""
        log = self.log_path.read_text()[-2000:]
        return f"\nthe server exited with {self.server.returncode}; its log ends:\n{log}"

    def apply(self, definition: dict[str, Any]) -> dict[str, Any]:
        """Create (or update) a workflow from a JSON file; the workflow as JSON."""
        path = self.home / f"{definition['name']}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(definition))
        return dict(self.ok("workflows", "apply", "-f", str(path), "-o", "json").json())

    def trigger(self, workflow: str, *args: str) -> dict[str, Any]:
        """Trigger a run; the run as JSON."""
        return dict(self.ok("runs", "trigger", workflow, *args, "-o", "json").json())

    def get_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.ok("runs", "get", run_id, "-o", "json").json())

    def steps(self, run_id: str) -> dict[str, dict[str, Any]]:
        """A run's steps as JSON, by ref."""
        return {s["step_ref"]: s for s in self.ok("steps", "list", run_id, "-o", "json").json()}


async def _create_pg(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def _drop_pg(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        # FORCE: the server's pool may still hold a connection for a moment.
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def module_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database for one test module (the suite's `db_url` is per test)."""
    if BACKEND == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'conveyor.db'}"
        return
    name = f"conveyor_test_{uuid.uuid4().hex[:16]}"
    asyncio.run(_create_pg(name))
    try:
        yield PG_URL_PREFIX + name
    finally:
        asyncio.run(_drop_pg(name))


@pytest.fixture(scope="module")
def cli(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """A `conveyor serve --no-envoy` of this module, and the command pointed at it."""
    root = tmp_path_factory.mktemp("cli")
    data_dir, home = root / "data", root / "home"
    home.mkdir()
    log_path = root / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", "0", "--no-envoy",
             "--db-url", module_db_url, "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        address = _wait_for_address(proc, log_path)
        yield Cli(address, data_dir, home, proc, log_path, module_db_url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_address(proc: subprocess.Popen[str], log_path: Path) -> str:
    """The address a starting server prints in its `gRPC on HOST:PORT` line."""
    found: list[str] = []
    started = threading.Event()

    def read() -> None:
        # Reads to the end, so the server never blocks on a full pipe.
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"gRPC on (\S+)", line):
                found.append(m.group(1))
                started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(START_TIMEOUT):
        proc.kill()
        raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
    return found[0]


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A workflow name of this test's own (tests of a module share one server)."""
    return re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40] + "-" + uuid.uuid4().hex[:4]
