"""The gRPC server: every servicer behind the error interceptor, plus health and reflection.

Owns what the gRPC port serves and how it is bound; starting, stopping and the engine's own
lifecycle belong to the caller (the `serve` command, tests).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from conveyor import logs
from conveyor.api.access import Gate
from conveyor.api.audit import AuditServicer
from conveyor.api.errors import ErrorInterceptor
from conveyor.api.events import EventsServicer
from conveyor.api.keys import KeysServicer
from conveyor.api.requests import RequestChecker
from conveyor.api.secrets import SecretsServicer
from conveyor.api.step_runs import StepRunsServicer
from conveyor.api.webhooks import WebhooksServicer
from conveyor.api.workers import WorkersServicer
from conveyor.api.workflow_runs import WorkflowRunsServicer
from conveyor.api.workflows import WorkflowsServicer
from conveyor.domain.limits import JSON_TO_PROTOBUF_GROWTH
from conveyor.engine.facade import Engine
from conveyor.gateway.envoy import rest_body_bytes
from conveyor.settings import Settings
from conveyor.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    events_service_pb2,
    events_service_pb2_grpc,
    keys_service_pb2,
    keys_service_pb2_grpc,
    secrets_service_pb2,
    secrets_service_pb2_grpc,
    step_runs_service_pb2,
    step_runs_service_pb2_grpc,
    webhooks_service_pb2,
    webhooks_service_pb2_grpc,
    workers_service_pb2,
    workers_service_pb2_grpc,
    workflow_runs_service_pb2,
    workflow_runs_service_pb2_grpc,
    workflows_service_pb2,
    workflows_service_pb2_grpc,
)

# Full names of the Conveyor services, e.g. "conveyor.v1.WorkflowsService".
SERVICE_NAMES: tuple[str, ...] = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (workflows_service_pb2, "WorkflowsService"),
        (workflow_runs_service_pb2, "WorkflowRunsService"),
        (step_runs_service_pb2, "StepRunsService"),
        (workers_service_pb2, "WorkersService"),
        (keys_service_pb2, "KeysService"),
        (audit_service_pb2, "AuditService"),
        (webhooks_service_pb2, "WebhooksService"),
        (secrets_service_pb2, "SecretsService"),
        (events_service_pb2, "EventsService"),
    ))

# RPCs of the contract that deliberately answer UNIMPLEMENTED for now (reason NOT_IMPLEMENTED);
# none today. A test checks that every other RPC of the descriptors is served.
PENDING_RPCS: frozenset[str] = frozenset()


# Envoy answers 413 to REST bodies above gateway.envoy.rest_body_bytes (what the largest
# legitimate request needs: a 2 MiB definition by default), but transcoding can make the gRPC
# message larger than its JSON: a JSON array of small numbers ("1," is 2 bytes) becomes protobuf
# Values of 11 bytes each (measured: 3 MB of JSON -> 17 MB). gRPC messages may be
# JSON_TO_PROTOBUF_GROWTH (6) times larger, 12 MiB by default, so no body Envoy lets through is
# refused by grpc with a raw RESOURCE_EXHAUSTED; direct gRPC clients above it get grpc's own
# RESOURCE_EXHAUSTED. Decoding a message that large takes protobuf ~35 ms (1M numbers in 11 MB:
# ~30 ms); what it holds is then refused by size before it is converted (api/requests.py).

# grpc refuses request metadata above its soft limit (8 KB by default) at random, and above the
# hard limit always. Envoy forwards REST headers as metadata and caps them at
# `max_request_headers_kb` (32 KB, envoy/envoy.yaml.tmpl); twice that here means nothing Envoy
# forwards is ever refused. A test checks the two numbers agree.
MAX_METADATA_BYTES = 64 * 1024


# Long streams (watches, worker streams) live for hours, mostly quiet between heartbeats (15 s):
# the server pings idle connections every 30 s and drops one that does not answer in 10 s, so
# a client gone without a FIN (a dead machine, a NAT that forgot the flow) frees its watch;
# clients (Envoy, SDK workers) may ping as often as every 10 s, even with no call open,
# without being told GOAWAY "too many pings".
KEEPALIVE: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


async def build_server(engine: Engine, settings: Settings,
                       rest_base_url: Callable[[], str] | None = None,
                       health_servicer: health.aio.HealthServicer | None = None,
                       ) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server and the port it is bound to (settings.grpc_port may be 0).
    `rest_base_url` tells where REST clients reach it (webhook URLs), when settings cannot;
    `health_servicer`, when given, is the one served, so its owner can flip it (`set_serving`).

    A coroutine because the health servicer's statuses are set with awaits.
    """
    logs.hide_undecodable_metadata()
    server = grpc.aio.server(
        # Every request is checked against the limits before its handler runs.
        interceptors=[ErrorInterceptor(prepare=RequestChecker(settings.limits).prepare,
                                       admission=Gate(engine, settings.auth_enabled, settings.rate_limit,
                                                      anonymous_rate=settings.anonymous_rate_limit,
                                                      webhook_rate=settings.webhook_rate_limit,
                                                      gateway_secret=settings.gateway_secret),
                                       max_in_flight=settings.max_in_flight)],
        options=[
            ("grpc.max_receive_message_length", rest_body_bytes(settings) * JSON_TO_PROTOBUF_GROWTH),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            *KEEPALIVE,
        ],
    )
    workflows_service_pb2_grpc.add_WorkflowsServiceServicer_to_server(
        WorkflowsServicer(engine, settings, rest_base_url), server)
    workflow_runs_service_pb2_grpc.add_WorkflowRunsServiceServicer_to_server(
        WorkflowRunsServicer(engine), server)
    step_runs_service_pb2_grpc.add_StepRunsServiceServicer_to_server(StepRunsServicer(engine), server)
    workers_service_pb2_grpc.add_WorkersServiceServicer_to_server(WorkersServicer(engine), server)
    keys_service_pb2_grpc.add_KeysServiceServicer_to_server(KeysServicer(engine), server)
    audit_service_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(engine), server)
    webhooks_service_pb2_grpc.add_WebhooksServiceServicer_to_server(WebhooksServicer(engine), server)
    secrets_service_pb2_grpc.add_SecretsServiceServicer_to_server(SecretsServicer(engine), server)
    events_service_pb2_grpc.add_EventsServiceServicer_to_server(EventsServicer(engine), server)

    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.SERVICE_NAME, reflection.SERVICE_NAME):  # they need no database
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await set_serving(health_servicer, True)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)

    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    return server, port


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """The health status of the server ("") and of every Conveyor service: SERVING, or
    NOT_SERVING while the database is unreachable (the readiness probe, conveyor/health.py)."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)
