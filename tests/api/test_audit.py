"""The audit log through the real server: every write call leaves an entry naming who, what, on
which resource and how it ended — refused ones too (role too low, triggers that failed to start,
requests refused before their handler) — reads leave none; calls with no valid key behind them
are counted instead of recorded; filters, a project admin's view and paging."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conveyor.settings import Settings
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.bare import bare_channel
from tests.api.support import Api, failure, listed, stream_failure, two_steps
from tests.auth import bearer, key

TRIGGER = "WorkflowRunsService/TriggerWorkflowRun"


async def entries(api: Api, metadata: Any = (), **fields: Any) -> list[pb.AuditEntry]:
    """Every entry the query reaches, over all pages."""
    out: list[pb.AuditEntry] = []
    token = ""
    stub = audit_grpc.AuditServiceStub(api.channel)
    while True:
        items, token = await listed(stub.ListAuditEntries(
            audit_pb.ListAuditEntriesRequest(page_token=token, **fields), metadata=metadata))
        out += items
        if not token:
            return out


def row(e: pb.AuditEntry) -> tuple[str, str, str, str]:
    return e.actor, e.method, e.resource_id, e.code


async def test_every_write_leaves_an_entry_and_reads_none(api: Api) -> None:
    wf = await api.create_workflow(two_steps("deploy", project_id="acme", max_concurrent_runs=5))
    run = await api.trigger(wf.id, payload={"x": 1})
    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=run.id))
    # Reads, of every kind.
    await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=wf.id))
    await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest()))
    await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    await listed(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest()))
    await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id=run.id)))
    await entries(api)

    got = await entries(api)
    # Newest first; exactly the three writes.
    assert [row(e) for e in got] == [
        ("test-admin", "WorkflowRunsService/CancelWorkflowRun", run.id, "OK"),
        ("test-admin", TRIGGER, run.id, "OK"),
        ("test-admin", "WorkflowsService/CreateWorkflow", wf.id, "OK"),
    ]
    assert all(e.project_id == "acme" for e in got)
    assert all(e.reason == "" and e.message == "" for e in got)
    assert all(e.HasField("at") and e.id for e in got)
    assert len({e.id for e in got}) == 3


async def test_entries_record_the_engine_clock(api: Api) -> None:
    api.clock.advance(3600)
    wf = await api.create_workflow(two_steps())
    (entry,) = await entries(api)
    assert entry.resource_id == wf.id
    assert entry.at.ToDatetime().replace(tzinfo=None) == api.clock.now().replace(tzinfo=None)


async def test_calls_without_a_valid_key_are_counted_not_recorded(api: Api, settings: Settings) -> None:
    """Anyone can send them, as many as they like: one entry each would let anybody fill the
    log (and the database) and bury what callers who proved who they are did."""
    async with bare_channel(api.engine, settings) as channel:
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        err = await failure(runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="deploy")))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.info is not None
        assert err.info.reason == "MISSING_TOKEN"
        err = await failure(runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id="r1"),
                                                   metadata=bearer("cvk_forged")))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        # A read without a token is refused and not recorded.
        err = await failure(runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id="r1")))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED

    assert await entries(api, failures_only=True) == []
    refused = api.engine.metrics.registry.get_sample_value
    assert refused("conveyor_refused_requests_total", {"reason": "MISSING_TOKEN"}) == 2
    assert refused("conveyor_refused_requests_total", {"reason": "INVALID_TOKEN"}) == 1


async def test_a_viewer_triggering_is_recorded_as_permission_denied(api: Api) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    viewer = await key(api.engine, "acme-viewer", "acme", "viewer")

    err = await failure(api.trigger(wf.id, metadata=bearer(viewer)))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED

    (entry,) = await entries(api, failures_only=True)
    assert row(entry) == ("acme-viewer", TRIGGER, wf.id, "PERMISSION_DENIED")
    assert entry.reason == "ROLE_TOO_LOW" and entry.project_id == "acme"
    assert "operator" in entry.message


async def test_triggers_that_failed_to_start_are_recorded_with_reason_and_message(api: Api) -> None:
    await api.create_workflow({"name": "release", "project_id": "acme",
                               "variables": [{"name": "service", "required": True}],
                               "steps": [{"ref": "a", "kind": "noop"}]})
    operator = bearer(await key(api.engine, "acme-op", "acme", "operator"))

    missing = await failure(api.trigger("nope", metadata=operator))
    assert missing.code == grpc.StatusCode.NOT_FOUND and missing.info is not None
    invalid = await failure(api.trigger("release", metadata=operator, payload={"other": 1}))
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.info is not None
    # Refused before the handler ran (a NUL byte): recorded all the same.
    nul = await failure(api.trigger("release", metadata=operator, payload={"service": "a\x00b"}))
    assert nul.code == grpc.StatusCode.INVALID_ARGUMENT and nul.info is not None
    ok = await api.trigger("release", metadata=operator, payload={"service": "web"})

    got = await entries(api, actor="acme-op")
    assert [(e.method, e.resource_id, e.code, e.reason, e.message) for e in got] == [
        (TRIGGER, ok.id, "OK", "", ""),
        (TRIGGER, "release", "INVALID_ARGUMENT", nul.info.reason, nul.message),
        (TRIGGER, "release", "INVALID_ARGUMENT", invalid.info.reason, invalid.message),
        (TRIGGER, "nope", "NOT_FOUND", missing.info.reason, missing.message),
    ]
    assert all(e.project_id == "acme" for e in got)
    assert missing.info.reason == "WORKFLOW_NOT_FOUND" and invalid.message
    # The "Failures" tab: every refused call, nothing else.
    failures = await entries(api, failures_only=True)
    assert [e.code for e in failures] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND"]


async def test_filters_by_actor_project_and_failures(api: Api) -> None:
    a = bearer(await key(api.engine, "alice", "acme", "admin"))
    b = bearer(await key(api.engine, "bob", "*", "admin"))
    wf_a = await api.create_workflow(two_steps("one", project_id="acme"))
    await api.workflows.ArchiveWorkflow(wf_pb.ArchiveWorkflowRequest(workflow_id=wf_a.id), metadata=a)
    wf_b = await api.create_workflow(two_steps("two", project_id="beta"))
    await failure(api.trigger(wf_b.id, metadata=a))  # alice cannot see beta: NOT_FOUND
    await api.trigger(wf_b.id, metadata=b)

    assert {e.actor for e in await entries(api)} == {"test-admin", "alice", "bob"}
    assert [(e.method, e.code) for e in await entries(api, actor="alice")] == [
        (TRIGGER, "NOT_FOUND"), ("WorkflowsService/ArchiveWorkflow", "OK")]
    assert [e.actor for e in await entries(api, actor="bob")] == ["bob"]
    assert await entries(api, actor="carol") == []
    assert {(e.actor, e.method) for e in await entries(api, project_id="beta")} == {
        ("bob", TRIGGER), ("test-admin", "WorkflowsService/CreateWorkflow")}
    assert [(e.actor, e.code) for e in await entries(api, failures_only=True)] == [("alice", "NOT_FOUND")]
    assert await entries(api, failures_only=True, actor="bob") == []


async def test_a_project_admin_reads_only_its_projects_entries(api: Api) -> None:
    acme_admin = bearer(await key(api.engine, "acme-admin", "acme", "admin"))
    acme_op = bearer(await key(api.engine, "acme-op", "acme", "operator"))
    wf_acme = await api.create_workflow(two_steps("one", project_id="acme"))
    wf_beta = await api.create_workflow(two_steps("two", project_id="beta"))
    await api.trigger(wf_acme.id, metadata=acme_op)
    await api.trigger(wf_beta.id)
    # An acme key naming another project: refused, and its entry belongs to acme, where the key
    # lives, not to the project it named (a key must not write into another project's log).
    err = await failure(api.trigger("two", metadata=acme_op, project_id="beta"))
    assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)

    seen = await entries(api, metadata=acme_admin)
    assert {e.project_id for e in seen} == {"acme"}
    assert [(e.actor, e.method, e.code) for e in seen] == [
        ("acme-op", TRIGGER, err.code.name),
        ("acme-op", TRIGGER, "OK"),
        ("test-admin", "WorkflowsService/CreateWorkflow", "OK"),
    ]
    assert await entries(api, metadata=acme_admin, project_id="beta") == []
    beta = await entries(api, project_id="beta")
    assert all(e.actor != "acme-op" for e in beta)
    # Operators and viewers may not read the log at all.
    err = await stream_failure(audit_grpc.AuditServiceStub(api.channel).ListAuditEntries(
        audit_pb.ListAuditEntriesRequest(), metadata=acme_op))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


async def test_pages_cover_every_entry_once(api: Api) -> None:
    wf = await api.create_workflow(two_steps(max_concurrent_runs=100))
    runs = [(await api.trigger(wf.id)).id for _ in range(6)]

    stub = audit_grpc.AuditServiceStub(api.channel)
    seen: list[pb.AuditEntry] = []
    token = ""
    pages = 0
    while True:
        items, token = await listed(stub.ListAuditEntries(
            audit_pb.ListAuditEntriesRequest(limit=2, page_token=token)))
        assert len(items) <= 2
        seen += items
        pages += 1
        if not token:
            break
    assert pages == 4
    assert [e.resource_id for e in seen] == [*reversed(runs), wf.id]
    assert len({e.id for e in seen}) == 7
    err = await stream_failure(stub.ListAuditEntries(audit_pb.ListAuditEntriesRequest(page_token="forged")))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("flush", [True, False])
async def test_entries_reach_the_database_by_flush_or_by_listing(api: Api, flush: bool) -> None:
    wf = await api.create_workflow(two_steps())
    if flush:
        await api.engine.audit.flush()
        assert api.engine.audit._pending == []
    assert [e.resource_id for e in await entries(api)] == [wf.id]


async def test_refused_calls_with_hostile_fields_do_not_poison_the_log(api: Api, settings: Settings) -> None:
    """A call refused before its request is checked (no token, role too low) still names what it
    asked for: a NUL byte or a huge id must not make the batch unwritable (PostgreSQL refuses
    both), or every later entry would be lost with it."""
    viewer = bearer(await key(api.engine, "viewer", "*", "viewer"))
    async with bare_channel(api.engine, settings) as channel:
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        for fields in ({"workflow_id": "a\x00b"}, {"workflow_id": "w" * 5000}, {"project_id": "p\x00" * 300},
                       {"workflow_id": "x", "project_id": "p" * 5000}):
            err = await failure(runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(**fields)))
            assert err.code == grpc.StatusCode.UNAUTHENTICATED
            err = await failure(runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(**fields),
                                                        metadata=viewer))
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
    await api.engine.audit.flush()
    wf = await api.create_workflow(two_steps())

    got = await entries(api)
    # The refusals without a key are counted, not recorded (test_anonymous_limits.py).
    assert len(got) == 5
    assert row(got[0]) == ("test-admin", "WorkflowsService/CreateWorkflow", wf.id, "OK")
    assert [e.actor for e in got[1:]] == ["viewer"] * 4
    for e in got[1:]:
        assert "\x00" not in e.resource_id + e.project_id and len(e.resource_id) <= 200
    assert got[-1].resource_id == "ab" or got[-1].resource_id.startswith("a")


async def test_a_failure_to_record_never_changes_the_calls_answer(api: Api,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(entry: object) -> None:
        raise RuntimeError("audit store on fire")

    monkeypatch.setattr(api.engine.audit, "record", broken)
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id)
    assert run.workflow_id == wf.id
    err = await failure(api.trigger("nope"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "on fire" not in err.message
