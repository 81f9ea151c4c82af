"""KeysService: API keys over the API (admins only; the gate checks the role) over the engine's
`keys`. The token is in the CreateApiKey response and nowhere else, ever."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.engine.facade import Engine
from conveyor.v1 import keys_service_pb2 as keys_pb
from conveyor.v1 import keys_service_pb2_grpc as keys_grpc
from conveyor.v1 import resources_pb2 as pb


class KeysServicer(keys_grpc.KeysServiceServicer):
    """Create, list and revoke API keys."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def CreateApiKey(self, request: keys_pb.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> keys_pb.CreateApiKeyResponse:
        key, token = await self._engine.keys.create(caller_from(context), request.name, request.project_id,
                                                    request.role, convert.time_or_none(request, "expires_at"),
                                                    request.rate_limit)
        return keys_pb.CreateApiKeyResponse(key=convert.key_to_proto(key), token=token)

    async def ListApiKeys(self, request: keys_pb.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ApiKey]:
        page = await self._engine.keys.list(caller_from(context), request.project_id, request.include_revoked,
                                            request.limit, request.page_token)
        await convert.send_next_page_token(context, page.next_token)
        for key in page.items:
            yield convert.key_to_proto(key)

    async def RevokeApiKey(self, request: keys_pb.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> pb.ApiKey:
        return convert.key_to_proto(await self._engine.keys.revoke(caller_from(context), request.key_id))
