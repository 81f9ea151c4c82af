"""Credentials for the tests' clients: a channel interceptor that sends a bearer token, and the
admin key a test server gets."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.domain.records import Caller
from conveyor.engine.facade import Engine

# Who creates the keys tests use (the engine records it as the keys' creator).
TEST_ADMIN = Caller(name="test-setup", project=None, role="admin")


def bearer_interceptors(token: str) -> list[Any]:
    """Channel interceptors sending `authorization: Bearer <token>` on every call that does not
    name its own (grpc.aio files an interceptor under its first kind only: one per kind)."""
    return [_BearerUnary(token), _BearerStream(token)]


class _Bearer:
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(name == "authorization" for name, _ in metadata):
            metadata.append(self.header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                          details.credentials, details.wait_for_ready)


class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


async def key(engine: Engine, name: str, project: str = "*", role: str = "admin", **extra: Any) -> str:
    """The token of a new key."""
    _, token = await engine.keys.create(TEST_ADMIN, name, project, role, **extra)
    return token


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata naming `token`."""
    return (("authorization", f"Bearer {token}"),)
