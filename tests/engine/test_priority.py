"""Time and order (issue 17, SPEC §3): trigger `priority` (slot waiters, task leasing), trigger
`start_at` (a delayed, cancelable start) and per-key concurrency (`concurrency: {key, max_runs}`).
Real database, ManualClock, no sleeping; the race at the end runs two engines on one database."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest

from conveyor.domain.concurrency import check_priority
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import RunQuery, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from tests.engine.test_core import WORKER, task
from tests.engine.test_engine import ME, noop, status, steps_of, trigger, wf
from tests.engine.test_races import (
    NO_ERROR,
    OPERATION_ERRORS,
    Outcomes,
    Pair,
    _unfinished,
    check_consistent,
    delay,
    running_intervals,
)

GATE = [{"ref": "gate", "kind": "approval"}]
PER_CUSTOMER = {"key": "{{ payload.customer }}", "max_runs": 1}


async def _queued(engine: Engine, clock: ManualClock, name: str, **kw: Any) -> str:
    """Trigger a run one second after the previous one (FIFO is by creation time)."""
    clock.advance(1)
    return await trigger(engine, name, **kw)


async def _release(engine: Engine, run_id: str) -> None:
    await engine.steps.approve(run_id, "gate", "", ME)
    await engine.tick()


async def _running(engine: Engine, run_ids: list[str]) -> set[str]:
    return {r for r in run_ids if await status(engine, r) == RunStatus.RUNNING}


# -- priority -------------------------------------------------------------------------------------

async def test_slot_waiters_start_highest_priority_first_then_oldest(engine: Engine,
                                                                     clock: ManualClock) -> None:
    await engine.workflows.create(wf("one", GATE, max_concurrent_runs=1), ME)
    holder = await _queued(engine, clock, "one")
    await engine.tick()
    low1 = await _queued(engine, clock, "one")
    high1 = await _queued(engine, clock, "one", priority=10)
    low2 = await _queued(engine, clock, "one", priority=0)
    high2 = await _queued(engine, clock, "one", priority=10)
    urgent = await _queued(engine, clock, "one", priority=100)
    lowest = await _queued(engine, clock, "one", priority=-100)
    await engine.tick()
    order = [holder]
    for _ in range(6):
        await _release(engine, order[-1])
        (started,) = await _running(engine, [low1, high1, low2, high2, urgent, lowest])
        order.append(started)
    assert order[1:] == [urgent, high1, high2, low1, low2, lowest]
    run = await engine.runs.get(urgent, ME)
    assert run.priority == 100 and {s.priority for s in (await steps_of(engine, urgent)).values()} == {100}


async def test_a_queue_hands_out_its_highest_priority_tasks_first(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("work", [task("t")]), ME)
    plain = await _queued(engine, clock, "work")
    high = await _queued(engine, clock, "work", priority=50)
    low = await _queued(engine, clock, "work", priority=-5)
    high_later = await _queued(engine, clock, "work", priority=50)
    await engine.tick()
    order = []
    for _ in range(4):
        (lease,) = await engine.leases.acquire("q", WORKER, 30, 1, ME)
        order.append(lease.run.id)
    assert order == [high, high_later, plain, low]
    # A batch is handed out in the same order.
    more = [await _queued(engine, clock, "work", priority=p) for p in (1, 3, 2)]
    await engine.tick()
    leases = await engine.leases.acquire("q", WORKER, 30, 3, ME)
    assert [lease.run.id for lease in leases] == [more[1], more[2], more[0]]


def test_priority_outside_its_range_or_not_a_whole_number_is_refused() -> None:
    for bad in (101, -101, 1.5, float("nan"), float("inf"), "5", None, True, 10**30):
        with pytest.raises(ConveyorError) as e:
            check_priority(bad)
        assert e.value.kind == ErrorKind.INVALID_ARGUMENT and e.value.reason == "INVALID_PRIORITY"
    assert check_priority(100) == 100 and check_priority(-100.0) == -100


async def test_a_trigger_with_a_bad_priority_creates_nothing(engine: Engine) -> None:
    await engine.workflows.create(wf("plain", [noop("a")]), ME)
    for bad in (101, -101):
        with pytest.raises(ConveyorError) as e:
            await trigger(engine, "plain", priority=bad)
        assert e.value.reason == "INVALID_PRIORITY"
    assert (await engine.runs.list(_all(), 10, "", ME)).items == []


async def test_idempotency_compares_priority_and_start_at(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("plain", [noop("a")]), ME)
    first = await trigger(engine, "plain", idempotency_key="k", priority=5)
    assert await trigger(engine, "plain", idempotency_key="k", priority=5) == first
    for other in ({"priority": 6}, {"priority": 5, "start_at": clock.now() + timedelta(hours=1)}):
        with pytest.raises(ConveyorError) as e:
            await trigger(engine, "plain", idempotency_key="k", **other)
        assert e.value.reason == "IDEMPOTENCY_KEY_REUSED"


# -- start_at -------------------------------------------------------------------------------------

async def test_a_delayed_run_starts_exactly_at_its_time(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("later", [noop("a"), noop("b", "a")], timeout_seconds=30), ME)
    at = clock.now() + timedelta(seconds=60)
    run = await engine.runs.trigger(TriggerRequest(workflow_id="later", start_at=at, immediate=True), ME)
    assert run.status == RunStatus.PENDING and run.start_at == at and run.wake_at == at
    # Its deadline counts from its start.
    assert run.expires_at == at + timedelta(seconds=30)
    clock.advance(59.999)
    await engine.tick()
    run = await engine.runs.get(run.id, ME)
    assert run.status == RunStatus.PENDING and run.started_at is None and run.wake_at == at
    assert {s.status for s in (await steps_of(engine, run.id)).values()} == {StepStatus.PENDING}
    clock.advance(0.001)
    assert await engine.tick() == 1
    run = await engine.runs.get(run.id, ME)
    assert run.status == RunStatus.COMPLETED and run.started_at == at


async def test_a_delayed_run_canceled_before_its_time_never_runs(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("later", [noop("a")]), ME)
    run_id = await trigger(engine, "later", start_at=clock.now() + timedelta(minutes=5))
    clock.advance(60)
    await engine.runs.cancel(run_id, ME)
    clock.advance(3600)
    await engine.tick()
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.CANCELED and run.started_at is None
    assert {s.status for s in (await steps_of(engine, run_id)).values()} == {StepStatus.CANCELED}


async def test_start_at_in_the_past_is_now_and_more_than_a_year_ahead_is_refused(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("later", [noop("a")]), ME)
    past = await engine.runs.trigger(
        TriggerRequest(workflow_id="later", start_at=clock.now() - timedelta(days=3)), ME)
    assert past.status == RunStatus.COMPLETED and past.start_at is None
    with pytest.raises(ConveyorError) as e:
        await trigger(engine, "later", start_at=clock.now() + timedelta(days=367))
    assert e.value.kind == ErrorKind.INVALID_ARGUMENT and e.value.reason == "INVALID_START_AT"
    assert len((await engine.runs.list(_all(), 10, "", ME)).items) == 1


async def test_a_delayed_run_is_no_slot_waiter_before_its_time(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("one", GATE, max_concurrent_runs=1), ME)
    holder = await _queued(engine, clock, "one")
    await engine.tick()
    delayed = await _queued(engine, clock, "one", priority=100, start_at=clock.now() + timedelta(seconds=30))
    plain = await _queued(engine, clock, "one")
    await engine.tick()
    await _release(engine, holder)  # the delayed run is older and higher, but not due yet
    assert await _running(engine, [delayed, plain]) == {plain}
    assert (await engine.runs.get(delayed, ME)).wake_at == clock.now() + timedelta(seconds=28)
    clock.advance(30)
    await engine.tick()  # due now, it waits for the slot like any other run
    assert await status(engine, delayed) == RunStatus.PENDING
    await _release(engine, plain)
    assert await status(engine, delayed) == RunStatus.RUNNING


# -- per-key concurrency ---------------------------------------------------------------------------

async def test_keys_do_not_hold_each_other_up(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("per", GATE, concurrency=PER_CUSTOMER), ME)
    a1 = await _queued(engine, clock, "per", payload={"customer": "acme"})
    a2 = await _queued(engine, clock, "per", payload={"customer": "acme"})
    b1 = await _queued(engine, clock, "per", payload={"customer": "bolt"})
    n1 = await _queued(engine, clock, "per", payload={"customer": 7})  # a number: the key "7"
    await engine.tick()
    assert await _running(engine, [a1, a2, b1, n1]) == {a1, b1, n1}
    assert (await engine.runs.get(n1, ME)).concurrency_key == "7"
    a3 = await _queued(engine, clock, "per", payload={"customer": "acme"}, priority=5)
    a4 = await _queued(engine, clock, "per", payload={"customer": "acme"})
    await engine.tick()
    await _release(engine, a1)  # priority first: a3 before the older a2
    assert await _running(engine, [a2, a3, a4, b1, n1]) == {a3, b1, n1}
    await _release(engine, a3)
    assert await _running(engine, [a2, a4]) == {a2}
    await engine.runs.cancel(a2, ME)  # a cancel frees the key's slot too
    await engine.tick()
    assert await _running(engine, [a4]) == {a4}


async def test_max_concurrent_runs_applies_on_top_of_the_keys(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("both", GATE, max_concurrent_runs=2, concurrency=PER_CUSTOMER), ME)
    a1, a2, b1, c1 = [await _queued(engine, clock, "both", payload={"customer": c})
                      for c in ("acme", "acme", "bolt", "corp")]
    await engine.tick()
    assert await _running(engine, [a1, a2, b1, c1]) == {a1, b1}
    # bolt's slot frees the workflow's: acme is full, so corp (no run of it in the batch) gets it.
    await _release(engine, b1)
    await engine.tick()
    assert await _running(engine, [a1, a2, c1]) == {a1, c1}
    await _release(engine, a1)
    await engine.tick()
    assert await _running(engine, [a2, c1]) == {a2, c1}


async def test_a_key_that_does_not_render_fails_the_trigger(engine: Engine) -> None:
    await engine.workflows.create(wf("per", [noop("a")], concurrency=PER_CUSTOMER), ME)
    bad: list[dict[str, Any]] = [{}, {"customer": ""}, {"customer": None}, {"customer": {"id": 1}},
                                 {"customer": [1]}, {"customer": "x" * 201}, {"customer": "a\x00b"}]
    for payload in bad:
        with pytest.raises(ConveyorError) as e:
            await trigger(engine, "per", payload=payload)
        assert e.value.kind == ErrorKind.INVALID_ARGUMENT and e.value.reason == "INVALID_CONCURRENCY_KEY"
        assert [v.field for v in e.value.violations] == ["concurrency.key"]
    assert (await engine.runs.list(_all(), 10, "", ME)).items == []
    ok_id = await trigger(engine, "per", payload={"customer": "x" * 200})
    await engine.tick()  # a run of a capped workflow is started by the runner
    ok = await engine.runs.get(ok_id, ME)
    assert ok.concurrency_key == "x" * 200 and ok.status == RunStatus.COMPLETED


@pytest.mark.parametrize(("concurrency", "field"), [
    ("acme", "concurrency"),
    ({"key": "", "max_runs": 1}, "concurrency.key"),
    ({"key": 5, "max_runs": 1}, "concurrency.key"),
    ({"key": "{{ payload.c", "max_runs": 1}, "concurrency.key"),
    ({"key": "{{ steps.a.output.c }}", "max_runs": 1}, "concurrency.key"),
    ({"key": "{{ secrets.TOKEN }}", "max_runs": 1}, "concurrency.key"),
    ({"key": "x" * 1001, "max_runs": 1}, "concurrency.key"),
    ({"key": "k"}, "concurrency.max_runs"),
    ({"key": "k", "max_runs": 0}, "concurrency.max_runs"),
    ({"key": "k", "max_runs": 10_001}, "concurrency.max_runs"),
    ({"key": "k", "max_runs": 1.5}, "concurrency.max_runs"),
    ({"key": "k", "max_runs": "2"}, "concurrency.max_runs"),
    ({"key": "k", "max_runs": 1, "per": "day"}, "concurrency.per"),
])
async def test_a_bad_concurrency_definition_is_a_field_violation(engine: Engine, concurrency: Any,
                                                                 field: str) -> None:
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.create(wf("per", [noop("a")], concurrency=concurrency), ME)
    assert e.value.reason == "INVALID_WORKFLOW"
    assert field in [v.field for v in e.value.violations], e.value.violations


async def test_a_child_run_whose_key_does_not_render_fails_its_step(engine: Engine) -> None:
    await engine.workflows.create(wf("per", [noop("a")], concurrency=PER_CUSTOMER), ME)
    await engine.workflows.create(wf("parent", [
        {"ref": "child", "kind": "workflow", "config": {"workflow_id": "per", "payload": {}}}]), ME)
    run_id = await trigger(engine, "parent", priority=7)
    await engine.tick()
    step = (await steps_of(engine, run_id))["child"]
    assert step.status == StepStatus.FAILED and "INVALID_CONCURRENCY_KEY" in step.error
    assert await status(engine, run_id) == RunStatus.FAILED


def _all() -> RunQuery:
    return RunQuery()


# -- races: two engines on one database -----------------------------------------------------------

def _key_excess(runs: dict[str, Any], events: dict[str, list[Any]], cap: int) -> list[str]:
    """Times a key had more running runs than its cap, from the runs' events."""
    spans: dict[str, list[Any]] = defaultdict(list)
    for run in runs.values():
        spans[run.concurrency_key] += running_intervals(events[run.id])
    problems = []
    for key, intervals in spans.items():
        for t, _ in intervals:
            n = sum(1 for s, e in intervals if s <= t and (e is None or t < e))
            if n > cap:
                problems.append(f"key {key!r}: {n} running at {t} (cap {cap})")
    return problems


async def test_per_key_caps_hold_under_concurrent_triggers_and_cancels(pair: Pair) -> None:
    """Engines A and B trigger runs of four keys at once while both runners race and an operator
    cancels some: no key ever has more than max_runs running, every run ends."""
    p, out, rnd = pair, Outcomes(), random.Random(17)
    await p.a.workflows.create({"name": "keyed", "concurrency": {"key": "{{ payload.c }}", "max_runs": 2},
                                "steps": [noop("a"), delay("d", 1, "a"), noop("b", "d")]}, ME)
    run_ids: list[str] = []
    for _ in range(5):
        reqs = [out.call("trigger", (p.a, p.b)[i % 2].runs.trigger(
            TriggerRequest(workflow_id="keyed", payload={"c": f"k{rnd.randrange(4)}"},
                           priority=rnd.randrange(-3, 4)), ME), NO_ERROR) for i in range(16)]
        made = await asyncio.gather(*reqs, out.call("tick A", p.a.tick(), NO_ERROR),
                                    out.call("tick B", p.b.tick(), NO_ERROR))
        run_ids += [r.id for r in made[:16] if r is not None]
        victims = rnd.sample(run_ids, 3)
        await asyncio.gather(
            *(out.call("cancel", (p.a, p.b)[i % 2].runs.cancel(v, ME), OPERATION_ERRORS)
              for i, v in enumerate(victims)),
            out.call("tick A", p.a.tick(), NO_ERROR), out.call("tick B", p.b.tick(), NO_ERROR))
        p.clock.advance(1)
    for _ in range(120):
        await asyncio.gather(out.call("tick A", p.a.tick(), NO_ERROR),
                             out.call("tick B", p.b.tick(), NO_ERROR))
        if not await _unfinished(p.db):
            break
        p.clock.advance(1)
    out.check()
    runs, _, events = await check_consistent(p.db)
    assert len(runs) == 80
    assert {r.status for r in runs.values()} <= {RunStatus.COMPLETED, RunStatus.CANCELED}
    assert not _key_excess(runs, events, 2)
