"""Fixtures for gateway tests: a real grpc.aio server on port 0 and a real Envoy in front of it.

Both are async context managers handed out by fixtures, so each test starts them in its own
event loop with the servicers and settings it needs. The gRPC server has the API's interceptor
(as `build_server` installs it), so stand-in servicers receive what real ones do: typed requests,
with raw REST bodies already parsed strictly and every limit checked.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from conveyor.api.errors import ErrorInterceptor
from conveyor.api.requests import RequestChecker
from conveyor.domain.limits import Limits
from conveyor.gateway.envoy import EnvoyGateway
from conveyor.settings import Settings

# A generated add_XServicer_to_server function and the servicer it registers.
Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any]
GrpcServerFactory = Callable[..., AbstractAsyncContextManager[int]]
EnvoyGatewayFactory = Callable[..., AbstractAsyncContextManager[EnvoyGateway]]


@asynccontextmanager
async def _grpc_server(*registrations: Registration) -> AsyncIterator[int]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor(prepare=RequestChecker(Limits()).prepare)])
    for add_to_server, servicer in registrations:
        add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


@pytest.fixture
def grpc_server() -> GrpcServerFactory:
    """``async with grpc_server((add_fn, servicer), ...) as port``: a real server on 127.0.0.1:0."""
    return _grpc_server


@pytest.fixture
def envoy_gateway(tmp_path: Path) -> EnvoyGatewayFactory:
    """``async with envoy_gateway(grpc_port, **settings) as gateway``: a started Envoy on free ports,
    each with its own data directory under tmp_path."""
    numbers = itertools.count()

    @asynccontextmanager
    async def start(grpc_port: int, **settings: Any) -> AsyncIterator[EnvoyGateway]:
        settings = {"http_port": 0, "envoy_admin_port": 0, **settings}
        gateway = EnvoyGateway(Settings(data_dir=tmp_path / f"data{next(numbers)}", **settings), grpc_port)
        await gateway.start()
        try:
            yield gateway
        finally:
            await gateway.stop()

    return start
