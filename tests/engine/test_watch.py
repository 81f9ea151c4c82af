"""Run watches: snapshot first, then every event in seq order, resumable with after_seq, ending
once the run is final; heartbeats while nothing happens."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.feed import run_key
from conveyor.domain.records import Caller, EventRecord, TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Heartbeat, Snapshot, Watches, WatchItem
from tests.engine.test_tails import _joined

ME = Caller("tester")
GATED = {"name": "gated", "steps": [{"ref": "ok", "kind": "approval"}, {"ref": "n", "kind": "noop",
                                                                        "depends_on": ["ok"]}]}


async def test_watch_snapshot_then_events_until_final(engine: Engine) -> None:
    await engine.workflows.create(GATED, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    items: list[WatchItem] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for item in await engine.watches.watch_run(run_id, 0, ME):
            items.append(item)
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    snapshot = items[0]
    assert isinstance(snapshot, Snapshot)
    assert [s.step_ref for s in snapshot.steps] == ["ok", "n"] and snapshot.steps[0].status == "waiting"
    await engine.steps.approve(run_id, "ok", "", ME)
    await engine.tick()
    await asyncio.wait_for(task, 10)
    events = [i for i in items[1:] if isinstance(i, EventRecord)]
    assert [e.seq for e in events] == list(range(snapshot.seq + 1, snapshot.seq + 1 + len(events)))
    assert events[0].type == "step.completed" and events[-1].type == "run.completed"

    # Resuming after event 3 gives exactly the events after it, and ends (the run is final).
    resumed = [i async for i in await engine.watches.watch_run(run_id, 3, ME)]
    everything = (await engine.runs.events(run_id, 0, 100, "", ME)).items
    assert [e.seq for e in resumed if isinstance(e, EventRecord)] == [e.seq for e in everything[3:]]
    # A final run: the snapshot alone.
    assert [type(i) for i in [i async for i in await engine.watches.watch_run(run_id, 0, ME)]] == [Snapshot]


async def _beat(watches: Watches, clock: ManualClock, stream: Any, seconds: float = 15) -> WatchItem:
    """The stream's next item after `seconds` of the engine's clock pass and the heartbeat loop
    ticks once."""
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the watch waits for its next item before the clock moves
    clock.advance(seconds)
    watches.beats.beat_due()
    return await asyncio.wait_for(pending, 10)


async def test_watch_sends_heartbeats_while_quiet(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(GATED, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    watches = Watches(engine.store, engine.clock, engine.runner.keyed)
    stream = await watches.watch_run(run_id, 0, ME)
    assert isinstance(await anext(stream), Snapshot)
    pending = asyncio.ensure_future(anext(stream))
    await _joined(watches, run_id, 1)
    clock.advance(5)
    assert watches.beats.beat_due() == 0  # not due yet
    clock.advance(10)  # 15 s of the engine's clock: due
    assert watches.beats.beat_due() == 1
    assert isinstance(await asyncio.wait_for(pending, 10), Heartbeat)
    assert isinstance(await _beat(watches, clock, stream), Heartbeat)
    await stream.aclose()
    assert len(watches.beats) == 0  # a closed watch leaves nothing behind
    await watches.close()


async def test_a_watch_resumed_at_or_past_the_end_of_a_final_run(engine: Engine) -> None:
    await engine.workflows.create({"name": "quick", "steps": [{"ref": "a", "kind": "noop"}]}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("quick"), ME)).id
    await engine.tick()
    last = (await engine.runs.get(run_id, ME)).last_seq
    # At the end of a final run: nothing to send, the stream ends at once (it used to wait forever).
    assert [i async for i in await engine.watches.watch_run(run_id, last, ME)] == []
    # Past the end, or negative: the cursor is not this run's.
    for bad in (last + 1, -1):
        with pytest.raises(ConveyorError) as refused:
            await engine.watches.watch_run(run_id, bad, ME)
        assert refused.value.kind is ErrorKind.INVALID_ARGUMENT
    with pytest.raises(ConveyorError) as past:
        await engine.watches.watch_run(run_id, last + 1, ME)
    assert past.value.reason == "AFTER_SEQ_PAST_END"


async def test_a_watcher_wakes_on_its_run_only(engine: Engine) -> None:
    """Waiters wait on their run's key: a commit of another run does not fire it."""
    await engine.workflows.create(GATED, ME)
    mine = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    other = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    woken = engine.runner.keyed.next(run_key(mine))
    await engine.runs.comment(other, "not yours", ME)
    assert not woken.is_set()
    await engine.runs.comment(mine, "yours", ME)
    assert woken.is_set()


async def test_a_watch_on_one_replica_sees_another_replicas_commits_at_once(
        replicas: list[Engine], backend: str) -> None:
    """PostgreSQL: a commit on replica A reaches a watcher on replica B through NOTIFY/LISTEN,
    long before B's safety poll (30 s). SQLite has one process: the feed stays in-process."""
    a, b = replicas
    listening = asyncio.Event()

    def resync() -> None:  # called once the LISTEN connection is up
        b.runner.keyed.fire_all()
        listening.set()

    stop = await b.store.listen(b.runner.keyed.fire, resync)
    try:
        await a.workflows.create(GATED, ME)
        run_id = (await a.runs.trigger(TriggerRequest("gated"), ME)).id
        await a.tick()
        stream = await b.watches.watch_run(run_id, 0, ME)
        assert isinstance(await anext(stream), Snapshot)
        if backend == "sqlite":
            woken = b.runner.keyed.next(run_key(run_id))
            await a.runs.comment(run_id, "from A", ME)
            assert not woken.is_set()  # no feed between processes on SQLite (one process per file)
            await stream.aclose()
            return
        await asyncio.wait_for(listening.wait(), 10)
        await a.runs.comment(run_id, "from A", ME)
        event = await asyncio.wait_for(anext(stream), 5)
        assert isinstance(event, EventRecord) and event.type == "run.comment" and event.actor == ME.name
        await stream.aclose()
    finally:
        await stop()


async def test_events_carry_what_a_view_needs_to_follow_without_refetching(engine: Engine) -> None:
    """A view that applies each event's `change` to its step (or run), in seq order, ends
    exactly where the records are: status, attempt, deps, error, whether there is output."""
    await engine.workflows.create({"name": "mixed", "steps": [
        {"ref": "a", "kind": "noop", "config": {"output": {"x": 1}}},
        {"ref": "gate", "kind": "approval", "depends_on": ["a"]},
        {"ref": "b", "kind": "noop", "depends_on": ["gate"]}]}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("mixed"), ME)).id
    await engine.tick()
    await engine.steps.approve(run_id, "gate", "", ME)
    await engine.tick()
    view: dict[str, dict[str, object]] = {}
    for event in (await engine.runs.events(run_id, 0, 100, "", ME)).items:
        change = (event.data or {})["change"]
        view.setdefault(event.step_ref, {}).update(change)
    steps = {s.step_ref: s for s in (await engine.steps.list(run_id, 100, "", ME)).items}
    for ref, step in steps.items():
        assert view[ref]["status"] == str(step.status) and view[ref]["attempt"] == step.attempt, ref
        assert view[ref]["deps_completed"] == step.deps_completed, ref
        assert view[ref]["has_output"] == (step.output is not None), ref
    run = await engine.runs.get(run_id, ME)
    assert view[""]["status"] == "completed" == str(run.status)
    assert view[""]["finished_at"] == run.finished_at.isoformat() if run.finished_at else False


async def test_a_quiet_watch_heartbeats_without_reading_the_database(engine: Engine,
                                                                    clock: ManualClock) -> None:
    """Idle watches cost next to nothing: between the feed's wake-ups and the safety poll a
    watch only sends heartbeats; it reads again when its run changes."""
    await engine.workflows.create(GATED, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    reads = 0
    store = engine.store

    class Counting:
        def read(self) -> Any:
            nonlocal reads
            reads += 1
            return store.read()

    quiet = Watches(Counting(), engine.clock, engine.runner.keyed,  # type: ignore[arg-type]
                    poll_seconds=60)
    stream = await quiet.watch_run(run_id, 0, ME)
    assert isinstance(await anext(stream), Snapshot)
    beats = [await _beat(quiet, clock, stream) for _ in range(10)]
    assert all(isinstance(b, Heartbeat) for b in beats)
    assert reads == 2  # the snapshot, then the events after it once
    await engine.runs.comment(run_id, "news", ME)
    item = await anext(stream)
    while isinstance(item, Heartbeat):
        item = await anext(stream)
    assert isinstance(item, EventRecord) and item.type == "run.comment" and reads == 3
    await stream.aclose()
    await quiet.close()
