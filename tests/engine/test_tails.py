"""Shared run tails: every watcher of a run is served by one read per commit; a watcher too slow
for its buffer ends with WATCHER_TOO_SLOW and resumes with no gap; the last one to leave stops
the tail; a commit the feed never announced is caught by the one safety sweep."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.domain.errors import ConveyorError, unavailable
from conveyor.domain.records import Caller, EventRecord, TriggerRequest
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Snapshot, Watches, WatchItem

ME = Caller("tester")
GATED = {"name": "gated", "steps": [{"ref": "ok", "kind": "approval"}, {"ref": "n", "kind": "noop",
                                                                        "depends_on": ["ok"]}]}


class CountingStore:
    """The engine's store, counting read units (and failing them once told to)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.reads = 0
        self.fail = False

    def read(self) -> Any:
        self.reads += 1
        if self.fail:
            raise unavailable("the database is unavailable")
        return self.store.read()


async def _gated_run(engine: Engine) -> str:
    await engine.workflows.create(GATED, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("gated"), ME)).id
    await engine.tick()
    return run_id


async def _events(stream: Any, count: int) -> list[EventRecord]:
    """The next `count` events of a stream (heartbeats skipped)."""
    out: list[EventRecord] = []
    while len(out) < count:
        item = await asyncio.wait_for(anext(stream), 10)
        if isinstance(item, EventRecord):
            out.append(item)
    return out


async def _joined(watches: Watches, run_id: str, count: int) -> None:
    """Wait (10 s at most) until `count` watchers follow the run's tail."""
    for _ in range(1000):
        if watches.tails.watchers(run_id) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{watches.tails.watchers(run_id)} of {count} watchers joined the tail")


async def _counted_watches(engine: Engine, run_id: str,
                          count: int) -> tuple[CountingStore, Watches, list[Any]]:
    """`count` watches of the run through a counting store, each past its snapshot."""
    counting = CountingStore(engine.store)
    watches = Watches(counting, engine.clock, engine.runner.keyed)  # type: ignore[arg-type]
    streams = [await watches.watch_run(run_id, 0, ME) for _ in range(count)]
    for s in streams:
        assert isinstance(await anext(s), Snapshot)
    return counting, watches, streams


async def test_fifty_watchers_of_a_run_cost_one_read_per_commit(engine: Engine) -> None:
    run_id = await _gated_run(engine)
    counting, watches, streams = await _counted_watches(engine, run_id, 50)
    before = counting.reads
    for n in range(3):
        pending = [asyncio.create_task(_events(s, 1)) for s in streams]
        await _joined(watches, run_id, 50)  # every watcher waits on the tail
        assert len(watches.tails) == 1
        await engine.runs.comment(run_id, f"note {n}", ME)
        got = await asyncio.gather(*pending)
        assert {e[0].message for e in got} == {f"note {n}"}
    # One read per commit for all fifty (plus the tail's first read when the watchers joined).
    assert counting.reads - before <= 4
    for s in streams:
        await s.aclose()
    assert len(watches.tails) == 0  # the last watcher to leave stopped the tail


async def test_a_slow_watcher_is_cut_off_and_resumes_without_gap_while_others_go_on(engine: Engine) -> None:
    run_id = await _gated_run(engine)
    watches = Watches(engine.store, engine.clock, engine.runner.keyed, buffer=4)
    slow = await watches.watch_run(run_id, 0, ME)
    fast = await watches.watch_run(run_id, 0, ME)
    snapshot = await anext(slow)
    assert isinstance(snapshot, Snapshot) and isinstance(await anext(fast), Snapshot)
    first = snapshot.seq
    slow_first = asyncio.create_task(anext(slow))  # the slow watcher takes one event, then stalls
    fast_seen: list[int] = []
    for n in range(12):  # one commit at a time; the fast watcher takes each, the slow one none
        await engine.runs.comment(run_id, f"note {n}", ME)
        fast_seen += [e.seq for e in await _events(fast, 1)]
    assert fast_seen == list(range(first + 1, first + 13))

    # The slow watcher gets what its buffer held, then the end with the seq to resume after.
    taken = await slow_first
    assert isinstance(taken, EventRecord) and taken.seq == first + 1
    delivered = [taken.seq]
    with pytest.raises(ConveyorError) as cut:
        async for item in slow:
            if isinstance(item, EventRecord):
                delivered.append(item.seq)
    assert cut.value.reason == "WATCHER_TOO_SLOW"
    dropped = watches.metrics.registry.get_sample_value("conveyor_watchers_dropped_total")
    assert dropped == 1  # the slow watcher, not the fast one
    assert delivered == list(range(first + 1, first + 1 + len(delivered))) and 2 <= len(delivered) <= 5
    resume = int(cut.value.metadata["resume_after_seq"])
    assert resume == delivered[-1] and f"after_seq={resume}" in cut.value.message

    # Resuming from there: the rest, no gap, no duplicate; then it follows the run live again.
    again = await watches.watch_run(run_id, resume, ME)
    rest = await _events(again, first + 12 - resume)
    assert [e.seq for e in rest] == list(range(resume + 1, first + 13))
    await engine.runs.comment(run_id, "live", ME)
    assert [e.message for e in await _events(again, 1)] == ["live"]
    assert [e.message for e in await _events(fast, 1)] == ["live"]
    await again.aclose()
    await fast.aclose()


async def test_a_watcher_resuming_behind_a_running_tail_gets_every_event_once(engine: Engine) -> None:
    """A tail already ahead of a newcomer hands over only what it reads next: the newcomer reads
    the events in between itself, and drops the tail's copies of what it already sent."""
    run_id = await _gated_run(engine)
    watches = Watches(engine.store, engine.clock, engine.runner.keyed)
    leader = await watches.watch_run(run_id, 0, ME)
    start = await anext(leader)
    assert isinstance(start, Snapshot)
    for n in range(5):
        await engine.runs.comment(run_id, f"early {n}", ME)
    await _events(leader, 5)
    follower = await watches.watch_run(run_id, 1, ME)
    writer = asyncio.create_task(_comment_many(engine, run_id, 20))
    got = await _events(follower, start.seq - 1 + 5 + 20)
    await writer
    assert [e.seq for e in got] == list(range(2, start.seq + 26))
    await engine.steps.approve(run_id, "ok", "", ME)
    await engine.tick()
    tail = [i async for i in follower]  # ends with the run
    assert isinstance(tail[-1], EventRecord) and tail[-1].type == "run.completed"
    assert [e.seq for e in tail if isinstance(e, EventRecord)] == list(
        range(start.seq + 26, start.seq + 26 + len([e for e in tail if isinstance(e, EventRecord)])))
    await leader.aclose()


async def _comment_many(engine: Engine, run_id: str, count: int) -> None:
    for n in range(count):
        await engine.runs.comment(run_id, f"late {n}", ME)
        await asyncio.sleep(0)


async def test_a_failing_tail_ends_its_watches_with_the_error(engine: Engine) -> None:
    run_id = await _gated_run(engine)
    counting, watches, streams = await _counted_watches(engine, run_id, 3)
    pending = [asyncio.ensure_future(anext(s)) for s in streams]
    await _joined(watches, run_id, 3)
    counting.fail = True
    await engine.runs.comment(run_id, "unreadable", ME)
    for waiting in pending:
        with pytest.raises(ConveyorError):
            await asyncio.wait_for(waiting, 10)
    assert len(watches.tails) == 0
    counting.fail = False  # the next watcher opens a new tail
    fresh = await watches.watch_run(run_id, 0, ME)
    assert isinstance(await anext(fresh), Snapshot)
    await engine.runs.comment(run_id, "readable", ME)
    assert [e.message for e in await _events(fresh, 1)] == ["readable"]
    await fresh.aclose()


async def test_the_safety_sweep_catches_commits_the_feed_never_announced(replicas: list[Engine]) -> None:
    """B does not listen to A's commits (no feed between them here): B's watcher still sees A's
    comment within B's sweep period, read by the one sweep for all of B's tails."""
    a, b = replicas
    run_id = await _gated_run(a)
    watches = Watches(b.store, b.clock, b.runner.keyed, poll_seconds=0.05, heartbeat_seconds=60)
    stream = await watches.watch_run(run_id, 0, ME)
    assert isinstance(await anext(stream), Snapshot)
    await a.runs.comment(run_id, "from A", ME)
    item: WatchItem = await asyncio.wait_for(anext(stream), 10)
    assert isinstance(item, EventRecord) and item.message == "from A"
    await stream.aclose()



async def test_watches_that_ended_leave_no_pulse_behind(engine: Engine) -> None:
    run_ids = [await _gated_run(engine)]
    run_ids += [(await engine.runs.trigger(TriggerRequest("gated"), ME)).id for _ in range(2)]
    await engine.tick()
    before = engine.runner.keyed.held()
    for run_id in run_ids:
        stream = await engine.watches.watch_run(run_id, 0, ME)
        assert isinstance(await anext(stream), Snapshot)
        waiting = asyncio.create_task(_events(stream, 1))
        await _joined(engine.watches, run_id, 1)
        assert engine.runner.keyed.held() > before  # the tail waits on its run's key
        waiting.cancel()  # the client goes away
        await asyncio.gather(waiting, return_exceptions=True)
        await stream.aclose()

    for _ in range(1000):  # the tails stop once their last watcher left
        if engine.runner.keyed.held() == before:
            break
        await asyncio.sleep(0.01)
    assert engine.runner.keyed.held() == before  # no run's key is kept for a tail that is gone
