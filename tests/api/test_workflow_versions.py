"""Reading old versions: GetWorkflow's `version` and ListWorkflowVersions (newest first, paged),
on gRPC (a real server on port 0) and over REST (`conveyor serve` with its Envoy): a foreign
project's workflow is absent, a version it never had is WORKFLOW_VERSION_NOT_FOUND, hostile
input (a negative version, a huge or negative limit, a forged token) is refused or capped."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed, stream_failure, two_steps
from tests.auth import TEST_ADMIN, bearer, key
from tests.system.conftest import SpawnFactory, spawn  # noqa: F401 - the fixture, for the REST test

HOURLY = {"cron": "0 * * * *"}


def version_of(n: int, **extra: Any) -> dict[str, Any]:
    """Definition n of "deploy": its description names n; from 2 on, a third step."""
    definition = two_steps("deploy", description=f"version {n}", **extra)
    if n > 1:
        definition["steps"].append({"ref": f"ship{n}", "kind": "noop", "depends_on": ["test"]})
    return definition


async def versioned(api: Api, count: int, **extra: Any) -> list[pb.Workflow]:
    """"deploy" at versions 1..count, each as its write answered."""
    written = [await api.create_workflow(version_of(1, **extra))]
    for n in range(2, count + 1):
        definition = json_format.ParseDict(version_of(n, **extra), pb.Workflow())
        written.append(await api.workflows.UpdateWorkflow(
            wf_pb.UpdateWorkflowRequest(workflow_id=written[0].id, workflow=definition)))
    return written


async def get(api: Api, ident: str, version: int, **kw: Any) -> pb.Workflow:
    return await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=ident, version=version), **kw)


async def test_get_an_older_version_answers_its_definition(api: Api) -> None:
    v1, v2, v3 = await versioned(api, 3, schedule=HOURLY)
    api.clock.advance(60)

    old = await get(api, v1.id, 1)

    assert (old.id, old.name, old.created_at) == (v1.id, "deploy", v1.created_at)
    assert (old.version, old.workflow_version_id, old.description) == (1, v1.workflow_version_id, "version 1")
    assert [s.ref for s in old.steps] == ["build", "test"]
    assert old.updated_at == v1.updated_at  # when version 1 was written
    # The schedule's state describes the current definition only.
    assert not old.HasField("next_fire_at") and not old.schedule_paused
    middle = await get(api, "deploy", 2)
    assert (middle.version, middle.description, middle.workflow_version_id) == (2, "version 2",
                                                                                v2.workflow_version_id)
    assert [s.ref for s in middle.steps] == ["build", "test", "ship2"]
    # 0 and the current number both answer the current version, schedule and all.
    current = await get(api, v1.id, 0)
    assert current == await get(api, v1.id, 3) == v3
    assert current.HasField("next_fire_at")


async def test_a_version_it_never_had_is_not_found(api: Api) -> None:
    v1, _ = await versioned(api, 2)

    for version in (3, 2**31 - 1):
        error = await failure(get(api, v1.id, version))
        assert error.code == grpc.StatusCode.NOT_FOUND
        assert error.info is not None and error.info.reason == "WORKFLOW_VERSION_NOT_FOUND"
    missing = await failure(get(api, "nope", 1))
    assert missing.info is not None and missing.info.reason == "WORKFLOW_NOT_FOUND"


async def test_a_negative_version_is_invalid(api: Api) -> None:
    v1, = await versioned(api, 1)

    error = await failure(get(api, v1.id, -1))

    # The request check refuses it before the engine (every integer of the API is a count).
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == ["version"]
    # The engine refuses it too, whoever calls it.
    with pytest.raises(ConveyorError) as direct:
        await api.engine.workflows.get(v1.id, "", TEST_ADMIN, version=-1)
    assert (direct.value.kind, direct.value.reason) == (ErrorKind.INVALID_ARGUMENT, "INVALID_VERSION")


async def test_versions_are_listed_newest_first_in_pages(api: Api) -> None:
    written = await versioned(api, 5)
    await api.create_workflow(two_steps("other"))

    seen: list[pb.Workflow] = []
    token, pages = "", 0
    while True:
        items, token = await listed(api.workflows.ListWorkflowVersions(wf_pb.ListWorkflowVersionsRequest(
            workflow_id=written[0].id, limit=2, page_token=token)))
        seen += items
        pages += 1
        if not token:
            break
        assert pages < 5, "pagination does not end"

    assert pages == 3
    assert [w.version for w in seen] == [5, 4, 3, 2, 1]
    assert [w.workflow_version_id for w in seen] == [w.workflow_version_id for w in reversed(written)]
    assert [w.description for w in seen] == [f"version {n}" for n in (5, 4, 3, 2, 1)]
    assert {w.id for w in seen} == {written[0].id}
    # Each is what GetWorkflow answers at that version.
    for w in seen:
        assert w == await get(api, written[0].id, w.version)
    by_name, _ = await listed(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id="deploy")))
    assert by_name == seen


async def test_hostile_list_input_is_capped_or_refused(api: Api) -> None:
    written = await versioned(api, 3)
    ident = written[0].id

    huge, token = await listed(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id=ident, limit=2**31 - 1)))
    assert [w.version for w in huge] == [3, 2, 1] and token == ""
    negative = await stream_failure(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id=ident, limit=-1)))
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    assert negative.info is not None and negative.info.reason == "INVALID_PAGE_SIZE"
    for forged in ("garbage", "WyJ4Il0", "Wy0xXQ", "WzIxNDc0ODM2NDhd"):  # ["x"], [-1], [2**31]
        error = await stream_failure(api.workflows.ListWorkflowVersions(
            wf_pb.ListWorkflowVersionsRequest(workflow_id=ident, page_token=forged)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, forged
        assert error.info is not None and error.info.reason == "INVALID_PAGE_TOKEN"
    too_long = await stream_failure(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id=ident, page_token="A" * 5000)))
    assert too_long.code == grpc.StatusCode.INVALID_ARGUMENT
    empty = await stream_failure(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id="nope")))
    assert empty.code == grpc.StatusCode.NOT_FOUND


async def test_a_foreign_projects_workflow_is_absent(api: Api) -> None:
    written = await versioned(api, 2, project_id="alpha")
    ident = written[0].id
    beta = bearer(await key(api.engine, "beta-viewer", "beta", "viewer"))
    alpha = bearer(await key(api.engine, "alpha-viewer", "alpha", "viewer"))

    for request in (wf_pb.GetWorkflowRequest(workflow_id=ident, version=1),
                    wf_pb.GetWorkflowRequest(workflow_id="deploy", project_id="alpha", version=1)):
        error = await failure(api.workflows.GetWorkflow(request, metadata=beta))
        assert (error.code, error.info and error.info.reason) == (grpc.StatusCode.NOT_FOUND,
                                                                  "WORKFLOW_NOT_FOUND"), request
    listing = await stream_failure(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id=ident), metadata=beta))
    assert (listing.code, listing.info and listing.info.reason) == (grpc.StatusCode.NOT_FOUND,
                                                                    "WORKFLOW_NOT_FOUND")
    # Its own project's viewer reads them.
    own, _ = await listed(api.workflows.ListWorkflowVersions(
        wf_pb.ListWorkflowVersionsRequest(workflow_id=ident), metadata=alpha))
    assert [w.version for w in own] == [2, 1]
    assert (await get(api, ident, 1, metadata=alpha)).description == "version 1"


async def test_versions_over_rest(spawn: SpawnFactory, db_url: str) -> None:  # noqa: F811
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        created = (await client.post("/v1/workflows", json=version_of(1))).json()
        for n in (2, 3):
            updated = await client.put(f"/v1/workflows/{created['id']}", json=version_of(n))
            assert updated.status_code == 200, updated.text

        page = await client.get("/v1/workflows/deploy/versions", params={"limit": 2})
        assert page.status_code == 200, page.text
        assert [w["version"] for w in page.json()] == [3, 2]
        rest = await client.get(f"/v1/workflows/{created['id']}/versions",
                                params={"page_token": page.headers["x-next-page-token"]})
        assert [w["version"] for w in rest.json()] == [1] and not rest.headers.get("x-next-page-token")

        old = await client.get(f"/v1/workflows/{created['id']}", params={"version": 1})
        assert old.status_code == 200, old.text
        assert (old.json()["version"], old.json()["description"]) == (1, "version 1")
        missing = await client.get(f"/v1/workflows/{created['id']}", params={"version": 9})
        assert missing.status_code == 404
        assert any(d.get("reason") == "WORKFLOW_VERSION_NOT_FOUND" for d in missing.json()["details"])
        negative = await client.get(f"/v1/workflows/{created['id']}", params={"version": -1})
        assert negative.status_code == 400
