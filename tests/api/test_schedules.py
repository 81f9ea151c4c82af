"""Schedules over the API: Workflow.next_fire_at and schedule_paused on gRPC (a real server on
port 0 over the engine with a ManualClock) and in REST JSON (`conveyor serve` with its Envoy),
PauseSchedule / ResumeSchedule and their errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, two_steps
from tests.system.conftest import SpawnFactory, spawn  # noqa: F401 - the fixture, for the REST test

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # the Api fixture's ManualClock
EVERY_MINUTE = {"cron": "* * * * *"}


async def test_next_fire_at_is_on_the_workflow(api: Api) -> None:
    created = await api.create_workflow(two_steps("minutely", schedule=EVERY_MINUTE))
    assert created.next_fire_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=1)
    assert not created.schedule_paused
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="minutely"))
    assert json_format.MessageToDict(got, preserving_proto_field_name=True)["next_fire_at"] == \
        "2026-01-01T00:01:00Z"

    plain = await api.create_workflow(two_steps("plain"))
    assert not plain.HasField("next_fire_at")


async def test_a_workflow_read_back_updates_as_is(api: Api) -> None:
    # next_fire_at and schedule_paused are output only: a Workflow as read is a valid update.
    created = await api.create_workflow(two_steps("minutely", schedule=EVERY_MINUTE))
    api.clock.advance(90)
    updated = await api.workflows.UpdateWorkflow(
        wf_pb.UpdateWorkflowRequest(workflow_id=created.id, workflow=created))
    assert updated.version == 2
    assert updated.next_fire_at == created.next_fire_at  # the same schedule keeps its tick


async def test_pause_and_resume_over_grpc(api: Api) -> None:
    created = await api.create_workflow(two_steps("minutely", schedule=EVERY_MINUTE))

    paused = await api.workflows.PauseSchedule(wf_pb.PauseScheduleRequest(workflow_id="minutely"))
    assert paused.schedule_paused and not paused.HasField("next_fire_at")
    assert paused.version == created.version
    api.clock.advance(150)
    assert await api.engine.schedules.fire_due() == 0

    resumed = await api.workflows.ResumeSchedule(wf_pb.ResumeScheduleRequest(workflow_id=created.id))
    assert not resumed.schedule_paused
    assert resumed.next_fire_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=3)
    got = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=created.id))
    assert got.next_fire_at == resumed.next_fire_at and not got.schedule_paused


async def test_pause_without_a_schedule_is_failed_precondition(api: Api) -> None:
    await api.create_workflow(two_steps("plain"))
    for call in (api.workflows.PauseSchedule(wf_pb.PauseScheduleRequest(workflow_id="plain")),
                 api.workflows.ResumeSchedule(wf_pb.ResumeScheduleRequest(workflow_id="plain"))):
        error = await failure(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info is not None and error.info.reason == "NO_SCHEDULE"
    missing = await failure(api.workflows.PauseSchedule(wf_pb.PauseScheduleRequest(workflow_id="nope")))
    assert missing.code == grpc.StatusCode.NOT_FOUND


async def test_a_cron_that_never_fires_is_a_field_violation(api: Api) -> None:
    error = await failure(api.create_workflow(two_steps("feb30", schedule={"cron": "0 0 30 2 *"})))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in error.violations] == ["schedule.cron"]


async def test_schedule_over_rest(spawn: SpawnFactory, db_url: str) -> None:  # noqa: F811
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        before = datetime.now(UTC)
        created = await client.post("/v1/workflows", json=two_steps("minutely", schedule=EVERY_MINUTE))
        assert created.status_code == 200, created.text
        body: dict[str, Any] = created.json()
        next_fire = datetime.fromisoformat(body["next_fire_at"])
        assert before < next_fire <= before + timedelta(minutes=1, seconds=1)
        assert next_fire.second == 0 and body["schedule_paused"] is False

        paused = await client.post("/v1/workflows/minutely/schedule/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["schedule_paused"] is True and "next_fire_at" not in paused.json()

        resumed = await client.post(f"/v1/workflows/{body['id']}/schedule/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["schedule_paused"] is False and resumed.json()["next_fire_at"]

        plain = await client.post("/v1/workflows", json=two_steps("plain"))
        assert plain.status_code == 200
        refused = await client.post("/v1/workflows/plain/schedule/pause")
        assert refused.status_code == 400
        assert any(d.get("reason") == "NO_SCHEDULE" for d in refused.json()["details"])
