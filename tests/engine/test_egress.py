"""Egress through the engine's two clients (issue 16 items 1, 2 and 7): http steps and notification
deliveries make every connection through the one check (engine/egress.py over domain/egress.py).

- Property: generated spellings of denied addresses (tests/spellings.py), as literals and as
  names a fake resolver answers with, are refused by both executors BEFORE any connection (the
  connector's connect is replaced by one that records what it is asked to reach); public
  addresses pass and are connected to as exactly the vetted address.
- On a real database: the issue's spellings (`127。0。0。1`, fullwidth digits) against a real
  listener are refused by default with nothing arriving, and reach it through `http_allow`;
  redirects are not followed; a URL a template renders malformed fails its attempt at once,
  without retries, instead of stranding the lease.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohappyeyeballs
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.domain.egress import destination
from conveyor.domain.notifications import OutboxEntry
from conveyor.domain.states import StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.http_steps import HttpSteps, _Request
from conveyor.engine.notify import Notifier
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_engine import ME, events_of, noop, steps_of, trigger, wf
from tests.spellings import IPAddress, denied_urls, denied_v4, denied_v6, public_urls, public_v4

# -- both executors, generated destinations, no connection ------------------------------------


class Connections:
    """Stands in for the connector's connect: records every address it is asked to reach and
    refuses, so nothing leaves the machine and a test sees exactly where a request would go."""

    def __init__(self) -> None:
        self.tried: list[list[tuple[str, int]]] = []

    async def start_connection(self, addr_infos: Any, **_: Any) -> Any:
        self.tried.append([(str(info[4][0]), int(info[4][1])) for info in addr_infos])
        raise OSError(errno.ECONNREFUSED, "refused by the test")


class Executors:
    """An HttpSteps and a Notifier as the engine builds them (default settings: nothing special
    allowed), with a fake resolver; their request paths are driven directly, no database."""

    def __init__(self, tmp_path: Path) -> None:
        self.answers: dict[str, list[str]] = {}
        self.lookups: list[str] = []
        settings = Settings(db_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", notify_secret="s")
        self.engine = Engine(SqlStore(Database(settings.db_url)), settings, ManualClock())
        self.http = HttpSteps(self.engine.leases, self.engine.runner.keyed, settings, resolver=self.resolve)
        self.notifier = Notifier(self.engine.store, self.engine.clock, self.engine.runner, settings,
                                 resolver=self.resolve)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers[host]

    async def attempt(self, url: str) -> tuple[str, str]:
        """The error of an http step's attempt and of a delivery to `url` ("" if it went out)."""
        step = await self.http._perform(_Request("GET", destination(url, 2048), {}, None, 5.0))
        entry = OutboxEntry(id="r/1/0", run_id="r", project_id="p", url=url, event_type="run.completed",
                            event_seq=1, body={}, created_at=datetime(2026, 3, 1, tzinfo=UTC))
        delivery = await self.notifier._post(entry)
        return step.error, ("" if delivery.ok else delivery.detail)

    async def close(self) -> None:
        await self.http.stop()
        await self.notifier.stop()
        await self.engine.stop()


def run_property(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 check: Callable[[asyncio.Runner, Executors, Connections], None]) -> None:
    connections = Connections()
    monkeypatch.setattr(aiohappyeyeballs, "start_connection", connections.start_connection)
    with asyncio.Runner() as runner:
        executors = Executors(tmp_path)
        try:
            check(runner, executors, connections)
        finally:
            runner.run(executors.close())


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_spelling_of_a_denied_address_is_refused_by_both_before_any_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(runner: asyncio.Runner, executors: Executors, connections: Connections) -> None:
        @PROPERTY
        @given(denied_urls())
        def refused(drawn: tuple[str, IPAddress]) -> None:
            url, _ = drawn
            for error in runner.run(executors.attempt(url)):
                assert error.startswith("EGRESS_DENIED: ") and error.endswith(
                    "not allowed by CONVEYOR_HTTP_ALLOW"), (url, error)
            assert connections.tried == [] and executors.lookups == [], url
        refused()
    run_property(tmp_path, monkeypatch, check)


def test_a_name_resolving_to_any_denied_address_is_refused_by_both_before_any_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(runner: asyncio.Runner, executors: Executors, connections: Connections) -> None:
        @PROPERTY
        @given(st.one_of(denied_v4, denied_v6), st.lists(public_v4, max_size=2), st.randoms())
        def refused(denied: IPAddress, public: list[ipaddress.IPv4Address], rng: Any) -> None:
            answer = [str(a) for a in public] + [str(denied)]
            rng.shuffle(answer)
            executors.answers["api.rebind.test"] = answer
            for error in runner.run(executors.attempt("https://API.rebind.test./hook")):
                assert error.startswith(f"EGRESS_DENIED: api.rebind.test resolves to {denied}, "), error
            assert connections.tried == []
        refused()
    run_property(tmp_path, monkeypatch, check)


def test_public_addresses_pass_both_and_are_connected_to_as_vetted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(runner: asyncio.Runner, executors: Executors, connections: Connections) -> None:
        @PROPERTY
        @given(public_urls(), public_v4)
        def passes(drawn: tuple[str, IPAddress], resolved: ipaddress.IPv4Address) -> None:
            url, ip = drawn
            port = destination(url, 2048).port
            connections.tried.clear()
            for error in runner.run(executors.attempt(url)):
                assert error.startswith("ConnectError") or "refused by the test" in error, (url, error)
            assert connections.tried == [[(str(ip), port)]] * 2, url  # the literal, as parsed
            # A name: resolved once per connection, connected to as exactly what was vetted.
            executors.answers["api.example.test"] = [str(resolved)]
            executors.lookups.clear()
            connections.tried.clear()
            runner.run(executors.attempt("http://api.example.test:8080/"))
            assert executors.lookups == ["api.example.test"] * 2
            assert connections.tried == [[(str(resolved), 8080)]] * 2
        passes()
    run_property(tmp_path, monkeypatch, check)


def test_a_stored_target_that_is_no_url_is_given_up_at_once(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows written before targets were checked this strictly may hold anything.
    def check(runner: asyncio.Runner, executors: Executors, connections: Connections) -> None:
        entry = OutboxEntry(id="r/1/0", run_id="r", project_id="p", url="http://[::1",
                            event_type="run.failed", event_seq=1, body={},
                            created_at=datetime(2026, 3, 1, tzinfo=UTC))
        outcome = runner.run(executors.notifier._post(entry))
        assert (outcome.ok, outcome.retryable) == (False, False)
        assert outcome.detail == "INVALID_URL: the url is not a valid URL"
        assert connections.tried == []
    run_property(tmp_path, monkeypatch, check)


# -- on a real database, against a real listener --------------------------------------------


class Listener:
    """An HTTP endpoint on 127.0.0.1 that records every request (`/moved` answers a redirect to
    `elsewhere`)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []  # (path, Host header)
        self.port = 0
        self.elsewhere = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.append((request.path, request.headers.get("Host", "")))
        if request.path == "/moved":
            raise web.HTTPFound(self.elsewhere)
        return web.json_response({"ok": True})


@pytest.fixture
async def listeners() -> AsyncIterator[list[Listener]]:
    """Two listeners: the second is where the first's redirects point."""
    made: list[Listener] = []
    runners: list[web.AppRunner] = []
    for _ in range(2):
        listener = Listener()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", listener.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        listener.port = runner.addresses[0][1]
        made.append(listener)
        runners.append(runner)
    made[0].elsewhere = f"http://127.0.0.1:{made[1].port}/landed"
    try:
        yield made
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def make_engine(database: Database, clock: ManualClock) -> AsyncIterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(**settings: Any) -> Engine:
        made.append(Engine(SqlStore(database), Settings(db_url=str(database.url), notify_secret="s",
                                                        notify_max_attempts=3, **settings), clock))
        return made[-1]

    yield make
    for engine in made:
        await engine.stop()


def http(ref: str, url: str, attempts: int = 3) -> dict[str, Any]:
    return {"ref": ref, "kind": "http", "config": {"url": url},
            "retry": {"max_attempts": attempts, "initial_interval_seconds": 1}}


def spelled(port: int, path: str) -> list[str]:
    """127.0.0.1:port/path as the issue spelled it: ideographic full stops, fullwidth digits."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "127") + "\uff0e\uff10\uff61\uff10\u3002\uff11"
    return [f"http://127\u30020\u30020\u30021:{port}{path}", f"http://{fullwidth}:{port}{path}"]


async def deliveries(engine: Engine, run_id: str) -> list[tuple[str, str]]:
    return [(e.type, (e.data or {}).get("error", "")) for e in await events_of(engine, run_id)
            if e.type.startswith("notification.")]


async def test_the_issues_spellings_reach_nothing_by_default_and_the_listener_when_allowed(
        make_engine: Callable[..., Engine], listeners: list[Listener]) -> None:
    listener = listeners[0]
    urls = spelled(listener.port, "/call")
    hooks = spelled(listener.port, "/hook")
    targets = [{"url": hook, "events": ["run.failed", "run.completed"]} for hook in hooks]
    definition = wf("probe", [http("a", urls[0]), http("b", urls[1]), noop("c")], notifications=targets)
    denied = make_engine()
    await denied.workflows.create(definition, ME)
    run_id = await trigger(denied, "probe")
    assert await denied.http.run_once() == 2
    await denied.tick()
    assert await denied.notifier.run_once() == 2

    steps = await steps_of(denied, run_id)
    message = "EGRESS_DENIED: 127.0.0.1 is loopback (127.0.0.0/8), not allowed by CONVEYOR_HTTP_ALLOW"
    for ref in ("a", "b"):  # refused for good at once: retries cannot change the policy
        assert (steps[ref].status, steps[ref].attempt, steps[ref].error) == (StepStatus.FAILED, 1, message)
    assert await deliveries(denied, run_id) == [("notification.abandoned", message)] * 2
    assert listener.got == []

    allowed = make_engine(http_allow=(f"127.0.0.1:{listener.port}",))
    run_id = await trigger(allowed, "probe")
    assert await allowed.http.run_once() == 2
    await allowed.tick()
    assert await allowed.notifier.run_once() == 2
    steps = await steps_of(allowed, run_id)
    assert steps["a"].status == steps["b"].status == StepStatus.COMPLETED
    assert await deliveries(allowed, run_id) == [("notification.delivered", "")] * 2
    # The requests went to the address the check read, and name it as their host.
    assert sorted(listener.got) == sorted([("/call", f"127.0.0.1:{listener.port}")] * 2
                                          + [("/hook", f"127.0.0.1:{listener.port}")] * 2)


async def test_redirects_are_not_followed_by_either(make_engine: Callable[..., Engine],
                                                    listeners: list[Listener]) -> None:
    first, second = listeners
    engine = make_engine(http_allow=("127.0.0.1",))  # both listeners allowed: only the policy of
    moved = f"http://127.0.0.1:{first.port}/moved"   # redirects keeps the second one unreached
    await engine.workflows.create(wf("moved", [http("a", moved, attempts=1)], notifications=[
        {"url": moved, "events": ["run.failed"]}]), ME)
    run_id = await trigger(engine, "moved")
    assert await engine.http.run_once() == 1
    await engine.tick()
    assert await engine.notifier.run_once() == 1
    step = (await steps_of(engine, run_id))["a"]
    assert step.status == StepStatus.FAILED
    assert step.error == f"HTTP 302: redirects are not followed (location: {first.elsewhere})"
    (outcome,) = await deliveries(engine, run_id)
    assert outcome == ("notification.failed", "HTTP 302")
    assert [path for path, _ in first.got] == ["/moved", "/moved"] and second.got == []


@pytest.mark.parametrize(("rendered", "problem"), [
    ("http://[::1", "is not a valid URL"),
    ("http://", "must be an absolute http or https URL"),
    ("ftp://x", "must be an absolute http or https URL"),
    ("http://a b", "must not contain spaces or control characters"),
    ("http://x:99999/", "has an invalid port (1-65535)"),
    ("http://127.0.0.999/", "has an invalid IPv4 address"),
    ("http://x/" + "a" * 2100, "is 2109 characters; at most 2048 are allowed"),
])
async def test_a_url_a_template_renders_malformed_fails_the_attempt_at_once(
        make_engine: Callable[..., Engine], rendered: str, problem: str) -> None:
    engine = make_engine()
    await engine.workflows.create(wf("t", [http("a", "{{ payload.url }}")]), ME)  # 3 attempts
    run_id = await trigger(engine, "t", payload={"url": rendered})
    assert await engine.http.run_once() == 1
    step = (await steps_of(engine, run_id))["a"]
    # Failed at once and for good (the same render fails every attempt); no lease left to expire.
    assert (step.status, step.attempt, step.error) == (StepStatus.FAILED, 1, f"config: url {problem}")
    assert step.lease_expires_at is None
    assert rendered not in step.error
