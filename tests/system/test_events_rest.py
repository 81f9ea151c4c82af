"""Events through Envoy (issue 17, SPEC §9): `conveyor serve` with its real Envoy; a workflow
listening to an event, POST /v1/events starting its run (the answer's shape, numbers as JSON
numbers), the same id again answering the same, another body 409 IDEMPOTENCY_KEY_REUSED,
GET /v1/events as a bare JSON array newest first with x-next-page-token, filters by name and key,
and hostile bodies (unknown fields, a payload that is no object, over the limits, a NUL in the
key, a huge name) 400 with a reason, storing nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.system.conftest import SpawnFactory

WAITER = {"name": "await-payment",
          "steps": [{"ref": "paid", "kind": "wait_event",
                     "config": {"event": "order.paid", "key": "{{ payload.customer }}",
                                "match": "event.payload.n >= payload.least"}}]}
LISTENER = {"name": "ship",
            "steps": [{"ref": "a", "kind": "noop", "config": {"output": {"n": "{{ payload.n }}"}}}],
            "on_events": [{"name": "order.paid", "when": "event.payload.n > 0"}]}


async def wait_final(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            run = (await client.get(f"/v1/workflow-runs/{run_id}")).json()
            if run["status"] not in ("pending", "running"):
                return dict(run)
            await asyncio.sleep(0.05)


async def test_publish_and_list_events_over_rest(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        created = await client.post("/v1/workflows", json=LISTENER)
        assert created.status_code == 200, created.text
        assert created.json()["on_events"] == LISTENER["on_events"]
        assert (await client.post("/v1/workflows", json=WAITER)).status_code == 200
        waiter = (await client.post("/v1/workflows/await-payment/runs",
                                    json={"payload": {"customer": "cust-7", "least": 2}})).json()

        body = {"name": "order.paid", "key": "cust-7", "payload": {"n": 3}, "id": "pay-7"}
        first = await client.post("/v1/events", json=body)
        assert first.status_code == 200, first.text
        answer = first.json()
        assert {k: answer[k] for k in ("id", "name", "key", "resumed", "started", "project_id")} == {
            "id": "pay-7", "name": "order.paid", "key": "cust-7", "resumed": 1, "started": 1,
            "project_id": "default"}
        assert answer["received_at"].endswith("Z") and answer["payload"] == {"n": 3}
        again = await client.post("/v1/events", json=body)
        assert again.status_code == 200 and again.json() == answer
        reused = await client.post("/v1/events", json={**body, "payload": {"n": 4}})
        assert reused.status_code == 409, reused.text
        assert reused.json()["details"][0]["reason"] == "IDEMPOTENCY_KEY_REUSED"

        runs = (await client.get("/v1/workflow-runs", params={"workflow_id": "ship"})).json()
        started = [(r["triggered_by"], r["entity_id"], r["payload"]) for r in runs]
        assert started == [("event", "cust-7", {"n": 3})]
        assert (await wait_final(client, runs[0]["id"]))["status"] == "completed"
        assert (await wait_final(client, waiter["id"]))["status"] == "completed"
        (paid,) = (await client.get(f"/v1/workflow-runs/{waiter['id']}/steps")).json()
        got = (paid["kind"], paid["output"]["id"], paid["output"]["payload"])
        assert got == ("wait_event", "pay-7", {"n": 3})

        filtered = await client.post("/v1/events", json={"name": "order.paid", "payload": {"n": 0}})
        assert filtered.json()["started"] == 0 and filtered.json()["id"]
        await client.post("/v1/events", json={"name": "user.signup", "key": "cust-7"})

        listed = await client.get("/v1/events", params={"limit": 2})
        assert listed.status_code == 200, listed.text
        assert [e["name"] for e in listed.json()] == ["user.signup", "order.paid"]
        token = listed.headers["x-next-page-token"]
        rest = await client.get("/v1/events", params={"limit": 2, "page_token": token})
        assert [e["id"] for e in rest.json()] == ["pay-7"] and "x-next-page-token" not in rest.headers
        by_key = await client.get("/v1/events", params={"name": "order.paid", "key": "cust-7"})
        assert [e["id"] for e in by_key.json()] == ["pay-7"]

        hostile: list[tuple[Any, str]] = [
            ({"name": "order.paid", "paylod": {}}, "UNKNOWN_FIELD"),
            ({"name": "order.paid", "payload": [1, 2]}, "INVALID_FIELD"),
            ({"name": "order.paid", "payload": {"big": "x" * 70_000}}, "JSON_TOO_LARGE"),
            ({"name": "order.paid", "key": "a\u0000b"}, "INVALID_CHARACTER"),
            ({"name": "n" * 5000}, "FIELD_TOO_LONG"),
            ({"name": "has space"}, "INVALID_EVENT"),
            ({"name": "order.paid", "key": "line\nbreak"}, "INVALID_EVENT"),
            ({}, "INVALID_EVENT"),
        ]
        for hostile_body, reason in hostile:
            refused = await client.post("/v1/events", json=hostile_body)
            assert refused.status_code == 400, (hostile_body, refused.text)
            assert refused.json()["details"][0]["reason"] == reason, (hostile_body, refused.text)
        not_json = await client.post("/v1/events", content=b"{nope",
                                     headers={"content-type": "application/json"})
        assert not_json.status_code == 400
        assert len((await client.get("/v1/events", params={"limit": 100})).json()) == 3
