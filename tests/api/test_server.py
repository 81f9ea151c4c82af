"""The server as a whole: health, reflection, the message size limit, and that every RPC of
the contract is either served or deliberately pending (answering UNIMPLEMENTED)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.api.server import JSON_TO_PROTOBUF_GROWTH, PENDING_RPCS, SERVICE_NAMES, build_server
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.v1 import (
    audit_service_pb2,
    events_service_pb2,
    keys_service_pb2,
    secrets_service_pb2,
    step_runs_service_pb2,
    webhooks_service_pb2,
    workers_service_pb2,
    workflow_runs_service_pb2,
    workflows_service_pb2,
)
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from tests.api.support import Api, RichError, decode, failure

CONTRACT_FILES = (workflows_service_pb2, workflow_runs_service_pb2, step_runs_service_pb2,
                  workers_service_pb2, keys_service_pb2, audit_service_pb2, webhooks_service_pb2,
                  secrets_service_pb2, events_service_pb2)


def contract_methods() -> list[MethodDescriptor]:
    return [method
            for module in CONTRACT_FILES
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_empty(channel: grpc.aio.Channel, method: MethodDescriptor) -> RichError | None:
    """Call `method` with an empty request; its error, or None when it succeeded."""
    request_class: Any = GetMessageClass(method.input_type)
    response_class: Any = GetMessageClass(method.output_type)
    kwargs = {"request_serializer": request_class.SerializeToString,
              "response_deserializer": response_class.FromString}
    try:
        if method.server_streaming:
            async for _ in channel.unary_stream(path(method), **kwargs)(request_class(), timeout=10):
                pass
        else:
            await channel.unary_unary(path(method), **kwargs)(request_class(), timeout=10)
    except grpc.aio.AioRpcError as error:
        return decode(error)
    return None


def test_the_contract_has_the_services_the_server_names() -> None:
    assert SERVICE_NAMES == ("conveyor.v1.WorkflowsService", "conveyor.v1.WorkflowRunsService",
                             "conveyor.v1.StepRunsService", "conveyor.v1.WorkersService",
                             "conveyor.v1.KeysService", "conveyor.v1.AuditService",
                             "conveyor.v1.WebhooksService", "conveyor.v1.SecretsService",
                             "conveyor.v1.EventsService")
    unknown = PENDING_RPCS - {path(m) for m in contract_methods()}
    assert unknown == set(), "PENDING_RPCS names RPCs that do not exist"


async def test_every_rpc_is_served_or_pending(api: Api) -> None:
    methods = contract_methods()
    assert {m.containing_service.full_name for m in methods} == set(SERVICE_NAMES)

    unimplemented, internal = [], []
    for method in methods:
        error = await call_empty(api.channel, method)
        code = error.code if error else grpc.StatusCode.OK
        if path(method) in PENDING_RPCS:
            assert error is not None, f"{path(method)} is listed as pending but succeeded"
            assert code == grpc.StatusCode.UNIMPLEMENTED, (path(method), code)
            assert error.info is not None and error.info.reason == "NOT_IMPLEMENTED", path(method)
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            unimplemented.append(path(method))
        elif code == grpc.StatusCode.INTERNAL:
            internal.append(path(method))

    assert unimplemented == []
    assert internal == []


async def test_health_is_serving_for_the_server_and_every_service(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)

    for service in ("", *SERVICE_NAMES):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    unknown = await failure(health.Check(health_pb2.HealthCheckRequest(service="nope.Service")))
    assert unknown.code == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services_and_describes_them(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="conveyor.v1.WorkflowRunsService"),
    ]

    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]

    listed = {s.name for s in responses[0].list_services_response.service}
    assert listed == {*SERVICE_NAMES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in responses[1].file_descriptor_response.file_descriptor_proto]
    described = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert "conveyor.v1.WorkflowRunsService" in described


async def test_requests_above_the_size_limit_are_resource_exhausted(engine: Engine, db_url: str) -> None:
    # gRPC messages may be JSON_TO_PROTOBUF_GROWTH times the REST body limit (see server.py).
    settings = Settings(db_url=db_url, grpc_port=0, max_request_bytes=1024)
    server, port = await build_server(engine, settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            runs = runs_grpc.WorkflowRunsServiceStub(channel)
            try:
                too_long = "x" * (1024 * JSON_TO_PROTOBUF_GROWTH + 1)
                await runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=too_long))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            else:
                raise AssertionError("an oversized request was accepted")
    finally:
        await server.stop(grace=None)
