"""Anonymous traffic through the real server, on a rate clock the test moves: calls without a valid
key and webhook deliveries are limited per client address (RESOURCE_EXHAUSTED RATE_LIMITED with
retry-after), before the token costs a lookup; Envoy's x-forwarded-for counts only beside the
gateway secret, from loopback; a working key is never refused for its address's anonymous flood;
refusals are counted in conveyor_refused_requests_total, never one audit entry each; tokens that
name no key are remembered in a bounded cache that expires on the engine's clock; a token holding
anything but visible ASCII is MALFORMED_TOKEN and never quoted."""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from conveyor.api import access, server
from conveyor.api.clients import client_address
from conveyor.api.server import build_server
from conveyor.domain.errors import ConveyorError
from conveyor.engine import keys as keys_module
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.keys import Keys
from conveyor.settings import Settings
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import webhooks_service_pb2_grpc as hooks_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.api.support import decode, listed, two_steps
from tests.auth import TEST_ADMIN, bearer, key

SECRET = "gateway-secret-of-this-test"
Metadata = tuple[tuple[str, str], ...]


def via_envoy(address: str, secret: str = SECRET) -> Metadata:
    """What this server's Envoy adds to a call from `address` (after whatever the client sent)."""
    return (("x-forwarded-for", f"203.0.113.9, {address}"), ("x-conveyor-gateway", secret))


@dataclass
class Limited:
    """A server with anonymous_rate 3 and webhook_rate 2 whose limiter reads `now`."""

    engine: Engine
    channel: grpc.aio.Channel
    now: float = 1000.0

    def refused(self, reason: str) -> float:
        return self.engine.metrics.registry.get_sample_value(
            "conveyor_refused_requests_total", {"reason": reason}) or 0.0

    async def get(self, metadata: Metadata = ()) -> str:
        """The ErrorInfo reason of a GetWorkflow of a workflow that does not exist ("" if OK)."""
        stub = wf_grpc.WorkflowsServiceStub(self.channel)
        try:
            await stub.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id="x"), metadata=metadata)
        except grpc.aio.AioRpcError as e:
            err = decode(e)
            assert err.info is not None, e
            if err.info.reason == "RATE_LIMITED":
                assert dict(e.trailing_metadata() or ())["retry-after"] == "1"
            return err.info.reason
        return ""

    async def deliver(self, token: str, metadata: Metadata = ()) -> str:
        stub = hooks_grpc.WebhooksServiceStub(self.channel)
        try:
            await stub.DeliverWebhook(hooks_pb.DeliverWebhookRequest(token=token), metadata=metadata)
        except grpc.aio.AioRpcError as e:
            info = decode(e).info
            assert info is not None, e
            return info.reason
        return ""


@pytest.fixture
async def limited(engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Limited]:
    limited = Limited(engine, channel=None)  # type: ignore[arg-type]
    limiter = access.RateLimiter(now=lambda: limited.now)
    monkeypatch.setattr(server, "Gate", functools.partial(access.Gate, limiter=limiter))
    srv, port = await build_server(engine, dataclasses.replace(
        settings, anonymous_rate_limit=3, webhook_rate_limit=2, gateway_secret=SECRET))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            limited.channel = channel
            yield limited
    finally:
        await srv.stop(grace=None)


async def test_calls_without_a_valid_key_are_limited_per_address(limited: Limited) -> None:
    forged = bearer("cvk_" + secrets.token_urlsafe(32))
    assert [await limited.get(m) for m in ((), forged, (("authorization", "Basic x"),), ())] == [
        "MISSING_TOKEN", "INVALID_TOKEN", "MALFORMED_TOKEN", "RATE_LIMITED"]
    # Another client behind Envoy has its own bucket ...
    assert [await limited.get(via_envoy("198.51.100.7")) for _ in range(4)] == [
        "MISSING_TOKEN"] * 3 + ["RATE_LIMITED"]
    assert await limited.get(via_envoy("198.51.100.8")) == "MISSING_TOKEN"
    # ... but an x-forwarded-for without the gateway's secret (or with a wrong one) is the
    # client's own say-so: counted under the connection's address, already over its limit.
    for metadata in (via_envoy("198.51.100.9", secret=""), via_envoy("198.51.100.9", secret="guess"),
                     (("x-forwarded-for", "198.51.100.9"),)):
        assert await limited.get(metadata) == "RATE_LIMITED"
    # A second refills the burst, and never beyond it.
    limited.now += 60
    assert [await limited.get() for _ in range(4)] == ["MISSING_TOKEN"] * 3 + ["RATE_LIMITED"]
    assert limited.refused("RATE_LIMITED") == 5 + 1


async def test_a_working_key_is_never_refused_for_its_addresss_anonymous_flood(limited: Limited) -> None:
    token = await key(limited.engine, "busy", "*", "viewer")
    assert await limited.get() == "MISSING_TOKEN"
    # Not yet in the key cache: the lookup takes from the address's bucket, and gives it back.
    assert await limited.get(bearer(token)) == "WORKFLOW_NOT_FOUND"
    assert [await limited.get() for _ in range(3)] == ["MISSING_TOKEN"] * 2 + ["RATE_LIMITED"]
    # The address is over its limit; the key's calls go on.
    assert [await limited.get(bearer(token)) for _ in range(5)] == ["WORKFLOW_NOT_FOUND"] * 5


async def test_webhook_deliveries_are_limited_per_address(limited: Limited, api: Any) -> None:
    wf = await api.create_workflow(two_steps(project_id="acme"))
    rotated = await api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id))
    good = rotated.webhook_url.rsplit("/", 1)[-1]
    unknown = "whk_" + secrets.token_urlsafe(32)

    assert [await limited.deliver(t) for t in (unknown, good, unknown)] == [
        "WEBHOOK_NOT_FOUND", "", "RATE_LIMITED"]
    assert [await limited.deliver(unknown, via_envoy("2001:db8::1")) for _ in range(3)] == [
        "WEBHOOK_NOT_FOUND"] * 2 + ["RATE_LIMITED"]
    # An IPv6 client is counted by its /64: another address of the same network shares it.
    assert await limited.deliver(good, via_envoy("2001:db8::2")) == "RATE_LIMITED"
    assert await limited.deliver(good, via_envoy("2001:db8:0:1::2")) == ""
    assert limited.refused("WEBHOOK_NOT_FOUND") == 3


async def test_refusals_without_a_key_are_counted_not_audited(limited: Limited, api: Any) -> None:
    forged = bearer("cvk_" + secrets.token_urlsafe(32))
    for n in range(40):
        limited.now += 1  # under the limit: every call reaches the gate's verdict
        await limited.get(forged if n % 2 else ())
        await limited.deliver("whk_" + secrets.token_urlsafe(32))
    got, _ = await listed(audit_grpc.AuditServiceStub(api.channel).ListAuditEntries(
        audit_pb.ListAuditEntriesRequest(limit=1000)))
    assert got == []
    assert (limited.refused("MISSING_TOKEN"), limited.refused("INVALID_TOKEN"),
            limited.refused("WEBHOOK_NOT_FOUND")) == (20, 20, 40)


@pytest.mark.parametrize("value", [
    "Bearer cvk_secret\xff", "Bearer cvk_s\u00e9cret", "Bearer cvk_sec ret", "Bearer cvk_sec\tret",
    "Bearer cvk_\x7fsecret",
])
async def test_a_token_that_is_no_visible_ascii_is_malformed_and_never_quoted(
        limited: Limited, value: str, caplog: pytest.LogCaptureFixture) -> None:
    """What grpc hands over from a header that is not UTF-8 (decoded as Latin-1), and what no
    key ever holds. The gate refuses it before any lookup; nothing quotes it."""
    refusal = await failure_of(lambda: access.Gate(limited.engine, True, 0).admit(
        "/conveyor.v1.WorkflowsService/GetWorkflow", (("authorization", value),), "ipv4:127.0.0.1:1"))
    assert refusal.reason == "MALFORMED_TOKEN" and "secret" not in refusal.message
    assert "secret" not in caplog.text


async def failure_of(call: Callable[[], Awaitable[None]]) -> Any:
    try:
        await call()
    except ConveyorError as e:
        return e
    raise AssertionError("admitted")


def test_the_client_address_believes_envoy_only_with_its_secret_from_loopback() -> None:
    envoy = via_envoy("198.51.100.7")
    assert client_address(envoy, "ipv4:127.0.0.1:5000", SECRET) == "198.51.100.7"
    assert client_address(envoy, "ipv6:%5B::1%5D:5000", SECRET) == "198.51.100.7"
    # Not from loopback, no secret configured, or the wrong one: the connection's own address.
    assert client_address(envoy, "ipv4:192.0.2.5:5000", SECRET) == "192.0.2.5"
    assert client_address(envoy, "ipv4:127.0.0.1:5000", "") == "127.0.0.1"
    assert client_address(via_envoy("198.51.100.7", "nope"), "ipv4:127.0.0.1:5000", SECRET) == "127.0.0.1"
    # What Envoy appended is not an address: the connection's.
    bad = (("x-forwarded-for", "198.51.100.7, unknown"), ("x-conveyor-gateway", SECRET))
    assert client_address(bad, "ipv4:127.0.0.1:5000", SECRET) == "127.0.0.1"
    assert client_address((), "ipv6:%5B2001:db8::5%5D:1", "") == "2001:db8::/64"
    assert client_address((), "ipv6:%5B::ffff:192.0.2.1%5D:1", "") == "192.0.2.1"
    assert client_address((), "unix:/tmp/socket", "") == "unix:/tmp/socket"


async def test_unknown_tokens_are_remembered_in_a_bounded_cache_on_the_engines_clock(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_module, "UNKNOWN_ENTRIES", 50)
    clock = ManualClock()
    keys = Keys(engine.store, clock, cache_seconds=5.0)
    lookups = 0
    real_read = engine.store.read

    def counted_read() -> Any:
        nonlocal lookups
        lookups += 1
        return real_read()

    monkeypatch.setattr(engine.store, "read", counted_read)
    repeated = "cvk_" + secrets.token_urlsafe(32)
    assert [await keys.resolve(repeated) for _ in range(10)] == [None] * 10
    assert lookups == 1
    # Not a key's shape: no lookup at all.
    assert await keys.resolve("whk_" + secrets.token_urlsafe(32)) is None
    assert await keys.resolve("garbage") is None
    assert lookups == 1
    # A flood of random tokens: the cache stays at its bound, and a key still resolves.
    for _ in range(200):
        assert await keys.resolve("cvk_" + secrets.token_urlsafe(32)) is None
    assert len(keys._unknown) == 50
    _, token = await keys.create(TEST_ADMIN, "after-flood", "*", "viewer")
    assert (await keys.resolve(token)) is not None
    # Entries go stale on the engine's clock.
    lookups = 0
    flood_end = "cvk_" + secrets.token_urlsafe(32)
    await keys.resolve(flood_end)
    await keys.resolve(flood_end)
    assert lookups == 1
    clock.advance(5.0)
    await keys.resolve(flood_end)
    assert lookups == 2
