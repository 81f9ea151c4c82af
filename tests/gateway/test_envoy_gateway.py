"""REST through a real Envoy to a real grpc.aio server: the wire contract of SPEC §1.1.

Small servicers stand in for the API layer: they answer fixed messages and record what reached
them, so these tests pin down what Envoy's transcoder (as configured by envoy/envoy.yaml.tmpl)
does to requests, responses, streams and errors.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from conveyor.api.server import MAX_METADATA_BYTES
from conveyor.domain.limits import Limits, trigger_body_bytes
from conveyor.gateway.envoy import TEMPLATE_PATH, EnvoyGateway, rest_body_bytes
from conveyor.settings import Settings
from conveyor.v1 import (
    resources_pb2,
    workflow_runs_service_pb2,
    workflow_runs_service_pb2_grpc,
    workflows_service_pb2,
    workflows_service_pb2_grpc,
)
from tests.gateway.conftest import EnvoyGatewayFactory, GrpcServerFactory

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# Small, so the 413 test needs no large body.
MAX_REQUEST_BYTES = 16 * 1024
# gRPC and Envoy internals that REST clients must not see.
INTERNAL_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-accept-encoding",
    "x-envoy-upstream-service-time",
)


async def abort_with_reason(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str
) -> None:
    """Abort like the API layer does: a google.rpc.Status with an ErrorInfo in the details trailer."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="conveyor.dev")
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    await context.abort(
        code, message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


def a_run(run_id: str) -> resources_pb2.WorkflowRun:
    run = resources_pb2.WorkflowRun(
        id=run_id,
        workflow_id="wf",
        status=resources_pb2.RunStatus.running,
        workflow_version=3,
        max_parallel_steps=0,
        tags={"a": "b"},
        payload=struct_pb2.Struct(fields={"x": struct_pb2.Value(number_value=1)}),
    )
    run.started_at.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
    return run


class RunsServicer(workflow_runs_service_pb2_grpc.WorkflowRunsServiceServicer):
    """Answers fixed messages; records each request and its metadata. RetryWorkflowRun is left
    to the base class, which answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})

    async def GetWorkflowRun(
        self, request: workflow_runs_service_pb2.GetWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> resources_pb2.WorkflowRun:
        self._record(request, context)
        errors = {
            "missing": (grpc.StatusCode.NOT_FOUND, "run missing not found", "RUN_NOT_FOUND"),
            "final": (grpc.StatusCode.FAILED_PRECONDITION, "run is completed", "INVALID_TRANSITION"),
            "dup": (grpc.StatusCode.ALREADY_EXISTS, "key reused", "IDEMPOTENCY_KEY_REUSED"),
        }
        if request.workflow_run_id in errors:
            await abort_with_reason(context, *errors[request.workflow_run_id])
        return a_run(request.workflow_run_id)

    async def ListWorkflowRuns(
        self, request: workflow_runs_service_pb2.ListWorkflowRunsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[resources_pb2.WorkflowRun]:
        self._record(request, context)
        if request.project_id == "empty":
            return
        await context.send_initial_metadata((("x-next-page-token", "tok"),))
        yield a_run("r1")
        yield a_run("r2")

    async def TriggerWorkflowRun(
        self, request: workflow_runs_service_pb2.TriggerWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> resources_pb2.WorkflowRun:
        self._record(request, context)
        return a_run("triggered")

    async def CancelWorkflowRun(
        self, request: workflow_runs_service_pb2.CancelWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> workflow_runs_service_pb2.CancelWorkflowRunResponse:
        self._record(request, context)
        return workflow_runs_service_pb2.CancelWorkflowRunResponse()

    async def PauseWorkflowRun(
        self, request: workflow_runs_service_pb2.PauseWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> workflow_runs_service_pb2.PauseWorkflowRunResponse:
        self._record(request, context)
        return workflow_runs_service_pb2.PauseWorkflowRunResponse()

    async def WatchWorkflowRun(
        self, request: workflow_runs_service_pb2.WatchWorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workflow_runs_service_pb2.WatchWorkflowRunResponse]:
        self._record(request, context)
        for seq in (1, 2):
            event = resources_pb2.RunEvent(seq=seq, workflow_run_id=request.workflow_run_id)
            yield workflow_runs_service_pb2.WatchWorkflowRunResponse(event=event)


    async def WatchProjectRuns(
        self, request: workflow_runs_service_pb2.WatchProjectRunsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workflow_runs_service_pb2.WatchProjectRunsResponse]:
        self._record(request, context)
        for run_id in ("r1", "r2"):
            yield workflow_runs_service_pb2.WatchProjectRunsResponse(run=a_run(run_id))


class WorkflowsServicer(workflows_service_pb2_grpc.WorkflowsServiceServicer):
    """Echoes the created workflow."""

    async def CreateWorkflow(
        self, request: workflows_service_pb2.CreateWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> resources_pb2.Workflow:
        return request.workflow


@pytest.fixture
def runs() -> RunsServicer:
    return RunsServicer()


@pytest.fixture
async def gateway(
    runs: RunsServicer, grpc_server: GrpcServerFactory, envoy_gateway: EnvoyGatewayFactory
) -> AsyncIterator[EnvoyGateway]:
    async with (
        grpc_server(
            (workflow_runs_service_pb2_grpc.add_WorkflowRunsServiceServicer_to_server, runs),
            (workflows_service_pb2_grpc.add_WorkflowsServiceServicer_to_server, WorkflowsServicer()),
        ) as grpc_port,
        envoy_gateway(grpc_port, max_request_bytes=MAX_REQUEST_BYTES) as gateway,
    ):
        yield gateway


@pytest.fixture
async def client(gateway: EnvoyGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield client


def assert_error(response: httpx.Response, http_status: int, code: int, reason: str | None = None) -> dict:
    """The JSON error shape of SPEC §1.1; reason None only checks that there is an ErrorInfo."""
    assert response.status_code == http_status, response.text
    assert response.headers["content-type"].startswith("application/json")
    for header in INTERNAL_HEADERS:
        assert header not in response.headers
    body = response.json()
    assert body.keys() == {"code", "message", "details"}
    assert body["code"] == code
    assert isinstance(body["message"], str)
    (detail,) = [d for d in body["details"] if d["@type"] == ERROR_INFO_TYPE]
    # Besides the ErrorInfo, only a BadRequest with field violations.
    assert all(d["@type"] in (ERROR_INFO_TYPE, BAD_REQUEST_TYPE) for d in body["details"])
    # The same keys whether Envoy or the server produced the error.
    assert detail.keys() == {"@type", "reason", "domain", "metadata"}
    assert detail["@type"] == ERROR_INFO_TYPE
    assert detail["reason"] == reason if reason else detail["reason"].isupper()
    return body


async def test_start_reports_real_port_and_stop_is_idempotent(gateway: EnvoyGateway) -> None:
    assert gateway.http_port > 0
    assert gateway.url == f"http://127.0.0.1:{gateway.http_port}"
    await gateway.stop()
    await gateway.stop()


async def test_unary_response_is_snake_case_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/workflow-runs/abc")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    for header in INTERNAL_HEADERS:
        assert header not in response.headers
    run = response.json()
    assert run["id"] == "abc"
    assert run["workflow_id"] == "wf"
    assert run["status"] == "running"
    assert run["workflow_version"] == 3
    assert run["max_parallel_steps"] == 0
    assert run["tags"] == {"a": "b"}
    assert run["payload"] == {"x": 1}
    assert run["started_at"] == "2023-11-14T22:13:20Z"
    assert "finished_at" not in run
    assert run["error"] == ""


async def test_list_is_a_bare_array_with_next_page_header(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/workflow-runs", params={"project_id": "p"})
    assert response.status_code == 200, response.text
    assert response.headers["x-next-page-token"] == "tok"
    body = response.json()
    assert isinstance(body, list)
    assert [run["id"] for run in body] == ["r1", "r2"]

    empty = await client.get("/v1/workflow-runs", params={"project_id": "empty"})
    assert empty.status_code == 200
    assert empty.json() == []
    assert "x-next-page-token" not in empty.headers


async def test_status_filter_is_parsed_as_the_enum(client: httpx.AsyncClient, runs: RunsServicer) -> None:
    response = await client.get("/v1/workflow-runs?project_id=p&status=running&status=paused&limit=5")
    assert response.status_code == 200, response.text
    (request,) = runs.requests
    assert list(request.status) == [resources_pb2.RunStatus.running, resources_pb2.RunStatus.paused]
    assert request.limit == 5

    bogus = await client.get("/v1/workflow-runs", params={"status": "bogus"})
    assert_error(bogus, 400, code_pb2.INVALID_ARGUMENT, "BAD_REQUEST")
    unknown = await client.get("/v1/workflow-runs", params={"nope": "1"})
    assert_error(unknown, 400, code_pb2.INVALID_ARGUMENT, "BAD_REQUEST")
    assert len(runs.requests) == 1


@pytest.mark.parametrize(
    ("run_id", "http_status", "code", "reason"),
    [
        ("missing", 404, code_pb2.NOT_FOUND, "RUN_NOT_FOUND"),
        ("final", 400, code_pb2.FAILED_PRECONDITION, "INVALID_TRANSITION"),
        ("dup", 409, code_pb2.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    ],
)
async def test_grpc_errors_keep_the_servers_error_info(
    client: httpx.AsyncClient, run_id: str, http_status: int, code: int, reason: str
) -> None:
    body = assert_error(await client.get(f"/v1/workflow-runs/{run_id}"), http_status, code, reason)
    assert body["details"][0]["domain"] == "conveyor.dev"
    assert body["message"]


async def test_unimplemented_method_is_501(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/workflow-runs/abc/retry", json={})
    assert response.status_code == 501, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == code_pb2.UNIMPLEMENTED


async def test_envoys_own_errors_are_json(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nope"), 404, code_pb2.NOT_FOUND, "UNKNOWN_PATH")
    assert_error(await client.patch("/v1/workflow-runs/abc"), 404, code_pb2.NOT_FOUND, "UNKNOWN_PATH")
    malformed = await client.post(
        "/v1/workflow-runs/x/pause", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert_error(malformed, 400, code_pb2.INVALID_ARGUMENT, "BAD_REQUEST")
    too_large = await client.post("/v1/workflows", json={"description": "x" * (MAX_REQUEST_BYTES + 1)})
    assert_error(too_large, 413, code_pb2.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")


async def test_raw_bodies_reach_the_server_as_bytes_and_are_parsed_strictly(
    client: httpx.AsyncClient, runs: RunsServicer
) -> None:
    # CreateWorkflow, UpdateWorkflow and TriggerWorkflowRun bind their REST body to an HttpBody
    # field: Envoy would drop unknown fields of a typed body silently (notes: envoy-1.40-facts).
    malformed = await client.post(
        "/v1/workflows", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    body = assert_error(malformed, 400, code_pb2.INVALID_ARGUMENT, "INVALID_JSON")
    assert "line 1" in body["message"]
    misspelt = {"name": "a", "steps": [{"ref": "a", "timeout_second": 60}]}
    unknown = await client.post("/v1/workflows", json=misspelt)
    body = assert_error(unknown, 400, code_pb2.INVALID_ARGUMENT, "UNKNOWN_FIELD")
    assert "steps[0].timeout_second" in body["message"]
    string_bool = await client.post("/v1/workflows/wf/runs", json={"check_conditions": "true"})
    assert_error(string_bool, 400, code_pb2.INVALID_ARGUMENT, "INVALID_FIELD")
    in_path_and_body = await client.post("/v1/workflows/wf/runs", json={"workflow_id": "other"})
    assert_error(in_path_and_body, 400, code_pb2.INVALID_ARGUMENT, "UNKNOWN_FIELD")
    assert runs.requests == []

    # The JSON shapes are unchanged: camelCase names are accepted as before, the query string
    # still binds project_id, and the server gets the typed request.
    ok = await client.post("/v1/workflows/wf/runs?project_id=p",
                           json={"payload": {"env": "prod"}, "maxParallelSteps": 2, "tags": {"t": "v"}})
    assert ok.status_code == 200, ok.text
    (request,) = runs.requests
    assert (request.workflow_id, request.project_id, request.max_parallel_steps) == ("wf", "p", 2)
    assert dict(request.payload) == {"env": "prod"} and dict(request.tags) == {"t": "v"}
    assert not request.HasField("body")
    empty = await client.post("/v1/workflows/wf/runs")
    assert empty.status_code == 200, empty.text
    definition = {"name": "deploy", "steps": [{"ref": "a", "kind": "noop"}]}
    created = await client.post("/v1/workflows", json=definition)
    assert created.status_code == 200, created.text
    assert created.json()["name"] == "deploy" and created.json()["steps"][0]["ref"] == "a"


async def test_long_urls_never_reach_grpc_as_metadata(client: httpx.AsyncClient, runs: RunsServicer) -> None:
    # A 10 KB URL: grpc's 8 KB soft metadata limit used to refuse it at random (429), because
    # Envoy forwarded the URL in x-envoy-original-path. Now it reaches the server, whose limits
    # answer (an id this long is not one).
    for _ in range(5):
        response = await client.get("/v1/workflow-runs/" + "a" * 10_000)
        assert_error(response, 400, code_pb2.INVALID_ARGUMENT, "FIELD_TOO_LONG")
    query = "&".join(["triggered_by=" + "b" * 150] * 60)
    listed = await client.get("/v1/workflow-runs?project_id=p&" + query)
    assert listed.status_code == 200, listed.text
    assert all("x-envoy-original-path" not in metadata for metadata in runs.metadata)
    # A 100 KB URL is over Envoy's header limit: 431 as JSON, before any gRPC.
    status, headers, body = await raw_get(client, "/v1/workflow-runs/" + "a" * 100_000)
    assert status == 431 and headers["content-type"] == "application/json"
    assert json.loads(body)["details"][0]["reason"] == "REQUEST_HEADERS_TOO_LARGE"


async def raw_get(client: httpx.AsyncClient, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET over a bare socket (httpx refuses URLs over 64 KB): status, headers, body."""
    reader, writer = await asyncio.open_connection(client.base_url.host, client.base_url.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def test_every_oversized_body_is_413_json(client: httpx.AsyncClient, runs: RunsServicer) -> None:
    # Bodies the transcoder streams (not raw HttpBody ones) used to reach grpc and come back as
    # 429 with grpc's raw message; the buffer filter refuses them all alike.
    big = "x" * (MAX_REQUEST_BYTES + 1)
    for response in (
        await client.post("/v1/workflow-runs/x/pause", json={"x": big}),
        await client.post("/v1/workflows/wf/runs", json={"payload": {"a": big}}),
        await client.post("/v1/workflow-runs/bulk-cancel", content=b"[" + b"1," * MAX_REQUEST_BYTES + b"1]"),
    ):
        assert_error(response, 413, code_pb2.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")
    assert runs.requests == []


async def test_body_field_colliding_with_path_variable_is_400(
    client: httpx.AsyncClient, runs: RunsServicer
) -> None:
    response = await client.post("/v1/workflow-runs/x/pause", json={"workflow_run_id": "y"})
    assert_error(response, 400, code_pb2.INVALID_ARGUMENT, "BAD_REQUEST")
    assert runs.requests == []


@pytest.mark.parametrize(
    ("path", "first_key"),
    [("/v1/workflow-runs/abc/watch?after_seq=7", "event"), ("/v1/projects/p/workflow-runs/watch", "run")],
)
async def test_watches_are_server_sent_events(client: httpx.AsyncClient, path: str, first_key: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in response.text.split("\n\n") if frame]
    assert len(frames) == 2
    for frame in frames:
        assert frame.startswith("data: ")
        assert first_key in json.loads(frame.removeprefix("data: "))


async def test_watch_query_parameters_reach_the_server(client: httpx.AsyncClient, runs: RunsServicer) -> None:
    response = await client.get("/v1/workflow-runs/abc/watch", params={"after_seq": 7})
    assert response.status_code == 200, response.text
    (request,) = runs.requests
    assert (request.workflow_run_id, request.after_seq) == ("abc", 7)


async def test_other_streams_stay_arrays_next_to_the_watch(client: httpx.AsyncClient) -> None:
    # The SSE override is per route: the list endpoint under the same prefix is not affected.
    response = await client.get("/v1/workflow-runs", params={"project_id": "p"})
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()) == 2


async def test_empty_response_is_an_empty_object(client: httpx.AsyncClient, runs: RunsServicer) -> None:
    response = await client.delete("/v1/workflow-runs/x")
    assert response.status_code == 200, response.text
    assert response.json() == {}
    assert runs.requests[0].workflow_run_id == "x"


async def test_authorization_and_idempotency_key_reach_the_server(
    client: httpx.AsyncClient, runs: RunsServicer
) -> None:
    response = await client.post(
        "/v1/workflows/wf/runs",
        json={"payload": {"env": "prod"}},
        headers={"Authorization": "Bearer secret", "Idempotency-Key": "k-1"},
    )
    assert response.status_code == 200, response.text
    (metadata,) = runs.metadata
    assert metadata["authorization"] == "Bearer secret"
    assert metadata["idempotency-key"] == "k-1"
    (request,) = runs.requests
    assert request.workflow_id == "wf"
    assert dict(request.payload) == {"env": "prod"}


async def test_server_down_is_503_json(
    grpc_server: GrpcServerFactory, envoy_gateway: EnvoyGatewayFactory
) -> None:
    async with grpc_server() as grpc_port:
        pass  # the port is closed again: nothing listens there
    async with envoy_gateway(grpc_port) as gateway, httpx.AsyncClient(base_url=gateway.url) as client:
        response = await client.get("/v1/workflow-runs/abc")
    assert_error(response, 503, code_pb2.UNAVAILABLE, "UNAVAILABLE")


async def test_start_fails_with_envoys_log_when_the_port_is_taken(
    gateway: EnvoyGateway, envoy_gateway: EnvoyGatewayFactory
) -> None:
    # Also guards enable_reuse_port: false, without which the second Envoy would start and
    # share the port.
    with pytest.raises(RuntimeError, match="Envoy exited") as failure:
        async with envoy_gateway(1, http_port=gateway.http_port):
            pass
    assert "Address already in use" in str(failure.value)


def test_grpc_accepts_all_the_metadata_envoy_forwards() -> None:
    # Envoy caps a REST request's line and headers at max_request_headers_kb and forwards the
    # headers as gRPC metadata; grpc must accept all of that (its soft limit refuses at random).
    template = TEMPLATE_PATH.read_text()
    (kb,) = re.findall(r"max_request_headers_kb: (\d+)", template)
    assert 2 * int(kb) * 1024 <= MAX_METADATA_BYTES
    # And the URL itself is not forwarded at all.
    assert "request_headers_to_remove: [x-envoy-original-path" in template


def test_envoys_body_limit_is_what_the_largest_request_needs() -> None:
    # A definition (max_definition_bytes) by default; a trigger's room if payloads may be larger;
    # never above max_request_bytes.
    assert rest_body_bytes(Settings()) == Limits().max_definition_bytes == 2 * 1024 * 1024
    big_payloads = Limits(max_payload_bytes=1024 * 1024)
    settings = Settings(max_request_bytes=64 << 20, limits=big_payloads)
    assert rest_body_bytes(settings) == trigger_body_bytes(big_payloads)
    assert rest_body_bytes(Settings(max_request_bytes=1024)) == 1024
