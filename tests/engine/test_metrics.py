"""The engine's Prometheus metrics after real triggers, runs, leases and watches, on a ManualClock
(engine/metrics.py; README "Metrics and health")."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from conveyor.domain.records import Caller, TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.logs import JsonFormatter
from conveyor.storage.db import Database

ME = Caller("tester")


def value(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def step_seconds(engine: Engine, part: str, kind: str, status: str, queue: str = "") -> float:
    """A sample (sum, count) of conveyor_step_duration_seconds."""
    return value(engine, f"conveyor_step_duration_seconds_{part}", kind=kind, queue=queue, status=status)


async def create(engine: Engine, name: str, steps: list[dict[str, Any]]) -> None:
    await engine.workflows.create({"name": name, "steps": steps}, ME)


async def test_triggers_runs_steps_and_passes_are_counted(engine: Engine, clock: ManualClock) -> None:
    await create(engine, "wait", [
        {"ref": "a", "kind": "noop"},
        {"ref": "d", "kind": "delay", "depends_on": ["a"], "config": {"seconds": 5}}])
    # Concurrent triggers are written together: one batch of 3.
    runs = await asyncio.gather(*(engine.runs.trigger(TriggerRequest("wait"), ME) for _ in range(3)))
    assert value(engine, "conveyor_runs_triggered_total", origin="trigger") == 3
    assert value(engine, "conveyor_trigger_batch_size_count") == 1
    assert value(engine, "conveyor_trigger_batch_size_sum") == 3
    await engine.tick()
    assert value(engine, "conveyor_runs_finished_total", status="completed") == 0
    # Each noop's attempt started and ended in the same pass: 0 s.
    assert step_seconds(engine, "count", "noop", "completed") == 3
    assert step_seconds(engine, "sum", "noop", "completed") == 0
    clock.advance(65)  # 60 s past the delays' wake_at
    assert await engine.runner.tick() == 3
    assert value(engine, "conveyor_runner_lag_seconds") == 60
    assert value(engine, "conveyor_runs_finished_total", status="completed") == 3
    assert step_seconds(engine, "sum", "delay", "completed") == 3 * 65
    await engine.tick()  # nothing is due: the last pass claimed nothing late
    assert value(engine, "conveyor_runner_lag_seconds") == 0
    assert value(engine, "conveyor_runner_pass_seconds_count") >= 3
    # A finished run that is canceled changes nothing; a canceled running one counts once.
    await create(engine, "gate", [{"ref": "ok", "kind": "approval"}])
    gated = await engine.runs.trigger(TriggerRequest("gate"), ME)
    await engine.tick()
    await engine.runs.cancel(gated.id, ME)
    assert value(engine, "conveyor_runs_finished_total", status="canceled") == 1
    assert {r.id for r in runs}.isdisjoint({gated.id})


async def test_queue_wait_and_lease_expiry_by_kind_and_queue(engine: Engine, clock: ManualClock) -> None:
    await create(engine, "job", [{"ref": "t", "kind": "task", "queue": "gpu",
                                  "retry": {"max_attempts": 2, "initial_interval_seconds": 1}}])
    await engine.runs.trigger(TriggerRequest("job"), ME)
    await engine.tick()
    clock.advance(10)
    (lease,) = await engine.leases.acquire("gpu", "w1", 30, 1, ME)
    assert value(engine, "conveyor_step_queue_wait_seconds_count", kind="task", queue="gpu") == 1
    assert value(engine, "conveyor_step_queue_wait_seconds_sum", kind="task", queue="gpu") == 10
    clock.advance(31)  # w1 never heartbeats
    await engine.tick()
    assert value(engine, "conveyor_lease_expiries_total", kind="task", queue="gpu") == 1
    assert value(engine, "conveyor_step_losses_total", kind="task", queue="gpu") == 1
    # The attempt was lost: it went back to the queue after 31 s.
    assert step_seconds(engine, "sum", "task", "queued", "gpu") == 31
    clock.advance(2)
    await engine.tick()
    (again,) = await engine.leases.acquire("gpu", "w2", 30, 1, ME)
    assert again.step.attempt == 2 and again.step.id == lease.step.id
    # Ready again at the expiry (a loss waits for no backoff), leased 2 s later.
    assert value(engine, "conveyor_step_queue_wait_seconds_sum", kind="task", queue="gpu") == 10 + 2
    clock.advance(4)
    await engine.leases.complete(again.step.id, 2, "w2", {"ok": True}, ME)
    assert step_seconds(engine, "sum", "task", "completed", "gpu") == 4
    assert value(engine, "conveyor_lease_expiries_total", kind="task", queue="gpu") == 1  # a report is none
    assert value(engine, "conveyor_step_losses_total", kind="task", queue="gpu") == 1
    assert value(engine, "conveyor_runs_finished_total", status="completed") == 1


async def test_open_watches_are_counted_until_they_close(engine: Engine) -> None:
    await create(engine, "gate", [{"ref": "ok", "kind": "approval"}])
    run = await engine.runs.trigger(TriggerRequest("gate"), ME)
    watches = [await engine.watches.watch_run(run.id, 0, ME) for _ in range(2)]
    for w in watches:
        await anext(w)  # the snapshot: the watch is open
    assert value(engine, "conveyor_watches_open", kind="run") == 2
    await watches[0].aclose()  # a client that hangs up
    assert value(engine, "conveyor_watches_open", kind="run") == 1
    await engine.runs.cancel(run.id, ME)
    async for _ in watches[1]:  # the run's end ends the watch
        pass
    assert value(engine, "conveyor_watches_open", kind="run") == 0


async def test_pool_use_is_read_when_scraped(engine: Engine, database: Database, backend: str) -> None:
    engine.metrics.watch_pool(database.pool_usage)
    pool = "writer" if backend == "sqlite" else "main"
    async with database.write():
        assert value(engine, "conveyor_db_pool_checked_out", pool=pool) == 1
    assert value(engine, "conveyor_db_pool_checked_out", pool=pool) == 0
    assert value(engine, "conveyor_db_pool_size", pool=pool) == (1 if backend == "sqlite" else 15)
    await database.ping()


def test_json_log_lines_carry_the_extras() -> None:
    record = logging.LogRecord("conveyor.engine.runner", logging.WARNING, __file__, 1, "run %s failed",
                               ("r1",), None)
    record.run_id, record.step_id = "r1", "s1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING" and parsed["logger"] == "conveyor.engine.runner"
    assert parsed["message"] == "run r1 failed"
    assert (parsed["run_id"], parsed["step_id"]) == ("r1", "s1")
    assert parsed["time"].endswith("+00:00")
