"""http steps (issue 6 item 3): the engine's own executor against a real HTTP server on 127.0.0.1
(allowed through `http_allow`, CONVEYOR_HTTP_ALLOW: loopback is denied by default), on a real
database with a ManualClock. Each test drives `engine.http.run_once()` (lease what is
ready, request, report) and ticks the engine; only the background-loop test runs the loop, and
only the timeout test waits out a (tiny) real timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from conveyor.domain.feed import run_key
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.http_steps import LEASE_MARGIN_SECONDS, HttpSteps
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_core import check_history
from tests.engine.test_engine import ME, events_of, noop, status, steps_of, trigger, wf

# -- a tiny HTTP/1.1 server --------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server read it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # False: no Content-Length, the body ends when the connection closes.
    length: bool = True


def json_reply(value: Any, status: int = 200, **headers: str) -> Reply:
    return Reply(status, {"Content-Type": "application/json", **headers}, json.dumps(value).encode())


Handler = Callable[[Seen], Awaitable[Reply | None]]


class Server:
    """Reads requests (keep-alive), records them, counts those in flight, and answers with
    `handler` (None: never answer). The default handler echoes the request as JSON."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrived = asyncio.Condition()
        self.handler: Handler = self.echo
        # Open connections, closed at exit (a handler that never answers waits for `_closed`).
        self._tasks: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @staticmethod
    async def echo(seen: Seen) -> Reply:
        return json_reply({"method": seen.method, "path": seen.path})

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closed.set()
        for writer in self._tasks.values():
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(predicate), 10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        try:
            while line := await reader.readline():
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    name, value = h.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, path, headers, body)
                async with self.arrived:
                    self.requests.append(seen)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    self.arrived.notify_all()
                try:
                    reply = await self.handler(seen)
                    if reply is None:
                        await self._closed.wait()  # never answers
                        return
                    head = [f"HTTP/1.1 {reply.status} X", *(f"{k}: {v}" for k, v in reply.headers.items())]
                    head.append(f"Content-Length: {len(reply.body)}" if reply.length else "Connection: close")
                    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
                    await writer.drain()
                finally:
                    async with self.arrived:
                        self.in_flight -= 1
                        self.arrived.notify_all()
                if not reply.length:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            del self._tasks[task]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as s:
        yield s


# The test server's address, allowed (loopback is denied unless allowed).
LOCAL = Settings(http_allow=("127.0.0.1",))


@pytest.fixture
async def make_engine(database: Database, clock: ManualClock) -> AsyncIterator[Callable[..., Engine]]:
    """Engines with these Settings fields over the test database (the test server's address
    allowed unless `http_allow` says otherwise); stopped after the test."""
    made: list[Engine] = []

    def make(**settings: Any) -> Engine:
        settings.setdefault("http_allow", LOCAL.http_allow)
        made.append(Engine(SqlStore(database), Settings(db_url=str(database.url), **settings), clock))
        return made[-1]

    yield make
    for e in made:
        await e.stop()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    """The engine of these tests: default settings but for the test server's address allowed."""
    return make_engine()


def http(ref: str, config: dict[str, Any], *deps: str, attempts: int = 1, **extra: Any) -> dict[str, Any]:
    return {"ref": ref, "kind": "http", "depends_on": list(deps), "config": config,
            "retry": {"max_attempts": attempts, "initial_interval_seconds": 1}, **extra}


async def one_http_run(engine: Engine, config: dict[str, Any], attempts: int = 1,
                       payload: dict[str, Any] | None = None, **extra: Any) -> str:
    await engine.workflows.create(wf("call", [http("call", config, attempts=attempts, **extra)]), ME)
    return await trigger(engine, "call", payload=payload or {})


async def step_of(engine: Engine, run_id: str, ref: str = "call") -> Any:
    return (await steps_of(engine, run_id))[ref]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- requests and outputs ----------------------------------------------------------------------

async def test_templated_request_reaches_the_server_and_a_2xx_is_the_output(
        engine: Engine, server: Server) -> None:
    async def created(seen: Seen) -> Reply:
        return json_reply({"id": 7, "ok": True}, 201, **{"X-Reply": "yes"})
    server.handler = created
    run_id = await one_http_run(engine, {
        "method": "{{ payload.method }}",
        "url": server.url("/items/") + "{{ payload.item }}",
        "headers": {"X-Token": "{{ payload.token }}", "X-Count": "{{ payload.count }}"},
        "body": {"name": "{{ payload.name }}", "tags": ["a", "{{ payload.item }}"]},
    }, payload={"method": "PUT", "item": "42", "token": "s3cret", "count": 3, "name": "widget"})

    assert await engine.http.run_once() == 1

    (seen,) = server.requests
    assert (seen.method, seen.path) == ("PUT", "/items/42")
    assert seen.headers["x-token"] == "s3cret" and seen.headers["x-count"] == "3"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"name": "widget", "tags": ["a", "42"]}
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.COMPLETED and step.attempt == 1
    assert step.worker_id == engine.http.holder and step.worker_id.startswith("engine:http:")
    assert step.output == {"status": 201, "headers": {"x-reply": "yes", "content-type": "application/json",
                                                      "content-length": str(len(b'{"id": 7, "ok": true}'))},
                           "body": {"id": 7, "ok": True}}
    assert await status(engine, run_id) == RunStatus.COMPLETED
    await check_history(engine, run_id)


async def test_a_string_body_is_sent_as_text_and_a_non_json_response_is_text(
        engine: Engine, server: Server) -> None:
    async def text(seen: Seen) -> Reply:
        return Reply(200, {"Content-Type": "text/plain; charset=utf-8"}, b"got: " + seen.body)
    server.handler = text
    run_id = await one_http_run(engine, {"method": "POST", "url": server.url("/t"),
                                         "body": "hello {{ payload.who }}"}, payload={"who": "you"})
    assert await engine.http.run_once() == 1
    assert server.requests[0].body == b"hello you"
    assert (await step_of(engine, run_id)).output["body"] == "got: hello you"


async def test_the_http_output_feeds_the_next_steps_template(engine: Engine, server: Server) -> None:
    async def value(seen: Seen) -> Reply:
        return json_reply({"value": "from-server"})
    server.handler = value
    await engine.workflows.create(wf("chain", [
        noop("before", output={"path": "/x"}),
        http("call", {"url": server.url("") + "{{ steps.before.output.path }}"}, "before"),
        noop("after", "call", output={"got": "{{ steps.call.output.body.value }}",
                                      "status": "{{ steps.call.output.status }}"})]), ME)
    run_id = await trigger(engine, "chain")
    assert (await step_of(engine, run_id)).status == StepStatus.QUEUED  # waits for the executor

    assert await engine.http.run_once() == 1

    assert server.requests[0].path == "/x"
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.COMPLETED
    assert run.output is not None and run.output["after"] == {"got": "from-server", "status": 200}
    await check_history(engine, run_id)


# -- failures and retries ----------------------------------------------------------------------

async def test_a_500_then_a_200_completes_on_attempt_2_with_an_event_per_attempt(
        engine: Engine, server: Server, clock: ManualClock) -> None:
    async def flaky(seen: Seen) -> Reply:
        if len(server.requests) == 1:
            return Reply(500, {"Content-Type": "text/plain"}, b"database\n  on fire")
        return json_reply({"ok": True})
    server.handler = flaky
    run_id = await one_http_run(engine, {"url": server.url()}, attempts=2)

    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.QUEUED and step.error == "HTTP 500: database on fire"
    assert await engine.http.run_once() == 0  # backing off for 1 s
    clock.advance(1)
    assert await engine.http.run_once() == 1

    step = await step_of(engine, run_id)
    assert step.status == StepStatus.COMPLETED and step.attempt == 2 and step.output["body"] == {"ok": True}
    assert len(server.requests) == 2
    events = [(e.type, (e.data or {}).get("attempt")) for e in await events_of(engine, run_id)
              if e.step_ref == "call"]
    assert events == [("step.queued", None), ("step.running", 1), ("step.queued", 1),
                      ("step.running", 2), ("step.completed", 2)]
    await check_history(engine, run_id)


async def test_a_500_without_retries_fails_the_step_and_the_run(engine: Engine, server: Server) -> None:
    async def broken(seen: Seen) -> Reply:
        return Reply(503, {}, b"x" * 1000)
    server.handler = broken
    run_id = await one_http_run(engine, {"url": server.url()})
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and step.error == "HTTP 503: " + "x" * 200
    assert await status(engine, run_id) == RunStatus.FAILED
    await check_history(engine, run_id)


async def test_retry_after_of_a_503_delays_the_next_attempt(
        engine: Engine, server: Server, clock: ManualClock) -> None:
    async def busy(seen: Seen) -> Reply:
        return Reply(503, {"Retry-After": "5"}) if len(server.requests) == 1 else json_reply({})
    server.handler = busy
    run_id = await one_http_run(engine, {"url": server.url()}, attempts=2)
    assert await engine.http.run_once() == 1
    clock.advance(1)  # the policy's backoff is over, the server's 5 s are not
    assert await engine.http.run_once() == 0
    clock.advance(4)
    assert await engine.http.run_once() == 1
    assert (await step_of(engine, run_id)).status == StepStatus.COMPLETED


async def test_connection_refused_is_a_retryable_failure(engine: Engine) -> None:
    run_id = await one_http_run(engine, {"url": f"http://127.0.0.1:{free_port()}/"}, attempts=2)
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.QUEUED and step.error.startswith("ConnectError: ")
    assert "Traceback" not in step.error


async def test_a_request_that_outlasts_its_timeout_fails_the_attempt(engine: Engine, server: Server) -> None:
    async def silent(seen: Seen) -> None:
        return None
    server.handler = silent
    run_id = await one_http_run(engine, {"url": server.url(), "timeout_seconds": 0.2}, attempts=2)
    assert await engine.http.run_once() == 1  # returns after the 0.2 s timeout, not the server
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.QUEUED and step.error.endswith("no response within 0.2s")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
async def test_a_body_over_the_cap_fails_the_step_without_retries(
        make_engine: Callable[..., Engine], server: Server, declared: bool) -> None:
    engine = make_engine(http_max_body_bytes=1000)

    async def big(seen: Seen) -> Reply:
        return Reply(200, {"Content-Type": "text/plain"}, b"y" * 5000, length=declared)
    server.handler = big
    run_id = await one_http_run(engine, {"url": server.url()}, attempts=3)
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and step.attempt == 1
    assert step.error.startswith("RESPONSE_TOO_LARGE: the response body exceeds 1000 bytes")
    assert await status(engine, run_id) == RunStatus.FAILED


async def test_a_config_that_renders_to_nonsense_fails_without_retries(engine: Engine,
                                                                       server: Server) -> None:
    run_id = await one_http_run(engine, {"method": "{{ payload.m }}", "url": server.url()}, attempts=3,
                                payload={"m": "FETCH"})
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and step.error.startswith("config: method must be one of")
    assert server.requests == []


async def test_a_timeout_longer_than_the_default_extends_the_lease_before_the_request(
        engine: Engine, server: Server, clock: ManualClock) -> None:
    release = asyncio.Event()

    async def held(seen: Seen) -> Reply:
        await release.wait()
        return json_reply({})
    server.handler = held
    run_id = await one_http_run(engine, {"url": server.url(), "timeout_seconds": 100})
    started = clock.now()
    once = asyncio.create_task(engine.http.run_once())
    await server.wait_for(lambda: len(server.requests) == 1)
    step = await step_of(engine, run_id)
    assert (step.lease_expires_at - started).total_seconds() == 100 + LEASE_MARGIN_SECONDS
    release.set()
    assert await once == 1
    assert (await step_of(engine, run_id)).status == StepStatus.COMPLETED


# -- egress ------------------------------------------------------------------------------------

async def test_the_metadata_address_is_refused_without_retries(engine: Engine) -> None:
    run_id = await one_http_run(engine, {"url": "http://169.254.169.254/latest/meta-data/"}, attempts=3)
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and step.attempt == 1
    assert step.error == ("EGRESS_DENIED: 169.254.169.254 is link-local, cloud metadata (169.254.0.0/16), "
                          "not allowed by CONVEYOR_HTTP_ALLOW")


async def test_loopback_is_refused_unless_allowed_and_only_on_the_allowed_port(
        make_engine: Callable[..., Engine], server: Server) -> None:
    await make_engine().workflows.create(wf("call", [http("call", {"url": server.url()}, attempts=3)]), ME)
    for allow in [(), (f"127.0.0.1:{server.port + 1}",), ("10.0.0.0/8", "localhost")]:
        engine = make_engine(http_allow=allow)
        run_id = await trigger(engine, "call")
        assert await engine.http.run_once() == 1
        step = await step_of(engine, run_id)
        assert step.status == StepStatus.FAILED and step.attempt == 1
        assert step.error == ("EGRESS_DENIED: 127.0.0.1 is loopback (127.0.0.0/8), "
                              "not allowed by CONVEYOR_HTTP_ALLOW")
    assert server.requests == []
    engine = make_engine(http_allow=(f"127.0.0.1:{server.port}",))
    run_id = await trigger(engine, "call")
    assert await engine.http.run_once() == 1
    assert (await step_of(engine, run_id)).status == StepStatus.COMPLETED
    assert len(server.requests) == 1


async def test_an_allowed_host_name_is_reached_through_whichever_address_answers(
        make_engine: Callable[..., Engine], server: Server) -> None:
    # localhost may resolve to ::1 first; the server listens on 127.0.0.1 only.
    engine = make_engine(http_allow=("localhost",))
    run_id = await one_http_run(engine, {"url": f"http://localhost:{server.port}/hi"})
    assert await engine.http.run_once() == 1
    assert (await step_of(engine, run_id)).status == StepStatus.COMPLETED
    assert server.requests[0].headers["host"] == f"localhost:{server.port}"


async def test_a_name_that_resolves_to_a_denied_network_is_refused(
        make_engine: Callable[..., Engine], server: Server) -> None:
    engine = make_engine(http_allow=())
    run_id = await one_http_run(engine, {"url": f"http://localhost:{server.port}/"}, attempts=3)
    assert await engine.http.run_once() == 1
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.FAILED and step.error.startswith("EGRESS_DENIED: localhost resolves to")
    assert server.requests == []


async def test_the_connection_goes_to_the_vetted_address_and_any_denied_answer_refuses(
        engine: Engine, server: Server) -> None:
    answers = {"app.test": ["127.0.0.1"], "rebind.test": ["127.0.0.1", "169.254.169.254"]}
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[host]
    executor = HttpSteps(engine.leases, engine.runner.keyed, LOCAL, resolver=resolver)
    try:
        await engine.workflows.create(wf("two", [
            http("ok", {"url": f"http://app.test:{server.port}/"}),
            http("bad", {"url": f"http://rebind.test:{server.port}/"}, "ok")]), ME)
        run_id = await trigger(engine, "two")
        assert await executor.run_once() == 1
        assert await executor.run_once() == 1
    finally:
        await executor.stop()
    steps = await steps_of(engine, run_id)
    assert steps["ok"].status == StepStatus.COMPLETED
    assert steps["bad"].error.startswith("EGRESS_DENIED: rebind.test resolves to 169.254.169.254")
    # One lookup per connection, and the request carried the name, not the address.
    assert lookups == ["app.test", "rebind.test"]
    assert [r.headers["host"] for r in server.requests] == [f"app.test:{server.port}"]


# -- concurrency and the loop ------------------------------------------------------------------

async def test_one_round_leases_no_more_than_the_concurrency_cap(
        make_engine: Callable[..., Engine], server: Server) -> None:
    engine = make_engine(http_max_concurrency=3)
    gate = {"expect": 3}

    async def together(seen: Seen) -> Reply:
        # Held until every request of the round is in flight, so the round's concurrency shows.
        await server.wait_for(lambda: server.in_flight >= gate["expect"])
        return json_reply({})
    server.handler = together
    await engine.workflows.create(wf("call", [http("call", {"url": server.url()})]), ME)
    runs = [await trigger(engine, "call") for _ in range(7)]

    rounds = []
    for expect in (3, 3, 1):
        gate["expect"] = expect
        rounds.append(await engine.http.run_once())
    assert rounds == [3, 3, 1] and await engine.http.run_once() == 0
    assert server.max_in_flight == 3
    assert all([await status(engine, r) == RunStatus.COMPLETED for r in runs])


async def test_the_background_loop_runs_steps_as_they_become_ready_within_the_cap(
        make_engine: Callable[..., Engine], server: Server) -> None:
    engine = make_engine(http_max_concurrency=3)
    total = 7

    async def held(seen: Seen) -> Reply:
        # Each request waits for a full set of 3 in flight (or the last stragglers), so the
        # loop must keep the cap filled, and may never exceed it.
        await server.wait_for(lambda: server.in_flight >= 3 or len(server.requests) == total)
        return json_reply({"n": len(server.requests)})
    server.handler = held
    await engine.workflows.create(wf("call", [http("call", {"url": server.url()})]), ME)
    engine.http.start()
    runs = [await trigger(engine, "call") for _ in range(total)]  # each commit wakes the loop

    async with asyncio.timeout(10):
        while True:
            committed = engine.runner.keyed.next_any([run_key(r) for r in runs])
            if all([await status(engine, r) == RunStatus.COMPLETED for r in runs]):
                break
            await committed.wait()
    assert len(server.requests) == total and server.max_in_flight == 3


# -- at-least-once -----------------------------------------------------------------------------

async def test_a_server_stop_mid_request_gives_the_attempt_back_as_lost(
        engine: Engine, server: Server, make_engine: Callable[..., Engine]) -> None:
    server.handler = _hang_first(server)
    run_id = await one_http_run(engine, {"url": server.url()})  # max_attempts 1
    stopping = make_engine()  # a replica whose executor runs in the background, then stops
    stopping.http.start()
    await server.wait_for(lambda: len(server.requests) == 1)

    await stopping.http.stop()

    step = await step_of(engine, run_id)
    assert step.status == StepStatus.QUEUED and step.attempt == 1
    assert step.error.endswith(f"lost: released by {stopping.http.holder!r}: server stopping")
    (lost,) = [e for e in await events_of(engine, run_id) if e.data and "lost" in e.data]
    assert lost.data["attempt"] == 1
    assert await engine.http.run_once() == 1  # offered again at once: no clock moved
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.COMPLETED and step.attempt == 2
    assert len(server.requests) == 2
    assert await status(engine, run_id) == RunStatus.COMPLETED
    await check_history(engine, run_id)


def _hang_first(server: Server) -> Handler:
    """A handler that never answers the first request and answers every later one."""
    async def hang_first(seen: Seen) -> Reply | None:
        return None if len(server.requests) == 1 else json_reply({"ok": True})
    return hang_first


async def test_a_crash_mid_request_runs_the_step_again_once_its_lease_expires(
        engine: Engine, server: Server, clock: ManualClock) -> None:
    server.handler = _hang_first(server)
    run_id = await one_http_run(engine, {"url": server.url()})  # max_attempts 1

    # A second executor (a process of its own) leases the step and dies mid-request: it never
    # reports anything.
    doomed = HttpSteps(engine.leases, engine.runner.keyed, LOCAL)
    dying = asyncio.create_task(doomed.run_once())
    await server.wait_for(lambda: len(server.requests) == 1)
    dying.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dying
    await doomed.stop()
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.RUNNING and step.attempt == 1
    assert await engine.http.run_once() == 0  # still leased: nobody else takes it

    clock.advance(Settings().http_default_timeout_seconds + LEASE_MARGIN_SECONDS)
    await engine.tick()  # the expired lease is a lost attempt (no verdict), offered again at once
    step = await step_of(engine, run_id)
    assert step.status == StepStatus.QUEUED and "lost" in step.error and "expired" in step.error
    assert await engine.http.run_once() == 1

    step = await step_of(engine, run_id)
    assert step.status == StepStatus.COMPLETED and step.attempt == 2
    assert len(server.requests) == 2
    assert [e.type for e in await events_of(engine, run_id)].count("step.completed") == 1
    assert await status(engine, run_id) == RunStatus.COMPLETED
    await check_history(engine, run_id)
