"""The project watch: every run status change of a project, in one order every replica agrees
on, resumable from a cursor with no gap and no duplicate — also with concurrent writers on two
replicas of one PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Heartbeat, ProjectChange, Watches

ME = Caller("tester")
QUICK = {"name": "quick", "steps": [{"ref": "a", "kind": "noop"}]}
GATED = {"name": "gated", "steps": [{"ref": "ok", "kind": "approval"}]}


async def take(stream: AsyncIterator[ProjectChange | Heartbeat], n: int,
               within: float = 10) -> list[ProjectChange]:
    got: list[ProjectChange] = []
    async with asyncio.timeout(within):
        while len(got) < n:
            item = await anext(stream)
            if isinstance(item, ProjectChange):
                got.append(item)
    return got


async def head(engine: Engine, project: str = "default") -> str:
    """The project's cursor now: a watch from it sends what is committed after."""
    async with engine.store.read() as repo:
        return await repo.head_cursor(project)


async def test_every_status_change_in_order_then_resume_from_a_cursor(engine: Engine) -> None:
    await engine.workflows.create(GATED, ME)
    stream = await engine.watches.watch_project("", [], [], await head(engine), ME)
    first = asyncio.ensure_future(take(stream, 3))
    run = await engine.runs.trigger(TriggerRequest("gated"), ME)  # created running: one change
    await engine.runs.pause(run.id, ME)
    await engine.runs.resume(run.id, ME)
    changes = await first
    assert [(c.run.id, c.run.status) for c in changes] == [
        (run.id, "running"), (run.id, "paused"), (run.id, "running")]
    await engine.steps.approve(run.id, "ok", "", ME)
    await engine.tick()
    (done,) = await take(stream, 1)
    assert done.run.status == "completed"
    await stream.aclose()

    # Resumed from the first change's cursor: exactly the changes after it.
    again = await engine.watches.watch_project("", [], [], changes[0].cursor, ME)
    resumed = await take(again, 3)
    assert [c.run.status for c in resumed] == ["paused", "running", "completed"]
    assert [c.cursor for c in resumed] == [changes[1].cursor, changes[2].cursor, done.cursor]
    await again.aclose()


async def test_filters_and_scope(engine: Engine) -> None:
    await engine.workflows.create(QUICK, ME)
    await engine.workflows.create(GATED, ME)
    completed = await engine.watches.watch_project("", ["quick"], ["completed"], await head(engine), ME)
    pending = asyncio.ensure_future(take(completed, 1))
    await engine.runs.trigger(TriggerRequest("gated"), ME)
    run = await engine.runs.trigger(TriggerRequest("quick"), ME)
    await engine.tick()
    (change,) = await pending
    assert change.run.id == run.id and change.run.status == "completed"
    await completed.aclose()
    # A key of another project may not watch this one; a forged cursor is refused before anything.
    with pytest.raises(ConveyorError) as foreign:
        await engine.watches.watch_project("default", [], [], "", Caller("x", project="other"))
    assert foreign.value.reason == "PROJECT_FORBIDDEN"
    with pytest.raises(ConveyorError) as forged:
        await engine.watches.watch_project("", [], [], "bm90IGEgY3Vyc29y", ME)
    assert forged.value.kind is ErrorKind.INVALID_ARGUMENT and forged.value.reason == "INVALID_CURSOR"


async def test_concurrent_writers_on_two_replicas_no_gap_no_duplicate(replicas: list[Engine]) -> None:
    """Triggers race on both replicas while a watcher on one of them reads along from a cursor:
    it gets every change of the project exactly once, whichever replica wrote it (PostgreSQL:
    xids are not commit order; the feed reads below the oldest running transaction)."""
    a, b = replicas
    await a.workflows.create(QUICK, ME)
    start = await head(a)
    n = 80  # one change per new run (created running; nothing ticks)
    # A's feed does not hear B's commits here: A's safety poll (quick) picks up B's last ones.
    watches = Watches(a.store, a.clock, a.runner.keyed, poll_seconds=0.05)
    watcher = await watches.watch_project("", [], [], start, ME)
    collected = asyncio.ensure_future(take(watcher, n, within=60))

    async def trigger_many(engine: Engine, count: int) -> list[str]:
        return [(await engine.runs.trigger(TriggerRequest("quick"), ME)).id for _ in range(count)]

    batches = await asyncio.gather(trigger_many(a, 30), trigger_many(b, 30), trigger_many(b, 20))
    ids = [i for batch in batches for i in batch]
    seen = await collected
    await watcher.aclose()
    assert sorted(c.run.id for c in seen) == sorted(ids)  # each once: no gap, no duplicate
    # Resumed anywhere, on the other replica: the same tail in the same order.
    cut = n // 2
    again = await b.watches.watch_project("", [], [], seen[cut].cursor, ME)
    tail = await take(again, n - cut - 1)
    await again.aclose()
    assert [c.run.id for c in tail] == [c.run.id for c in seen[cut + 1:]]
    await watches.close()


async def test_a_heartbeat_within_15_s_of_the_last_message_whatever_else_commits(
        engine: Engine, clock: ManualClock) -> None:
    """Judged by the engine's clock: a comment (a commit of the project that changes no status)
    wakes the watch but neither sends anything nor moves its heartbeat; a change sent does."""
    await engine.workflows.create(GATED, ME)
    run = await engine.runs.trigger(TriggerRequest("gated"), ME)
    beats = engine.watches.beats
    stream = await engine.watches.watch_project("", [], [], await head(engine), ME)
    first = asyncio.ensure_future(anext(stream))
    for _ in range(1000):  # 10 s at most: the watch is open and waiting
        if len(beats):
            break
        await asyncio.sleep(0.01)
    await engine.runs.comment(run.id, "not a status change", ME)
    clock.advance(15)  # whatever offset the first heartbeat drew, it is due by now
    assert beats.beat_due() == 1
    assert isinstance(await asyncio.wait_for(first, 10), Heartbeat)

    # Comments 5 s and 10 s into the period: no heartbeat before it ends, one when it does.
    second = asyncio.ensure_future(anext(stream))
    for _ in range(2):
        clock.advance(5)
        await engine.runs.comment(run.id, "still nothing to send", ME)
        assert beats.beat_due() == 0
    clock.advance(3.9)
    assert beats.beat_due() == 0 and not second.done()
    clock.advance(1.1)
    assert beats.beat_due() == 1
    assert isinstance(await asyncio.wait_for(second, 10), Heartbeat)

    # A change sent 10 s into a period starts the next one from there.
    clock.advance(10)
    await engine.runs.pause(run.id, ME)
    (change,) = await take(stream, 1)
    assert change.run.status == "paused"
    third = asyncio.ensure_future(anext(stream))
    clock.advance(10)
    assert beats.beat_due() == 0
    clock.advance(5)
    assert beats.beat_due() == 1
    assert isinstance(await asyncio.wait_for(third, 10), Heartbeat)
    await stream.aclose()
    assert len(beats) == 0
