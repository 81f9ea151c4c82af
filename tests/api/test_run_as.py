"""`run_as` over gRPC against a real server (issue 16 finding 6): an operator may record another
initiator, but never one of the engine's own actors (`schedule`, `webhook`, `engine`,
`engine:…`, `anonymous`, `conveyor-cli`), whatever its case, width or surrounding whitespace:
INVALID_ARGUMENT RUN_AS_RESERVED, and no run, no idempotency record."""

from __future__ import annotations

import grpc
import pytest

from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, listed, two_steps


async def run_count(api: Api, workflow_id: str) -> int:
    request = runs_pb.ListWorkflowRunsRequest(workflow_id=[workflow_id])
    items, _ = await listed(api.runs.ListWorkflowRuns(request))
    return len(items)


@pytest.mark.parametrize("claimed", [
    "schedule", "webhook", "engine", "engine:notify", "engine:http:host:1", "anonymous", "conveyor-cli",
    "Schedule", "WEBHOOK", " engine", "webhook\t", "\nschedule ", "sch\u200bedule",
    "".join(chr(ord(c) + 0xFEE0) for c in "webhook"),  # fullwidth letters
])
async def test_run_as_may_not_claim_an_engine_actor(api: Api, claimed: str) -> None:
    wf = await api.create_workflow(two_steps())

    err = await failure(api.trigger(wf.id, run_as=claimed, idempotency_key="k1"))

    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.info is not None
    assert err.info.reason == "RUN_AS_RESERVED" and "engine's own actors" in err.message
    assert [f for f, _ in err.violations] == ["run_as"]
    assert await run_count(api, wf.id) == 0
    # The key was not spent on the refusal: the same key with an allowed initiator starts a run.
    run = await api.trigger(wf.id, run_as="release-bot", idempotency_key="k1")
    assert run.triggered_by == "release-bot" and run.created_by == "test-admin"


async def test_anybody_else_may_be_recorded(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    for name in ("scheduler", "webhooks-bot", "engineer", "alice@example.com"):
        run = await api.trigger(wf.id, run_as=name)
        assert run.triggered_by == name
    assert await run_count(api, wf.id) == 4
