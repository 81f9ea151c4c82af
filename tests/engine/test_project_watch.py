"""The project watch: every run status change of a project, in one order every replica agrees
on, resumable from a cursor with no gap and no duplicate — also with concurrent writers on two
replicas of one PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, TriggerRequest
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Heartbeat, ProjectChange

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
    stream = engine.watches.watch_project("", [], [], await head(engine), ME)
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
    again = engine.watches.watch_project("", [], [], changes[0].cursor, ME)
    resumed = await take(again, 3)
    assert [c.run.status for c in resumed] == ["paused", "running", "completed"]
    assert [c.cursor for c in resumed] == [changes[1].cursor, changes[2].cursor, done.cursor]
    await again.aclose()


async def test_filters_and_scope(engine: Engine) -> None:
    await engine.workflows.create(QUICK, ME)
    await engine.workflows.create(GATED, ME)
    completed = engine.watches.watch_project("", ["quick"], ["completed"], await head(engine), ME)
    pending = asyncio.ensure_future(take(completed, 1))
    await engine.runs.trigger(TriggerRequest("gated"), ME)
    run = await engine.runs.trigger(TriggerRequest("quick"), ME)
    await engine.tick()
    (change,) = await pending
    assert change.run.id == run.id and change.run.status == "completed"
    await completed.aclose()
    # A key of another project may not watch this one; a forged cursor is refused before anything.
    with pytest.raises(ConveyorError) as foreign:
        await anext(engine.watches.watch_project("default", [], [], "", Caller("x", project="other")))
    assert foreign.value.reason == "PROJECT_FORBIDDEN"
    with pytest.raises(ConveyorError) as forged:
        await anext(engine.watches.watch_project("", [], [], "bm90IGEgY3Vyc29y", ME))
    assert forged.value.kind is ErrorKind.INVALID_ARGUMENT and forged.value.reason == "INVALID_CURSOR"


async def test_concurrent_writers_on_two_replicas_no_gap_no_duplicate(replicas: list[Engine]) -> None:
    """Triggers race on both replicas while a watcher on one of them reads along from a cursor:
    it gets every change of the project exactly once, whichever replica wrote it (PostgreSQL:
    xids are not commit order; the feed reads below the oldest running transaction)."""
    a, b = replicas
    await a.workflows.create(QUICK, ME)
    start = await head(a)
    n = 80  # one change per new run (created running; nothing ticks)
    watcher = a.watches.watch_project("", [], [], start, ME)
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
    again = b.watches.watch_project("", [], [], seen[cut].cursor, ME)
    tail = await take(again, n - cut - 1)
    await again.aclose()
    assert [c.run.id for c in tail] == [c.run.id for c in seen[cut + 1:]]
