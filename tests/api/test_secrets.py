"""The secrets API over the real gRPC server (issue 16 item 4, SPEC §11): admins set, list and
delete a project's secrets; values go in and never come out (no response, no error, no stored
column holds one in the clear); names and values are bounded and checked; another project's
secrets answer NOT_FOUND; a worker gets the value in its task's config and nowhere else. Roles
per RPC are in tests/api/test_access_matrix.py."""

from __future__ import annotations

from datetime import UTC

import grpc
import pytest
from google.protobuf import json_format

from conveyor.domain.limits import Limits
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import secrets_service_pb2 as secrets_pb
from conveyor.v1 import secrets_service_pb2_grpc as secrets_grpc
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed, stream_failure
from tests.auth import bearer, key
from tests.tables import every_row_as_text, found_in

VALUE = "hunter2-0f9e8d7c6b5a"


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(db_url=db_url, grpc_host="127.0.0.1", grpc_port=0, envoy_enabled=False,
                    limits=Limits(max_secrets=5))


def stub(api: Api) -> secrets_grpc.SecretsServiceStub:
    return secrets_grpc.SecretsServiceStub(api.channel)


def put(project: str, name: str, value: str = VALUE) -> secrets_pb.PutSecretRequest:
    return secrets_pb.PutSecretRequest(project_id=project, name=name, value=value)


async def names(api: Api, project: str = "acme") -> list[str]:
    items, _ = await listed(stub(api).ListSecrets(secrets_pb.ListSecretsRequest(project_id=project)))
    return [s.name for s in items]


def test_a_listed_secret_has_no_value_to_show() -> None:
    assert [f.name for f in secrets_pb.Secret.DESCRIPTOR.fields] == [
        "project_id", "name", "created_at", "updated_at"]


async def test_set_replace_list_and_delete(api: Api) -> None:
    secrets = stub(api)
    created = await secrets.PutSecret(put("acme", "API_TOKEN"))
    assert (created.project_id, created.name) == ("acme", "API_TOKEN")
    assert created.created_at == created.updated_at
    api.clock.advance(10)
    replaced = await secrets.PutSecret(put("acme", "API_TOKEN", "rotated"))
    assert replaced.created_at == created.created_at
    assert replaced.updated_at.ToDatetime(tzinfo=UTC) == api.clock.now()
    await secrets.PutSecret(put("acme", "_second"))
    await secrets.PutSecret(put("other", "API_TOKEN"))
    assert await names(api) == ["_second", "API_TOKEN"]  # newest first

    await secrets.DeleteSecret(secrets_pb.DeleteSecretRequest(project_id="acme", name="API_TOKEN"))
    assert await names(api) == ["_second"]
    assert await names(api, "other") == ["API_TOKEN"]
    gone = await failure(secrets.DeleteSecret(secrets_pb.DeleteSecretRequest(project_id="acme",
                                                                              name="API_TOKEN")))
    assert (gone.code, gone.info and gone.info.reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")


async def test_pages_travel_in_the_next_page_token(api: Api) -> None:
    secrets = stub(api)
    for i in range(5):
        await secrets.PutSecret(put("acme", f"S{i}"))
        api.clock.advance(1)
    first, token = await listed(secrets.ListSecrets(secrets_pb.ListSecretsRequest(project_id="acme",
                                                                                  limit=2)))
    assert [s.name for s in first] == ["S4", "S3"] and token
    rest, last = await listed(secrets.ListSecrets(secrets_pb.ListSecretsRequest(
        project_id="acme", limit=10, page_token=token)))
    assert [s.name for s in rest] == ["S2", "S1", "S0"] and last == ""
    forged = await stream_failure(secrets.ListSecrets(secrets_pb.ListSecretsRequest(
        project_id="acme", page_token="bm90LWEtY3Vyc29y")))
    assert forged.info is not None and forged.info.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("", VALUE, "INVALID_SECRET_NAME"),
    ("1ABC", VALUE, "INVALID_SECRET_NAME"),
    ("API-TOKEN", VALUE, "INVALID_SECRET_NAME"),
    ("a.b", VALUE, "INVALID_SECRET_NAME"),
    ("x" * 65, VALUE, "INVALID_SECRET_NAME"),
    ("true", VALUE, "INVALID_SECRET_NAME"),  # a CEL reserved word: secrets.true cannot be written
    ("OK", "", "INVALID_SECRET_VALUE"),
    ("OK", f"{VALUE}\x00tail", "INVALID_CHARACTER"),
    ("OK", "x" * (64 * 1024 + 1), "FIELD_TOO_LONG"),
    ("OK", "é" * (32 * 1024 + 1), "INVALID_SECRET_VALUE"),  # within 64 Ki characters, over 64 KiB
])
async def test_bad_names_and_values_are_refused_without_quoting_the_value(
        api: Api, name: str, value: str, reason: str) -> None:
    refused = await failure(stub(api).PutSecret(put("acme", name, value)))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.info is not None
    assert refused.info.reason == reason
    assert value[:16] not in refused.message or not value
    assert await names(api) == []


async def test_a_project_holds_a_bounded_number_of_secrets(api: Api) -> None:
    for i in range(5):
        await stub(api).PutSecret(put("acme", f"S{i}"))
    full = await failure(stub(api).PutSecret(put("acme", "S5")))
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.info is not None and full.info.reason == "TOO_MANY_SECRETS"
    await stub(api).PutSecret(put("acme", "S0", "replacing is fine"))
    await stub(api).PutSecret(put("other", "S5"))  # another project's room
    assert len(await names(api)) == 5


async def test_another_projects_secrets_answer_not_found(api: Api) -> None:
    await stub(api).PutSecret(put("acme", "API_TOKEN"))
    mine = bearer(await key(api.engine, "beta-admin", "beta", "admin"))
    secrets = stub(api)
    for call in (secrets.PutSecret(put("acme", "API_TOKEN", "overwritten"), metadata=mine),
                 secrets.DeleteSecret(secrets_pb.DeleteSecretRequest(project_id="acme", name="API_TOKEN"),
                                      metadata=mine)):
        refused = await failure(call)
        assert (refused.code, refused.info and refused.info.reason) == (grpc.StatusCode.NOT_FOUND,
                                                                         "PROJECT_NOT_FOUND")
    listing = await stream_failure(secrets.ListSecrets(secrets_pb.ListSecretsRequest(project_id="acme"),
                                                       metadata=mine))
    assert listing.code == grpc.StatusCode.NOT_FOUND
    # Its own project, named or not.
    await secrets.PutSecret(put("", "OWN"), metadata=mine)
    assert await names(api, "beta") == ["OWN"]
    assert await names(api) == ["API_TOKEN"]


async def test_values_are_sealed_at_rest_and_only_a_worker_sees_one(api: Api, database: Database) -> None:
    await stub(api).PutSecret(put("acme", "API_TOKEN"))
    refused = await failure(stub(api).PutSecret(put("acme", "bad-name", VALUE)))
    assert VALUE not in refused.message
    definition = {"name": "deploy", "project_id": "acme", "steps": [
        {"ref": "t", "kind": "task", "queue": "q", "config": {"auth": "Bearer {{ secrets.API_TOKEN }}"}}]}
    await api.create_workflow(definition)
    run = await api.trigger("deploy", project_id="acme")
    await api.engine.tick()

    (task,) = (await api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id="acme", queue="q", worker_id="w"))).tasks
    assert json_format.MessageToDict(task.config) == {"auth": f"Bearer {VALUE}"}
    await api.workers.CompleteTask(workers_pb.CompleteTaskRequest(
        task_id=task.task_id, attempt=task.attempt, worker_id="w",
        result=json_format.ParseDict({"said": task.config["auth"]}, pb.Task().config)))
    steps = [s async for s in api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run.id))]
    assert json_format.MessageToDict(steps[0].output) == {"said": "Bearer ***"}
    workflow = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="deploy",
                                                                        project_id="acme"))
    assert VALUE not in str(workflow) and "{{ secrets.API_TOKEN }}" in str(workflow)

    await api.engine.audit.flush()
    assert not found_in(await every_row_as_text(database), VALUE)


async def test_secrets_outside_http_and_task_configs_are_refused_at_definition(api: Api) -> None:
    for step in ({"ref": "a", "kind": "noop", "config": {"output": {"x": "{{ secrets.API_TOKEN }}"}}},
                 {"ref": "a", "kind": "task", "queue": "q", "when": "secrets.API_TOKEN == 'x'"},
                 {"ref": "a", "kind": "task", "queue": "q", "config": {"x": "{{ secrets['API_TOKEN'] }}"}}):
        refused = await failure(api.create_workflow({"name": "w", "steps": [step]}))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and "secret" in refused.message
