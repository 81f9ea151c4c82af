"""The wiring: one running Conveyor — database (migrated), engine, gRPC server and Envoy.

`App.start()` brings them up in dependency order and `App.stop()` takes them down in reverse:
the operators' endpoints and Envoy first (no new REST requests), then the gRPC server with a
grace period for calls in flight, then the engine's loop, then the database pool. The readiness
probe (health.py) drives both /ready and the gRPC health status.

Nothing secret is printed (SPEC §11): the database URL only with its password masked
(`database`), and the first start's admin token only to a terminal; where the output is kept
(a pipe, a container's log) only the path of the file that holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health

from conveyor.api.server import build_server, set_serving
from conveyor.engine.cipher import new_key_text
from conveyor.engine.facade import Engine
from conveyor.gateway.envoy import EnvoyGateway
from conveyor.gateway.supervisor import EnvoySupervisor, RestartBackoff
from conveyor.health import OpsServer, Readiness
from conveyor.settings import Settings
from conveyor.storage.db import Database, masked_url
from conveyor.storage.migrate import migrate
from conveyor.storage.store import SqlStore

# Seconds in-flight RPCs get to finish on shutdown before they are cancelled.
SHUTDOWN_GRACE = 5.0
# How often the interpreter hands the GIL between threads (default 5 ms): while the engine's CPU
# thread validates or plans something big, the event loop waits at most this long for its turn.
GIL_SWITCH_SECONDS = 0.0005


class App:
    """A started server and everything it needs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.engine: Engine | None = None
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.gateway: EnvoyGateway | None = None
        self.supervisor: EnvoySupervisor | None = None
        self.readiness: Readiness | None = None
        self.ops: OpsServer | None = None
        # The admin token this start created (the first start over a database) when stdout is a
        # terminal, else "".
        self.new_admin_token = ""

    async def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        await migrate(self.settings.db_url)
        self.db = Database(self.settings.db_url, busy_timeout_ms=self.settings.db_busy_timeout_ms,
                           pool_timeout=self.settings.db_pool_timeout_seconds,
                           connect_timeout=self.settings.db_connect_timeout_seconds,
                           command_timeout=self.settings.db_command_timeout_seconds)
        if not self.settings.notify_secret:
            self.settings = dataclasses.replace(self.settings, notify_secret=_kept_secret(
                self.settings.notify_secret_path, lambda: secrets.token_hex(32)))
        if not self.settings.secret_key:
            self.settings = dataclasses.replace(self.settings, secret_key=_kept_secret(
                self.settings.secret_key_path, new_key_text))
        # Envoy proves with it that the x-forwarded-for of a call is its own (api/clients.py).
        self.settings = dataclasses.replace(self.settings, gateway_secret=secrets.token_urlsafe(32))
        self.engine = Engine(SqlStore(self.db), self.settings, rest_urls=self._rest_urls)
        metrics = self.engine.runner.metrics
        metrics.watch_pool(self.db.pool_usage)
        if self.settings.auth_enabled:
            await self._bootstrap_admin(self.engine)
        health_servicer = health.aio.HealthServicer()
        self.server, self.grpc_port = await build_server(self.engine, self.settings, self._rest_base_url,
                                                         health_servicer)
        self.readiness = Readiness(self.db.ping)

        async def readiness_changed(ready: bool) -> None:
            metrics.ready.set(1 if ready else 0)
            await set_serving(health_servicer, ready)

        self.readiness.listeners.append(readiness_changed)
        await self.readiness.check()  # the migration just reached it: ready from the first answer
        self.readiness.start()
        self.ops = OpsServer(metrics.registry, self.readiness, self.settings.metrics_host,
                             self.settings.metrics_port)
        await self.ops.start()
        await self.server.start()
        await self.engine.start()
        if self.settings.envoy_enabled:
            self.gateway = EnvoyGateway(self.settings, self.grpc_port)
            await self.gateway.start()
            backoff = RestartBackoff(self.settings.envoy_restart_first_seconds,
                                     self.settings.envoy_restart_max_seconds,
                                     self.settings.envoy_restart_reset_seconds)
            readiness = self.readiness
            self.supervisor = EnvoySupervisor(self.gateway, backoff,
                                              report=lambda reason: readiness.set_down("envoy", reason),
                                              on_restart=metrics.envoy_restarts.inc)
            self.supervisor.start()
        # Everything built at start (modules, protos, the CEL grammar) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it while
        # requests wait (it took ~100 ms at a time once big requests had grown the heap).
        gc.collect()
        gc.freeze()

    def _rest_base_url(self) -> str:
        """Where REST clients reach this server: the configured public URL, else Envoy's real
        address (the port it bound when 0 was asked for)."""
        if not self.settings.public_url and self.gateway is not None:
            try:
                return self.gateway.url
            except RuntimeError:  # not listening yet
                pass
        return self.settings.rest_base_url

    def _rest_urls(self) -> list[str]:
        """Every address this server's webhook URLs are shown or reached under (the public URL,
        Envoy's real one, the configured one): a notification to one is delivered internally."""
        urls = [self._rest_base_url(), self.settings.rest_base_url]
        if self.gateway is not None:
            with contextlib.suppress(RuntimeError):  # not listening yet
                urls.append(self.gateway.url)
        return list(dict.fromkeys(urls))

    async def _bootstrap_admin(self, engine: Engine) -> None:
        """Zero setup: on a database without an admin key of every project, create one and keep
        its token in the data directory (mode 0600) for the CLI and README; show it once on a
        terminal (printed anywhere else, it would live on in a log)."""
        token = await engine.keys.bootstrap()
        if token is None:
            return
        path = self.settings.admin_token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 from the start: the token never exists on disk readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_TRUNC
        if not sys.stdout.isatty():
            print(f"conveyor: created the admin API key 'admin'; its token is in {path}", flush=True)
            return
        print(f"conveyor: created the admin API key 'admin' (kept in {path}); its token, shown once:",
              flush=True)
        print(token, flush=True)
        self.new_admin_token = token

    async def stop(self) -> None:
        if self.ops is not None:
            await self.ops.stop()
        if self.readiness is not None:
            await self.readiness.stop()
        if self.supervisor is not None:  # first: Envoy's exit below is no crash to restart
            await self.supervisor.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.engine is not None:
            self.engine.dispatch.quiesce()  # before the server refuses new reports: see quiesce
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE)
        if self.engine is not None:
            await self.engine.stop()
        if self.db is not None:
            await self.db.dispose()

    @property
    def database(self) -> str:
        """The database URL as it may be shown: its password masked."""
        return masked_url(self.settings.db_url)

    @property
    def grpc_address(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"


def _kept_secret(path: Path, generate: Callable[[], str]) -> str:
    """A key the settings leave unset (CONVEYOR_NOTIFY_SECRET, CONVEYOR_SECRET_KEY): generated on
    the first start and kept in the data directory (mode 0600), like the admin token, so restarts
    keep it (and receivers of notifications can read theirs once)."""
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret
