"""End to end over plain HTTP: `conveyor serve` with its real Envoy, driven with httpx exactly as
the README walkthrough drives it with curl."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.system.conftest import SpawnFactory

DEPLOY = {
    "name": "deploy",
    "steps": [
        {"ref": "build", "kind": "noop", "config": {"output": {"sha": "abc123"}}},
        {"ref": "check", "kind": "condition", "depends_on": ["build"],
         "config": {"expression": "payload.env == 'prod'"}},
        {"ref": "announce", "kind": "noop", "depends_on": ["check"], "when": "steps.check.output.result"},
        {"ref": "settle", "kind": "delay", "depends_on": ["build"], "config": {"seconds": 0.2}},
    ],
}
GATED = {"name": "gated", "steps": [{"ref": "ok", "kind": "approval"}]}


def reason(body: dict[str, Any]) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo"))


async def wait_final(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            run = (await client.get(f"/v1/workflow-runs/{run_id}")).json()
            if run["status"] not in ("pending", "running"):
                return run
            await asyncio.sleep(0.05)


async def test_walkthrough_over_rest(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        created = await client.post("/v1/workflows", json=DEPLOY)
        assert created.status_code == 200, created.text
        workflow = created.json()
        assert (workflow["name"], workflow["version"], workflow["project_id"]) == ("deploy", 1, "default")

        trigger = await client.post("/v1/workflows/deploy/runs", json={"payload": {"env": "prod"},
                                                                       "tags": {"team": "web"}},
                                    headers={"Idempotency-Key": "deploy-1"})
        assert trigger.status_code == 200, trigger.text
        run = trigger.json()
        assert run["status"] in ("pending", "running") and run["workflow_version"] == 1
        again = await client.post("/v1/workflows/deploy/runs", json={"payload": {"env": "prod"},
                                                                     "tags": {"team": "web"}},
                                  headers={"Idempotency-Key": "deploy-1"})
        assert again.json()["id"] == run["id"]
        reused = await client.post("/v1/workflows/deploy/runs", json={"payload": {"env": "dev"}},
                                   headers={"Idempotency-Key": "deploy-1"})
        assert reused.status_code == 409 and reason(reused.json()) == "IDEMPOTENCY_KEY_REUSED"

        done = await wait_final(client, run["id"])
        assert done["status"] == "completed"
        assert done["output"]["build"] == {"sha": "abc123"}
        assert isinstance(done["duration_in_seconds"], float | int) and done["tags"] == {"team": "web"}

        steps = await client.get(f"/v1/workflow-runs/{run['id']}/steps")
        assert steps.status_code == 200
        by_ref = {s["step_ref"]: s for s in steps.json()}
        assert set(by_ref) == {"build", "check", "announce", "settle"}
        assert by_ref["announce"]["status"] == "completed" and by_ref["build"]["attempt"] == 1
        assert by_ref["check"]["output"] == {"result": True} and by_ref["check"]["deps_required"] == 1

        events = (await client.get(f"/v1/workflow-runs/{run['id']}/events")).json()
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "run.completed"

        for _ in range(2):
            await client.post("/v1/workflows/deploy/runs", json={"payload": {"env": "dev"}})
        page = await client.get("/v1/workflow-runs", params={"workflow_id": "deploy", "limit": 2})
        assert page.status_code == 200 and len(page.json()) == 2
        token = page.headers["x-next-page-token"]
        rest = await client.get("/v1/workflow-runs", params={"workflow_id": "deploy", "limit": 2,
                                                             "page_token": token})
        assert len(rest.json()) == 1 and "x-next-page-token" not in rest.headers
        filtered = await client.get("/v1/workflow-runs", params={"tag": "team:web", "status": "completed"})
        assert [r["id"] for r in filtered.json()] == [run["id"]]

        not_allowed = await client.delete(f"/v1/workflow-runs/{run['id']}")
        assert not_allowed.status_code == 400 and reason(not_allowed.json()) == "INVALID_TRANSITION"

        assert (await client.post("/v1/workflows", json=GATED)).status_code == 200
        gated = (await client.post("/v1/workflows/gated/runs", json={})).json()
        async with client.stream("GET", f"/v1/workflow-runs/{gated['id']}/watch") as watch:
            assert watch.headers["content-type"].startswith("text/event-stream")
            frames = watch.aiter_lines()
            first = json.loads((await anext(frames)).removeprefix("data: "))
            assert first["snapshot"]["run"]["id"] == gated["id"]
            assert first["snapshot"]["steps"][0]["step_ref"] == "ok"
            canceled = await client.delete(f"/v1/workflow-runs/{gated['id']}")
            rest_of_stream = [json.loads(line.removeprefix("data: ")) async for line in frames if line]
        # The stream ended by itself after the run's final event.
        assert rest_of_stream[-1]["event"]["type"] == "run.canceled"
        seqs = [f["event"]["seq"] for f in rest_of_stream if "event" in f]
        assert seqs == list(range(first["snapshot"]["seq"] + 1, first["snapshot"]["seq"] + 1 + len(seqs)))
        assert canceled.status_code == 200 and canceled.json() == {}
        assert (await wait_final(client, gated["id"]))["status"] == "canceled"

        missing = await client.get("/v1/workflow-runs/00000000-0000-7000-8000-000000000000")
        assert missing.status_code == 404 and reason(missing.json()) == "RUN_NOT_FOUND"
        bad_step = {"ref": "x", "kind": "teleport"}
        invalid = await client.post("/v1/workflows", json={"name": "bad", "steps": [bad_step]})
        assert invalid.status_code == 400 and reason(invalid.json()) == "INVALID_WORKFLOW"
        unknown = await client.get("/v1/nothing-here")
        assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/json")
        bad_json = await client.post("/v1/workflows", content=b"{not json",
                                     headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.headers["content-type"].startswith("application/json")


async def test_priority_start_at_and_concurrency_over_rest(spawn: SpawnFactory, db_url: str) -> None:
    keyed = {"name": "keyed", "concurrency": {"key": "{{ payload.customer }}", "max_runs": 1},
             "steps": [{"ref": "gate", "kind": "approval"}]}
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        created = await client.post("/v1/workflows", json=keyed)
        assert created.status_code == 200, created.text
        assert created.json()["concurrency"] == {"key": "{{ payload.customer }}", "max_runs": 1}

        later = await client.post("/v1/workflows/keyed/runs", json={
            "payload": {"customer": "acme"}, "priority": -3, "start_at": "2099-01-01T00:00:00Z"})
        assert later.status_code == 400 and reason(later.json()) == "INVALID_START_AT"
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        start_at = tomorrow.isoformat().replace("+00:00", "Z")
        soon = await client.post("/v1/workflows/keyed/runs", json={
            "payload": {"customer": "acme"}, "priority": -3, "start_at": start_at})
        assert soon.status_code == 200, soon.text
        run = soon.json()
        assert (run["status"], run["priority"], run["start_at"], run["concurrency_key"]) == (
            "pending", -3, start_at, "acme")
        for bad, why in (({"priority": "high"}, "INVALID_FIELD"), ({"priority": 1000}, "INVALID_PRIORITY")):
            refused = await client.post("/v1/workflows/keyed/runs",
                                        json={"payload": {"customer": "a"}, **bad})
            assert refused.status_code == 400, refused.text
            assert reason(refused.json()) == why, refused.text
        runs = (await client.get("/v1/workflow-runs", params={"workflow_id": "keyed"})).json()
        assert [r["id"] for r in runs] == [run["id"]]  # the refused triggers stored nothing
