"""Map steps through Envoy (SPEC §2.1): a map's items listed with `?parent_ref=`, its progress
on its step run, and one item steered by its URL-escaped ref (`each%5B1%5D`)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.system.conftest import SpawnFactory

REVIEW = {"name": "review-each", "steps": [
    {"ref": "each", "kind": "map", "config": {
        "items": ["a", "b"], "step": {"kind": "approval", "config": {"message": "{{ item }}?"}}}}]}


async def steps_when(client: httpx.AsyncClient, run_id: str, ready: Any,
                     **params: str) -> list[dict[str, Any]]:
    async with asyncio.timeout(30):
        while True:
            steps = (await client.get(f"/v1/workflow-runs/{run_id}/steps", params=params)).json()
            if ready(steps):
                return list(steps)
            await asyncio.sleep(0.05)


async def test_map_items_over_rest(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        created = await client.post("/v1/workflows", json=REVIEW)
        assert created.status_code == 200, created.text
        run = (await client.post("/v1/workflows/review-each/runs", json={})).json()

        items = await steps_when(client, run["id"], lambda s: [i["status"] for i in s] == ["waiting"] * 2,
                                 parent_ref="each")
        assert [(i["step_ref"], i["parent_ref"], i["map_index"]) for i in items] == [
            ("each[0]", "each", 0), ("each[1]", "each", 1)]
        (each,) = [s for s in (await client.get(f"/v1/workflow-runs/{run['id']}/steps")).json()
                   if s["step_ref"] == "each"]
        assert each["progress"] == {"total": 2, "completed": 0, "failed": 0, "running": 2}

        for ref in ("each%5B1%5D", "each%5B0%5D"):
            approved = await client.post(f"/v1/workflow-runs/{run['id']}/steps/{ref}/approve", json={})
            assert approved.status_code == 200, approved.text
        done = await steps_when(client, run["id"], lambda s: s[0]["status"] == "completed")
        assert done[0]["output"] == {"items": [{"approved_by": done[1]["approved_by"], "comment": ""},
                                               {"approved_by": done[2]["approved_by"], "comment": ""}],
                                     "failed": []}
        assert done[0]["progress"]["completed"] == 2
