"""The wiring: one running Conveyor — database (migrated), engine, gRPC server and Envoy.

`App.start()` brings them up in dependency order and `App.stop()` takes them down in reverse:
Envoy first (no new REST requests), then the gRPC server with a grace period for calls in
flight, then the engine's loop, then the database pool.
"""

from __future__ import annotations

import gc
import sys

import grpc

from conveyor.api.server import build_server
from conveyor.engine.facade import Engine
from conveyor.gateway.envoy import EnvoyGateway
from conveyor.settings import Settings
from conveyor.storage.db import Database
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

    async def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        await migrate(self.settings.db_url)
        self.db = Database(self.settings.db_url, busy_timeout_ms=self.settings.db_busy_timeout_ms,
                           pool_timeout=self.settings.db_pool_timeout_seconds)
        self.engine = Engine(SqlStore(self.db), self.settings)
        self.server, self.grpc_port = await build_server(self.engine, self.settings)
        await self.server.start()
        await self.engine.start()
        if self.settings.envoy_enabled:
            self.gateway = EnvoyGateway(self.settings, self.grpc_port)
            await self.gateway.start()
        # Everything built at start (modules, protos, the CEL grammar) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it while
        # requests wait (it took ~100 ms at a time once big requests had grown the heap).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE)
        if self.engine is not None:
            await self.engine.stop()
        if self.db is not None:
            await self.db.dispose()

    @property
    def grpc_address(self) -> str:
        return f"{self.settings.grpc_host}:{self.grpc_port}"
