"""A sound core (issue 5): one bad run never stops another, leases and deadlines as rows, one
event per visible change, one way to create runs. Real database, ManualClock, no sleeping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.domain import planner
from conveyor.domain.errors import ConveyorError
from conveyor.domain.limits import Limits
from conveyor.domain.records import Caller, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus, can_run, can_step
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_engine import ME, events_of, noop, status, steps_of, trigger, wf

WORKER = "worker-1"


def task(ref: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"ref": ref, "kind": "task", "queue": "q", "depends_on": list(deps), **extra}


async def check_history(engine: Engine, run_id: str) -> None:
    """Seq is gapless and every status change the events record is a legal transition."""
    events = await events_of(engine, run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    run_status: RunStatus | None = None
    step_status: dict[str, StepStatus] = {}
    for e in events:
        if e.type.startswith("run.") and e.type != "run.retried":
            new = RunStatus(e.status)
            assert run_status is None or can_run(run_status, new), (run_status, new, e)
            run_status = new
        elif e.type.startswith("step."):
            new_step = StepStatus(e.status)
            old = step_status.get(e.step_ref, StepStatus.PENDING)
            assert can_step(old, new_step), (old, new_step, e)
            step_status[e.step_ref] = new_step
    assert run_status == (await engine.runs.get(run_id, ME)).status
    steps = await steps_of(engine, run_id)
    for ref, st in step_status.items():
        assert steps[ref].status == st


# -- isolation ------------------------------------------------------------------------------------

async def test_a_when_that_fails_at_run_time_fails_its_step_and_no_other_run(engine: Engine) -> None:
    await engine.workflows.create(wf("gated", [
        {"ref": "wait", "kind": "delay", "config": {"seconds": 5}},
        noop("flagged", "wait", when="payload.flag")]), ME)
    await engine.workflows.create(wf("plain", [{"ref": "wait", "kind": "delay", "config": {"seconds": 5}},
                                               noop("after", "wait")]), ME)
    bad = await trigger(engine, "gated", payload={})  # payload.flag is absent
    good = [await trigger(engine, "plain") for _ in range(3)]
    engine.clock.advance(5)  # type: ignore[attr-defined]
    await engine.tick()

    assert await status(engine, bad) == RunStatus.FAILED
    flagged = (await steps_of(engine, bad))["flagged"]
    assert flagged.status == StepStatus.FAILED and flagged.error.startswith("when: ")
    assert all([await status(engine, r) == RunStatus.COMPLETED for r in good])
    for run_id in [bad, *good]:
        await check_history(engine, run_id)
    assert await engine.tick() == 0


async def test_a_when_that_fails_at_trigger_time_is_a_failed_run_with_its_steps(engine: Engine) -> None:
    await engine.workflows.create(wf("eager", [noop("a"), noop("b", "a", when="payload.flag")]), ME)
    run_id = await trigger(engine, "eager", payload={})

    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.FAILED and "'b'" in run.error
    steps = await steps_of(engine, run_id)
    assert steps["a"].status == StepStatus.COMPLETED and steps["b"].status == StepStatus.FAILED
    await check_history(engine, run_id)


async def test_a_planning_bug_fails_that_run_alone_with_a_generic_error(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    await engine.workflows.create(wf("later", [{"ref": "wait", "kind": "delay", "config": {"seconds": 1}},
                                               noop("done", "wait")]), ME)
    doomed = await trigger(engine, "later", payload={"boom": True})
    fine = [await trigger(engine, "later") for _ in range(3)]
    real = planner._Pass.timer_due

    def buggy(self: Any, step: Any) -> None:
        if self.run.payload.get("boom"):
            raise RuntimeError("a bug in the planner")
        real(self, step)

    monkeypatch.setattr(planner._Pass, "timer_due", buggy)
    engine.clock.advance(1)  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR):
        await engine.tick()

    run = await engine.runs.get(doomed, ME)
    assert run.status == RunStatus.FAILED and run.error == "internal error while planning the run"
    assert {s.status for s in (await steps_of(engine, doomed)).values()} == {StepStatus.CANCELED}
    assert all([await status(engine, r) == RunStatus.COMPLETED for r in fine])
    assert "a bug in the planner" in caplog.text  # the traceback is in the log, not on the run
    for run_id in [doomed, *fine]:
        await check_history(engine, run_id)


async def test_an_output_too_large_fails_the_step_and_reads_keep_working(database: Database,
                                                                       clock: ManualClock) -> None:
    limits = Limits(max_output_bytes=200)
    engine = Engine(SqlStore(database), Settings(db_url=database.url, limits=limits), clock)
    # Each template's value is within the limit; together they are not.
    output = {"x": "{{ payload.x }}", "y": "{{ payload.y }}"}
    await engine.workflows.create(wf("big", [noop("a", output=output)]), ME)
    small = await trigger(engine, "big", payload={"x": "x" * 10, "y": "y"})
    large = await trigger(engine, "big", payload={"x": "x" * 150, "y": "y" * 150})

    assert await status(engine, small) == RunStatus.COMPLETED
    assert await status(engine, large) == RunStatus.FAILED
    step = (await steps_of(engine, large))["a"]
    assert step.status == StepStatus.FAILED and step.output is None
    assert step.error.startswith("OUTPUT_TOO_LARGE")
    failed = [e for e in await events_of(engine, large) if e.type == "step.failed"]
    assert failed[0].data["reason"] == "OUTPUT_TOO_LARGE"
    await check_history(engine, large)


# -- reopened runs ------------------------------------------------------------------------------

async def test_skipping_a_step_of_a_canceled_run_lets_the_run_go_on(engine: Engine) -> None:
    await engine.workflows.create(wf("gate", [{"ref": "ok", "kind": "approval"}, noop("after", "ok")]), ME)
    run_id = await trigger(engine, "gate")
    await engine.runs.cancel(run_id, ME)
    await engine.steps.skip(run_id, "ok", "not needed", ME)
    await engine.tick()

    assert await status(engine, run_id) == RunStatus.COMPLETED
    steps = await steps_of(engine, run_id)
    assert steps["ok"].status == StepStatus.SKIPPED and steps["after"].status == StepStatus.COMPLETED
    await check_history(engine, run_id)


async def test_a_reopened_run_of_a_capped_workflow_waits_for_a_slot(engine: Engine) -> None:
    await engine.workflows.create(wf("one", [{"ref": "ok", "kind": "approval"}], max_concurrent_runs=1), ME)
    first = await trigger(engine, "one")
    await engine.tick()
    await engine.runs.cancel(first, ME)
    second = await trigger(engine, "one")
    await engine.tick()
    assert await status(engine, second) == RunStatus.RUNNING

    await engine.steps.retry(first, "ok", ME)  # reopens the canceled run: no slot is free
    await engine.tick()
    assert await status(engine, first) == RunStatus.PENDING
    await engine.steps.approve(second, "ok", "", ME)
    await engine.tick()
    assert await status(engine, second) == RunStatus.COMPLETED
    assert await status(engine, first) == RunStatus.RUNNING
    await check_history(engine, first)


# -- leases and deadlines -----------------------------------------------------------------------

async def test_a_lease_is_the_step_row_fenced_by_attempt(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("work", [task("t", retry={"max_attempts": 2,
                                                                "initial_interval_seconds": 1})]), ME)
    run_id = await trigger(engine, "work", payload={"n": 3})
    (lease,) = await engine.leases.acquire("q", WORKER, 10, 5, ME)
    assert lease.step.attempt == 1 and lease.step.status == StepStatus.RUNNING
    assert await engine.leases.acquire("q", "worker-2", 10, 5, ME) == []  # never held twice
    step = (await steps_of(engine, run_id))["t"]
    assert step.worker_id == WORKER and step.job_run_id
    assert step.lease_expires_at == lease.step.lease_expires_at

    clock.advance(8)
    await engine.leases.heartbeat(lease.step.id, 1, WORKER, 10, ME)  # now expires at +18
    clock.advance(8)
    await engine.tick()
    assert (await steps_of(engine, run_id))["t"].status == StepStatus.RUNNING

    clock.advance(11)  # no heartbeat: the lease expires, a failed attempt, retried after 1 s
    await engine.tick()
    step = (await steps_of(engine, run_id))["t"]
    assert step.status == StepStatus.QUEUED and step.attempt == 1 and "expired" in step.error
    assert step.lease_expires_at is None
    for late in (engine.leases.complete(lease.step.id, 1, WORKER, {"late": True}, ME),
                 engine.leases.heartbeat(lease.step.id, 1, WORKER, 10, ME)):
        with pytest.raises(ConveyorError) as refused:
            await late
        assert refused.value.reason == "LEASE_LOST"
    assert (await steps_of(engine, run_id))["t"].output is None

    clock.advance(1)
    (second,) = await engine.leases.acquire("q", "worker-2", 10, 5, ME)
    assert second.step.attempt == 2
    await engine.leases.complete(second.step.id, 2, "worker-2", {"done": 1}, ME)
    with pytest.raises(ConveyorError) as duplicate:
        await engine.leases.complete(second.step.id, 2, "worker-2", {"done": 2}, ME)
    assert duplicate.value.reason == "LEASE_LOST"
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.COMPLETED and run.output == {"t": {"done": 1}}
    await check_history(engine, run_id)


async def test_cancel_revokes_a_lease(engine: Engine) -> None:
    await engine.workflows.create(wf("work", [task("t")]), ME)
    run_id = await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", WORKER, 30, 1, ME)
    await engine.runs.cancel(run_id, ME)
    with pytest.raises(ConveyorError) as lost:
        await engine.leases.heartbeat(lease.step.id, 1, WORKER, 30, ME)
    assert lost.value.reason == "LEASE_LOST"
    step = (await steps_of(engine, run_id))["t"]
    assert step.status == StepStatus.CANCELED and step.lease_expires_at is None
    await check_history(engine, run_id)


async def test_a_running_steps_deadline_fires_once(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("slow", [task("t", timeout_seconds=5)]), ME)
    run_id = await trigger(engine, "slow")
    (lease,) = await engine.leases.acquire("q", WORKER, 60, 1, ME)
    clock.advance(5)
    assert await engine.tick() == 1
    step = (await steps_of(engine, run_id))["t"]
    assert step.status == StepStatus.TIMED_OUT and step.lease_expires_at is None
    assert await status(engine, run_id) == RunStatus.FAILED
    assert await engine.tick() == 0  # nothing left due: the runner does not spin on it
    with pytest.raises(ConveyorError):
        await engine.leases.complete(lease.step.id, 1, WORKER, {}, ME)
    await check_history(engine, run_id)


async def test_a_failed_report_is_retried_per_policy_unless_non_retryable(engine: Engine,
                                                                          clock: ManualClock) -> None:
    await engine.workflows.create(wf("work", [task("t", retry={"max_attempts": 3,
                                                                "initial_interval_seconds": 1})]), ME)
    run_id = await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", WORKER, 30, 1, ME)
    await engine.leases.fail(lease.step.id, 1, WORKER, "flaky", True, ME)
    assert await engine.leases.acquire("q", WORKER, 30, 1, ME) == []  # backing off
    clock.advance(1)
    (again,) = await engine.leases.acquire("q", WORKER, 30, 1, ME)
    assert again.step.attempt == 2
    await engine.leases.fail(again.step.id, 2, WORKER, "bad input", False, ME)
    step = (await steps_of(engine, run_id))["t"]
    assert step.status == StepStatus.FAILED and step.attempt == 2 and step.error == "bad input"
    assert await status(engine, run_id) == RunStatus.FAILED
    attempts = [(e.data or {}).get("attempt") for e in await events_of(engine, run_id) if e.step_ref == "t"]
    assert 1 in attempts and 2 in attempts  # every attempt stays visible
    await check_history(engine, run_id)


# -- creating runs ------------------------------------------------------------------------------

async def test_a_five_step_noop_run_writes_one_event_per_visible_change(engine: Engine) -> None:
    chain = [noop(f"s{i}", *([f"s{i - 1}"] if i else [])) for i in range(5)]
    await engine.workflows.create(wf("five", chain), ME)
    run_id = await trigger(engine, "five")
    assert [e.type for e in await events_of(engine, run_id)] == (
        ["run.running"] + ["step.completed"] * 5 + ["run.completed"])


async def test_the_same_key_by_name_and_by_id_is_the_same_request(engine: Engine) -> None:
    created = await engine.workflows.create(wf("named", [{"ref": "ok", "kind": "approval"}]), ME)
    by_name = await engine.runs.trigger(TriggerRequest("named", idempotency_key="k", payload={"a": 1}), ME)
    by_id = await engine.runs.trigger(TriggerRequest(created.id, idempotency_key="k", payload={"a": 1}), ME)
    assert by_id.id == by_name.id
    with pytest.raises(ConveyorError) as reused:
        await engine.runs.trigger(TriggerRequest(created.id, idempotency_key="k", payload={"a": 2}), ME)
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_batch_with_keys_looks_them_up_together(engine: Engine) -> None:
    await engine.workflows.create(wf("keyed", [noop("a")]), ME)
    first = await asyncio.gather(*[engine.runs.trigger(
        TriggerRequest("keyed", idempotency_key=f"k{i % 5}", payload={"i": i % 5}), ME) for i in range(20)])
    assert len({r.id for r in first}) == 5
    again = await asyncio.gather(*[engine.runs.trigger(
        TriggerRequest("keyed", idempotency_key=f"k{i}", payload={"i": i}), ME) for i in range(5)])
    assert {r.id for r in again} == {r.id for r in first}


@pytest.fixture
async def pg_only(backend: str) -> AsyncIterator[None]:
    if backend != "postgresql":
        pytest.skip("SQLite stores NUL characters; PostgreSQL refuses them")
    yield


async def test_a_trigger_the_database_refuses_fails_alone(engine: Engine, pg_only: None) -> None:
    await engine.workflows.create(wf("batch", [noop("a")]), ME)
    # The API refuses NUL characters at the edge; this one comes in below it, so the database
    # itself refuses its batch, which is then written request by request.
    requests = [TriggerRequest("batch", tags={"i": str(i)}) for i in range(5)]
    requests.insert(2, TriggerRequest("batch", tags={"bad": "nul\x00here"}))
    results = await asyncio.gather(*[engine.runs.trigger(r, Caller("t")) for r in requests],
                                   return_exceptions=True)
    assert isinstance(results[2], ConveyorError) and results[2].reason == "VALUE_REFUSED"
    ok = [r for i, r in enumerate(results) if i != 2]
    assert all(not isinstance(r, BaseException) and r.status == RunStatus.COMPLETED for r in ok)


async def test_a_workflow_changed_by_another_replica_is_seen_by_the_next_trigger(
        engine: Engine, database: Database, clock: ManualClock) -> None:
    other = Engine(SqlStore(database), Settings(db_url=database.url), clock)  # another replica
    await engine.workflows.create(wf("moving", [noop("a")]), ME)
    first = await engine.runs.trigger(TriggerRequest("moving"), ME)  # `engine` now remembers v1
    await other.workflows.update("moving", wf("moving", [noop("a"), noop("b", "a")]), ME)
    second = await engine.runs.trigger(TriggerRequest("moving"), ME)
    assert (first.workflow_version, second.workflow_version) == (1, 2)
    assert set(await steps_of(engine, second.id)) == {"a", "b"}

    await other.workflows.archive("moving", "", ME)
    with pytest.raises(ConveyorError) as archived:
        await engine.runs.trigger(TriggerRequest("moving"), ME)
    assert archived.value.reason == "WORKFLOW_ARCHIVED"


async def test_an_approval_that_times_out_is_retried_per_policy(engine: Engine, clock: ManualClock) -> None:
    retry = {"max_attempts": 2, "initial_interval_seconds": 1}
    await engine.workflows.create(wf("ask", [{"ref": "ok", "kind": "approval", "timeout_seconds": 5,
                                             "retry": retry}]), ME)
    run_id = await trigger(engine, "ask")
    clock.advance(5)
    await engine.tick()
    step = (await steps_of(engine, run_id))["ok"]
    assert step.status == StepStatus.QUEUED and step.attempt == 1 and "timed out" in step.error
    clock.advance(1)
    await engine.tick()
    assert (await steps_of(engine, run_id))["ok"].status == StepStatus.WAITING
    clock.advance(5)
    await engine.tick()
    step = (await steps_of(engine, run_id))["ok"]
    assert step.status == StepStatus.TIMED_OUT and step.attempt == 2
    assert await status(engine, run_id) == RunStatus.FAILED
    await check_history(engine, run_id)


@pytest.mark.parametrize("operation", ["skip", "replay-subtree", "force-complete"])
async def test_every_exit_from_running_revokes_the_lease(engine: Engine, operation: str) -> None:
    await engine.workflows.create(wf("work", [task("t"), noop("after", "t")]), ME)
    run_id = await trigger(engine, "work")
    (lease,) = await engine.leases.acquire("q", WORKER, 30, 1, ME)
    if operation == "skip":
        await engine.steps.skip(run_id, "t", "", ME)
    elif operation == "replay-subtree":
        await engine.steps.replay_subtree(run_id, "t", ME)
    else:
        await engine.steps.force_complete(run_id, "t", {"by": "hand"}, ME)
    step = (await steps_of(engine, run_id))["t"]
    assert step.lease_expires_at is None and step.status != StepStatus.RUNNING
    with pytest.raises(ConveyorError) as lost:
        await engine.leases.complete(lease.step.id, 1, WORKER, {"late": True}, ME)
    assert lost.value.reason == "LEASE_LOST"
    assert (await steps_of(engine, run_id))["t"].output != {"late": True}
    await check_history(engine, run_id)


async def test_a_retried_run_waits_for_a_slot_when_its_workflow_is_capped_now(engine: Engine) -> None:
    await engine.workflows.create(wf("grows", [{"ref": "c", "kind": "condition",
                                                "config": {"expression": "payload.x > 1"}}]), ME)
    failed = await trigger(engine, "grows")  # payload.x missing: fails, on an uncapped version
    assert await status(engine, failed) == RunStatus.FAILED
    await engine.workflows.update("grows", wf("grows", [{"ref": "ok", "kind": "approval"}],
                                              max_concurrent_runs=1), ME)
    holder = await trigger(engine, "grows")
    await engine.tick()
    assert await status(engine, holder) == RunStatus.RUNNING
    retried = await engine.runs.retry(failed, ME)
    await engine.tick()
    # The workflow's cap now counts, not the old version's: the retry waits for the slot.
    assert (await engine.runs.get(retried.id, ME)).status == RunStatus.PENDING
    await engine.steps.approve(holder, "ok", "", ME)
    await engine.tick()
    assert await status(engine, retried.id) == RunStatus.FAILED  # ran once the slot was free
    await check_history(engine, retried.id)


async def test_a_lease_start_that_ends_a_capped_run_hands_on_its_slot(engine: Engine) -> None:
    await engine.workflows.create(wf("one", [task("t", config={"n": "{{ payload.n + 1 }}"})],
                                     max_concurrent_runs=1), ME)
    broken = await trigger(engine, "one", payload={"n": "text"})  # the template cannot render
    waiting = await trigger(engine, "one", payload={"n": 1})
    await engine.tick()
    assert (await status(engine, broken), await status(engine, waiting)) == (RunStatus.RUNNING,
                                                                             RunStatus.PENDING)
    assert await engine.leases.acquire("q", WORKER, 30, 5, ME) == []  # its start failed the run
    assert await status(engine, broken) == RunStatus.FAILED
    await engine.tick()
    assert await status(engine, waiting) == RunStatus.RUNNING
    (lease,) = await engine.leases.acquire("q", WORKER, 30, 5, ME)
    assert lease.run.id == waiting and lease.step.input == {"n": 2.0}
