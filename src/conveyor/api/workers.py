"""WorkersService: task leases for external workers (SPEC §4.3).

Not served yet: every method answers UNIMPLEMENTED (reason NOT_IMPLEMENTED) until the workers
capability lands; `conveyor.api.server.PENDING_RPCS` lists them.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from conveyor.api.errors import abort
from conveyor.engine.facade import Engine
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc

_MESSAGE = "arrives with the workers capability"


class WorkersServicer(workers_grpc.WorkersServiceServicer):
    """Placeholder for the worker protocol; holds the engine it will serve from."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def _pending(self, method: str, context: grpc.aio.ServicerContext) -> NoReturn:
        await abort(context, grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED", f"{method} {_MESSAGE}")

    async def PollTasks(self, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._pending("PollTasks", context)

    async def StreamTasks(self, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._pending("StreamTasks", context)

    async def HeartbeatTask(self, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._pending("HeartbeatTask", context)

    async def CompleteTask(self, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._pending("CompleteTask", context)

    async def FailTask(self, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._pending("FailTask", context)
