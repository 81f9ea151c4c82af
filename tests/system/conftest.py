"""Fixtures for system tests: `conveyor serve` as a real child process.

`spawn` starts the server on free ports over a given database and yields where it listens
(read from the lines it prints); tests may SIGKILL it and spawn another on the same database.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.auth import FirstStartAdmin, bearer_interceptors

# A cold start (migrations, Envoy) takes about a second; leave room for a loaded CI machine.
START_TIMEOUT = 30.0


@dataclass
class Served(FirstStartAdmin):
    """A running `conveyor serve` process and its addresses."""

    proc: asyncio.subprocess.Process
    grpc_target: str
    rest_url: str
    data_dir: Path
    printed: list[str]  # what it printed on stdout up to where it said it listens


    def channel(self, **options: Any) -> grpc.aio.Channel:
        """A gRPC channel to the server whose calls authenticate as that admin."""
        return grpc.aio.insecure_channel(self.grpc_target, interceptors=bearer_interceptors(self.token),
                                         **options)

    def kill(self) -> None:
        """SIGKILL the server at once, mid-whatever-it-is-doing."""
        self.proc.kill()


SpawnFactory = Callable[..., AbstractAsyncContextManager[Served]]


@pytest.fixture
def spawn(tmp_path: Path) -> SpawnFactory:
    """``async with spawn(db_url, envoy=False) as served``: a real server process (on free ports
    unless `grpc_port` / `http_port` name one). `name`: its data directory under tmp_path (and
    its log, `<name>.log`; "server.log" for the default), so replicas can run side by side.
    `env`: CONVEYOR_* variables of its own (e.g. CONVEYOR_HTTP_ALLOW)."""

    @asynccontextmanager
    async def start(db_url: str, envoy: bool = False, grpc_port: int = 0,
                    http_port: int = 0, name: str = "data",
                    env: dict[str, str] | None = None) -> AsyncIterator[Served]:
        data_dir = tmp_path / name
        log_path = tmp_path / ("server.log" if name == "data" else f"{name}.log")
        args = [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", str(grpc_port),
                "--http-port", str(http_port), "--db-url", db_url, "--data-dir", str(data_dir)]
        if not envoy:
            args.append("--no-envoy")
        log = log_path.open("ab")
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=log,
                                                    env=environ)
        grpc_target = rest_url = ""
        printed: list[str] = []
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT):
                while not grpc_target or (envoy and not rest_url):
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
                    printed.append(line.rstrip("\n"))
                    if m := re.search(r"gRPC on (\S+)", line):
                        grpc_target = m.group(1)
                    if m := re.search(r"REST on (\S+)", line):
                        rest_url = m.group(1)
            yield Served(proc, grpc_target, rest_url, data_dir, printed)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(15):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            log.close()

    return start
