"""SecretsService: a project's secrets for its admins (the gate checks the role) over the
engine's `secrets`. Values go in and never come out: no response carries one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.engine.facade import Engine
from conveyor.v1 import secrets_service_pb2 as secrets_pb
from conveyor.v1 import secrets_service_pb2_grpc as secrets_grpc


class SecretsServicer(secrets_grpc.SecretsServiceServicer):
    """Set, list and delete project secrets."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def PutSecret(self, request: secrets_pb.PutSecretRequest,
                        context: grpc.aio.ServicerContext) -> secrets_pb.Secret:
        secret = await self._engine.secrets.put(caller_from(context), request.project_id, request.name,
                                                request.value)
        return convert.secret_to_proto(secret)

    async def ListSecrets(self, request: secrets_pb.ListSecretsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[secrets_pb.Secret]:
        page = await self._engine.secrets.list(caller_from(context), request.project_id, request.limit,
                                               request.page_token)
        await convert.send_next_page_token(context, page.next_token)
        for secret in page.items:
            yield convert.secret_to_proto(secret)

    async def DeleteSecret(self, request: secrets_pb.DeleteSecretRequest,
                           context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._engine.secrets.delete(caller_from(context), request.project_id, request.name)
        return empty_pb2.Empty()
