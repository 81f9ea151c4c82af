"""Inbound webhooks through the real server: a rotated URL shown once (only its hash stored), the
workflow showing a hint of it, deliveries without any key triggering runs as `webhook` in the
workflow's project with Idempotency-Key honored, and every dead URL answering the same NOT_FOUND."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from sqlalchemy import text

from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import webhooks_service_pb2_grpc as hooks_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.bare import bare_channel
from tests.api.support import Api, failure, listed, two_steps
from tests.auth import bearer, key

URL = re.compile(r"https?://[^/]+/v1/webhooks/(whk_[A-Za-z0-9_-]{43})")


@pytest.fixture
async def hooks(api: Api, settings: Settings) -> AsyncIterator[Any]:
    """The Webhooks stub on a channel that sends no credentials at all."""
    async with bare_channel(api.engine, settings) as channel:
        yield hooks_grpc.WebhooksServiceStub(channel)


async def rotate(api: Api, workflow_id: str, metadata: Any = ()) -> tuple[pb.Workflow, str]:
    """The workflow and its new webhook token (from the URL shown once)."""
    got = await api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=workflow_id),
                                            metadata=metadata)
    m = URL.fullmatch(got.webhook_url)
    assert m, got.webhook_url
    return got.workflow, m.group(1)


def deliver(hooks: Any, token: str, payload: dict[str, Any] | None = None, idempotency_key: str = "") -> Any:
    request = hooks_pb.DeliverWebhookRequest(token=token)
    if payload is not None:
        request.payload.CopyFrom(json_format.ParseDict(payload, struct_pb2.Struct()))
    metadata = (("idempotency-key", idempotency_key),) if idempotency_key else ()
    return hooks.DeliverWebhook(request, metadata=metadata)


async def runs_of(api: Api, workflow_id: str) -> list[pb.WorkflowRun]:
    request = runs_pb.ListWorkflowRunsRequest(workflow_id=[workflow_id])
    items, _ = await listed(api.runs.ListWorkflowRuns(request))
    return items


async def test_rotate_shows_the_url_once_and_the_workflow_only_a_hint(api: Api, database: Database) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    assert not wf.webhook_enabled and wf.webhook_url_hint == ""

    shown, token = await rotate(api, wf.id)

    assert shown.webhook_enabled and shown.HasField("webhook_rotated_at")
    assert shown.webhook_url_hint.startswith("/v1/webhooks/" + token[:8])
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=wf.id))
    (listed_wf,), _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(project_id="acme")))
    for w in (got, listed_wf):
        assert w.webhook_enabled and w.webhook_url_hint == shown.webhook_url_hint
        assert token.encode() not in w.SerializeToString() and token[8:] not in str(w)
    async with database.read() as conn:
        found = await conn.execute(text("SELECT * FROM workflows WHERE id = :id"), {"id": wf.id})
        row = found.mappings().one()
    assert row["webhook_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert all(token[8:] not in str(v) for v in row.values())


async def test_a_delivery_triggers_a_run_as_webhook_in_the_workflows_project(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    _, token = await rotate(api, wf.id)

    run = await deliver(hooks, token, {"ref": "main", "commits": [1, 2], "pusher": {"name": "eve"}})

    assert run.workflow_id == wf.id and run.project_id == "acme"
    assert run.triggered_by == "webhook" and run.created_by == "webhook"
    assert json_format.MessageToDict(run.payload) == {"ref": "main", "commits": [1, 2],
                                                      "pusher": {"name": "eve"}}
    assert [r.id for r in await runs_of(api, wf.id)] == [run.id]
    # An empty body is an empty payload.
    empty = await deliver(hooks, token)
    assert json_format.MessageToDict(empty.payload) == {} and empty.id != run.id


async def test_a_delivery_is_the_webhook_whatever_credentials_it_carries(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    _, token = await rotate(api, wf.id)
    stub = hooks_grpc.WebhooksServiceStub(api.channel)  # sends the test admin's token
    run = await stub.DeliverWebhook(hooks_pb.DeliverWebhookRequest(token=token))
    assert run.triggered_by == "webhook"
    viewer = await key(api.engine, "viewer", "*", "viewer")
    run = await stub.DeliverWebhook(hooks_pb.DeliverWebhookRequest(token=token), metadata=bearer(viewer))
    assert run.triggered_by == "webhook"


async def test_idempotency_key_gives_the_same_run(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps())
    _, token = await rotate(api, wf.id)

    first = await deliver(hooks, token, {"n": 1}, idempotency_key="delivery-1")
    again = await deliver(hooks, token, {"n": 1}, idempotency_key="delivery-1")
    other = await deliver(hooks, token, {"n": 1}, idempotency_key="delivery-2")

    assert again.id == first.id and other.id != first.id
    assert len(await runs_of(api, wf.id)) == 2


async def test_rotating_or_disabling_kills_the_old_url_at_once(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps())
    _, old = await rotate(api, wf.id)
    await deliver(hooks, old)
    _, new = await rotate(api, wf.id)
    assert new != old

    err = await failure(deliver(hooks, old))
    assert err.code == grpc.StatusCode.NOT_FOUND and err.info is not None
    assert err.info.reason == "WEBHOOK_NOT_FOUND"
    await deliver(hooks, new)

    disabled = await api.workflows.DisableWebhook(wf_pb.DisableWebhookRequest(workflow_id=wf.id))
    assert not disabled.webhook_enabled and disabled.webhook_url_hint == ""
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=wf.id))
    assert not got.webhook_enabled and got.webhook_url_hint == ""
    gone = await failure(deliver(hooks, new))
    assert (gone.code, gone.info) == (err.code, err.info) and gone.message == err.message
    assert len(await runs_of(api, wf.id)) == 2


async def test_every_dead_url_answers_the_same_not_found(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps())
    _, token = await rotate(api, wf.id)
    api_key = await key(api.engine, "ci", "*", "admin")
    answers = []
    for dead in ("whk_" + "A" * 43, "whk_", api_key, "", token[:-1], token + "x", token.upper(),
                 "../workflows", "x" * 150):
        err = await failure(deliver(hooks, dead, {"a": 1}))
        assert err.info is not None
        answers.append((err.code, err.info.reason, err.message))
    assert set(answers) == {(grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND", answers[0][2])}
    assert await runs_of(api, wf.id) == []


async def test_an_archived_workflow_takes_no_runs(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps())
    _, token = await rotate(api, wf.id)
    await api.workflows.ArchiveWorkflow(wf_pb.ArchiveWorkflowRequest(workflow_id=wf.id))

    err = await failure(deliver(hooks, token, {"a": 1}))
    assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    assert await runs_of(api, wf.id) == []
    # Nor can an archived workflow get a new URL.
    err = await failure(api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id)))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_payload_the_workflow_refuses_starts_nothing(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow({"name": "release", "variables": [{"name": "service", "required": True}],
                                    "steps": [{"ref": "a", "kind": "noop"}]})
    _, token = await rotate(api, wf.id)
    err = await failure(deliver(hooks, token, {"other": 1}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    err = await failure(deliver(hooks, token, {"service": "a\x00b"}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert await runs_of(api, wf.id) == []
    run = await deliver(hooks, token, {"service": "web"})
    assert run.status in (pb.RunStatus.pending, pb.RunStatus.running, pb.RunStatus.completed)


async def test_only_admins_of_the_project_manage_its_webhook(api: Api) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    operator = bearer(await key(api.engine, "acme-op", "acme", "operator"))
    foreign = bearer(await key(api.engine, "beta-admin", "beta", "admin"))
    own = bearer(await key(api.engine, "acme-admin", "acme", "admin"))

    err = await failure(api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id),
                                                    metadata=operator))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    for call in (api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id),
                                             metadata=foreign),
                 api.workflows.DisableWebhook(wf_pb.DisableWebhookRequest(workflow_id=wf.id),
                                              metadata=foreign)):
        err = await failure(call)
        assert err.code == grpc.StatusCode.NOT_FOUND
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=wf.id))
    assert not got.webhook_enabled
    shown, _ = await rotate(api, wf.id, metadata=own)
    assert shown.webhook_enabled


async def test_the_audit_log_records_deliveries(api: Api, hooks: Any) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    _, token = await rotate(api, wf.id)
    run = await deliver(hooks, token, {"a": 1})
    await failure(deliver(hooks, "whk_nope"))

    stub = audit_grpc.AuditServiceStub(api.channel)
    got, _ = await listed(stub.ListAuditEntries(audit_pb.ListAuditEntriesRequest(limit=10)))
    # A token that names no webhook is counted, not recorded (test_anonymous_limits.py).
    assert [(e.actor, e.method, e.resource_id, e.code, e.project_id) for e in got[:2]] == [
        ("webhook", "WebhooksService/DeliverWebhook", run.id, "OK", "acme"),
        ("test-admin", "WorkflowsService/RotateWebhook", wf.id, "OK", "acme"),
    ]
    # The URL's secret is in no entry.
    assert all(token[4:] not in str(e) and "whk_nope" not in str(e) for e in got)
