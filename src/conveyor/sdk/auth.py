"""API keys on the client side: channel interceptors that send `authorization: Bearer <token>`.

For programs that call Conveyor's stubs directly (tests, benchmarks, your services): every call
on a channel built with `bearer_interceptors(token)` carries the key, unless the call names its
own `authorization` metadata.

    channel = grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(token))
"""

from __future__ import annotations

from typing import Any

import grpc


def bearer_interceptors(token: str) -> list[Any]:
    """Interceptors for a grpc.aio channel (one per call kind: grpc.aio files an interceptor
    under the first kind it implements only)."""
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
