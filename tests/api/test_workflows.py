"""WorkflowsService through the real server: definitions stored, versioned, listed, archived."""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed, stream_failure, two_steps


async def test_create_then_get_by_id_and_by_name(api: Api) -> None:
    created = await api.create_workflow(two_steps("deploy", project_id="acme", max_parallel_steps=2,
                                                  description="build and test"))

    assert created.id
    assert created.project_id == "acme"
    assert created.name == "deploy"
    assert created.version == 1
    assert created.workflow_version_id
    assert created.max_parallel_steps == 2
    assert created.description == "build and test"
    assert not created.archived
    assert created.created_by == "test-admin"
    assert created.HasField("created_at") and created.HasField("updated_at")
    assert [s.ref for s in created.steps] == ["build", "test"]
    assert list(created.steps[1].depends_on) == ["build"]
    assert json_format.MessageToDict(created.steps[0].config) == {"output": {"sha": "abc123"}}

    by_id = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    by_name = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="deploy",
                                                                      project_id="acme"))
    assert by_id == created
    assert by_name == created


async def test_output_only_fields_of_a_create_are_ignored(api: Api) -> None:
    created = await api.create_workflow(two_steps(id="mine", version=7, archived=True, created_by="eve"))

    assert created.id != "mine"
    assert created.version == 1
    assert not created.archived
    assert created.created_by == "test-admin"
    assert created.project_id == "default"


async def test_invalid_definition_is_invalid_argument_with_a_violation_per_problem(api: Api) -> None:
    definition = {
        "name": "broken",
        "steps": [
            {"ref": "a", "kind": "noop", "depends_on": ["ghost"]},
            {"ref": "a", "kind": "teleport"},
        ],
    }

    error = await failure(api.create_workflow(definition))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None
    assert error.info.reason == "INVALID_WORKFLOW"
    assert error.info.domain == "conveyor.dev"
    fields = [f for f, _ in error.violations]
    assert len(fields) >= 3, error.violations
    assert any(f.startswith("steps[0]") and "depends_on" in f for f in fields), fields
    assert any(f.startswith("steps[1]") for f in fields), fields
    # Nothing was stored.
    items, _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest()))
    assert items == []


async def test_unknown_workflow_is_not_found(api: Api) -> None:
    error = await failure(api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="nope")))

    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.info is not None and error.info.reason == "WORKFLOW_NOT_FOUND"


async def test_list_pages_with_the_token_in_initial_metadata(api: Api) -> None:
    names = ["wf-a", "wf-b", "wf-c"]
    for name in names:
        await api.create_workflow(two_steps(name, project_id="acme"))
    await api.create_workflow(two_steps("elsewhere", project_id="other"))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        items, token = await listed(api.workflows.ListWorkflows(
            wf_pb.ListWorkflowsRequest(project_id="acme", limit=2, page_token=token)))
        pages += 1
        seen += [w.name for w in items]
        assert all(isinstance(w, pb.Workflow) and w.project_id == "acme" for w in items)
        if not token:
            break
        assert pages < 5, "pagination does not end"

    assert pages == 2
    assert sorted(seen) == names
    assert len(seen) == len(set(seen))


async def test_update_creates_the_next_version(api: Api) -> None:
    created = await api.create_workflow(two_steps("deploy"))
    changed = two_steps("deploy", description="now with a third step")
    changed["steps"].append({"ref": "ship", "kind": "noop", "depends_on": ["test"]})

    updated = await api.workflows.UpdateWorkflow(wf_pb.UpdateWorkflowRequest(
        workflow_id=created.id, workflow=json_format.ParseDict(changed, pb.Workflow())))

    assert updated.id == created.id
    assert updated.version == 2
    assert updated.workflow_version_id not in ("", created.workflow_version_id)
    assert [s.ref for s in updated.steps] == ["build", "test", "ship"]
    again = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    assert again.version == 2
    assert again.description == "now with a third step"


async def test_update_with_an_invalid_definition_keeps_the_version(api: Api) -> None:
    created = await api.create_workflow(two_steps("deploy"))
    broken = {"name": "deploy", "steps": []}

    error = await failure(api.workflows.UpdateWorkflow(wf_pb.UpdateWorkflowRequest(
        workflow_id=created.id, workflow=json_format.ParseDict(broken, pb.Workflow()))))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("steps", "at least one step is required") in error.violations
    again = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    assert again.version == 1


async def test_archive_hides_from_list_and_blocks_new_runs(api: Api) -> None:
    created = await api.create_workflow(two_steps("deploy"))

    response = await api.workflows.ArchiveWorkflow(wf_pb.ArchiveWorkflowRequest(workflow_id=created.id))

    assert response == wf_pb.ArchiveWorkflowResponse()
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    assert got.archived
    active, _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest()))
    everything, _ = await listed(api.workflows.ListWorkflows(
        wf_pb.ListWorkflowsRequest(include_archived=True)))
    assert active == []
    assert [w.id for w in everything] == [created.id]
    error = await failure(api.trigger(created.id))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "WORKFLOW_ARCHIVED"


async def test_negative_limit_is_invalid_argument(api: Api) -> None:
    error = await stream_failure(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(limit=-1)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "INVALID_PAGE_SIZE"
