"""A channel without credentials to a second server over the same engine (the `api` fixture's
channel always sends the test admin's token): for calls that must carry no `authorization`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from conveyor.api.server import build_server
from conveyor.engine.facade import Engine
from conveyor.settings import Settings


@asynccontextmanager
async def bare_channel(engine: Engine, settings: Settings) -> AsyncIterator[grpc.aio.Channel]:
    server, port = await build_server(engine, settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)
