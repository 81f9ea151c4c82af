"""Tenancy over plain HTTP through the real Envoy: `conveyor serve` started twice over one database.
The first start creates the admin key (kept 0600 in the data directory; its output, a pipe, names
the file and never holds the token); REST
answers 401/403/429 as JSON with reasons (429 with Retry-After); comments, webhooks and keys work
over REST; the second start creates no other admin key."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx

from conveyor.v1 import keys_service_pb2 as keys_pb
from conveyor.v1 import keys_service_pb2_grpc as keys_grpc
from tests.auth import bearer_interceptors
from tests.system.conftest import SpawnFactory

TOKEN_LINE = re.compile(r"cvk_[A-Za-z0-9_-]{43}")


def reason(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) >= {"code", "message", "details"}, body
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))


async def new_key(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    created = await client.post("/v1/api-keys", json=fields)
    assert created.status_code == 200, created.text
    body: dict[str, Any] = created.json()
    return body


async def test_tenancy_over_rest_and_the_first_start_admin_key(spawn: SpawnFactory, tmp_path: Path,
                                                                 db_url: str) -> None:
    token_file = tmp_path / "data" / "admin.token"
    async with spawn(db_url, envoy=True) as served:
        # The first start kept the admin token 0600, and said where, not what (stdout is a pipe).
        admin_token = token_file.read_text().strip()
        assert TOKEN_LINE.fullmatch(admin_token)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert not any(TOKEN_LINE.search(line) for line in served.printed), served.printed
        assert any(str(token_file) in line for line in served.printed), served.printed

        admin = {"authorization": f"Bearer {admin_token}"}
        async with httpx.AsyncClient(base_url=served.rest_url, timeout=20) as anon, \
                httpx.AsyncClient(base_url=served.rest_url, headers=admin, timeout=20) as client:
            # No token: 401 with a reason.
            r = await anon.get("/v1/workflows")
            assert r.status_code == 401 and reason(r) == "MISSING_TOKEN"
            assert r.headers["content-type"].startswith("application/json")
            r = await anon.get("/v1/workflows", headers={"authorization": "Bearer cvk_forged"})
            assert r.status_code == 401 and reason(r) == "INVALID_TOKEN"

            created = await client.post("/v1/workflows", json={
                "name": "gated", "steps": [{"ref": "ok", "kind": "approval"}]})
            assert created.status_code == 200, created.text

            # Keys over REST: create (token once), list (never the token), revoke.
            viewer = await new_key(client, name="viewer", project_id="default", role="viewer")
            assert viewer["token"].startswith("cvk_") and viewer["key"]["role"] == "viewer"
            listed = await client.get("/v1/api-keys")
            assert listed.status_code == 200
            assert {k["name"] for k in listed.json()} == {"admin", "viewer"}
            assert viewer["token"] not in listed.text and admin_token not in listed.text

            # A viewer triggering: 403 with a reason; reading is fine.
            as_viewer = {"authorization": f"Bearer {viewer['token']}"}
            r = await anon.post("/v1/workflows/gated/runs", json={}, headers=as_viewer)
            assert r.status_code == 403 and reason(r) == "ROLE_TOO_LOW"
            assert (await anon.get("/v1/workflows/gated", headers=as_viewer)).status_code == 200

            revoked = await client.post(f"/v1/api-keys/{viewer['key']['id']}:revoke", json={})
            assert revoked.status_code == 200 and revoked.json()["revoked_at"]
            r = await anon.get("/v1/workflows/gated", headers=as_viewer)
            assert r.status_code == 401 and reason(r) == "INVALID_TOKEN"
            assert "viewer" not in {k["name"] for k in (await client.get("/v1/api-keys")).json()}

            # Over its rate: 429 with Retry-After, for a unary method and for a list (a stream).
            for path in ("/v1/workflows/gated", "/v1/workflows"):
                slow = await new_key(client, name=f"slow{len(path)}", project_id="*", role="viewer",
                                     rate_limit=1)
                as_slow = {"authorization": f"Bearer {slow['token']}"}
                responses = [await anon.get(path, headers=as_slow) for _ in range(3)]
                assert responses[0].status_code == 200
                limited = [r for r in responses if r.status_code == 429]
                assert limited, (path, [(r.status_code, r.text[:200]) for r in responses])
                assert reason(limited[0]) == "RATE_LIMITED"
                assert limited[0].headers.get("retry-after") == "1", dict(limited[0].headers)

            # Comments.
            run = (await client.post("/v1/workflows/gated/runs", json={})).json()
            posted = await client.post(f"/v1/workflow-runs/{run['id']}/comments", json={"content": "on it"})
            assert posted.status_code == 200, posted.text
            assert posted.json()["created_by"] == "admin" and posted.json()["content"] == "on it"
            got = await client.get(f"/v1/workflow-runs/{run['id']}/comments")
            assert got.status_code == 200
            assert [(c["seq"], c["content"]) for c in got.json()] == [(posted.json()["seq"], "on it")]
            r = await client.post(f"/v1/workflow-runs/{run['id']}/comments", json={"content": "  "})
            assert r.status_code == 400

            # The webhook: rotate, then POST its URL with no credentials.
            rotated = await client.post("/v1/workflows/gated/webhook:rotate", json={})
            assert rotated.status_code == 200, rotated.text
            url = rotated.json()["webhook_url"]
            path = urlsplit(url).path
            assert re.fullmatch(r"/v1/webhooks/whk_[A-Za-z0-9_-]{43}", path), url
            assert url == served.rest_url + path, (url, served.rest_url)
            assert rotated.json()["workflow"]["webhook_enabled"] is True
            shown = (await client.get("/v1/workflows/gated")).json()
            assert shown["webhook_url_hint"] and path not in str(shown)
            hook = await anon.post(path, json={"ref": "main", "n": 3}, headers={"Idempotency-Key": "push-1"})
            assert hook.status_code == 200, hook.text
            hooked = hook.json()
            assert hooked["payload"] == {"ref": "main", "n": 3} and hooked["triggered_by"] == "webhook"
            again = await anon.post(path, json={"ref": "main", "n": 3}, headers={"Idempotency-Key": "push-1"})
            assert again.status_code == 200 and again.json()["id"] == hooked["id"]
            dead = await anon.post(path + "x", json={})
            assert dead.status_code == 404 and reason(dead) == "WEBHOOK_NOT_FOUND"

            # The audit log over REST saw the refusals of keys; those with no key or webhook
            # behind them are counted instead (tests/api/test_anonymous_limits.py).
            audit = await client.get("/v1/audit-entries", params={"failures_only": "true"})
            assert audit.status_code == 200
            seen = {(e["code"], e["reason"]) for e in audit.json()}
            assert ("PERMISSION_DENIED", "ROLE_TOO_LOW") in seen
            assert not {"MISSING_TOKEN", "INVALID_TOKEN", "WEBHOOK_NOT_FOUND"} & {r for _, r in seen}

    # A second start over the same database creates no other admin key and prints no token.
    async with spawn(db_url) as again_served:
        assert not any(TOKEN_LINE.search(line) for line in again_served.printed), again_served.printed
        assert not any("admin API key" in line for line in again_served.printed)
        assert token_file.read_text().strip() == admin_token
        async with grpc.aio.insecure_channel(again_served.grpc_target,
                                             interceptors=bearer_interceptors(admin_token)) as channel:
            keys = [k async for k in keys_grpc.KeysServiceStub(channel).ListApiKeys(
                keys_pb.ListApiKeysRequest(include_revoked=True))]
        admins = sorted((k.name, k.role, k.project_id) for k in keys if k.role == "admin")
        assert admins == [("admin", "admin", "*")]
