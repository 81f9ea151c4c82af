"""Outbound notifications (issue 8 item 6): the outbox is written with the events that cause it,
and the Notifier delivers it to a real aiohttp server on 127.0.0.1, signed, retried with backoff,
given up, every outcome a run event. Tests drive `notifier.run_once()` on a ManualClock; only
the timeout test waits out a (tiny) real timeout."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import func, select

from conveyor.domain.changes import Changes
from conveyor.domain.notifications import verify_signature
from conveyor.domain.states import RunStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.notifications import outbox_t
from conveyor.storage.store import SqlStore
from tests.engine.test_engine import ME, events_of, noop, status, trigger, wf

SECRET = "test-secret"


@dataclass
class Receiver:
    """A webhook endpoint: records what it got; `/fail` answers 500, `/slow` never in time."""

    port: int = 0
    got: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in self.got if p == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((request.path, dict(request.headers), await request.read()))
        if request.path == "/fail":
            return web.Response(status=500, text="down")
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", r.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.port = runner.addresses[0][1]
    try:
        yield r
    finally:
        await runner.cleanup()


def make_engine(database: Database, clock: ManualClock, **settings: Any) -> Engine:
    # The receiver's address allowed: loopback is denied unless CONVEYOR_HTTP_ALLOW says so.
    base: dict[str, Any] = {"notify_secret": SECRET, "notify_max_attempts": 3,
                            "notify_initial_backoff_seconds": 1.0, "notify_timeout_seconds": 2.0,
                            "http_allow": ("127.0.0.1",)}
    return Engine(SqlStore(database), Settings(db_url=str(database.url), **{**base, **settings}), clock)


async def outbox_count(engine: Engine) -> int:
    async with engine.store.read() as repo:
        return int((await repo.conn.execute(select(func.count()).select_from(outbox_t))).scalar_one())  # type: ignore[attr-defined]


async def deliveries(engine: Engine, run_id: str) -> list[tuple[str, int]]:
    return [(e.type, e.data["attempt"]) for e in await events_of(engine, run_id)
            if e.type.startswith("notification.")]


async def test_a_completed_run_notifies_with_a_valid_signature(eng: Engine, receiver: Receiver,
                                                               clock: ManualClock) -> None:
    await eng.workflows.create(wf("w", [noop("a")], notifications=[
        {"url": receiver.url(), "events": ["run.completed", "run.failed"]}]), ME)
    run_id = await trigger(eng, "w")
    await eng.tick()
    assert await status(eng, run_id) == RunStatus.COMPLETED
    assert await outbox_count(eng) == 1

    assert await eng.notifier.run_once() == 1

    (_path, headers, raw), = receiver.got
    assert verify_signature(SECRET, headers["X-Conveyor-Signature"], raw, now=clock.now().timestamp())
    body = json.loads(raw)
    assert body["type"] == "run.completed" and body["workflow_run_id"] == run_id
    assert body["workflow_name"] == "w" and body["project_id"] and body["status"] == "completed"
    assert body["event"]["type"] == "run.completed" and body["event"]["seq"] >= 1
    assert headers["X-Conveyor-Delivery"] == body["id"] and headers["X-Conveyor-Event"] == "run.completed"
    assert await deliveries(eng, run_id) == [("notification.delivered", 1)]
    assert await outbox_count(eng) == 0
    assert await eng.notifier.run_once() == 0  # delivered once


async def test_trigger_targets_and_a_waiting_approval(eng: Engine, receiver: Receiver) -> None:
    await eng.workflows.create(wf("gate", [{"ref": "ok", "kind": "approval"}, noop("done", "ok")]), ME)
    run_id = await trigger(eng, "gate", notifications=[{"url": receiver.url(), "events": ["step.waiting"]}])
    await eng.tick()
    assert await eng.notifier.run_once() == 1
    (body,) = receiver.bodies()
    assert body["type"] == "step.waiting" and body["event"]["step_ref"] == "ok"
    await eng.steps.approve(run_id, "ok", "", ME)
    await eng.tick()
    assert await eng.notifier.run_once() == 0  # completion was not asked for


async def test_a_failing_receiver_is_retried_with_backoff_then_given_up(
        eng: Engine, receiver: Receiver, clock: ManualClock) -> None:
    await eng.workflows.create(wf("w", [noop("a")], notifications=[
        {"url": receiver.url("/fail"), "events": ["run.completed"]}]), ME)
    run_id = await trigger(eng, "w")
    await eng.tick()
    assert await eng.notifier.run_once() == 1
    assert await eng.notifier.run_once() == 0  # backing off 1 s
    clock.advance(1)
    assert await eng.notifier.run_once() == 1
    clock.advance(1)
    assert await eng.notifier.run_once() == 0  # backing off 2 s now
    clock.advance(1)
    assert await eng.notifier.run_once() == 1
    assert await deliveries(eng, run_id) == [
        ("notification.failed", 1), ("notification.failed", 2), ("notification.abandoned", 3)]
    events = [e for e in await events_of(eng, run_id) if e.type.startswith("notification.")]
    assert events[0].data["error"] == "HTTP 500" and events[0].data["url"] == receiver.url("/fail")
    assert events[0].data["retry_at"]
    assert len(receiver.got) == 3 and await outbox_count(eng) == 0
    clock.advance(3600)
    assert await eng.notifier.run_once() == 0


async def test_a_rolled_back_change_sends_nothing(eng: Engine, receiver: Receiver,
                                                  clock: ManualClock) -> None:
    await eng.workflows.create(wf("w", [{"ref": "ok", "kind": "approval"}], notifications=[
        {"url": receiver.url(), "events": ["run.canceled"]}]), ME)
    run_id = await trigger(eng, "w")
    await eng.tick()
    with pytest.raises(RuntimeError):
        async with eng.store.write() as repo:
            run = await repo.get_run(run_id, None, lock=True)
            c = Changes(run, clock.now(), "t")
            c.run_to(RunStatus.CANCELED)
            await repo.save([c])
            assert (await repo.conn.execute(  # type: ignore[attr-defined]
                select(func.count()).select_from(outbox_t))).scalar_one() == 1
            raise RuntimeError("the unit fails after saving")
    assert await outbox_count(eng) == 0
    assert await eng.notifier.run_once() == 0 and receiver.got == []
    await eng.runs.cancel(run_id, ME)  # the real cancel commits, and notifies
    assert await eng.notifier.run_once() == 1
    assert [b["type"] for b in receiver.bodies()] == ["run.canceled"]


async def test_the_egress_policy_applies(database: Database, clock: ManualClock, receiver: Receiver) -> None:
    engine = make_engine(database, clock, http_allow=())  # the default: loopback denied
    try:
        await engine.workflows.create(wf("w", [noop("a")], notifications=[
            {"url": receiver.url(), "events": ["run.completed"]}]), ME)
        run_id = await trigger(engine, "w")
        await engine.tick()
        assert await engine.notifier.run_once() == 1
        assert receiver.got == []
        (event,) = [e for e in await events_of(engine, run_id) if e.type.startswith("notification.")]
        assert event.type == "notification.abandoned"
        assert event.data["error"] == ("EGRESS_DENIED: 127.0.0.1 is loopback (127.0.0.0/8), "
                                       "not allowed by CONVEYOR_HTTP_ALLOW")
    finally:
        await engine.stop()


async def test_a_slow_endpoint_times_out_and_delays_only_its_own(
        database: Database, clock: ManualClock, receiver: Receiver) -> None:
    engine = make_engine(database, clock, notify_timeout_seconds=0.2)
    try:
        await engine.workflows.create(wf("w", [noop("a")], notifications=[
            {"url": receiver.url("/slow"), "events": ["run.completed"]},
            {"url": receiver.url("/fast"), "events": ["run.completed"]}]), ME)
        run_id = await trigger(engine, "w")
        await engine.tick()
        assert await engine.notifier.run_once() == 2
        outcomes = {e.data["url"]: (e.type, e.data.get("error", "")) for e in await events_of(engine, run_id)
                    if e.type.startswith("notification.")}
        assert outcomes[receiver.url("/fast")] == ("notification.delivered", "")
        assert outcomes[receiver.url("/slow")][0] == "notification.failed"
        assert "TimeoutError" in outcomes[receiver.url("/slow")][1]
    finally:
        await engine.stop()


async def test_an_expired_claim_is_taken_over_and_recorded_once(
        database: Database, clock: ManualClock, receiver: Receiver) -> None:
    a, b = make_engine(database, clock), make_engine(database, clock)
    try:
        await a.workflows.create(wf("w", [noop("a")], notifications=[
            {"url": receiver.url(), "events": ["run.completed"]}]), ME)
        run_id = await trigger(a, "w")
        await a.tick()
        (claimed,) = await a.notifier._claim(1, Counter())  # A claims, then "dies" mid-request
        clock.advance(60)  # past the claim's lease
        assert await b.notifier.run_once() == 1
        await a.notifier._deliver(claimed)  # A's late outcome is dropped: B's claim counted attempt 2
        assert await deliveries(a, run_id) == [("notification.delivered", 2)]
        assert len(receiver.got) == 2  # at least once: both requests went out, one delivery id
        assert len({h["X-Conveyor-Delivery"] for _, h, _ in receiver.got}) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_two_engines_deliver_each_notification_once(
        replicas: list[Engine], receiver: Receiver) -> None:
    a, b = replicas
    await a.workflows.create(wf("w", [noop("a")], notifications=[
        {"url": receiver.url(f"/hook{i}"), "events": ["run.completed"]} for i in range(5)]), ME)
    runs = [await trigger(a, "w") for _ in range(8)]
    await a.tick()

    async def drain(engine: Engine) -> int:
        total = 0
        while n := await engine.notifier.run_once():
            total += n
        return total

    sent = await asyncio.gather(drain(a), drain(b), drain(a), drain(b))
    assert sum(sent) == 40
    ids = [h["X-Conveyor-Delivery"] for _, h, _ in receiver.got]
    assert len(ids) == len(set(ids)) == 40
    for run_id in runs:
        assert [t for t, _ in await deliveries(a, run_id)] == ["notification.delivered"] * 5


async def test_the_notifier_wakes_on_the_feed_not_on_its_poll(eng: Engine, receiver: Receiver) -> None:
    """The background loop sleeps until the outbox's earliest timer (none: its 30 s safety poll),
    and a commit whose events a target asks for wakes it at once."""
    await eng.workflows.create(wf("w", [noop("a")], notifications=[
        {"url": receiver.url(), "events": ["run.completed"]}]), ME)
    eng.notifier.start()
    await asyncio.sleep(0.2)  # the loop found an empty outbox and sleeps
    run_id = await trigger(eng, "w")
    await eng.tick()
    for _ in range(250):  # 5 s at most: far less than the safety poll
        if await deliveries(eng, run_id) == [("notification.delivered", 1)]:
            break
        await asyncio.sleep(0.02)
    assert await deliveries(eng, run_id) == [("notification.delivered", 1)]
    assert [b["type"] for b in receiver.bodies()] == ["run.completed"]


async def test_a_run_shows_the_targets_it_notifies(eng: Engine, receiver: Receiver) -> None:
    await eng.workflows.create(wf("w", [noop("a")], notifications=[
        {"url": receiver.url("/team"), "events": ["run.failed"]}]), ME)
    mine = {"url": receiver.url("/me"), "events": ["run.completed"]}
    run_id = await trigger(eng, "w", notifications=[mine])
    run = await eng.runs.get(run_id, ME)
    assert run.notifications == [{"url": receiver.url("/team"), "events": ["run.failed"]},
                                 {"url": receiver.url("/me"), "events": ["run.completed"]}]
