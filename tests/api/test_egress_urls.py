"""Malformed URLs over the API (issue 16 item 7): an http step's url or a notification target that
is no URL the engine could request is INVALID_ARGUMENT with a field violation naming it, at
create, update and trigger — never INTERNAL (`http://[::1` was a 500) — and nothing is stored.
A URL that names a denied address is a valid URL: the egress check refuses it when it is used
(tests/engine/test_egress.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, two_steps
from tests.api.test_notifications import stored

MALFORMED = [
    ("http://[::1", "is not a valid URL"),
    ("http://", "must be an absolute http or https URL"),
    ("ftp://x", "must be an absolute http or https URL"),
    ("http://a b", "must not contain spaces or control characters"),
    ("http://[::1]:99999/", "has an invalid port (1-65535)"),
    ("http://1.2.3.256/", "has an invalid IPv4 address"),
    ("http://[fe80::1%25eth0]/", "must not name an IPv6 zone"),
    ("http://x/" + "a" * 2100, "is 2109 characters; at most 2048 are allowed"),
]


def calling(url: str, name: str = "call") -> dict[str, Any]:
    return {"name": name, "steps": [{"ref": "call", "kind": "http", "config": {"url": url}}]}


@pytest.mark.parametrize(("url", "problem"), MALFORMED)
async def test_a_malformed_http_url_is_a_field_violation_at_create_and_update(api: Api, url: str,
                                                                             problem: str) -> None:
    error = await failure(api.create_workflow(calling(url)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "INVALID_WORKFLOW"
    assert ("steps[0].config.url", problem) in error.violations, error.violations

    created = await api.create_workflow(calling("https://api.example.com/deploy"))
    error = await failure(api.workflows.UpdateWorkflow(wf_pb.UpdateWorkflowRequest(
        workflow_id=created.id, workflow=json_format.ParseDict(calling(url), pb.Workflow()))))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("steps[0].config.url", problem) in error.violations, error.violations
    again = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    assert again.version == 1
    workflows, runs = await stored(api)
    assert [w.name for w in workflows] == ["call"] and runs == []


@pytest.mark.parametrize(("url", "problem"), MALFORMED)
async def test_a_malformed_notification_target_is_a_field_violation_at_create_and_trigger(
        api: Api, url: str, problem: str) -> None:
    target = {"url": url, "events": ["run.failed"]}
    error = await failure(api.create_workflow(two_steps(notifications=[target])))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.endswith("notifications[0].url") and d == problem for f, d in error.violations)
    wf = await api.create_workflow(two_steps("ok"))
    error = await failure(api.trigger(wf.id, notifications=[target]))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f.endswith("notifications[0].url") and d == problem for f, d in error.violations)
    workflows, runs = await stored(api)
    assert [w.name for w in workflows] == ["ok"] and runs == []


async def test_templated_and_denied_urls_are_accepted_at_create(api: Api) -> None:
    # A template is checked when it renders; a denied address when it is connected to (the
    # allow-list may change, and names resolve only then).
    for i, url in enumerate(["http://{{ payload.host }}/x", "http://127\u30020\u30020\u30021:9464/metrics",
                             "http://169.254.169.254/latest/meta-data/", "http://localhost/"]):
        await api.create_workflow(calling(url, f"ok{i}"))


async def test_a_nul_in_a_url_is_refused_at_the_edge_with_its_field(api: Api) -> None:
    url = "http://exa\x00mple.com/"
    for definition in (calling(url), two_steps(notifications=[{"url": url, "events": ["run.failed"]}])):
        error = await failure(api.create_workflow(definition))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert any(f.endswith(("steps[0].config.url", "notifications[0].url")) for f, _ in error.violations)
    assert await stored(api) == ([], [])
