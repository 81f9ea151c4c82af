"""WorkersService: external workers lease and report `task` steps (SPEC §4.3) over the engine's
`dispatch` (long-polls, streams) and `leases` (heartbeats, reports)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.domain.errors import ConveyorError
from conveyor.engine.dispatch import Heartbeat, Revoked, lease_length
from conveyor.engine.facade import Engine
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc

# A heartbeat for a lease this worker no longer holds answers `revoked`, not an error.
_LEASE_LOST = "LEASE_LOST"


class WorkersServicer(workers_grpc.WorkersServiceServicer):
    """The worker protocol: one engine call per RPC, converted both ways."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def PollTasks(self, request: workers_pb.PollTasksRequest,
                        context: grpc.aio.ServicerContext) -> workers_pb.PollTasksResponse:
        dispatch = self._engine.dispatch
        req = dispatch.request(request.project_id, request.queue, request.worker_id, request.lease_seconds,
                               caller_from(context))
        leases = await dispatch.poll(req, request.max_tasks, request.wait_seconds)
        return workers_pb.PollTasksResponse(tasks=[convert.task_to_proto(lease) for lease in leases])

    async def StreamTasks(self, request: workers_pb.StreamTasksRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[workers_pb.StreamTasksResponse]:
        dispatch = self._engine.dispatch
        req = dispatch.request(request.project_id, request.queue, request.worker_id, request.lease_seconds,
                               caller_from(context))
        async for item in dispatch.stream(req, request.max_in_flight):
            if isinstance(item, Revoked):
                yield workers_pb.StreamTasksResponse(revoked=workers_pb.TaskRevoked(
                    task_id=item.task_id, attempt=item.attempt, reason=item.reason))
            elif isinstance(item, Heartbeat):
                yield workers_pb.StreamTasksResponse(heartbeat=convert.heartbeat_to_proto(item.at))
            else:
                yield workers_pb.StreamTasksResponse(task=convert.task_to_proto(item))

    async def HeartbeatTask(self, request: workers_pb.HeartbeatTaskRequest,
                            context: grpc.aio.ServicerContext) -> workers_pb.HeartbeatTaskResponse:
        try:
            until = await self._engine.leases.heartbeat(
                request.task_id, request.attempt, request.worker_id,
                lease_length(request.lease_seconds), caller_from(context))
        except ConveyorError as e:
            if e.reason != _LEASE_LOST:
                raise
            return workers_pb.HeartbeatTaskResponse(revoked=True)
        response = workers_pb.HeartbeatTaskResponse()
        response.lease_expires_at.FromDatetime(until)
        return response

    async def HeartbeatTasks(self, request: workers_pb.HeartbeatTasksRequest,
                             context: grpc.aio.ServicerContext) -> workers_pb.HeartbeatTasksResponse:
        leases = [(lease.task_id, lease.attempt) for lease in request.leases]
        untils = await self._engine.leases.heartbeat_many(
            leases, request.worker_id, lease_length(request.lease_seconds),
            caller_from(context))
        response = workers_pb.HeartbeatTasksResponse()
        for (task_id, attempt), until in zip(leases, untils, strict=True):
            status = response.leases.add(task_id=task_id, attempt=attempt, revoked=until is None)
            if until is not None:
                status.lease_expires_at.FromDatetime(until)
        return response

    async def CompleteTask(self, request: workers_pb.CompleteTaskRequest,
                           context: grpc.aio.ServicerContext) -> workers_pb.CompleteTaskResponse:
        await self._engine.leases.complete(request.task_id, request.attempt, request.worker_id,
                                           convert.struct_to_dict(request, "result"), caller_from(context))
        return workers_pb.CompleteTaskResponse()

    async def FailTask(self, request: workers_pb.FailTaskRequest,
                       context: grpc.aio.ServicerContext) -> workers_pb.FailTaskResponse:
        await self._engine.leases.fail(request.task_id, request.attempt, request.worker_id, request.error,
                                       not request.non_retryable, caller_from(context),
                                       retry_after=request.retry_after_seconds)
        return workers_pb.FailTaskResponse()

    async def ReleaseTask(self, request: workers_pb.ReleaseTaskRequest,
                          context: grpc.aio.ServicerContext) -> workers_pb.ReleaseTaskResponse:
        await self._engine.leases.release(request.task_id, request.attempt, request.worker_id,
                                          request.reason, caller_from(context))
        return workers_pb.ReleaseTaskResponse()
