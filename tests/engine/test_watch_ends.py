"""Every run watch ends once its run is final and every event up to its last is sent, whatever
events follow the final one (a notification's outcome, a comment, `run.retried`), wherever it is
resumed: before the final event, between it and the events after it, at the very end; read in
one page or in many; by the watch itself or by the run's shared tail. A run reopened after its
final event is followed to its new end. The end is judged by the run's status, never by an
event's type (engine/tails.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.domain.feed import run_key
from conveyor.domain.records import Caller, EventRecord
from conveyor.engine import tails
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Snapshot, Watches, WatchItem
from tests.engine.test_engine import events_of, trigger, wf
from tests.engine.test_notify import Receiver, receiver  # noqa: F401  (the fixture)
from tests.engine.test_tails import _joined

ME = Caller("tester")
# What follows the final event in the histories below, oldest first.
TRAILING = ["notification.delivered", "run.comment", "run.retried"]


async def _gated_run(engine: Engine, hook: Receiver) -> str:
    """A running run waiting on an approval, whose cancel is announced to `hook`."""
    await engine.workflows.create(wf("gated", [{"ref": "ok", "kind": "approval"}], notifications=[
        {"url": hook.url(), "events": ["run.canceled"]}]), ME)
    run_id = await trigger(engine, "gated")
    await engine.tick()
    return run_id


async def _end_then_trail(engine: Engine, run_id: str) -> None:
    """Cancel the run (its final event), then what may follow a final event: the notification's
    outcome, a comment, a retry as a new run."""
    await engine.runs.cancel(run_id, ME)
    assert await engine.notifier.run_once() == 1
    await engine.runs.comment(run_id, "why it was canceled", ME)
    await engine.runs.retry(run_id, ME)


async def _all(stream: AsyncIterator[WatchItem], within: float = 10) -> list[WatchItem]:
    """Everything the stream sends until it ends (failing the test if it does not end)."""
    async with asyncio.timeout(within):
        return [item async for item in stream]


def _seqs(items: list[WatchItem]) -> list[int]:
    return [i.seq for i in items if isinstance(i, EventRecord)]


@pytest.mark.parametrize("page", [500, 2], ids=["one-page", "pages-of-2"])
async def test_a_watch_resumed_anywhere_ends_after_the_last_event_of_a_final_run(
        eng: Engine, receiver: Receiver, page: int, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(tails, "PAGE", page)  # pages of 2: the end is found past a page boundary
    run_id = await _gated_run(eng, receiver)
    await _end_then_trail(eng, run_id)
    history = await events_of(eng, run_id)
    final = next(e.seq for e in history if e.type == "run.canceled")
    last = history[-1].seq
    assert [e.type for e in history if e.seq > final] == TRAILING

    # Resumed before the final event, on it, between it and each trailing event, at the very end:
    # exactly the events after the resume point, then the end.
    for after in range(1, last + 1):
        items = await _all(await eng.watches.watch_run(run_id, after, ME))
        assert _seqs(items) == list(range(after + 1, last + 1)), f"resumed after {after}"
    # From the start: the snapshot of the final run, and the end.
    (snapshot,) = await _all(await eng.watches.watch_run(run_id, 0, ME))
    assert isinstance(snapshot, Snapshot) and snapshot.seq == last and snapshot.run.status == "canceled"
    assert len(eng.watches.tails) == 0 and len(eng.watches.beats) == 0  # nothing left open


async def test_a_live_watch_ends_when_the_final_event_and_trailing_ones_come_in_one_read(
        eng: Engine, replicas: list[Engine], receiver: Receiver) -> None:  # noqa: F811
    """Watchers on replica B wait on their run's tail; B does not hear A's commits, so the
    tail reads the final event and everything after it at once when B's feed is woken after A
    is done: the last event it hands over is `run.retried`, not the final one."""
    run_id = await _gated_run(eng, receiver)
    b = replicas[1]
    watches = Watches(b.store, b.clock, b.runner.keyed, poll_seconds=3600)
    streams = [await watches.watch_run(run_id, 0, ME) for _ in range(3)]
    snapshots = [await anext(s) for s in streams]
    collected = [asyncio.ensure_future(_all(s)) for s in streams]
    await _joined(watches, run_id, 3)  # every watcher waits on the run's one tail
    await _end_then_trail(eng, run_id)
    b.runner.keyed.fire([run_key(run_id)])  # as B's feed would, once
    last = (await eng.runs.get(run_id, ME)).last_seq
    for snapshot, got in zip(snapshots, await asyncio.gather(*collected), strict=True):
        assert isinstance(snapshot, Snapshot)
        assert _seqs(got) == list(range(snapshot.seq + 1, last + 1))
        assert [i.type for i in got if isinstance(i, EventRecord)][-3:] == TRAILING
    assert len(watches.tails) == 0
    await watches.close()


async def test_a_run_reopened_after_its_final_event_is_followed_to_its_new_end(
        eng: Engine, receiver: Receiver) -> None:  # noqa: F811
    """Adversarial: the run is final, then a step retry reopens it. A watch resumed before the
    final event does not end there: it follows the reopened run until it is final again."""
    run_id = await _gated_run(eng, receiver)
    await eng.runs.cancel(run_id, ME)
    final = (await eng.runs.get(run_id, ME)).last_seq
    await eng.steps.retry(run_id, "ok", ME)  # a finished run is reopened to running
    await eng.tick()
    assert (await eng.runs.get(run_id, ME)).status == "running"
    stream = await eng.watches.watch_run(run_id, final - 1, ME)
    done = asyncio.ensure_future(_all(stream))
    await _joined(eng.watches, run_id, 1)  # caught up, it follows the run's tail
    assert not done.done()
    await eng.steps.approve(run_id, "ok", "", ME)
    await eng.tick()
    items = await done
    run = await eng.runs.get(run_id, ME)
    assert run.status == "completed"
    assert _seqs(items) == list(range(final, run.last_seq + 1))
    events: list[Any] = [i for i in items if isinstance(i, EventRecord)]
    assert events[0].type == "run.canceled" and events[-1].type == "run.completed"
