"""`wait_event` steps (SPEC §9) against a real database (SQLite, and PostgreSQL with
CONVEYOR_TEST_DB=postgresql), ManualClock and runner ticks: the first event of the step's name
and exact key received after its run was created completes it (also one that arrived before
the run reached the step; never one from before the run), its output is the event, one event
completes every step waiting for it (`resumed` counts them), `match` filters and a `match` that
errors fails that step only, `timeout_seconds` times it out, a replayed step does not take the
same event twice, bad configs are refused, and on PostgreSQL a publish on one engine racing the
step's start on another is matched exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from conveyor.domain.errors import ConveyorError
from conveyor.domain.event_waits import WaitChange
from conveyor.domain.events import Event
from conveyor.domain.records import Caller, RunRecord, StepRecord, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine

ME = Caller("tester")


def waiting(name: str, *, gated: bool = False, **config: Any) -> dict[str, Any]:
    """A workflow whose step `w` waits for order.paid (keyed by the payload's customer), behind
    an approval `gate` when `gated`, then `after`."""
    wait: dict[str, Any] = {"ref": "w", "kind": "wait_event",
                            "config": {"event": "order.paid", "key": "{{ payload.customer }}", **config}}
    steps = [wait, {"ref": "after", "kind": "noop", "depends_on": ["w"],
                    "config": {"output": {"total": "{{ steps.w.output.payload.total }}"}}}]
    if gated:
        steps.insert(0, {"ref": "gate", "kind": "approval"})
        wait["depends_on"] = ["gate"]
    return {"name": name, "steps": steps}


async def start(engine: Engine, workflow: str, customer: str = "c1", **payload: Any) -> str:
    run = await engine.runs.trigger(TriggerRequest(workflow, payload={"customer": customer, **payload}), ME)
    await engine.tick()
    return run.id


async def step(engine: Engine, run_id: str, ref: str = "w") -> StepRecord:
    page = await engine.steps.list(run_id, 100, "", ME)
    return next(s for s in page.items if s.step_ref == ref)


async def run_of(engine: Engine, run_id: str) -> RunRecord:
    return await engine.runs.get(run_id, ME)


async def publish(engine: Engine, key: str = "c1", ident: str = "", **payload: Any) -> Any:
    event = await engine.events.publish(ME, "", "order.paid", key, payload, ident)
    await engine.tick()
    return event


async def test_the_first_event_after_the_run_was_created_completes_the_step(engine: Engine,
                                                                            clock: ManualClock) -> None:
    await engine.workflows.create(waiting("pay", gated=True), ME)
    await publish(engine, ident="too-early", total=1)  # before the run: not for it
    clock.advance(1)
    run_id = await start(engine, "pay")
    clock.advance(1)
    # Arrives while the run still waits at its gate: kept for the step.
    early = await publish(engine, ident="kept", total=5)
    assert early.resumed == 0
    await publish(engine, key="c2", ident="other-key", total=9)
    clock.advance(1)
    await engine.steps.approve(run_id, "gate", "", ME)
    await engine.tick()

    w = await step(engine, run_id)
    assert w.status == StepStatus.COMPLETED
    assert w.output is not None
    assert (w.output["id"], w.output["name"], w.output["key"], w.output["payload"]) == (
        "kept", "order.paid", "c1", {"total": 5})
    assert w.output["received_at"].startswith("2026-")
    run = await run_of(engine, run_id)
    assert run.status == RunStatus.COMPLETED and (await step(engine, run_id, "after")).output == {"total": 5}


async def test_one_event_completes_every_step_waiting_for_it(engine: Engine) -> None:
    await engine.workflows.create(waiting("pay"), ME)
    runs = [await start(engine, "pay") for _ in range(3)]
    other = await start(engine, "pay", customer="c2")
    assert {(await step(engine, r)).status for r in runs} == {StepStatus.WAITING}

    event = await publish(engine, total=3)
    assert event.resumed == 3
    assert [(await run_of(engine, r)).status for r in runs] == [RunStatus.COMPLETED] * 3
    assert (await step(engine, other)).status == StepStatus.WAITING
    # Published again (same id and body): the same answer, nothing more.
    assert (await engine.events.publish(ME, "", "order.paid", "c1", {"total": 3}, event.id)) == event


async def test_match_filters_and_a_failing_match_fails_that_step_only(engine: Engine) -> None:
    await engine.workflows.create(waiting("big", match="event.payload.total >= payload.least"), ME)
    await engine.workflows.create(waiting("fragile", match="event.payload.missing.size() > 0"), ME)
    big = await start(engine, "big", least=10)
    fragile = await start(engine, "fragile")
    calm = await start(engine, "big", least=1)

    await publish(engine, total=5)
    assert (await step(engine, big)).status == StepStatus.WAITING  # 5 < 10: waits on
    assert (await step(engine, calm)).status == StepStatus.COMPLETED
    broken = await step(engine, fragile)
    assert broken.status == StepStatus.FAILED and broken.error.startswith("match: ")
    assert (await run_of(engine, fragile)).status == RunStatus.FAILED

    await publish(engine, total=50)
    done = await step(engine, big)
    assert done.status == StepStatus.COMPLETED and done.output is not None
    assert done.output["payload"] == {"total": 50}


async def test_timeout_seconds_times_the_step_out(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(waiting("slow", timeout_seconds=60), ME)
    run_id = await start(engine, "slow")
    clock.advance(59)
    await engine.tick()
    assert (await step(engine, run_id)).status == StepStatus.WAITING
    clock.advance(2)
    await engine.tick()
    assert (await step(engine, run_id)).status == StepStatus.TIMED_OUT
    assert (await run_of(engine, run_id)).status == RunStatus.FAILED
    # An event now finds no wait.
    assert (await publish(engine, total=1)).resumed == 0


async def test_a_replayed_step_takes_the_next_event_not_the_same_one(engine: Engine,
                                                                    clock: ManualClock) -> None:
    await engine.workflows.create(waiting("again"), ME)
    run_id = await start(engine, "again")
    clock.advance(1)
    await publish(engine, ident="first", total=1)
    assert (await step(engine, run_id)).output["id"] == "first"  # type: ignore[index]

    assert await engine.steps.replay_subtree(run_id, "w", ME) == 2
    await engine.tick()
    assert (await step(engine, run_id)).status == StepStatus.WAITING
    clock.advance(1)
    await publish(engine, ident="second", total=2)
    w = await step(engine, run_id)
    assert w.status == StepStatus.COMPLETED and w.output is not None and w.output["id"] == "second"


async def test_bad_wait_event_configs_are_refused(engine: Engine) -> None:
    bad = [{}, {"event": "has space"}, {"event": "e", "match": "event.x +"}, {"event": "e", "match": 3},
           {"event": "e", "timeout_seconds": 0}, {"event": "e", "key": ["x"]}, {"event": "e", "other": 1}]
    for i, config in enumerate(bad):
        with pytest.raises(ConveyorError) as e:
            await engine.workflows.create({"name": f"bad{i}", "steps": [
                {"ref": "w", "kind": "wait_event", "config": config}]}, ME)
        assert e.value.reason == "INVALID_WORKFLOW", config
        assert all(v.field.startswith("steps[0].config") for v in e.value.violations), config


async def test_a_key_that_renders_badly_fails_the_step(engine: Engine) -> None:
    await engine.workflows.create({"name": "odd", "steps": [
        {"ref": "w", "kind": "wait_event", "config": {"event": "e", "key": "{{ payload.customer }}"}}]}, ME)
    run = await engine.runs.trigger(TriggerRequest("odd", payload={"customer": {"an": "object"}}), ME)
    await engine.tick()
    w = await step(engine, run.id)
    assert w.status == StepStatus.FAILED and "key must render to a string" in w.error


@pytest.mark.postgresql_only
async def test_a_publish_racing_the_steps_start_on_another_replica_is_matched_once(
        replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(waiting("race", gated=True), ME)
    n = 20
    runs = [(await a.runs.trigger(TriggerRequest("race", payload={"customer": f"k{i}"}), ME)).id
            for i in range(n)]
    await a.tick()
    # B's approvals start the waits (each in its unit) while A publishes their events.
    await asyncio.gather(*(b.steps.approve(r, "gate", "", ME) for r in runs),
                         *(a.events.publish(ME, "", "order.paid", f"k{i}", {"total": i}, f"race-{i}")
                           for i in range(n)))
    await asyncio.gather(a.tick(), b.tick())
    await a.tick()
    missed = []
    for i, run_id in enumerate(runs):
        w = await step(a, run_id)
        if w.status != StepStatus.COMPLETED or (w.output or {}).get("id") != f"race-{i}":
            missed.append((i, w.status))
    assert missed == []
    async with a.store.read() as repo:
        done = (await repo.conn.execute(text(  # type: ignore[attr-defined]
            "SELECT count(*) FROM run_events WHERE step_ref = 'w' AND status = 'completed'"))).scalar_one()
    assert done == n  # each step completed once


@pytest.mark.postgresql_only
async def test_publish_and_a_new_wait_of_one_key_take_turns(replicas: list[Engine],
                                                            clock: ManualClock) -> None:
    """The lock both take, held open by one transaction: the other waits for it, then sees what
    the first wrote (the wait, or the event); either order, neither misses the other."""
    a, b = replicas
    await a.workflows.create(waiting("turns"), ME)
    run = await a.runs.trigger(TriggerRequest("turns", payload={"customer": "x"}), ME)
    await a.tick()
    w = await step(a, run.id)
    change = WaitChange(run.id, w.id, "default", "order.paid", "x", run.created_at, waiting=True)
    event = Event(project_id="default", id="turns-1", name="order.paid", key="x", payload={},
                  received_at=clock.now(), request_hash="h")

    async def publish(repo: Any) -> list[str]:
        await repo.lock_event_key([("default", "order.paid", "x")])
        waiting_runs = await repo.waiting_runs("default", "order.paid", "x", event.received_at)
        await repo.insert_event(event)
        return list(waiting_runs)

    # The wait first: the publish waits for its commit, then finds it.
    async with a.store.write() as repo:
        await repo.conn.execute(text("DELETE FROM event_waits"))  # type: ignore[attr-defined]
    first = a.store.write()
    repo_a = await first.__aenter__()
    assert await repo_a.record_event_waits([change]) == set()
    second = asyncio.create_task(_in_tx(b, publish))
    done, _ = await asyncio.wait([second], timeout=0.3)
    assert not done  # held by the wait's transaction
    await first.__aexit__(None, None, None)
    assert await second == [run.id]

    # The event first: the wait waits for its commit, then finds the event (its run to signal).
    async with a.store.write() as repo:
        await repo.conn.execute(text("DELETE FROM event_waits"))  # type: ignore[attr-defined]
        await repo.conn.execute(text("DELETE FROM events"))  # type: ignore[attr-defined]
    first = b.store.write()
    repo_b = await first.__aenter__()
    assert await publish(repo_b) == []
    registering = asyncio.create_task(_in_tx(a, lambda repo: repo.record_event_waits([change])))
    done, _ = await asyncio.wait([registering], timeout=0.3)
    assert not done  # held by the publish's transaction
    await first.__aexit__(None, None, None)
    assert await registering == {run.id}


async def _in_tx(engine: Engine, work: Any) -> Any:
    async with engine.store.write() as repo:
        return await work(repo)
