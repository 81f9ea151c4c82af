"""Run watches: snapshot first, then every event in seq order, resumable with after_seq, ending
once the run is final; heartbeats while nothing happens."""

from __future__ import annotations

import asyncio

from conveyor.domain.records import Caller, EventRecord, TriggerRequest
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Heartbeat, Snapshot, Watches, WatchItem

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
        async for item in engine.watches.watch_run(run_id, 0, ME):
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
    resumed = [i async for i in engine.watches.watch_run(run_id, 3, ME)]
    everything = (await engine.runs.events(run_id, 0, 100, "", ME)).items
    assert [e.seq for e in resumed if isinstance(e, EventRecord)] == [e.seq for e in everything[3:]]
    # A final run: the snapshot alone.
    assert [type(i) for i in [i async for i in engine.watches.watch_run(run_id, 0, ME)]] == [Snapshot]


async def test_watch_sends_heartbeats_while_quiet(engine: Engine) -> None:
    await engine.workflows.create(GATED, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    quick = Watches(engine.store, engine.clock, engine.runner.committed, poll_seconds=0.01,
                    heartbeat_seconds=0.02)
    stream = quick.watch_run(run_id, 0, ME)
    assert isinstance(await anext(stream), Snapshot)
    assert isinstance(await anext(stream), Heartbeat)
    await stream.aclose()
