"""The durable engine against a real database with a ManualClock: DAG advance, in-engine kinds,
`when`, limits, timers, timeouts, triggers with idempotency, and every run/step operation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.domain.errors import ConveyorError
from conveyor.domain.records import Caller, RunQuery, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from tests.engine.events import without_change

ME = Caller("tester")


def wf(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": steps, **extra}


def noop(ref: str, *deps: str, output: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    step = {"ref": ref, "kind": "noop", "depends_on": list(deps), **extra}
    if output is not None:
        step["config"] = {"output": output}
    return step


async def trigger(engine: Engine, workflow: str, **kw: Any) -> str:
    run = await engine.runs.trigger(TriggerRequest(workflow_id=workflow, **kw), ME)
    return run.id


async def steps_of(engine: Engine, run_id: str) -> dict[str, Any]:
    page = await engine.steps.list(run_id, 100, "", ME)
    return {s.step_ref: s for s in page.items}


async def events_of(engine: Engine, run_id: str) -> list[Any]:
    return (await engine.runs.events(run_id, 0, 1000, "", ME)).items


async def status(engine: Engine, run_id: str) -> RunStatus:
    return (await engine.runs.get(run_id, ME)).status


async def test_noop_chain_completes_with_contiguous_events(engine: Engine) -> None:
    chain = [noop("a", output={"x": 1}), noop("b", "a"), noop("c", "b")]
    await engine.workflows.create(wf("chain", chain), ME)
    run_id = await trigger(engine, "chain")
    # Nothing to wait for: the trigger's own transaction already ran the chain.
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert await engine.tick() == 0
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.COMPLETED
    assert run.output == {"a": {"x": 1}, "b": {}, "c": {}}
    assert run.started_at is not None and run.finished_at is not None
    steps = await steps_of(engine, run_id)
    assert {s.status for s in steps.values()} == {StepStatus.COMPLETED}
    assert steps["c"].deps_completed == steps["c"].deps_required == 1
    events = await events_of(engine, run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # Created and started in one transaction, each step queued, started and finished in it: only
    # where each ended is recorded (run.running, 3 x step.completed with its attempt, run.completed).
    assert [(e.type, e.step_ref) for e in events] == [
        ("run.running", ""), ("step.completed", "a"), ("step.completed", "b"), ("step.completed", "c"),
        ("run.completed", "")]
    assert without_change(events[1].data) == {"attempt": 1, "output": {"x": 1}}
    assert (await engine.runs.get(run_id, ME)).wake_at is None


async def test_runner_advances_a_capped_run_the_same_way(engine: Engine) -> None:
    chain = [noop("a", output={"x": 1}), noop("b", "a"), noop("c", "b")]
    await engine.workflows.create(wf("capped", chain, max_concurrent_runs=5), ME)
    run_id = await trigger(engine, "capped")
    assert await status(engine, run_id) == RunStatus.PENDING
    assert await engine.tick() == 1
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.COMPLETED and run.output == {"a": {"x": 1}, "b": {}, "c": {}}
    # run.pending at the trigger; the runner's pass: run.running, 3 x step.completed, run.completed.
    assert len(await events_of(engine, run_id)) == 6 and run.wake_at is None
    assert await engine.tick() == 0


async def test_condition_and_when_skip_propagates(engine: Engine) -> None:
    await engine.workflows.create(wf("cond", [
        {"ref": "check", "kind": "condition", "config": {"expression": "payload.amount > 100"}},
        noop("big", "check", when="steps.check.output.result"),
        noop("after_big", "big"),
        noop("small", "check", when="!steps.check.output.result"),
        noop("end", "after_big", "small"),
    ]), ME)
    run_id = await trigger(engine, "cond", payload={"amount": 5})
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["check"].output == {"result": False}
    assert steps["big"].status == StepStatus.SKIPPED and steps["big"].skip_reason == "condition false"
    assert steps["after_big"].status == StepStatus.SKIPPED
    assert steps["small"].status == StepStatus.COMPLETED
    # `end` has its own dependencies done (one skipped by a false `when`): the skip propagates.
    assert steps["end"].status == StepStatus.SKIPPED
    assert await status(engine, run_id) == RunStatus.COMPLETED


async def test_delay_is_a_durable_timer(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("sleepy", [
        noop("a"), {"ref": "wait", "kind": "delay", "depends_on": ["a"], "config": {"seconds": 30}},
        noop("b", "wait")]), ME)
    run_id = await trigger(engine, "sleepy")
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["wait"].status == StepStatus.WAITING
    run = await engine.runs.get(run_id, ME)
    assert run.wake_at == steps["wait"].due_at
    clock.advance(29)
    await engine.tick()
    assert (await steps_of(engine, run_id))["wait"].status == StepStatus.WAITING
    clock.advance(1)
    await engine.tick()
    assert await status(engine, run_id) == RunStatus.COMPLETED


async def test_max_parallel_steps_caps_running_steps(engine: Engine) -> None:
    steps = [{"ref": f"ok{i}", "kind": "approval"} for i in range(3)]
    await engine.workflows.create(wf("gated", steps, max_parallel_steps=1), ME)
    run_id = await trigger(engine, "gated")
    await engine.tick()
    waiting = [s for s in (await steps_of(engine, run_id)).values() if s.status == StepStatus.WAITING]
    assert [s.step_ref for s in waiting] == ["ok0"]
    await engine.steps.approve(run_id, "ok0", "fine", ME)
    await engine.tick()
    now = await steps_of(engine, run_id)
    assert now["ok0"].status == StepStatus.COMPLETED and now["ok0"].approved_by == "tester"
    assert now["ok1"].status == StepStatus.WAITING and now["ok2"].status == StepStatus.QUEUED


async def test_max_concurrent_runs_fifo(engine: Engine) -> None:
    await engine.workflows.create(wf("one_at_a_time", [{"ref": "gate", "kind": "approval"}],
                                     max_concurrent_runs=1), ME)
    ids = [await trigger(engine, "one_at_a_time") for _ in range(3)]
    await engine.tick()
    assert [await status(engine, i) for i in ids] == [RunStatus.RUNNING, RunStatus.PENDING, RunStatus.PENDING]
    await engine.runs.cancel(ids[0], ME)
    await engine.tick()
    assert [await status(engine, i) for i in ids] == [
        RunStatus.CANCELED, RunStatus.RUNNING, RunStatus.PENDING]
    # A paused run does not hold a slot.
    await engine.runs.pause(ids[1], ME)
    await engine.tick()
    assert [await status(engine, i) for i in ids[1:]] == [RunStatus.PAUSED, RunStatus.RUNNING]
    await engine.runs.resume(ids[1], ME)
    await engine.tick()
    assert await status(engine, ids[1]) == RunStatus.PENDING


async def test_run_timeout_cancels_unfinished_steps(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("slow", [{"ref": "wait", "kind": "delay", "config": {"seconds": 60}},
                                              noop("b", "wait")]), ME)
    run_id = await trigger(engine, "slow", timeout_seconds=10)
    await engine.tick()
    clock.advance(10)
    await engine.tick()
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.TIMED_OUT
    steps = await steps_of(engine, run_id)
    assert steps["wait"].status == steps["b"].status == StepStatus.CANCELED


async def test_cancel_and_invalid_transition_changes_nothing(engine: Engine) -> None:
    await engine.workflows.create(wf("gate", [{"ref": "g", "kind": "approval"}, noop("n", "g")]), ME)
    run_id = await trigger(engine, "gate")
    await engine.tick()
    await engine.runs.cancel(run_id, ME)
    steps = await steps_of(engine, run_id)
    assert {s.status for s in steps.values()} == {StepStatus.CANCELED}
    before = await events_of(engine, run_id)
    assert before[-1].type == "run.canceled" and before[-1].actor == "tester"
    with pytest.raises(ConveyorError) as e:
        await engine.runs.cancel(run_id, ME)
    assert e.value.reason == "INVALID_TRANSITION"
    assert len(await events_of(engine, run_id)) == len(before)
    with pytest.raises(ConveyorError) as e:
        await engine.runs.cancel("00000000-0000-7000-8000-000000000000", ME)
    assert e.value.reason == "RUN_NOT_FOUND"


async def test_idempotency_same_body_same_run_different_body_rejected(engine: Engine) -> None:
    await engine.workflows.create(wf("idem", [noop("a")]), ME)
    first = await trigger(engine, "idem", idempotency_key="k1", payload={"n": 1})
    assert await trigger(engine, "idem", idempotency_key="k1", payload={"n": 1}) == first
    with pytest.raises(ConveyorError) as e:
        await trigger(engine, "idem", idempotency_key="k1", payload={"n": 2})
    assert e.value.reason == "IDEMPOTENCY_KEY_REUSED"
    results = await asyncio.gather(*[trigger(engine, "idem", idempotency_key="k2") for _ in range(20)])
    assert len(set(results)) == 1
    page = await engine.runs.list(RunQuery(), 100, "", ME)
    assert len(page.items) == 2


async def test_batch_isolates_bad_requests(engine: Engine) -> None:
    await engine.workflows.create(wf("vars", [noop("a")], variables=[{"name": "n", "required": True}]), ME)
    good = [engine.runs.trigger(TriggerRequest("vars", payload={"n": i}), ME) for i in range(5)]
    bad = [engine.runs.trigger(TriggerRequest("vars", payload={}), ME),
           engine.runs.trigger(TriggerRequest("missing"), ME)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results[:5])
    assert [r.reason for r in results[5:]] == ["INVALID_PAYLOAD", "WORKFLOW_NOT_FOUND"]  # type: ignore[union-attr]


async def test_check_conditions_false_records_canceled_run(engine: Engine) -> None:
    await engine.workflows.create(wf("picky", [noop("a")], condition="payload.go == true"), ME)
    run_id = await trigger(engine, "picky", payload={"go": False}, check_conditions=True)
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.CANCELED and run.status_message == "conditions not met"
    assert await steps_of(engine, run_id) == {}
    ok = await trigger(engine, "picky", payload={"go": True}, check_conditions=True, immediate=True)
    assert await status(engine, ok) == RunStatus.COMPLETED


async def test_retry_run_copies_completed_steps(engine: Engine) -> None:
    await engine.workflows.create(wf("flaky", [
        noop("a", output={"v": 7}),
        {"ref": "b", "kind": "condition", "depends_on": ["a"],
         "config": {"expression": "payload.x > 1"}}]), ME)
    run_id = await trigger(engine, "flaky")  # payload.x missing: the condition fails
    await engine.tick()
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.FAILED and "b" in run.error
    new = await engine.runs.retry(run_id, ME)
    assert new.retry_of_run_id == run_id and new.id != run_id
    steps = await steps_of(engine, new.id)
    # `a` is kept as it was; `b` ran again at once (the new run is planned like a trigger) and
    # failed again, since the payload did not change.
    assert steps["a"].status == StepStatus.COMPLETED and steps["a"].output == {"v": 7}
    assert steps["a"].attempt == 1 and not any(e.step_ref == "a" for e in await events_of(engine, new.id))
    assert steps["b"].status == StepStatus.FAILED and steps["b"].attempt == 1
    assert (await engine.runs.get(new.id, ME)).status == RunStatus.FAILED
    assert (await events_of(engine, run_id))[-1].type == "run.retried"
    await engine.workflows.create(wf("fine", [noop("a")]), ME)
    with pytest.raises(ConveyorError) as refused:
        await engine.runs.retry(await trigger(engine, "fine"), ME)  # completed: not retryable
    assert refused.value.reason == "INVALID_TRANSITION"


async def test_step_operations(engine: Engine) -> None:
    await engine.workflows.create(wf("ops", [
        {"ref": "ask", "kind": "input"}, {"ref": "ok", "kind": "approval", "depends_on": ["ask"]},
        noop("done", "ok")]), ME)
    run_id = await trigger(engine, "ops")
    await engine.tick()
    with pytest.raises(ConveyorError) as e:
        await engine.steps.approve(run_id, "ask", "", ME)  # an input step, not an approval
    assert e.value.reason == "INVALID_TRANSITION"
    await engine.steps.submit_input(run_id, "ask", {"name": "x"}, ME)
    await engine.tick()
    await engine.steps.force_complete(run_id, "ok", {"forced": True}, ME)
    await engine.tick()
    assert await status(engine, run_id) == RunStatus.COMPLETED
    steps = await steps_of(engine, run_id)
    assert steps["ask"].output == {"name": "x"} and steps["ok"].output == {"forced": True}
    assert await engine.steps.replay_subtree(run_id, "ok", ME) == 2
    assert await status(engine, run_id) == RunStatus.RUNNING
    await engine.tick()
    assert (await steps_of(engine, run_id))["ok"].status == StepStatus.WAITING
    await engine.steps.skip(run_id, "ok", "not needed", ME)
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["ok"].skip_reason == "not needed" and steps["done"].status == StepStatus.COMPLETED
    assert await status(engine, run_id) == RunStatus.COMPLETED


async def test_step_retry_reopens_failed_run(engine: Engine) -> None:
    await engine.workflows.create(wf("fix", [
        {"ref": "c", "kind": "condition", "config": {"expression": "payload.x > 1"}}, noop("d", "c")]), ME)
    run_id = await trigger(engine, "fix")
    await engine.tick()
    assert await status(engine, run_id) == RunStatus.FAILED
    step = await engine.steps.retry(run_id, "c", ME)
    assert step.status == StepStatus.QUEUED
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["c"].attempt == 2 and steps["d"].status == StepStatus.CANCELED
    assert await status(engine, run_id) == RunStatus.FAILED


async def test_bulk_operations_count_per_id(engine: Engine) -> None:
    await engine.workflows.create(wf("bulk", [{"ref": "g", "kind": "approval"}]), ME)
    ids = [await trigger(engine, "bulk") for _ in range(3)]
    await engine.tick()
    await engine.runs.cancel(ids[0], ME)
    assert await engine.runs.bulk_cancel([*ids, "nope"], ME) == (2, 2)
    assert await engine.runs.bulk_replay(ids, ME) == (3, 0)
    await engine.tick()
    assert {await status(engine, i) for i in ids} == {RunStatus.RUNNING}


async def test_list_runs_filters_and_pages(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("w1", [noop("a")]), ME)
    await engine.workflows.create(wf("w2", [{"ref": "g", "kind": "approval"}]), ME)
    for i in range(5):
        await trigger(engine, "w1", tags={"team": "a" if i % 2 else "b"}, run_as=f"user{i % 2}")
        clock.advance(1)
    await trigger(engine, "w2")
    await engine.tick()
    everything = await engine.runs.list(RunQuery(), 100, "", ME)
    assert len(everything.items) == 6 and everything.next_token == ""
    running = await engine.runs.list(RunQuery(statuses=[RunStatus.RUNNING]), 100, "", ME)
    assert [r.workflow_name for r in running.items] == ["w2"]
    by_wf = await engine.runs.list(RunQuery(workflow_ids=["w1"]), 100, "", ME)
    assert len(by_wf.items) == 5
    tagged = await engine.runs.list(RunQuery(tags=[("team", "a")]), 100, "", ME)
    assert len(tagged.items) == 2
    by_user = await engine.runs.list(RunQuery(triggered_by="user0"), 100, "", ME)
    assert len(by_user.items) == 3
    seen: list[str] = []
    token = ""
    while True:
        page = await engine.runs.list(RunQuery(), 2, token, ME)
        seen += [r.id for r in page.items]
        token = page.next_token
        if not token:
            break
    assert seen == [r.id for r in everything.items]
    with pytest.raises(ConveyorError) as e:
        await engine.runs.list(RunQuery(), 2, "garbage!", ME)
    assert e.value.reason == "INVALID_PAGE_TOKEN"


async def test_workflow_versions_and_archive(engine: Engine) -> None:
    created = await engine.workflows.create(wf("ver", [{"ref": "g", "kind": "approval"}]), ME)
    old_run = await trigger(engine, "ver")
    updated = await engine.workflows.update("ver", wf("ver", [noop("x"), noop("y", "x")]), ME)
    assert updated.version == 2 and updated.id == created.id
    new_run = await trigger(engine, created.id)
    await engine.tick()
    assert set(await steps_of(engine, old_run)) == {"g"}
    assert await status(engine, new_run) == RunStatus.COMPLETED
    await engine.workflows.archive("ver", "", ME)
    with pytest.raises(ConveyorError) as e:
        await trigger(engine, "ver")
    assert e.value.reason == "WORKFLOW_ARCHIVED"
    assert (await engine.workflows.list("", 10, "", False, ME)).items == []
    assert len((await engine.workflows.list("", 10, "", True, ME)).items) == 1
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.create(wf("ver", [noop("a")]), ME)
    assert e.value.reason == "WORKFLOW_ALREADY_EXISTS"


async def test_idempotency_key_expires_after_ttl(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("ttl", [noop("a")]), ME)
    first = await trigger(engine, "ttl", idempotency_key="k", payload={"n": 1})
    clock.advance(24 * 3600 - 1)
    assert (await engine.retention.sweep())["idempotency"] == 0
    assert await trigger(engine, "ttl", idempotency_key="k", payload={"n": 1}) == first
    clock.advance(1)
    # Expired: the key is free again, for any body, before and after the purge.
    second = await trigger(engine, "ttl", idempotency_key="k", payload={"n": 2})
    assert second != first
    assert (await engine.retention.sweep())["idempotency"] == 0  # the expired record was replaced
    clock.advance(24 * 3600)
    assert (await engine.retention.sweep())["idempotency"] == 1
