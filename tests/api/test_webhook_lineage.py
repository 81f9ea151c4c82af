"""DeliverWebhook over gRPC with an X-Conveyor-Lineage header (issue 16 finding 3): a header this
server signed makes the delivery join its run's family, so the workflow that family started is
refused FAILED_PRECONDITION WORKFLOW_LOOP (a family too deep NESTING_TOO_DEEP) with no run; any
other header is no cause at all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from conveyor.domain.families import Cause, sign_cause
from conveyor.domain.records import Caller
from conveyor.settings import Settings
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import webhooks_service_pb2_grpc as hooks_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.bare import bare_channel
from tests.api.support import Api, failure, listed, two_steps
from tests.api.test_webhooks import rotate


@pytest.fixture
async def hooks(api: Api, settings: Settings) -> AsyncIterator[Any]:
    async with bare_channel(api.engine, settings) as channel:
        yield hooks_grpc.WebhooksServiceStub(channel)


def deliver(hooks: Any, token: str, lineage: str) -> Any:
    return hooks.DeliverWebhook(hooks_pb.DeliverWebhookRequest(token=token),
                                metadata=(("x-conveyor-lineage", lineage),))


async def runs_of(api: Api, workflow_id: str) -> list[Any]:
    request = runs_pb.ListWorkflowRunsRequest(workflow_id=[workflow_id])
    items, _ = await listed(api.runs.ListWorkflowRuns(request))
    return items


async def test_a_signed_lineage_that_reached_the_workflow_before_is_a_loop(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    _, token = await rotate(api, wf.id)
    secret = api.engine.webhooks.secret

    err = await failure(deliver(hooks, token, sign_cause(secret, Cause("run-0", ("other", wf.id), 1))))

    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.info is not None
    assert err.info.reason == "WORKFLOW_LOOP" and "would start itself (through run run-0)" in err.message
    deep = await failure(deliver(hooks, token, sign_cause(secret, Cause("run-0", ("a",), 10))))
    assert deep.code == grpc.StatusCode.FAILED_PRECONDITION and deep.info is not None
    assert deep.info.reason == "NESTING_TOO_DEEP"
    assert await runs_of(api, wf.id) == []

    # A family that has not met this workflow: the run joins it.
    run = await deliver(hooks, token, sign_cause(secret, Cause("run-0", ("other",), 1)))
    assert run.triggered_by == "webhook" and run.project_id == "acme"
    stored = await api.engine.runs.get(run.id, Caller("tester"))
    assert stored.lineage == ["other", wf.id] and stored.depth == 2


async def test_a_lineage_this_server_did_not_sign_is_ignored(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps())
    _, token = await rotate(api, wf.id)
    not_ours = sign_cause("not ours", Cause("r", (wf.id,), 0))
    for header in (not_ours, "garbage", "v1.x.y", "v1." + "a" * 5000 + ".b"):
        run = await deliver(hooks, token, header)
        assert json_format.MessageToDict(run.payload) == {} and run.triggered_by == "webhook"
    assert len(await runs_of(api, wf.id)) == 4
