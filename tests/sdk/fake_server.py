"""A scripted WorkersService on a real gRPC port, for the protocol tests of the SDK.

It shows what the real server cannot: every request the worker sent (how many heartbeat calls,
which leases each named, each stream's `max_in_flight`), and it answers the way a test says
(revoke a lease, refuse a report with LEASE_LOST). It keeps the real server's stream contract:
a stream holds at most `max_in_flight` tasks; a slot frees when the task is reported or revoked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc


@dataclass(eq=False)
class _Stream:
    request: workers_pb.StreamTasksRequest
    held: set[tuple[str, int]] = field(default_factory=set)
    outbox: asyncio.Queue[workers_pb.StreamTasksResponse] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class FakeWorkers(workers_grpc.WorkersServiceServicer):
    def __init__(self) -> None:
        self.ready: dict[str, list[pb.Task]] = {}
        self.streams: list[_Stream] = []
        self.stream_requests: list[workers_pb.StreamTasksRequest] = []
        self.heartbeats: list[workers_pb.HeartbeatTasksRequest] = []
        self.completed: list[workers_pb.CompleteTaskRequest] = []
        self.failed: list[workers_pb.FailTaskRequest] = []
        self.released: list[workers_pb.ReleaseTaskRequest] = []
        self.revoked: set[tuple[str, int]] = set()
        self.lose_reports_of: set[str] = set()

    # ---- scripting -------------------------------------------------------------------------

    def add(self, queue: str, task_id: str, config: dict[str, Any] | None = None, attempt: int = 1,
            max_attempts: int = 1) -> None:
        c = struct_pb2.Struct()
        c.update(config or {})
        self.ready.setdefault(queue, []).append(pb.Task(
            task_id=task_id, attempt=attempt, workflow_run_id=f"run-{task_id}", step_ref=task_id, queue=queue,
            config=c, project_id="default", max_attempts=max_attempts))
        for s in self.streams:
            s.wake.set()

    def revoke(self, task_id: str, attempt: int = 1, via_stream: bool = True) -> None:
        key = (task_id, attempt)
        self.revoked.add(key)
        for s in self.streams:
            if key in s.held:
                s.held.discard(key)
                if via_stream:
                    s.outbox.put_nowait(workers_pb.StreamTasksResponse(
                        revoked=workers_pb.TaskRevoked(task_id=task_id, attempt=attempt, reason="test")))
                s.wake.set()

    def reports(self) -> int:
        return len(self.completed) + len(self.failed)

    # ---- the service -----------------------------------------------------------------------

    async def StreamTasks(self, request: workers_pb.StreamTasksRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[workers_pb.StreamTasksResponse]:
        stream = _Stream(request)
        self.stream_requests.append(request)
        self.streams.append(stream)
        try:
            while True:
                while not stream.outbox.empty():
                    yield stream.outbox.get_nowait()
                queue = self.ready.get(request.queue, [])
                if queue and len(stream.held) < request.max_in_flight:
                    task = queue.pop(0)
                    stream.held.add((task.task_id, task.attempt))
                    yield workers_pb.StreamTasksResponse(task=task)
                    continue
                stream.wake.clear()
                getter = asyncio.ensure_future(stream.outbox.get())
                waker = asyncio.ensure_future(stream.wake.wait())
                done, _ = await asyncio.wait([getter, waker], return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
        finally:
            self.streams.remove(stream)

    async def HeartbeatTasks(self, request: workers_pb.HeartbeatTasksRequest,
                             context: grpc.aio.ServicerContext) -> workers_pb.HeartbeatTasksResponse:
        self.heartbeats.append(request)
        until = timestamp_pb2.Timestamp()
        until.GetCurrentTime()
        return workers_pb.HeartbeatTasksResponse(leases=[
            workers_pb.TaskLeaseStatus(task_id=lease.task_id, attempt=lease.attempt,
                                       revoked=(lease.task_id, lease.attempt) in self.revoked,
                                       lease_expires_at=until)
            for lease in request.leases])

    async def _report(self, key: tuple[str, int], context: grpc.aio.ServicerContext) -> None:
        # Either way the stream's slot is free: a lost lease was revoked or expired already.
        for s in self.streams:
            if key in s.held:
                s.held.discard(key)
                s.wake.set()
        if key in self.revoked or key[0] in self.lose_reports_of:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason="LEASE_LOST", domain="conveyor"))
            status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="lease lost",
                                       details=[detail])
            await context.abort_with_status(rpc_status.to_status(status))

    async def CompleteTask(self, request: workers_pb.CompleteTaskRequest,
                           context: grpc.aio.ServicerContext) -> workers_pb.CompleteTaskResponse:
        await self._report((request.task_id, request.attempt), context)
        self.completed.append(request)
        return workers_pb.CompleteTaskResponse()

    async def FailTask(self, request: workers_pb.FailTaskRequest,
                       context: grpc.aio.ServicerContext) -> workers_pb.FailTaskResponse:
        await self._report((request.task_id, request.attempt), context)
        self.failed.append(request)
        return workers_pb.FailTaskResponse()

    async def ReleaseTask(self, request: workers_pb.ReleaseTaskRequest,
                          context: grpc.aio.ServicerContext) -> workers_pb.ReleaseTaskResponse:
        await self._report((request.task_id, request.attempt), context)
        self.released.append(request)
        return workers_pb.ReleaseTaskResponse()


async def start_fake(port: int = 0) -> tuple[grpc.aio.Server, FakeWorkers, str]:
    server = grpc.aio.server()
    fake = FakeWorkers()
    workers_grpc.add_WorkersServiceServicer_to_server(fake, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, fake, f"127.0.0.1:{port}"
