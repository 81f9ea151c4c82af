"""KeysService through the real server and database: tokens shown once and stored only as a hash,
names unique, input refused with reasons, a project admin's reach, paging, revocation (here at
once, elsewhere within the cache's seconds), expiry, last use written in batches, and the admin
key of a first start."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import text, update

from conveyor.engine.facade import Engine
from conveyor.storage.db import Database
from conveyor.storage.models import ApiKeyRow
from conveyor.v1 import keys_service_pb2 as keys_pb
from conveyor.v1 import keys_service_pb2_grpc as keys_grpc
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, failure, listed, stream_failure
from tests.auth import bearer, key

HEX64 = re.compile(r"[0-9a-f]{64}")


def stub(api: Api) -> Any:
    return keys_grpc.KeysServiceStub(api.channel)


async def create(api: Api, metadata: Any = (), **fields: Any) -> keys_pb.CreateApiKeyResponse:
    fields.setdefault("project_id", "*")
    fields.setdefault("role", "viewer")
    return await stub(api).CreateApiKey(keys_pb.CreateApiKeyRequest(**fields), metadata=metadata)


async def list_keys(api: Api, metadata: Any = (), **fields: Any) -> tuple[list[pb.ApiKey], str]:
    return await listed(stub(api).ListApiKeys(keys_pb.ListApiKeysRequest(**fields), metadata=metadata))


async def list_workflows(api: Api, token: str) -> list[pb.Workflow]:
    items, _ = await listed(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(), metadata=bearer(token)))
    return items


async def key_rows(database: Database) -> list[dict[str, Any]]:
    async with database.read() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys ORDER BY name"))).mappings().all()
    return [dict(r) for r in rows]


def stamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


# -- creating --------------------------------------------------------------------------------------

async def test_create_shows_the_token_once_and_stores_only_its_hash(api: Api, database: Database) -> None:
    created = await create(api, name="ci", project_id="acme", role="operator", rate_limit=7)

    token = created.token
    assert token.startswith("cvk_") and len(token) >= 40
    k = created.key
    assert (k.name, k.project_id, k.role, k.rate_limit, k.created_by) == ("ci", "acme", "operator", 7,
                                                                           "test-admin")
    assert k.id and k.token_prefix == token[:8] and k.HasField("created_at")
    assert not k.HasField("revoked_at") and not k.HasField("expires_at") and not k.HasField("last_used_at")

    # The token works: an operator of acme may list workflows.
    assert await list_workflows(api, token) == []

    # Never in a list...
    listed_keys, _ = await list_keys(api)
    ours = [x for x in listed_keys if x.name == "ci"]
    assert len(ours) == 1 and ours[0].id == k.id
    for x in listed_keys:
        assert token.encode() not in x.SerializeToString()
        assert token[8:] not in str(x)
    # ...nor in the database: the row holds the token's SHA-256 and its first 8 characters.
    rows = [r for r in await key_rows(database) if r["name"] == "ci"]
    assert len(rows) == 1
    row = rows[0]
    assert HEX64.fullmatch(row["token_hash"])
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert row["token_prefix"] == token[:8]
    for value in row.values():
        assert token[8:] not in str(value)
    # Two keys never share a token.
    other = await create(api, name="ci-2")
    assert other.token != token and other.key.token_prefix.startswith("cvk_")


async def test_names_are_unique(api: Api, database: Database) -> None:
    await create(api, name="ci")
    err = await failure(create(api, name="ci", role="admin", project_id="other"))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.info is not None
    assert err.info.reason == "KEY_ALREADY_EXISTS"
    assert [r["role"] for r in await key_rows(database) if r["name"] == "ci"] == ["viewer"]


@pytest.mark.parametrize(("fields", "reason"), [
    ({"name": "x", "role": "root"}, "INVALID_ROLE"),
    ({"name": "x", "role": ""}, "INVALID_ROLE"),
    ({"name": "", "role": "viewer"}, "INVALID_KEY_NAME"),
    ({"name": "has space", "role": "viewer"}, "INVALID_KEY_NAME"),
    ({"name": "-leading-dash", "role": "viewer"}, "INVALID_KEY_NAME"),
    ({"name": "a" * 101, "role": "viewer"}, "INVALID_KEY_NAME"),
    ({"name": "x", "role": "viewer", "project_id": "no/slash"}, "INVALID_PROJECT_ID"),
    ({"name": "x", "role": "viewer", "project_id": "a" * 129}, None),
])
async def test_bad_role_name_or_project_is_invalid_argument(
        api: Api, database: Database, fields: dict[str, Any], reason: str | None) -> None:
    before = await key_rows(database)
    err = await failure(create(api, **fields))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info is not None and err.info.reason
    if reason is not None:
        assert err.info.reason == reason
    assert await key_rows(database) == before


async def test_expiry_in_the_past_or_now_is_refused(api: Api, database: Database) -> None:
    before = await key_rows(database)
    for at in (api.clock.now() - timedelta(seconds=1), api.clock.now()):
        err = await failure(create(api, name="late", expires_at=stamp(at)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert any(f == "expires_at" for f, _ in err.violations)
    assert await key_rows(database) == before


async def test_nul_bytes_huge_names_and_forged_page_tokens_change_nothing(api: Api,
                                                                          database: Database) -> None:
    before = await key_rows(database)
    for fields in ({"name": "ci\x00admin"}, {"name": "x" * 100_000}, {"name": "ci", "project_id": "a\x00b"},
                   {"name": "ci", "role": "admin\x00"}):
        err = await failure(create(api, **fields))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert err.info is not None and err.info.reason
    for ident in ("test-admin\x00", "x" * 100_000):
        err = await failure(stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=ident)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    forged = [
        "garbage",
        "=" * 3,
        base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(["not a time", "id"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "a\x00b"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps([1, {"x": 1}]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"a": 1}).encode()).decode(),
        "A" * 50_000,
    ]
    for token in forged:
        err = await stream_failure(stub(api).ListApiKeys(keys_pb.ListApiKeysRequest(page_token=token)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, token[:40]
        assert err.info is not None
        assert err.info.reason in ("INVALID_PAGE_TOKEN", "FIELD_TOO_LONG"), err.info.reason
    assert await key_rows(database) == before
    # The test admin still works.
    assert len((await list_keys(api))[0]) == len(before)


async def test_a_project_admin_manages_only_its_project(api: Api) -> None:
    acme_admin = await key(api.engine, "acme-admin", "acme", "admin")
    own = bearer(acme_admin)
    other = await create(api, name="other-viewer", project_id="other")

    for project in ("other", "*"):
        err = await failure(create(api, metadata=own, name=f"sneaky-{project.strip('*') or 'all'}",
                                   project_id=project, role="viewer"))
        assert err.code == grpc.StatusCode.PERMISSION_DENIED, project
    # An empty project means its own.
    mine = await create(api, metadata=own, name="acme-ci", project_id="", role="admin")
    assert mine.key.project_id == "acme" and mine.key.created_by == "acme-admin"

    # It lists only acme's keys, whatever it asks for.
    names = {k.name for k in (await list_keys(api, metadata=own))[0]}
    assert names == {"acme-admin", "acme-ci"}
    assert (await list_keys(api, metadata=own, project_id="other"))[0] == []
    # A foreign key is absent to it: not revocable by id nor by name.
    for ident in (other.key.id, "other-viewer", "test-admin"):
        err = await failure(stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=ident), metadata=own))
        assert err.code == grpc.StatusCode.NOT_FOUND, ident
    assert await list_workflows(api, other.token) == []

    # Lower roles may not touch keys at all.
    for role in ("viewer", "operator"):
        token = await key(api.engine, f"acme-{role}", "acme", role)
        err = await failure(create(api, metadata=bearer(token), name=f"by-{role}", project_id="acme"))
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.info is not None
        assert err.info.reason == "ROLE_TOO_LOW"
        err = await stream_failure(stub(api).ListApiKeys(keys_pb.ListApiKeysRequest(),
                                                         metadata=bearer(token)))
        assert err.code == grpc.StatusCode.PERMISSION_DENIED


# -- listing ---------------------------------------------------------------------------------------

async def test_list_pages_through_every_key_once(api: Api) -> None:
    ids = {(await create(api, name=f"k{i}", project_id="acme")).key.id for i in range(7)}
    for i in range(3):  # keys created at different instants, too
        api.clock.advance(1)
        ids.add((await create(api, name=f"later{i}", project_id="acme")).key.id)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        items, token = await list_keys(api, project_id="acme", limit=3, page_token=token)
        assert len(items) <= 3
        seen += [k.id for k in items]
        pages += 1
        if not token:
            break
        assert pages < 10
    assert len(seen) == len(set(seen)) == 10 and set(seen) == ids
    assert pages == 4
    # Newest first.
    everything, _ = await list_keys(api, project_id="acme", limit=100)
    assert [k.id for k in everything] == seen
    assert [k.name for k in everything[:3]] == ["later2", "later1", "later0"]


# -- revoking --------------------------------------------------------------------------------------

async def test_revoke_by_id_and_by_name_stops_the_token_at_once(api: Api) -> None:
    a = await create(api, name="by-id", role="viewer")
    b = await create(api, name="by-name", role="viewer")
    for created in (a, b):  # both resolved (and cached) before they are revoked
        await list_workflows(api, created.token)

    revoked = await stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=a.key.id))
    assert revoked.id == a.key.id and revoked.HasField("revoked_at")
    revoked_b = await stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id="by-name"))
    assert revoked_b.id == b.key.id and revoked_b.HasField("revoked_at")

    for created in (a, b):
        err = await failure(api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"),
                                                      metadata=bearer(created.token)))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.info is not None
        assert err.info.reason == "INVALID_TOKEN"

    # Twice is fine and keeps the first revocation time.
    api.clock.advance(30)
    again = await stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=a.key.id))
    assert again.revoked_at == revoked.revoked_at
    # Revoked keys leave the default list, and are listed on request.
    names = {k.name for k in (await list_keys(api))[0]}
    assert "by-id" not in names and "by-name" not in names and "test-admin" in names
    names = {k.name for k in (await list_keys(api, include_revoked=True))[0]}
    assert {"by-id", "by-name"} <= names
    err = await failure(stub(api).RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id="nobody")))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_a_key_revoked_elsewhere_stops_within_the_cache_ttl(api: Api, database: Database) -> None:
    created = await create(api, name="elsewhere")
    await list_workflows(api, created.token)
    # Another replica revokes it: straight in the database, this server's cache knows nothing.
    async with database.write() as conn:
        await conn.execute(update(ApiKeyRow.__table__).where(ApiKeyRow.__table__.c.name == "elsewhere")
                           .values(revoked_at=api.clock.now()))
    # Within the cache's 5 seconds the cached key still answers (no database read per call)...
    api.clock.advance(4)
    await list_workflows(api, created.token)
    # ...and once they pass, it is refused.
    api.clock.advance(1.5)
    err = await stream_failure(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(),
                                                           metadata=bearer(created.token)))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_expired_key_is_unauthenticated(api: Api) -> None:
    created = await create(api, name="short", expires_at=stamp(api.clock.now() + timedelta(seconds=10)))
    assert created.key.HasField("expires_at")
    await list_workflows(api, created.token)
    api.clock.advance(9)
    await list_workflows(api, created.token)
    api.clock.advance(1)  # cached or not, the expiry is checked on every call
    err = await stream_failure(api.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(),
                                                           metadata=bearer(created.token)))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.info is not None
    assert err.info.reason == "INVALID_TOKEN"


@pytest.mark.parametrize("header", ["Bearer cvk_nope", "Bearer ", "Basic dXNlcjpwdw==", "cvk_x",
                                    "bearer whk_" + "a" * 43, "Bearer " + "x" * 5000])
async def test_bad_tokens_are_unauthenticated(api: Api, header: str) -> None:
    metadata = (("authorization", header),)
    err = await failure(api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"),
                                                  metadata=metadata))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.info is not None
    assert err.info.reason in ("INVALID_TOKEN", "MALFORMED_TOKEN")


# -- last use --------------------------------------------------------------------------------------

async def test_last_used_at_is_written_by_flush_not_per_request(api: Api, database: Database) -> None:
    created = await create(api, name="busy")
    await list_workflows(api, created.token)
    api.clock.advance(10)
    used_at = api.clock.now()
    for _ in range(3):
        await list_workflows(api, created.token)

    async def stored() -> Any:
        return next(r for r in await key_rows(database) if r["name"] == "busy")["last_used_at"]

    assert await stored() is None
    await api.engine.keys.flush_usage()
    assert await stored() is not None
    listed_key = next(k for k in (await list_keys(api))[0] if k.name == "busy")
    assert listed_key.last_used_at.ToDatetime().replace(tzinfo=None) == used_at.replace(tzinfo=None)
    # A flush never moves it backwards, and an idle key keeps its time.
    api.clock.advance(10)
    await api.engine.keys.flush_usage()
    listed_key = next(k for k in (await list_keys(api))[0] if k.name == "busy")
    assert listed_key.last_used_at.ToDatetime().replace(tzinfo=None) == used_at.replace(tzinfo=None)


# -- the first start's admin key ---------------------------------------------------------------------

async def test_bootstrap_creates_one_admin_then_none(engine: Engine, database: Database) -> None:
    token = await engine.keys.bootstrap()
    assert token is not None and token.startswith("cvk_")
    key_ = await engine.keys.resolve(token)
    assert key_ is not None and key_.name == "admin" and key_.project_id == "*" and key_.role.label == "admin"
    assert await engine.keys.bootstrap() is None
    rows = [(r["name"], r["role"], r["project_id"]) for r in await key_rows(database)]
    assert rows == [("admin", "admin", "*")]


async def test_concurrent_bootstraps_create_exactly_one_key(engine: Engine, database: Database) -> None:
    tokens = await asyncio.gather(*(engine.keys.bootstrap() for _ in range(4)))
    made = [t for t in tokens if t is not None]
    assert len(made) == 1
    rows = await key_rows(database)
    assert len(rows) == 1 and rows[0]["token_hash"] == hashlib.sha256(made[0].encode()).hexdigest()
