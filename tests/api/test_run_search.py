"""ListWorkflowRuns' `search` filter through the real server, on both backends: a case-insensitive
substring of the run's workflow name or description, every character literal, combined with the
other filters, within the caller's project, and refused when it is too long or holds a NUL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from conveyor.storage import repository
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, listed, stream_failure, two_steps
from tests.auth import bearer, key


async def _ids(api: Api, metadata: tuple[tuple[str, str], ...] = (), **fields: Any) -> set[str]:
    request = json_format.ParseDict(fields, runs_pb.ListWorkflowRunsRequest())
    items, token = await listed(api.runs.ListWorkflowRuns(request, metadata=metadata))
    assert token == ""
    return {r.id for r in items}


@pytest.fixture
async def runs(api: Api) -> dict[str, str]:
    """One run of each workflow, by workflow name."""
    workflows = [
        two_steps("build_app", project_id="acme", description="Builds the web app"),
        two_steps("buildXapp", project_id="acme", description="100% of the builds, ÉTÉ edition"),
        two_steps("Deploy-Prod", project_id="acme", description="Ships to the Straße servers"),
        two_steps("nightly", project_id="other", description="Builds every night"),
    ]
    made = {}
    for definition in workflows:
        wf = await api.create_workflow(definition)
        made[definition["name"]] = (await api.trigger(wf.id, tags={"team": definition["name"][:5]})).id
    return made


async def test_search_matches_name_or_description_case_insensitively(api: Api, runs: dict[str, str]) -> None:
    assert await _ids(api, search="") == set(runs.values())
    assert await _ids(api, search="DEPLOY") == {runs["Deploy-Prod"]}
    assert await _ids(api, search="web app") == {runs["build_app"]}  # description only
    assert await _ids(api, search="builds") == {runs["build_app"], runs["buildXapp"], runs["nightly"]}
    assert await _ids(api, search="build") == {runs["build_app"], runs["buildXapp"], runs["nightly"]}
    assert await _ids(api, search="no such text") == set()


async def test_search_characters_are_literal(api: Api, runs: dict[str, str]) -> None:
    # Were these LIKE patterns, "_" would match "X" and "%" anything.
    assert await _ids(api, search="d_a") == {runs["build_app"]}
    assert await _ids(api, search="%") == {runs["buildXapp"]}
    assert await _ids(api, search="100%") == {runs["buildXapp"]}
    assert await _ids(api, search="_%") == set()
    assert await _ids(api, search="*") == set()
    assert await _ids(api, search="\\") == set()
    assert await _ids(api, search="' OR 1=1 --") == set()


async def test_search_folds_unicode_case(api: Api, runs: dict[str, str]) -> None:
    assert await _ids(api, search="été") == {runs["buildXapp"]}
    assert await _ids(api, search="ÉTÉ EDITION") == {runs["buildXapp"]}
    assert await _ids(api, search="STRASSE") == {runs["Deploy-Prod"]}  # case folding: ß = ss
    assert await _ids(api, search="straße") == {runs["Deploy-Prod"]}
    assert await _ids(api, search="🚀") == set()


async def test_search_combines_with_every_other_filter(api: Api, runs: dict[str, str]) -> None:
    request = wf_pb.GetWorkflowRequest(workflow_id="build_app", project_id="acme")
    builds = await api.workflows.GetWorkflow(request)
    assert await _ids(api, search="build", project_id="acme") == {runs["build_app"], runs["buildXapp"]}
    assert await _ids(api, search="build", workflow_id=["buildXapp"]) == {runs["buildXapp"]}
    assert await _ids(api, search="build", workflow_id=[builds.id, "nightly"]) == {
        runs["build_app"], runs["nightly"]}
    assert await _ids(api, search="deploy", workflow_id=["build_app"]) == set()
    assert await _ids(api, search="build", tag=["team:night"]) == {runs["nightly"]}
    assert await _ids(api, search="build", status=["completed"]) == {
        runs["build_app"], runs["buildXapp"], runs["nightly"]}
    assert await _ids(api, search="build", status=["failed"]) == set()
    assert await _ids(api, search="build", triggered_by="test-admin", project_id="other") == {runs["nightly"]}
    assert await _ids(api, search="build", triggered_by="someone-else") == set()


async def test_search_pages_with_the_cursor(api: Api, runs: dict[str, str]) -> None:
    seen: list[str] = []
    token = ""
    while True:
        request = runs_pb.ListWorkflowRunsRequest(search="BUILD", limit=1, page_token=token)
        items, token = await listed(api.runs.ListWorkflowRuns(request))
        seen += [r.id for r in items]
        if not token:
            break
    assert sorted(seen) == sorted([runs["build_app"], runs["buildXapp"], runs["nightly"]])


async def test_search_stays_in_the_callers_project(api: Api, runs: dict[str, str]) -> None:
    acme = bearer(await key(api.engine, "acme-viewer", project="acme", role="viewer"))
    assert await _ids(api, acme, search="night") == set()
    assert await _ids(api, acme, search="build") == {runs["build_app"], runs["buildXapp"]}
    assert await _ids(api, acme, search="build", project_id="other") == set()


@pytest.mark.parametrize(("search", "reason", "description"), [
    ("bad\x00", "INVALID_CHARACTER", "must not contain NUL characters"),
    ("x" * 201, "FIELD_TOO_LONG", "is 201 characters long; at most 200 are allowed"),
])
async def test_a_bad_search_is_invalid(api: Api, runs: dict[str, str], search: str, reason: str,
                                       description: str) -> None:
    request = runs_pb.ListWorkflowRunsRequest(search=search)
    error = await stream_failure(api.runs.ListWorkflowRuns(request))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == reason
    assert error.violations == [("search", description)]


async def test_a_search_of_200_characters_is_accepted(api: Api, runs: dict[str, str]) -> None:
    assert await _ids(api, search="é" * 200) == set()


async def test_a_search_matching_too_many_workflows_is_refused(api: Api, runs: dict[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The matching workflows' ids are bound parameters of the runs query, which both databases
    cap: a search broader than MAX_SEARCHED_WORKFLOWS is INVALID_ARGUMENT, never a 5xx."""
    monkeypatch.setattr(repository, "MAX_SEARCHED_WORKFLOWS", 2)
    assert await _ids(api, search="deploy") == {runs["Deploy-Prod"]}  # within the cap
    error = await stream_failure(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(search="build")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "SEARCH_TOO_BROAD"
    assert error.violations == [("search", "matches too many workflows")]
