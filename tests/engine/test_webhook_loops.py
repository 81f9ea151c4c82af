"""Loops through webhooks end (issue 16 finding 3): a notification to one of this server's own
webhook URLs is delivered here with its run's family, and a workflow its family reached before is
refused WORKFLOW_LOOP, a family deeper than the cap NESTING_TOO_DEEP, each the notification's
outcome event; over HTTP the family travels in a signed X-Conveyor-Lineage header, and a Conveyor
webhook's refusal in the response is given up at once. Driven with `notifier.run_once()` and
`tick()` on a ManualClock against a real database and a real aiohttp receiver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.families import LINEAGE_HEADER, Cause, cause_of, sign_cause, verified_cause
from conveyor.domain.records import RunQuery
from conveyor.domain.states import RunStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.storage.db import Database
from tests.engine.test_engine import ME, events_of, noop, trigger, wf
from tests.engine.test_notify import SECRET, make_engine

OWN = "http://127.0.0.1:8080"  # Settings' default REST address: the engine's own
NOTIFIED = "notification."
COMPLETED = "run.completed"


async def hooked(engine: Engine, name: str) -> str:
    """Create workflow `name` (one noop step) with its webhook on; returns its webhook URL."""
    await engine.workflows.create(wf(name, [noop("a")]), ME)
    _, token = await engine.workflows.rotate_webhook(name, "", ME)
    return f"{OWN}/v1/webhooks/{token}"


async def notify(engine: Engine, name: str, *urls: str) -> None:
    """Give workflow `name` a target per URL, each told of its completion (and, to keep targets
    at one URL distinct, of more events after the first)."""
    more = ["run.failed", "run.canceled", "run.timed_out"]
    targets = [{"url": url, "events": ["run.completed", *more[:i]]} for i, url in enumerate(urls)]
    await engine.workflows.update(name, wf(name, [noop("a")], notifications=targets), ME)


async def runs_of(engine: Engine, name: str) -> list[Any]:
    wf_id = (await engine.workflows.get(name, "", ME)).id
    page = await engine.runs.list(RunQuery(workflow_ids=[wf_id]), 100, "", ME)
    return page.items


async def outcomes(engine: Engine, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.type, e.data) for e in await events_of(engine, run_id) if e.type.startswith(NOTIFIED)]


async def settle(engine: Engine) -> int:
    """Advance runs and deliver notifications until nothing is left; returns deliveries made."""
    made = 0
    for _ in range(20):
        await engine.tick()
        n = await engine.notifier.run_once()
        if n == 0:
            return made
        made += n
    raise AssertionError("notifications kept coming")


async def test_a_workflow_notifying_its_own_webhook_is_refused_as_a_loop(eng: Engine) -> None:
    url = await hooked(eng, "self")
    await notify(eng, "self", url)
    run_id = await trigger(eng, "self")

    assert await settle(eng) == 1

    assert [r.id for r in await runs_of(eng, "self")] == [run_id]
    ((type_, data),) = await outcomes(eng, run_id)
    assert type_ == "notification.abandoned" and data["attempt"] == 1 and data["url"] == url
    assert data["error"].startswith("WORKFLOW_LOOP: workflow 'self' would start itself")
    assert "status_code" not in data and "started_run_id" not in data  # delivered here, not over HTTP


async def test_two_targets_at_its_own_webhook_end_too(eng: Engine) -> None:
    url = await hooked(eng, "twice")
    await notify(eng, "twice", url, url)
    run_id = await trigger(eng, "twice")

    assert await settle(eng) == 2

    assert len(await runs_of(eng, "twice")) == 1
    got = await outcomes(eng, run_id)
    assert [t for t, _ in got] == ["notification.abandoned"] * 2
    assert all(d["error"].startswith("WORKFLOW_LOOP: ") for _, d in got)


async def test_two_workflows_at_each_others_webhooks_start_one_run_each(eng: Engine) -> None:
    ping, pong = await hooked(eng, "ping"), await hooked(eng, "pong")
    await notify(eng, "ping", pong)
    await notify(eng, "pong", ping)
    first = await trigger(eng, "ping")

    assert await settle(eng) == 2

    (started,) = await runs_of(eng, "pong")
    assert [r.id for r in await runs_of(eng, "ping")] == [first]
    ((type_, data),) = await outcomes(eng, first)
    assert type_ == "notification.delivered" and data["started_run_id"] == started.id
    assert started.triggered_by == "webhook" and started.status == RunStatus.COMPLETED
    ping_id = (await eng.workflows.get("ping", "", ME)).id
    assert started.lineage == [ping_id, started.workflow_id] and started.depth == 1
    assert started.root_run_id == ""  # its own family for retention
    opened = (await events_of(eng, started.id))[0]
    assert opened.data["caused_by_run_id"] == first and first in opened.message
    ((type_, data),) = await outcomes(eng, started.id)
    assert type_ == "notification.abandoned" and data["error"].startswith(
        f"WORKFLOW_LOOP: workflow 'ping' would start itself (through run {started.id})")


async def test_a_chain_of_notifications_is_capped_like_nesting(database: Database,
                                                                clock: ManualClock) -> None:
    engine = make_engine(database, clock, max_nesting_depth=2)
    try:
        urls = [await hooked(engine, f"w{i}") for i in range(4)]
        for i in range(3):
            await notify(engine, f"w{i}", urls[i + 1])
        first = await trigger(engine, "w0")

        assert await settle(engine) == 3

        assert [len(await runs_of(engine, f"w{i}")) for i in range(4)] == [1, 1, 1, 0]
        (w2,) = await runs_of(engine, "w2")
        assert w2.depth == 2
        ((type_, data),) = await outcomes(engine, w2.id)
        assert type_ == "notification.abandoned"
        assert data["error"] == "NESTING_TOO_DEEP: runs started by notifications nest at most 2 deep"
        assert first
    finally:
        await engine.stop()


async def test_a_delivery_handed_over_again_starts_one_run(eng: Engine) -> None:
    url = await hooked(eng, "target")
    token = url.rsplit("/", 1)[1]
    await eng.workflows.create(wf("source", [noop("a")]), ME)
    source = await eng.runs.get(await trigger(eng, "source"), ME)

    first = await eng.webhooks.deliver_caused(token, {"n": 1}, f"{source.id}/3/0", cause_of(source))
    again = await eng.webhooks.deliver_caused(token, {"n": 1}, f"{source.id}/3/0", cause_of(source))

    assert again.id == first.id and len(await runs_of(eng, "target")) == 1
    with pytest.raises(ConveyorError) as e:
        await eng.webhooks.deliver_caused(token + "x", {}, "k", cause_of(source))
    assert e.value.kind == ErrorKind.NOT_FOUND


async def test_the_lineage_header_counts_only_when_this_server_signed_it(eng: Engine) -> None:
    await hooked(eng, "w")
    target = await eng.workflows.get("w", "", ME)
    run = await eng.runs.get(await trigger(eng, "w"), ME)

    with pytest.raises(ConveyorError) as e:
        await eng.webhooks.deliver(target, {}, "", sign_cause(SECRET, cause_of(run)))
    assert (e.value.kind, e.value.reason) == (ErrorKind.FAILED_PRECONDITION, "WORKFLOW_LOOP")
    deep = Cause("elsewhere", ("x",), 10)
    with pytest.raises(ConveyorError) as e:
        await eng.webhooks.deliver(target, {}, "", sign_cause(SECRET, deep))
    assert e.value.reason == "NESTING_TOO_DEEP"
    assert len(await runs_of(eng, "w")) == 1

    # Another server's header (or a forged one) is no cause: a family of its own.
    for header in (sign_cause("someone else", cause_of(run)), "v1.e30.00", "x" * 9000):
        fresh = await eng.webhooks.deliver(target, {}, "", header)
        assert fresh.lineage is None and fresh.depth == 0
    assert len(await runs_of(eng, "w")) == 4


@dataclass
class Receiver:
    """A webhook endpoint answering what `answer` says, recording the requests it got."""

    port: int = 0
    answer: tuple[int, dict[str, Any]] = (204, {})
    got: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.got.append(dict(request.headers))
        status, body = self.answer
        return web.json_response(body, status=status) if body else web.Response(status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.port = runner.addresses[0][1]
    try:
        yield r
    finally:
        await runner.cleanup()


def conveyor_error(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "domain": "conveyor.dev", "reason": reason,
         "metadata": {}}]}


async def test_over_http_the_family_travels_signed_and_a_loop_refusal_is_final(
        eng: Engine, receiver: Receiver, clock: ManualClock) -> None:
    url = f"http://127.0.0.1:{receiver.port}/v1/webhooks/whk_elsewhere"  # not this engine's address
    await eng.workflows.create(wf("w", [noop("a")], notifications=[{"url": url, "events": [COMPLETED]}]), ME)
    receiver.answer = (400, conveyor_error(9, "WORKFLOW_LOOP", "workflow 'w' would start itself"))
    run = await eng.runs.get(await trigger(eng, "w"), ME)

    assert await settle(eng) == 1

    (headers,) = receiver.got
    assert verified_cause(SECRET, headers[LINEAGE_HEADER]) == Cause(run.id, (run.workflow_id,), 0)
    ((type_, data),) = await outcomes(eng, run.id)
    assert headers["Idempotency-Key"] == headers["X-Conveyor-Delivery"] == data["delivery_id"]
    assert type_ == "notification.abandoned" and data["status_code"] == 400
    assert data["error"] == "HTTP 400 WORKFLOW_LOOP: workflow 'w' would start itself"


async def test_over_http_other_refusals_are_retried_with_their_reason(
        eng: Engine, receiver: Receiver, clock: ManualClock) -> None:
    url = f"http://127.0.0.1:{receiver.port}/v1/webhooks/whk_gone"
    await eng.workflows.create(wf("w", [noop("a")], notifications=[{"url": url, "events": [COMPLETED]}]), ME)
    receiver.answer = (404, conveyor_error(5, "WEBHOOK_NOT_FOUND", "no webhook has this URL"))
    run_id = await trigger(eng, "w")
    await eng.tick()

    assert await eng.notifier.run_once() == 1

    ((type_, data),) = await outcomes(eng, run_id)
    assert type_ == "notification.failed"
    assert data["error"] == "HTTP 404 WEBHOOK_NOT_FOUND: no webhook has this URL"
    receiver.answer = (500, {"message": "not json we know", "details": "x"})
    clock.advance(2)
    assert await eng.notifier.run_once() == 1
    assert [d["error"] for _, d in await outcomes(eng, run_id)][1] == "HTTP 500"
    assert json.dumps(receiver.got[0]).count(LINEAGE_HEADER) == 1
