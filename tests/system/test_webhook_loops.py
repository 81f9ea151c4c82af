"""Loops through webhooks end, end to end (issue 16 findings 3 and 6): `conveyor serve` with its
real Envoy, allowed (CONVEYOR_HTTP_ALLOW) to reach its own REST address under both spellings, so
that without the family rules a workflow notifying its own webhook would start runs forever (149
in 4 s was seen; two targets: exponentially). The target spelled as the server shows it is
delivered internally; spelled `localhost` it goes out over HTTP, through Envoy, back to the same
webhook with its signed X-Conveyor-Lineage. Either way: one run, and the refusal is the
notification's outcome event with its reason. And a webhook takes only a JSON object body."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest

from tests.system.conftest import Served, SpawnFactory

# A run's noop completes at once and its notification goes out within milliseconds; this only
# bounds a failure.
OUTCOME_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reason(response: httpx.Response) -> str:
    return next(d["reason"] for d in response.json()["details"] if d["@type"].endswith("ErrorInfo"))


async def hooked(client: httpx.AsyncClient, name: str) -> str:
    """Create workflow `name` (one noop) with its webhook on; the URL the server shows for it."""
    created = await client.post("/v1/workflows", json={"name": name, "steps": [{"ref": "a", "kind": "noop"}]})
    assert created.status_code == 200, created.text
    rotated = await client.post(f"/v1/workflows/{name}/webhook:rotate", json={})
    assert rotated.status_code == 200, rotated.text
    return str(rotated.json()["webhook_url"])


async def notify(client: httpx.AsyncClient, name: str, *urls: str) -> None:
    """Give `name` one target per URL, each told of its completion (distinct event lists keep
    targets at one URL apart)."""
    more = ["run.failed", "run.canceled"]
    targets = [{"url": url, "events": ["run.completed", *more[:i]]} for i, url in enumerate(urls)]
    updated = await client.put(f"/v1/workflows/{name}", json={
        "name": name, "steps": [{"ref": "a", "kind": "noop"}], "notifications": targets})
    assert updated.status_code == 200, updated.text


async def runs_of(client: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    workflow_id = (await client.get(f"/v1/workflows/{name}")).json()["id"]
    got = await client.get("/v1/workflow-runs", params={"workflow_id": workflow_id})
    assert got.status_code == 200, got.text
    return list(got.json())


async def outcomes(client: httpx.AsyncClient, run_id: str, count: int) -> list[dict[str, Any]]:
    """The run's notification outcome events, once there are `count` of them."""
    async with asyncio.timeout(OUTCOME_TIMEOUT):
        while True:
            events = (await client.get(f"/v1/workflow-runs/{run_id}/events")).json()
            found = [e for e in events if e["type"].startswith("notification.")]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)


def localhost(url: str) -> str:
    """The same webhook URL under another spelling of the server's address: not recognised as
    its own, so the notification goes out over HTTP through Envoy."""
    return url.replace("://127.0.0.1:", "://localhost:", 1)


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> int:
    """The server's REST port, allowed as a notification destination under both spellings."""
    chosen = free_port()
    monkeypatch.setenv("CONVEYOR_HTTP_ALLOW", f"127.0.0.1:{chosen},localhost:{chosen}")
    return chosen


async def test_loops_through_its_own_webhooks_end_with_one_run(spawn: SpawnFactory, db_url: str,
                                                                port: int) -> None:
    served: Served
    async with (spawn(db_url, envoy=True, http_port=port) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=10) as client):
        assert served.rest_url == f"http://127.0.0.1:{port}"

        # 1. A workflow whose notification target is its own webhook URL, as the server shows it:
        #    delivered internally, refused.
        own = await hooked(client, "self")
        await notify(client, "self", own)
        run = (await client.post("/v1/workflows/self/runs", json={})).json()
        (event,) = await outcomes(client, run["id"], 1)
        assert event["type"] == "notification.abandoned" and event["data"]["url"] == own
        assert event["data"]["error"].startswith("WORKFLOW_LOOP: workflow 'self' would start itself")
        assert "WORKFLOW_LOOP" in event["message"] and event["actor"] == "engine:notify"

        # 2. The same, spelled so it goes out over HTTP through Envoy: the webhook verifies the
        #    lineage header and refuses; the notifier gives up at once with the reason.
        loop = await hooked(client, "loop")
        await notify(client, "loop", localhost(loop))
        run = (await client.post("/v1/workflows/loop/runs", json={})).json()
        (event,) = await outcomes(client, run["id"], 1)
        assert event["type"] == "notification.abandoned" and event["data"]["status_code"] == 400
        assert event["data"]["error"].startswith("HTTP 400 WORKFLOW_LOOP: workflow 'loop' would start itself")

        # 3. Two workflows at each other's webhooks (over HTTP): one run each.
        ping, pong = await hooked(client, "ping"), await hooked(client, "pong")
        await notify(client, "ping", localhost(pong))
        await notify(client, "pong", localhost(ping))
        first = (await client.post("/v1/workflows/ping/runs", json={})).json()
        (delivered,) = await outcomes(client, first["id"], 1)
        assert delivered["type"] == "notification.delivered" and delivered["data"]["status_code"] == 200
        (second,) = await runs_of(client, "pong")
        assert second["triggered_by"] == "webhook"
        (back,) = await outcomes(client, second["id"], 1)
        assert back["type"] == "notification.abandoned"
        assert back["data"]["error"].startswith("HTTP 400 WORKFLOW_LOOP: workflow 'ping' would start itself")

        # 4. One workflow with two targets at its own webhook (one of each spelling).
        twice = await hooked(client, "twice")
        await notify(client, "twice", twice, localhost(twice))
        run = (await client.post("/v1/workflows/twice/runs", json={})).json()
        got = await outcomes(client, run["id"], 2)
        assert sorted(e["type"] for e in got) == ["notification.abandoned"] * 2
        assert all("WORKFLOW_LOOP" in e["data"]["error"] for e in got)

        # Every outcome is final (nothing left to retry), so the counts below no longer move.
        assert [len(await runs_of(client, name)) for name in ("self", "loop", "ping", "pong", "twice")] == [
            1, 1, 1, 1, 1]


REFUSED_BODIES = (b"null", b"[]", b'[{"a": 1}]', b"3", b"-1.5", b'"text"', b"true", b"{not json",
                  b'{"a": 1', b'{"a": NaN}', b"\xff\xfe", b'{"a": 1} x', b" null ")


async def test_a_webhook_takes_only_a_json_object(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=10) as client,
                httpx.AsyncClient(base_url=served.rest_url, timeout=10) as anon):
        path = "/v1/webhooks/" + (await hooked(client, "w")).rsplit("/", 1)[1]
        json_type = {"content-type": "application/json"}

        for body in REFUSED_BODIES:
            refused = await anon.post(path, content=body, headers=json_type)
            assert refused.status_code == 400, (body, refused.text)
            assert reason(refused) == "INVALID_JSON" and refused.json()["code"] == 3, body
            assert refused.json()["message"].startswith("invalid request body: body: "), body
        deep = await anon.post(path, content=b'{"a": ' * 40 + b"1" + b"}" * 40, headers=json_type)
        assert deep.status_code == 400 and reason(deep) == "JSON_TOO_DEEP", deep.text
        assert await runs_of(client, "w") == []

        # An object is the payload, whatever its keys; a POST without a body an empty one.
        sent = {"ref": "main", "body": [1, {"x": None}], "payload": "is just a key", "token": "t"}
        for body, payload in ((b'{"ref": "main", "body": [1, {"x": null}], "payload": "is just a key", '
                               b'"token": "t"}', sent), (b"{}", {}), (b"", {}), (b" {} ", {})):
            ok = await anon.post(path, content=body, headers=json_type)
            assert ok.status_code == 200, (body, ok.text)
            assert ok.json()["payload"] == payload and ok.json()["triggered_by"] == "webhook"
        assert len(await runs_of(client, "w")) == 4

        # The same for run_as through REST: an engine actor is refused, nothing is started.
        claimed = await client.post("/v1/workflows/w/runs", json={"run_as": " Schedule"})
        assert claimed.status_code == 400 and reason(claimed) == "RUN_AS_RESERVED", claimed.text
        assert len(await runs_of(client, "w")) == 4
