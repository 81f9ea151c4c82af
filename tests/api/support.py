"""Helpers for API tests: the stubs bundle, workflow definitions, and decoding of rich errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc


@dataclass
class Api:
    """Stubs of every Conveyor service on one channel, plus the engine and clock behind them."""

    channel: grpc.aio.Channel
    engine: Engine
    clock: ManualClock
    workflows: Any = field(init=False)
    runs: Any = field(init=False)
    steps: Any = field(init=False)
    workers: Any = field(init=False)

    def __post_init__(self) -> None:
        self.workflows = wf_grpc.WorkflowsServiceStub(self.channel)
        self.runs = runs_grpc.WorkflowRunsServiceStub(self.channel)
        self.steps = steps_grpc.StepRunsServiceStub(self.channel)
        self.workers = workers_grpc.WorkersServiceStub(self.channel)

    async def create_workflow(self, definition: dict[str, Any]) -> pb.Workflow:
        workflow = json_format.ParseDict(definition, pb.Workflow())
        return await self.workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(workflow=workflow))

    async def trigger(self, workflow_id: str, metadata: tuple[tuple[str, str], ...] = (),
                      **fields: Any) -> pb.WorkflowRun:
        request = json_format.ParseDict({"workflow_id": workflow_id, **fields},
                                        runs_pb.TriggerWorkflowRunRequest())
        return await self.runs.TriggerWorkflowRun(request, metadata=metadata)


def two_steps(name: str = "deploy", **extra: Any) -> dict[str, Any]:
    """A workflow of two instant noop steps: build (output {sha}) then test."""
    return {
        "name": name,
        "steps": [
            {"ref": "build", "kind": "noop", "config": {"output": {"sha": "abc123"}}},
            {"ref": "test", "kind": "noop", "depends_on": ["build"]},
        ],
        **extra,
    }


def gated(name: str = "gated") -> dict[str, Any]:
    """A workflow whose run waits: build, then an approval gate and an input step, then ship."""
    return {
        "name": name,
        "steps": [
            {"ref": "build", "kind": "noop"},
            {"ref": "gate", "kind": "approval", "depends_on": ["build"]},
            {"ref": "answer", "kind": "input", "depends_on": ["build"]},
            {"ref": "ship", "kind": "noop", "depends_on": ["gate", "answer"]},
        ],
    }


@dataclass
class RichError:
    """A failed call as the client sees it: code, message, and the decoded status details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    violations: list[tuple[str, str]]


def decode(error: grpc.aio.AioRpcError) -> RichError:
    """The rich status a server sent in `grpc-status-details-bin`, unpacked."""
    status = rpc_status.from_call(error)
    info = None
    violations: list[tuple[str, str]] = []
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
    return RichError(error.code(), error.details() or "", info, violations)


async def failure(call: Awaitable[Any]) -> RichError:
    """Await a unary call that must fail; its decoded error."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return decode(error)
    raise AssertionError("the call succeeded")


async def stream_failure(call: AsyncIterator[Any]) -> RichError:
    """Drain a server-streaming call that must fail; its decoded error."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return decode(error)
    raise AssertionError("the stream ended without an error")


async def listed(call: Any) -> tuple[list[Any], str]:
    """The items of a list stream and the next page token from its initial metadata ("" if none)."""
    items = [item async for item in call]
    metadata = await call.initial_metadata()
    token = dict(metadata or ()).get("x-next-page-token", "")
    return items, token
