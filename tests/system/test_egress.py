"""Egress of a real `conveyor serve` behind its real Envoy (issue 16 items 1, 2 and 7): a tenant's
http steps and notification targets cannot reach the server's own ports or anything else on
loopback, however the address is spelled, unless the operator allows it (CONVEYOR_HTTP_ALLOW,
here one listener's host:port, which leaves the metrics port refused); a malformed URL in a
definition is a 400 with its field, never a 500."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.system.conftest import Served, SpawnFactory

LOOPBACK = "EGRESS_DENIED: 127.0.0.1 is loopback (127.0.0.0/8), not allowed by CONVEYOR_HTTP_ALLOW"


class Listener:
    """An HTTP endpoint on 127.0.0.1 recording the path of every request it receives."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        return web.json_response({"ok": True})


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    listener = Listener()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", listener.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    listener.port = runner.addresses[0][1]
    try:
        yield listener
    finally:
        await runner.cleanup()


def metrics_port(served: Served) -> int:
    for line in served.printed:
        if m := re.search(r"metrics on http://[^:]+:(\d+)/metrics", line):
            return int(m.group(1))
    raise AssertionError(f"no metrics line in {served.printed}")


def http_step(url: str) -> dict[str, Any]:
    return {"ref": "call", "kind": "http", "config": {"url": url}}


async def run_to_the_end(client: httpx.AsyncClient, workflow: str, notified: bool = False) -> dict[str, Any]:
    """Trigger `workflow`, wait until its run is final (and, when `notified`, until a delivery's
    outcome is recorded); the run's steps by ref and its notification events."""
    run = (await client.post(f"/v1/workflows/{workflow}/runs", json={})).json()
    async with asyncio.timeout(20):
        while True:
            got = (await client.get(f"/v1/workflow-runs/{run['id']}")).json()
            events = (await client.get(f"/v1/workflow-runs/{run['id']}/events")).json()
            outcomes = [(e["type"], e.get("data", {}).get("error", "")) for e in events
                        if e["type"].startswith("notification.")]
            if got["status"] not in ("pending", "running") and (outcomes or not notified):
                break
            await asyncio.sleep(0.05)
    steps = (await client.get(f"/v1/workflow-runs/{run['id']}/steps")).json()
    return {"status": got["status"], "steps": {s["step_ref"]: s for s in steps}, "notified": outcomes}


async def test_loopback_and_the_servers_own_ports_are_refused_unless_allowed(
        spawn: SpawnFactory, db_url: str, listener: Listener) -> None:
    # The spellings: ideographic full stops, fullwidth digits, a short form.
    own_metrics = "http://127\u30020\u30020\u30021:{port}/metrics"
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "127.0.0.1")  # dots too: U+FF0E
    to_listener = f"http://{fullwidth}:{listener.port}/call"
    hook = f"http://127.1:{listener.port}/hook"

    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=30) as client):
        metrics = own_metrics.format(port=metrics_port(served))
        for name, url in (("metrics", metrics), ("listener", to_listener)):
            definition = {"name": name, "steps": [http_step(url)],
                          "notifications": [{"url": hook, "events": ["run.completed", "run.failed"]}]}
            assert (await client.post("/v1/workflows", json=definition)).status_code == 200, name

        # A malformed URL is the client's mistake: 400 with the field, at create and update.
        for bad in ("http://[::1", "ftp://x", "http://"):
            created = await client.post("/v1/workflows", json={"name": "bad", "steps": [http_step(bad)]})
            updated = await client.put("/v1/workflows/listener", json={"name": "listener",
                                                                      "steps": [http_step(bad)]})
            for response in (created, updated):
                assert response.status_code == 400, response.text[:300]
                fields = [v["field"] for d in response.json()["details"] if d["@type"].endswith("BadRequest")
                          for v in d.get("fieldViolations", d.get("field_violations", []))]
                assert "steps[0].config.url" in fields, response.text[:300]

        for name in ("metrics", "listener"):
            run = await run_to_the_end(client, name, notified=True)
            assert run["status"] == "failed"
            assert (run["steps"]["call"]["status"], run["steps"]["call"]["error"]) == ("failed", LOOPBACK)
            assert run["notified"] == [("notification.abandoned", LOOPBACK)]
        assert listener.paths == []  # nothing arrived: refused before any connection

    allow = {"CONVEYOR_HTTP_ALLOW": f"127.0.0.1:{listener.port}"}
    async with (spawn(db_url, envoy=True, env=allow) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=30) as client):
        await client.put("/v1/workflows/metrics", json={
            "name": "metrics", "steps": [http_step(own_metrics.format(port=metrics_port(served)))]})
        run = await run_to_the_end(client, "listener", notified=True)
        assert run["status"] == "completed" and run["steps"]["call"]["output"]["body"] == {"ok": True}
        assert run["notified"] == [("notification.delivered", "")]
        assert sorted(listener.paths) == ["/call", "/hook"]
        # Allowed is that host:port only: the server's own metrics port stays out of reach.
        run = await run_to_the_end(client, "metrics")
        assert run["steps"]["call"]["error"] == LOOPBACK
