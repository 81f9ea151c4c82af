"""`GET /v1/workflow-runs?search=...` through the real Envoy of `conveyor serve`: the query
parameter reaches the filter percent-decoded, `%` and `_` stay literal, Unicode folds its case,
and a NUL or an over-long search is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx

from tests.system.conftest import SpawnFactory


def _workflow(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "description": description, "steps": [{"ref": "a", "kind": "noop"}]}


async def test_search_over_rest(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client):
        runs = {}
        for name, description in [("build_app", "Builds the web app"),
                                  ("buildXapp", "100% of the builds, ÉTÉ edition"),
                                  ("deploy", "Ships it")]:
            assert (await client.post("/v1/workflows", json=_workflow(name, description))).status_code == 200
            trigger = await client.post(f"/v1/workflows/{name}/runs", json={"tags": {"wf": name}})
            assert trigger.status_code == 200, trigger.text
            runs[name] = trigger.json()["id"]

        async def ids(**params: Any) -> set[str]:
            response = await client.get("/v1/workflow-runs", params=params)
            assert response.status_code == 200, response.text
            return {run["id"] for run in response.json()}

        assert await ids(search="BUILD") == {runs["build_app"], runs["buildXapp"]}
        assert await ids(search="ships") == {runs["deploy"]}
        assert await ids(search="") == set(runs.values())
        assert await ids(search="d_a") == {runs["build_app"]}
        assert await ids(search="100%") == {runs["buildXapp"]}
        assert await ids(search="%") == {runs["buildXapp"]}
        assert await ids(search="été") == {runs["buildXapp"]}
        assert await ids(search="build", tag="wf:build_app") == {runs["build_app"]}
        assert await ids(search="build", status=["failed", "timed_out"]) == set()
        assert await ids(search="build", workflow_id="deploy") == set()
        # Raw query strings: percent-encoded UTF-8 and spaces as %20 are decoded; a "+" is not
        # a space to Envoy's transcoder (URLSearchParams writes spaces as "+": use %20).
        raw = await client.get("/v1/workflow-runs?search=%C3%89t%C3%A9%20edition&limit=10")
        assert [run["id"] for run in raw.json()] == [runs["buildXapp"]]
        plus = await client.get("/v1/workflow-runs?search=%C3%89t%C3%A9+edition&limit=10")
        assert plus.status_code == 200 and plus.json() == []

        for search, reason in [("a\x00b", "INVALID_CHARACTER"), ("x" * 201, "FIELD_TOO_LONG")]:
            bad = await client.get("/v1/workflow-runs", params={"search": search})
            assert bad.status_code == 400, bad.text
            body = bad.json()
            info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
            assert info["reason"] == reason
            violations = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))
            assert [v["field"] for v in violations["field_violations"]] == ["search"]
