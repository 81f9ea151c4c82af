"""Secrets end to end (issue 16 item 4, SPEC §11): `conveyor serve` with its real Envoy, a secret
set over REST, runs that use it — an http step whose target echoes the credential back, one
whose target fails quoting it, a task whose worker (over gRPC) echoes its config into its output
and another into its failure, one naming a secret that does not exist — and then the value is
nowhere: not in the REST views of those runs (run, steps, events), not in any column of any
table, not in the server's log. The targets and the worker saw it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.storage.db import Database
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import secrets_service_pb2 as secrets_pb
from conveyor.v1 import secrets_service_pb2_grpc as secrets_grpc
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workers_service_pb2_grpc as workers_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as workflows_grpc
from tests.engine.test_http_steps import Reply, Seen, Server, json_reply
from tests.system.conftest import SpawnFactory
from tests.tables import every_row_as_text, found_in, spellings

VALUE = 'sk_live"51Hx\\9QeZ'  # a quote and a backslash: JSON escapes them, URLs percent-encode them


async def target(seen: Seen) -> Reply:
    if seen.path.startswith("/fail"):
        return Reply(401, {"Content-Type": "text/plain"},
                     f"rejected credential {seen.headers['authorization']}".encode())
    return json_reply({"path": seen.path, "headers": seen.headers, "body": seen.body.decode()})


def http_step(url: str, ref: str = "call", secret: str = "API_TOKEN") -> dict[str, Any]:
    return {"ref": ref, "kind": "http", "retry": {"max_attempts": 1},
            "config": {"method": "POST", "url": url,
                       "headers": {"Authorization": f"Bearer {{{{ secrets.{secret} }}}}"},
                       "body": {"token": f"{{{{ secrets.{secret} }}}}"}}}


def workflows(server: Server) -> list[dict[str, Any]]:
    task = {"ref": "t", "kind": "task", "queue": "q", "retry": {"max_attempts": 1},
            "config": {"auth": "Bearer {{ secrets.API_TOKEN }}", "who": "{{ payload.who }}"}}
    return [
        {"name": "echoed", "steps": [http_step(server.url("/ok?key={{ secrets.API_TOKEN }}"))]},
        {"name": "refused", "steps": [http_step(server.url("/fail"))]},
        {"name": "worked", "steps": [task]},
        {"name": "unknown", "steps": [http_step(server.url("/ok"), secret="NOPE")]},
    ]


async def wait_final(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            run = (await client.get(f"/v1/workflow-runs/{run_id}")).json()
            if run["status"] not in ("pending", "running"):
                return dict(run)
            await asyncio.sleep(0.05)


async def work(served: Any, runs: list[str]) -> None:
    """A worker: completes the first task echoing its config, fails the second quoting it."""
    async with served.channel() as channel:
        workers = workers_grpc.WorkersServiceStub(channel)
        leased: list[workers_pb.Task] = []
        async with asyncio.timeout(30):
            while len(leased) < 2:
                leased += (await workers.PollTasks(workers_pb.PollTasksRequest(
                    project_id="default", queue="q", worker_id="echo-worker", max_tasks=2,
                    wait_seconds=1))).tasks
        by_run = {t.workflow_run_id: t for t in leased}
        done, failed = by_run[runs[0]], by_run[runs[1]]
        for task in (done, failed):
            assert task.config["auth"] == f"Bearer {VALUE}"  # the worker gets the value
        echo = struct_pb2.Struct()
        echo.update({"config": json_format.MessageToDict(done.config), "note": f"used {VALUE}"})
        await workers.CompleteTask(workers_pb.CompleteTaskRequest(
            task_id=done.task_id, attempt=done.attempt, worker_id="echo-worker", result=echo))
        await workers.FailTask(workers_pb.FailTaskRequest(
            task_id=failed.task_id, attempt=failed.attempt, worker_id="echo-worker",
            error=f"login failed with {failed.config['auth']}", non_retryable=True))


async def test_a_secret_reaches_its_targets_and_is_stored_and_shown_nowhere(
        spawn: SpawnFactory, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HTTP_ALLOW", "127.0.0.1")  # the targets run here
    async with (Server() as server, spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        server.handler = target
        put = await client.put("/v1/projects/default/secrets/API_TOKEN", json={"value": VALUE})
        assert put.status_code == 200, put.text
        assert set(put.json()) == {"project_id", "name", "created_at", "updated_at"}
        listed = await client.get("/v1/projects/default/secrets")
        assert [s["name"] for s in listed.json()] == ["API_TOKEN"]
        assert not found_in({"list": listed.text}, VALUE)
        for definition in workflows(server):
            created = await client.post("/v1/workflows", json=definition)
            assert created.status_code == 200, created.text

        runs = {}
        for name in ("echoed", "refused", "worked", "worked", "unknown"):
            answer = await client.post(f"/v1/workflows/{name}/runs", json={"payload": {"who": "me"}})
            assert answer.status_code == 200, answer.text
            runs.setdefault(name, []).append(answer.json()["id"])
        await work(served, runs["worked"])
        final = {run_id: await wait_final(client, run_id) for ids in runs.values() for run_id in ids}

        # The targets got the credential.
        assert {seen.headers["authorization"] for seen in server.requests} == {f"Bearer {VALUE}"}
        assert len(server.requests) == 2  # the unknown secret made no request
        assert [final[r]["status"] for r in (*runs["echoed"], *runs["refused"], *runs["worked"],
                                             *runs["unknown"])] == [
            "completed", "failed", "completed", "failed", "failed"]

        # What REST shows of those runs: masked where it was echoed, the unknown one named.
        views: dict[str, str] = {}
        for ids in runs.values():
            for run_id in ids:
                for suffix in ("", "/steps", "/events"):
                    response = await client.get(f"/v1/workflow-runs/{run_id}{suffix}")
                    assert response.status_code == 200, response.text
                    views[f"{run_id}{suffix}"] = response.text
        views["workflow"] = (await client.get("/v1/workflows/echoed")).text
        assert not found_in(views, VALUE)
        (echoed,) = json.loads(views[f"{runs['echoed'][0]}/steps"])
        assert echoed["output"]["body"]["headers"]["authorization"] == "Bearer ***"
        assert json.loads(echoed["output"]["body"]["body"]) == {"token": "***"}
        (refused,) = json.loads(views[f"{runs['refused'][0]}/steps"])
        assert refused["error"] == "HTTP 401: rejected credential Bearer ***"
        (done,) = json.loads(views[f"{runs['worked'][0]}/steps"])
        assert done["output"] == {"config": {"auth": "Bearer ***", "who": "me"}, "note": "used ***"}
        (failed,) = json.loads(views[f"{runs['worked'][1]}/steps"])
        assert failed["error"] == "login failed with Bearer ***"
        (unknown,) = json.loads(views[f"{runs['unknown'][0]}/steps"])
        assert unknown["error"] == "SECRET_NOT_FOUND: secret 'NOPE' is not set in project 'default'"

    # Every column of every table, and the server's log, once it has stopped (audit flushed).
    database = Database(db_url)
    try:
        tables = await every_row_as_text(database)
    finally:
        await database.dispose()
    assert "API_TOKEN" in tables["secrets"] and not found_in(tables, VALUE)
    log = (tmp_path / "server.log").read_text()
    assert not any(s in log for s in spellings(VALUE))


async def test_the_generated_key_is_kept_private_and_reused_after_a_restart(
        spawn: SpawnFactory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_SECRET_KEY", raising=False)
    definition = {"name": "later", "steps": [{"ref": "t", "kind": "task", "queue": "later",
                                              "config": {"auth": "{{ secrets.API_TOKEN }}"}}]}
    async with spawn(db_url) as first, first.channel() as channel:
        key_file = first.data_dir / "secret.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text()
        await secrets_grpc.SecretsServiceStub(channel).PutSecret(secrets_pb.PutSecretRequest(
            project_id="default", name="API_TOKEN", value=VALUE))
    async with spawn(db_url) as second, second.channel() as channel:
        assert (second.data_dir / "secret.key").read_text() == key
        workflows = workflows_grpc.WorkflowsServiceStub(channel)
        await workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(
            workflow=json_format.ParseDict(definition, pb.Workflow())))
        await runs_grpc.WorkflowRunsServiceStub(channel).TriggerWorkflowRun(
            runs_pb.TriggerWorkflowRunRequest(workflow_id="later"))
        (task,) = (await workers_grpc.WorkersServiceStub(channel).PollTasks(workers_pb.PollTasksRequest(
            project_id="default", queue="later", worker_id="w", wait_seconds=10))).tasks
        assert task.config["auth"] == VALUE  # sealed by the first start, opened by the second


async def test_a_malformed_key_stops_the_start_without_quoting_it(
        spawn: SpawnFactory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", "hunter2-not-base64-of-32-bytes")
    with pytest.raises(RuntimeError) as exited:
        async with spawn(db_url):
            pass
    assert "CONVEYOR_SECRET_KEY must be 32 random bytes" in str(exited.value)
    assert "hunter2" not in str(exited.value)

