"""Child runs (issue 6, items 4 and 6): a `workflow` step starts a run of another workflow, waits
for it, takes its output or its failure; a step that stops waiting cancels its child (and so on
down); loops and deep nesting are refused; cross-run effects are durable run_wakeups signals.

Real database (SQLite, and PostgreSQL with CONVEYOR_TEST_DB=postgresql), ManualClock, no
sleeping. A child's end reaches its parent through a signal the NEXT runner pass takes, so tests
advance with `settle`, which ticks until nothing is due and no signal is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from typing import Any

import pytest
from sqlalchemy import text

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord, TriggerRequest
from conveyor.domain.states import FINAL_RUN, RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.events import without_change
from tests.engine.test_races import (
    BATCH,
    Outcomes,
    Pair,
    _load_all,
    check_consistent,
    check_history,
)

ME = Caller("me")
PARENT_GONE = "parent step no longer waits for this run"
# A history problem reported on its own (see test_a_capped_parents_history_is_legal).
FOLDED_START = re.compile(r"step \w+ \[<StepStatus.PENDING: 'pending'>\] -> running")


# -- definitions -----------------------------------------------------------------------------------

def wf(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": steps, **extra}


def noop(ref: str, *deps: str, output: dict[str, Any] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"ref": ref, "kind": "noop", "depends_on": list(deps)}
    if output is not None:
        step["config"] = {"output": output}
    return step


def approval(ref: str, *deps: str) -> dict[str, Any]:
    return {"ref": ref, "kind": "approval", "depends_on": list(deps)}


def call(ref: str, target: str, *deps: str, payload: dict[str, Any] | None = None,
         **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"workflow_id": target}
    if payload is not None:
        config["payload"] = payload
    return {"ref": ref, "kind": "workflow", "depends_on": list(deps), "config": config, **extra}


# -- reading -------------------------------------------------------------------------------------

async def trigger(engine: Engine, name: str, **kw: Any) -> str:
    return (await engine.runs.trigger(TriggerRequest(name, **kw), ME)).id


async def run_of(engine: Engine, run_id: str) -> RunRecord:
    async with engine.store.read() as repo:
        return await repo.get_run(run_id, None)


async def steps_of(engine: Engine, run_id: str) -> dict[str, StepRecord]:
    async with engine.store.read() as repo:
        return {s.step_ref: s for s in (await repo.steps_of([run_id]))[run_id]}


async def step(engine: Engine, run_id: str, ref: str) -> StepRecord:
    return (await steps_of(engine, run_id))[ref]


async def events_of(engine: Engine, run_id: str) -> list[EventRecord]:
    return list((await engine.runs.events(run_id, 0, 1000, "", ME)).items)


async def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    async with engine.store.read() as repo:
        return (await repo.conn.execute(text(sql), params)).scalar_one()  # type: ignore[attr-defined]


async def children_of(engine: Engine, step_id: str) -> list[RunRecord]:
    """Every run started for this step (any attempt), oldest first."""
    async with engine.store.read() as repo:
        rows = await repo.conn.execute(  # type: ignore[attr-defined]
            text("SELECT id FROM workflow_runs WHERE parent_step_run_id = :s ORDER BY created_at, id"),
            {"s": step_id})
        ids = [r[0] for r in rows]
        runs = {r.id: r for r in await repo.get_runs(ids, None)}
    # created_at ties within a pass: order by the attempt that started them instead.
    return sorted(runs.values(), key=lambda r: (r.created_at, r.id))


async def runs_of_workflow(engine: Engine, name: str) -> int:
    return int(await scalar(engine, "SELECT count(*) FROM workflow_runs WHERE workflow_name = :n", n=name))


async def wakeups(engine: Engine) -> int:
    return int(await scalar(engine, "SELECT count(*) FROM run_wakeups"))


async def settle(engine: Engine, rounds: int = 50) -> None:
    """Tick until a pass finds nothing due and no wake-up signal is left."""
    for _ in range(rounds):
        n = await engine.runner.run_until_idle()
        if n == 0 and await wakeups(engine) == 0 and await engine.tick() == 0:
            return
    raise AssertionError("the engine never settled")


async def the_child(engine: Engine, run_id: str, ref: str) -> RunRecord:
    s = await step(engine, run_id, ref)
    assert s.job_run_id, f"step {ref} has no child run: {s.status} {s.error}"
    return await run_of(engine, s.job_run_id)


# -- starting a child ----------------------------------------------------------------------------

async def test_a_workflow_step_starts_a_child_with_rendered_payload_variables_and_lineage(
        engine: Engine) -> None:
    child_wf = await engine.workflows.create(wf("child", [
        noop("echo", output={"got": "{{ payload.x }}", "y": "{{ payload.y }}",
                             "region": "{{ payload.region }}"}),
        approval("gate", "echo")],
        variables=[{"name": "x", "required": True}, {"name": "y", "required": True},
                   {"name": "region", "default": "eu"}]), ME)
    parent_wf = await engine.workflows.create(wf("parent", [
        noop("a", output={"y": 7}),
        call("call", "child", "a", payload={"x": "{{ payload.x }}", "y": "{{ steps.a.output.y }}"}),
        noop("after", "call", output={"seen": "{{ steps.call.output.echo.got }}",
                                      "region": "{{ steps.call.output.echo.region }}"})]), ME)
    parent = await trigger(engine, "parent", payload={"x": "hello"})
    await settle(engine)

    s = await step(engine, parent, "call")
    assert s.status == StepStatus.RUNNING and s.attempt == 1 and s.job_run_id
    child = await run_of(engine, s.job_run_id)
    assert child.workflow_id == child_wf.id and child.workflow_name == "child"
    # Rendered (a whole-string template keeps its JSON type), variables applied with defaults.
    assert child.payload == {"x": "hello", "y": 7, "region": "eu"}
    assert child.parent_workflow_run_id == parent and child.parent_step_run_id == s.id
    assert child.depth == 1 and child.root_run_id == parent
    assert child.lineage == [parent_wf.id, child_wf.id]
    assert child.status == RunStatus.RUNNING
    assert (await step(engine, child.id, "gate")).status == StepStatus.WAITING
    assert (await run_of(engine, parent)).status == RunStatus.RUNNING

    await engine.steps.approve(child.id, "gate", "ok", ME)
    await settle(engine)
    child = await run_of(engine, child.id)
    assert child.status == RunStatus.COMPLETED
    s = await step(engine, parent, "call")
    assert s.status == StepStatus.COMPLETED and s.output == child.output
    assert s.output is not None and s.output["echo"] == {"got": "hello", "y": 7, "region": "eu"}
    assert s.attempt == 1 and s.job_run_id == child.id
    assert (await step(engine, parent, "after")).output == {"seen": "hello", "region": "eu"}
    assert (await run_of(engine, parent)).status == RunStatus.COMPLETED
    assert await wakeups(engine) == 0


async def test_a_child_named_by_id_that_completes_at_once_completes_its_step_in_the_same_pass(
        engine: Engine) -> None:
    target = await engine.workflows.create(wf("instant", [noop("n", output={"v": "{{ payload.v }}"})]), ME)
    await engine.workflows.create(wf("caller", [call("c", target.id, payload={"v": 3}), noop("d", "c")]), ME)
    parent = await trigger(engine, "caller")
    # The trigger's pass leaves the child for the runner; ONE runner pass starts it, sees it end
    # and completes the step and the run — no second pass, no signal needed.
    assert (await step(engine, parent, "c")).status == StepStatus.QUEUED
    assert await engine.runner.tick() == 1
    run = await run_of(engine, parent)
    assert run.status == RunStatus.COMPLETED
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.COMPLETED and s.attempt == 1 and s.output == {"n": {"v": 3}}
    child = await run_of(engine, s.job_run_id)
    assert child.status == RunStatus.COMPLETED and child.parent_step_run_id == s.id
    await settle(engine)
    assert await runs_of_workflow(engine, "instant") == 1


async def test_a_workflow_of_another_project_is_refused_like_a_missing_one(engine: Engine) -> None:
    other = await engine.workflows.create({**wf("secret", [noop("n")]), "project_id": "other"}, ME)
    await engine.workflows.create(wf("prying", [
        call("by_name", "secret", retry={"max_attempts": 3}),
        call("by_id", other.id, retry={"max_attempts": 3}),
        call("missing", "no-such-workflow", retry={"max_attempts": 3})]), ME)
    parent = await trigger(engine, "prying")
    await settle(engine)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    await settle(engine)

    steps = await steps_of(engine, parent)
    for ref, ident in (("by_name", "secret"), ("by_id", other.id), ("missing", "no-such-workflow")):
        s = steps[ref]
        # Not retried (it would be refused again), no child run.
        assert s.status == StepStatus.FAILED and s.attempt <= 1, (ref, s.status, s.attempt)
        assert s.error == f"CHILD_REFUSED: workflow {ident!r} not found", (ref, s.error)
        assert await children_of(engine, s.id) == []
    assert await runs_of_workflow(engine, "secret") == 0
    assert (await run_of(engine, parent)).status == RunStatus.FAILED
    failed = [e for e in await events_of(engine, parent) if e.type == "step.failed"]
    assert {e.step_ref for e in failed} == {"by_name", "by_id", "missing"}
    assert all((e.data or {}).get("reason") == "CHILD_REFUSED" for e in failed)


async def test_a_missing_required_variable_fails_the_step_for_good(engine: Engine) -> None:
    await engine.workflows.create(wf("needs", [noop("n")],
                                     variables=[{"name": "must", "required": True}]), ME)
    await engine.workflows.create(wf("forgets", [
        call("c", "needs", payload={"other": 1}, retry={"max_attempts": 3})]), ME)
    parent = await trigger(engine, "forgets")
    await settle(engine)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.FAILED and s.attempt <= 1
    assert s.error.startswith("CHILD_REFUSED: ")
    assert await runs_of_workflow(engine, "needs") == 0
    mine = [e for e in await events_of(engine, parent) if e.step_ref == "c"]
    assert [e.type for e in mine if e.type != "step.queued"] == ["step.failed"]
    assert not any("retrying" in e.message for e in mine)
    ev = [e for e in await events_of(engine, parent) if e.type == "step.failed"][-1]
    assert (ev.data or {}).get("reason") == "CHILD_REFUSED"


# -- a child's end ---------------------------------------------------------------------------------

async def test_a_failed_child_fails_the_step_then_a_retry_starts_a_new_child(engine: Engine) -> None:
    await engine.workflows.create(wf("breaks", [noop("bad", output={"v": "{{ payload.nope.x }}"})]), ME)
    await engine.workflows.create(wf("tries", [call("c", "breaks", retry={"max_attempts": 2})]), ME)
    parent = await trigger(engine, "tries")
    await settle(engine)
    s = await step(engine, parent, "c")
    first = await run_of(engine, s.job_run_id)
    assert first.status == RunStatus.FAILED
    # Attempt 1 failed, backing off: queued with the child's status and error.
    assert s.status == StepStatus.QUEUED and s.attempt == 1
    assert f"child run {first.id} failed" in s.error and first.error and first.error in s.error

    engine.clock.advance(1)  # type: ignore[attr-defined]
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.attempt == 2 and s.job_run_id != first.id
    kids = await children_of(engine, s.id)
    assert [k.id for k in kids] == [first.id, s.job_run_id]
    assert (await run_of(engine, first.id)).status == RunStatus.FAILED  # left as it was
    assert (await run_of(engine, first.id)).finished_at == first.finished_at
    second = await run_of(engine, s.job_run_id)
    assert second.status == RunStatus.FAILED and second.parent_step_run_id == s.id
    assert s.status == StepStatus.FAILED and f"child run {second.id} failed" in s.error
    run = await run_of(engine, parent)
    assert run.status == RunStatus.FAILED and second.id in run.error


async def test_a_child_that_times_out_fails_the_step(engine: Engine) -> None:
    await engine.workflows.create(wf("slow", [approval("gate")], timeout_seconds=10), ME)
    await engine.workflows.create(wf("waits", [call("c", "slow")]), ME)
    parent = await trigger(engine, "waits")
    await settle(engine)
    child = await the_child(engine, parent, "c")
    assert child.expires_at is not None
    engine.clock.advance(10)  # type: ignore[attr-defined]
    await settle(engine)
    child = await run_of(engine, child.id)
    assert child.status == RunStatus.TIMED_OUT
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.FAILED
    assert f"child run {child.id} timed_out" in s.error and child.error in s.error
    assert (await run_of(engine, parent)).status == RunStatus.FAILED


async def test_an_operator_canceling_the_child_fails_the_step(engine: Engine) -> None:
    await engine.workflows.create(wf("held", [approval("gate")]), ME)
    await engine.workflows.create(wf("holder", [call("c", "held")]), ME)
    parent = await trigger(engine, "holder")
    await settle(engine)
    child = await the_child(engine, parent, "c")
    await engine.runs.cancel(child.id, ME)
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.FAILED
    assert f"child run {child.id} canceled" in s.error and "canceled by me" in s.error
    assert (await run_of(engine, parent)).status == RunStatus.FAILED
    assert await wakeups(engine) == 0


@pytest.mark.parametrize("retries", [False, True])
async def test_the_steps_own_timeout_ends_the_wait_and_cancels_the_child(engine: Engine,
                                                                         retries: bool) -> None:
    await engine.workflows.create(wf("held", [approval("gate")]), ME)
    extra: dict[str, Any] = {"timeout_seconds": 5}
    if retries:
        extra["retry"] = {"max_attempts": 2}
    await engine.workflows.create(wf("impatient", [call("c", "held", **extra)]), ME)
    parent = await trigger(engine, "impatient")
    await settle(engine)
    first = await the_child(engine, parent, "c")
    engine.clock.advance(5)  # type: ignore[attr-defined]
    await settle(engine)
    first = await run_of(engine, first.id)
    assert first.status == RunStatus.CANCELED and first.status_message == PARENT_GONE
    assert (await step(engine, first.id, "gate")).status == StepStatus.CANCELED
    s = await step(engine, parent, "c")
    if not retries:
        assert s.status == StepStatus.TIMED_OUT and s.error == "step timed out after 5s"
        assert (await run_of(engine, parent)).status == RunStatus.FAILED
        return
    assert s.status == StepStatus.QUEUED and s.attempt == 1
    engine.clock.advance(1)  # type: ignore[attr-defined]
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.RUNNING and s.attempt == 2 and s.job_run_id != first.id
    assert s.due_at is not None  # the new attempt has its own timeout
    second = await run_of(engine, s.job_run_id)
    assert second.status == RunStatus.RUNNING
    await engine.steps.approve(second.id, "gate", "", ME)
    await settle(engine)
    assert (await run_of(engine, parent)).status == RunStatus.COMPLETED
    assert [k.status for k in await children_of(engine, s.id)] == [RunStatus.CANCELED, RunStatus.COMPLETED]


# -- cancel cascade ------------------------------------------------------------------------------

async def _three_levels(engine: Engine) -> tuple[str, RunRecord, RunRecord]:
    """top -> mid -> leaf (an approval), settled: the leaf waits."""
    await engine.workflows.create(wf("leaf", [approval("gate")]), ME)
    await engine.workflows.create(wf("mid", [call("down", "leaf")]), ME)
    await engine.workflows.create(wf("top", [call("down", "mid"), noop("after", "down")]), ME)
    top = await trigger(engine, "top")
    await settle(engine)
    mid = await the_child(engine, top, "down")
    leaf = await the_child(engine, mid.id, "down")
    assert leaf.status == RunStatus.RUNNING and leaf.depth == 2
    assert leaf.root_run_id == top and mid.root_run_id == top
    assert leaf.lineage == [mid.lineage[0], mid.lineage[1], leaf.workflow_id]  # type: ignore[index]
    return top, mid, leaf


async def test_canceling_a_run_cancels_its_child_and_grandchild(engine: Engine) -> None:
    top, mid, leaf = await _three_levels(engine)
    await engine.runs.cancel(top, ME)
    await settle(engine)
    assert (await run_of(engine, top)).status == RunStatus.CANCELED
    for r in (mid, leaf):
        got = await run_of(engine, r.id)
        assert got.status == RunStatus.CANCELED, (r.workflow_name, got.status)
        assert got.status_message == PARENT_GONE
    assert (await step(engine, mid.id, "down")).status == StepStatus.CANCELED
    assert (await step(engine, leaf.id, "gate")).status == StepStatus.CANCELED
    ev = (await events_of(engine, leaf.id))[-1]
    assert ev.type == "run.canceled" and ev.message == PARENT_GONE
    assert await wakeups(engine) == 0


async def test_pausing_a_parent_does_not_cancel_its_child(engine: Engine) -> None:
    top, mid, leaf = await _three_levels(engine)
    await engine.runs.pause(top, ME)
    await settle(engine)
    assert (await run_of(engine, mid.id)).status == RunStatus.RUNNING
    assert (await run_of(engine, leaf.id)).status == RunStatus.RUNNING
    await engine.steps.approve(leaf.id, "gate", "", ME)
    await settle(engine)
    assert (await run_of(engine, mid.id)).status == RunStatus.COMPLETED
    # The paused parent's step took the outcome; nothing new starts until it is resumed.
    assert (await step(engine, top, "down")).status == StepStatus.COMPLETED
    assert (await run_of(engine, top)).status == RunStatus.PAUSED
    await engine.runs.resume(top, ME)
    await settle(engine)
    assert (await run_of(engine, top)).status == RunStatus.COMPLETED


@pytest.mark.parametrize("op", ["skip", "force_complete", "replay_subtree"])
async def test_an_operator_ending_the_wait_cancels_the_child(engine: Engine, op: str) -> None:
    top, mid, leaf = await _three_levels(engine)
    if op == "skip":
        await engine.steps.skip(top, "down", "not needed", ME)
    elif op == "force_complete":
        await engine.steps.force_complete(top, "down", {"forced": True}, ME)
    else:
        assert await engine.steps.replay_subtree(top, "down", ME) == 2
    await settle(engine)
    for r in (mid, leaf):
        got = await run_of(engine, r.id)
        assert got.status == RunStatus.CANCELED and got.status_message == PARENT_GONE, (r.workflow_name, got)
    s = await step(engine, top, "down")
    if op == "replay_subtree":
        # A NEW child for the replayed step; the old one stays canceled.
        kids = await children_of(engine, s.id)
        assert len(kids) == 2 and kids[0].id == mid.id
        assert s.status == StepStatus.RUNNING and s.job_run_id == kids[1].id
        new = await run_of(engine, s.job_run_id)
        assert new.status == RunStatus.RUNNING
        new_leaf = await the_child(engine, new.id, "down")
        assert new_leaf.id != leaf.id
        await engine.steps.approve(new_leaf.id, "gate", "", ME)
        await settle(engine)
    else:
        assert s.status in (StepStatus.SKIPPED, StepStatus.COMPLETED)
    assert (await run_of(engine, top)).status == RunStatus.COMPLETED
    assert await wakeups(engine) == 0


async def test_the_parents_deadline_cancels_its_children(engine: Engine) -> None:
    await engine.workflows.create(wf("leaf", [approval("gate")]), ME)
    await engine.workflows.create(wf("mid", [call("down", "leaf")]), ME)
    await engine.workflows.create(wf("top", [call("down", "mid")]), ME)
    top = await trigger(engine, "top", timeout_seconds=30)
    await settle(engine)
    mid = await the_child(engine, top, "down")
    leaf = await the_child(engine, mid.id, "down")
    engine.clock.advance(30)  # type: ignore[attr-defined]
    await settle(engine)
    assert (await run_of(engine, top)).status == RunStatus.TIMED_OUT
    for r in (mid, leaf):
        got = await run_of(engine, r.id)
        assert got.status == RunStatus.CANCELED and got.status_message == PARENT_GONE


# -- loops and nesting ---------------------------------------------------------------------------

async def test_a_workflow_that_names_itself_is_refused_and_not_stored(engine: Engine) -> None:
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.create(wf("ouroboros", [noop("a"), call("again", "ouroboros", "a")]), ME)
    assert e.value.kind == ErrorKind.FAILED_PRECONDITION and e.value.reason == "WORKFLOW_LOOP"
    with pytest.raises(ConveyorError) as missing:
        await engine.workflows.get("ouroboros", "", ME)
    assert missing.value.kind == ErrorKind.NOT_FOUND
    assert await scalar(engine, "SELECT count(*) FROM workflows") == 0
    assert await scalar(engine, "SELECT count(*) FROM workflow_versions") == 0


async def test_an_update_that_closes_a_loop_is_refused_and_keeps_the_version(engine: Engine) -> None:
    await engine.workflows.create(wf("b", [noop("n")]), ME)
    a = await engine.workflows.create(wf("a", [call("to_b", "b")]), ME)
    for target in ("a", a.id):
        with pytest.raises(ConveyorError) as e:
            await engine.workflows.update("b", wf("b", [call("to_a", target)]), ME)
        assert e.value.kind == ErrorKind.FAILED_PRECONDITION and e.value.reason == "WORKFLOW_LOOP"
    b = await engine.workflows.get("b", "", ME)
    assert b.version == 1 and b.spec.child_workflows == ()
    # Through a third workflow too: a -> b -> c -> a.
    await engine.workflows.create(wf("c", [call("to_a", "a")]), ME)
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.update("b", wf("b", [call("to_c", "c")]), ME)
    assert e.value.reason == "WORKFLOW_LOOP"
    assert (await engine.workflows.get("b", "", ME)).version == 1
    # A self-reference by update, by name.
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.update("c", wf("c", [call("me", "c")]), ME)
    assert e.value.reason == "WORKFLOW_LOOP"


async def test_a_templated_loop_fails_the_step_at_run_time_without_a_run(engine: Engine) -> None:
    await engine.workflows.create(wf("dispatcher", [
        call("go", "{{ payload.target }}", payload={"target": "{{ payload.next }}", "next": "x"},
             retry={"max_attempts": 3})]), ME)
    # Direct: dispatcher starting dispatcher.
    parent = await trigger(engine, "dispatcher", payload={"target": "dispatcher", "next": "x"})
    await settle(engine)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    await settle(engine)
    s = await step(engine, parent, "go")
    assert s.status == StepStatus.FAILED and s.attempt <= 1  # not retried
    assert s.error.startswith("WORKFLOW_LOOP: ")
    ev = [e for e in await events_of(engine, parent) if e.type == "step.failed"][-1]
    assert (ev.data or {}).get("reason") == "WORKFLOW_LOOP"
    assert await runs_of_workflow(engine, "dispatcher") == 1
    assert await children_of(engine, s.id) == []


async def test_a_templated_loop_through_an_ancestor_is_caught_by_lineage(engine: Engine) -> None:
    await engine.workflows.create(wf("hop", [call("back", "{{ payload.to }}", retry={"max_attempts": 3})],
                                     variables=[{"name": "to", "required": True}]), ME)
    await engine.workflows.create(wf("origin", [call("out", "hop", payload={"to": "{{ payload.to }}"})]), ME)
    parent = await trigger(engine, "origin", payload={"to": "origin"})
    await settle(engine)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    await settle(engine)
    hop = await the_child(engine, parent, "out")
    back = await step(engine, hop.id, "back")
    assert back.status == StepStatus.FAILED and back.attempt <= 1 and back.error.startswith("WORKFLOW_LOOP: ")
    assert hop.status == RunStatus.FAILED
    assert await runs_of_workflow(engine, "origin") == 1
    out = await step(engine, parent, "out")
    assert out.status == StepStatus.FAILED and "WORKFLOW_LOOP" in out.error
    # The same templated step to a workflow outside its lineage runs fine.
    await engine.workflows.create(wf("elsewhere", [noop("n")]), ME)
    ok = await trigger(engine, "origin", payload={"to": "elsewhere"})
    await settle(engine)
    assert (await run_of(engine, ok)).status == RunStatus.COMPLETED


async def test_nesting_deeper_than_the_setting_fails_the_step(database: Database, clock: ManualClock) -> None:
    shallow = Engine(SqlStore(database), Settings(db_url=str(database.url), max_nesting_depth=2), clock)
    try:
        await shallow.workflows.create(wf("w3", [noop("n", output={"deep": True})]), ME)
        await shallow.workflows.create(wf("w2", [call("c", "w3", retry={"max_attempts": 3})]), ME)
        await shallow.workflows.create(wf("w1", [call("c", "w2")]), ME)
        await shallow.workflows.create(wf("w0", [call("c", "w1")]), ME)
        # Depth 2 is allowed: w1 -> w2 -> w3.
        ok = await trigger(shallow, "w1")
        await settle(shallow)
        assert (await run_of(shallow, ok)).status == RunStatus.COMPLETED
        # w0 -> w1 -> w2 -> w3 would put w3 at depth 3.
        deep = await trigger(shallow, "w0")
        await settle(shallow)
        shallow.clock.advance(60)  # type: ignore[attr-defined]
        await settle(shallow)
        w1 = await the_child(shallow, deep, "c")
        w2 = await the_child(shallow, w1.id, "c")
        assert w2.depth == 2
        s = await step(shallow, w2.id, "c")
        assert s.status == StepStatus.FAILED and s.attempt <= 1 and s.error.startswith("NESTING_TOO_DEEP")
        assert not s.job_run_id
        assert await runs_of_workflow(shallow, "w3") == 1  # only the allowed run's
        assert (await run_of(shallow, deep)).status == RunStatus.FAILED
    finally:
        await shallow.stop()


async def test_an_archived_target_fails_the_step(engine: Engine) -> None:
    await engine.workflows.create(wf("old", [noop("n")]), ME)
    await engine.workflows.create(wf("user", [call("c", "old", retry={"max_attempts": 3})]), ME)
    await engine.workflows.archive("old", "", ME)
    parent = await trigger(engine, "user")
    await settle(engine)
    engine.clock.advance(60)  # type: ignore[attr-defined]
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.FAILED and s.attempt <= 1
    assert s.error.startswith("CHILD_REFUSED: ") and "archived" in s.error
    assert await runs_of_workflow(engine, "old") == 0


# -- concurrency caps ----------------------------------------------------------------------------

async def test_a_child_of_a_capped_workflow_waits_for_its_slot(engine: Engine) -> None:
    await engine.workflows.create(wf("solo", [approval("gate")], max_concurrent_runs=1), ME)
    await engine.workflows.create(wf("uses_solo", [call("c", "solo")]), ME)
    first = await trigger(engine, "solo")
    await settle(engine)
    assert (await run_of(engine, first)).status == RunStatus.RUNNING
    parent = await trigger(engine, "uses_solo")
    await settle(engine)
    child = await the_child(engine, parent, "c")
    assert child.status == RunStatus.PENDING
    assert (await step(engine, parent, "c")).status == StepStatus.RUNNING
    engine.clock.advance(3600)  # type: ignore[attr-defined]
    await settle(engine)
    assert (await run_of(engine, child.id)).status == RunStatus.PENDING
    await engine.steps.approve(first, "gate", "", ME)
    await settle(engine)
    assert (await run_of(engine, child.id)).status == RunStatus.RUNNING
    assert (await step(engine, parent, "c")).status == StepStatus.RUNNING
    await engine.steps.approve(child.id, "gate", "", ME)
    await settle(engine)
    assert (await run_of(engine, parent)).status == RunStatus.COMPLETED


async def test_canceling_the_parent_of_a_pending_child_cancels_it(engine: Engine) -> None:
    await engine.workflows.create(wf("solo", [approval("gate")], max_concurrent_runs=1), ME)
    await engine.workflows.create(wf("uses_solo", [call("c", "solo")]), ME)
    first = await trigger(engine, "solo")
    parent = await trigger(engine, "uses_solo")
    await settle(engine)
    child = await the_child(engine, parent, "c")
    assert child.status == RunStatus.PENDING
    await engine.runs.cancel(parent, ME)
    await settle(engine)
    child = await run_of(engine, child.id)
    assert child.status == RunStatus.CANCELED and child.status_message == PARENT_GONE
    assert (await run_of(engine, first)).status == RunStatus.RUNNING


# -- durable signals -----------------------------------------------------------------------------

async def test_a_childs_end_reaches_its_parent_across_a_restart(database: Database,
                                                                 clock: ManualClock) -> None:
    settings = Settings(db_url=str(database.url))
    first = Engine(SqlStore(database), settings, clock)
    await first.workflows.create(wf("held", [approval("gate")]), ME)
    await first.workflows.create(wf("holder", [call("c", "held"), noop("after", "c")]), ME)
    parent = await trigger(first, "holder")
    await settle(first)
    child = await the_child(first, parent, "c")
    await first.steps.approve(child.id, "gate", "", ME)
    assert await first.runner.tick() == 1  # the child completes and signals its parent ...
    assert (await run_of(first, child.id)).status == RunStatus.COMPLETED
    assert (await step(first, parent, "c")).status == StepStatus.RUNNING
    rows = await scalar(first, "SELECT count(*) FROM run_wakeups WHERE run_id = :r", r=parent)
    assert rows == 1
    await first.stop()  # ... and the engine is gone before the parent's pass.
    del first

    second = Engine(SqlStore(database), settings, clock)
    try:
        await settle(second)
        assert (await run_of(second, parent)).status == RunStatus.COMPLETED
        assert (await step(second, parent, "c")).output == (await run_of(second, child.id)).output
        assert await wakeups(second) == 0
    finally:
        await second.stop()


# -- run retry and history -------------------------------------------------------------------------

async def test_a_run_retry_of_a_failed_child_is_a_run_of_its_own(engine: Engine) -> None:
    await engine.workflows.create(wf("needs_later", [call("c", "later")]), ME)
    await engine.workflows.create(wf("outer", [call("c", "needs_later")]), ME)
    parent = await trigger(engine, "outer")
    await settle(engine)
    child = await the_child(engine, parent, "c")
    assert child.status == RunStatus.FAILED
    assert (await run_of(engine, parent)).status == RunStatus.FAILED
    parent_before = await run_of(engine, parent)

    await engine.workflows.create(wf("later", [noop("n", output={"ok": 1})]), ME)
    retry = await engine.runs.retry(child.id, ME)
    await settle(engine)
    retry = await run_of(engine, retry.id)
    assert retry.retry_of_run_id == child.id
    assert retry.parent_workflow_run_id == "" and retry.parent_step_run_id == ""
    assert retry.depth == 0
    assert retry.status == RunStatus.COMPLETED
    grandchild = await the_child(engine, retry.id, "c")
    assert grandchild.status == RunStatus.COMPLETED and grandchild.depth == 1
    assert grandchild.root_run_id == retry.id
    # The original parent is untouched.
    after = await run_of(engine, parent)
    assert after.status == RunStatus.FAILED and after.last_seq == parent_before.last_seq


async def test_events_name_the_parent_and_each_attempts_child(engine: Engine) -> None:
    await engine.workflows.create(wf("breaks", [noop("bad", output={"v": "{{ payload.nope.x }}"})]), ME)
    await engine.workflows.create(wf("held", [approval("gate")]), ME)
    await engine.workflows.create(wf("parent", [
        call("c", "breaks", retry={"max_attempts": 2}), call("h", "held")]), ME)
    parent = await trigger(engine, "parent")
    await settle(engine)
    engine.clock.advance(1)  # type: ignore[attr-defined]
    await settle(engine)
    h = await step(engine, parent, "h")
    held = await run_of(engine, h.job_run_id)
    first_ev = (await events_of(engine, held.id))[0]
    assert first_ev.seq == 1 and first_ev.type == "run.running"
    assert without_change(first_ev.data) == {"parent_workflow_run_id": parent, "parent_step_run_id": h.id}
    assert parent in first_ev.message and "'h'" in first_ev.message

    c = await step(engine, parent, "c")
    kids = await children_of(engine, c.id)
    assert len(kids) == 2
    events = await events_of(engine, parent)
    # Each attempt's child is named by the event that records its start (an attempt started and
    # ended by one pass is recorded once, where it ended, with the start's data folded in).
    started = [without_change(e.data) for e in events if e.step_ref == "c" and "job_run_id" in (e.data or {})]
    assert [(d.get("attempt"), d.get("job_run_id")) for d in started] == [(1, kids[0].id), (2, kids[1].id)]
    failed = [e for e in events if e.step_ref == "c" and "error" in (e.data or {})]
    assert [(e.data or {}).get("attempt") for e in failed] == [1, 2]
    assert kids[0].id in failed[0].message and kids[1].id in failed[1].message
    hs = [without_change(e.data) for e in events if e.step_ref == "h" and e.type == "step.running"]
    assert hs == [{"attempt": 1, "job_run_id": held.id}]


# -- races: two engines on one database ------------------------------------------------------------

async def _race_settle(p: Pair, out: Outcomes, rounds: int = 200) -> None:
    for _ in range(rounds):
        counts = await asyncio.gather(*(out.call(f"tick {n}", e.tick(), set())
                                         for n, e in (("A", p.a), ("B", p.b))))
        if not any(counts) and await wakeups(p.a) == 0 and await p.a.tick() == 0:
            return
    raise AssertionError("the engines never settled")


async def test_two_engines_start_each_child_exactly_once(pair: Pair) -> None:
    p, out = pair, Outcomes()
    await p.a.workflows.create(wf("instant", [noop("n", output={"v": "{{ payload.i }}"})]), ME)
    await p.a.workflows.create(wf("held", [approval("gate")]), ME)
    await p.a.workflows.create(wf("fan", [
        call("quick", "instant", payload={"i": "{{ payload.i }}"}),
        call("slow", "held"),
        noop("join", "quick", "slow")]), ME)
    parents = [await trigger(p.a, "fan", payload={"i": i}) for i in range(50)]
    await _race_settle(p, out)
    # Approve every held child, half from each engine, racing both runners.
    for _ in range(100):
        held = [s.job_run_id for r in parents
                for s in [await step(p.a, r, "slow")] if s.status == StepStatus.RUNNING and s.job_run_id]
        waiting = [c for c in held if (await step(p.a, c, "gate")).status == StepStatus.WAITING]
        if not waiting:
            break
        await asyncio.gather(
            *(out.call("approve", (p.a if i % 2 else p.b).steps.approve(c, "gate", "", ME),
                       {ErrorKind.FAILED_PRECONDITION, ErrorKind.ABORTED}) for i, c in enumerate(waiting)),
            *(out.call(f"tick {n}", e.tick(), set()) for n, e in (("A", p.a), ("B", p.b))))
    await _race_settle(p, out)
    out.check()

    runs, steps, events = await check_consistent(p.db)
    for r in parents:
        assert runs[r].status == RunStatus.COMPLETED, (r, runs[r].status, runs[r].error)
        completed = [e for e in events[r] if e.type == "run.completed"]
        assert len(completed) == 1
    by_step: dict[str, list[RunRecord]] = {}
    for run in runs.values():
        if run.parent_step_run_id:
            by_step.setdefault(run.parent_step_run_id, []).append(run)
    for r in parents:
        for s in steps[r]:
            if s.kind == "workflow":
                kids = by_step.get(s.id, [])
                assert len(kids) == s.attempt == 1, (r, s.step_ref, [k.id for k in kids])
                assert kids[0].id == s.job_run_id and kids[0].status == RunStatus.COMPLETED
                done = [e for e in events[r] if e.step_ref == s.step_ref and e.type == "step.completed"]
                assert len(done) == 1
    assert len(runs) == 150
    assert await wakeups(p.a) == 0


def _family_problems(runs: dict[str, RunRecord], steps: dict[str, list[StepRecord]]) -> list[str]:
    """After settling: no step waits on a finished child, no live child is unwanted."""
    problems = []
    step_by_id = {s.id: s for ss in steps.values() for s in ss}
    for run in runs.values():
        for s in steps[run.id]:
            if s.kind == "workflow" and s.status == StepStatus.RUNNING:
                child = runs.get(s.job_run_id)
                if child is None or child.status in FINAL_RUN:
                    problems.append(f"run {run.id} ({run.status}) step {s.step_ref} running on "
                                    f"{child.status if child else 'no'} child {s.job_run_id}")
        if run.parent_step_run_id and run.status not in FINAL_RUN:
            ps = step_by_id[run.parent_step_run_id]
            if ps.status != StepStatus.RUNNING or ps.job_run_id != run.id:
                problems.append(f"live child {run.id} ({run.status}) of a {ps.status} step")
    return problems


async def test_canceling_a_parent_races_its_grandchilds_approval(pair: Pair, backend: str) -> None:
    p, out = pair, Outcomes()
    await p.a.workflows.create(wf("leaf", [approval("gate")]), ME)
    await p.a.workflows.create(wf("mid", [call("down", "leaf")]), ME)
    await p.a.workflows.create(wf("top", [call("down", "mid")]), ME)
    rng = random.Random(6)
    tops = [await trigger(p.a, "top") for _ in range(30)]
    await _race_settle(p, out)
    leaves = {}
    for t in tops:
        mid = await the_child(p.a, t, "down")
        leaves[t] = (await the_child(p.a, mid.id, "down")).id

    allowed = {ErrorKind.FAILED_PRECONDITION, ErrorKind.ABORTED}

    async def later(label: str, make: Any) -> None:
        # A random head start, so cancels land before, between and after the passes that carry
        # the grandchild's end up to the top.
        await asyncio.sleep(rng.random() * 0.2)
        await out.call(label, make(), allowed)

    async def passes(name: str, e: Engine) -> None:
        for _ in range(30):
            await out.call(f"tick {name}", e.runner.tick(), set())
            await asyncio.sleep(0.01)

    await asyncio.gather(
        *(later("cancel", lambda t=t: p.a.runs.cancel(t, ME)) for t in tops),
        *(later("approve", lambda t=t: p.b.steps.approve(leaves[t], "gate", "", ME)) for t in tops),
        passes("A", p.a), passes("B", p.b))
    await _race_settle(p, out)
    out.check()

    runs, steps, _ = await check_consistent(p.db)
    assert not (problems := _family_problems(runs, steps)), "\n".join(problems)
    outcomes = set()
    for t in tops:
        top = runs[t]
        mid = runs[(s := {x.step_ref: x for x in steps[t]}["down"]).job_run_id]
        leaf = runs[leaves[t]]
        assert top.status in (RunStatus.CANCELED, RunStatus.COMPLETED), top.status
        if top.status == RunStatus.COMPLETED:
            assert s.status == StepStatus.COMPLETED and mid.status == leaf.status == RunStatus.COMPLETED
        else:
            assert s.status == StepStatus.CANCELED
            assert mid.status in (RunStatus.CANCELED, RunStatus.COMPLETED)
            assert leaf.status in (RunStatus.CANCELED, RunStatus.COMPLETED)
            if mid.status == RunStatus.COMPLETED:
                assert leaf.status == RunStatus.COMPLETED
        outcomes.add((top.status, mid.status, leaf.status))
    assert all(r.status in FINAL_RUN for r in runs.values())
    assert await wakeups(p.a) == 0


async def test_capped_chains_on_two_engines_do_not_deadlock(pair: Pair) -> None:
    """Each pass locks the rows of the capped workflows of its batch, and inserting a child run
    takes a key-share lock on its workflow's row (the foreign key). Engine A's batch holds only
    runs of p1 (it locks p1 and starts children of x); engine B's holds runs of q and x (it locks
    q and x and starts children of p1). Each pass, once it holds its workflow locks, waits (up
    to half a second: below SQLite's busy timeout, which the other waits with) for the other to
    hold its own: the two passes must still not deadlock."""
    p, out = pair, Outcomes()
    cap = {"max_concurrent_runs": 1000}
    await p.a.workflows.create(wf("x", [noop("n")], **cap), ME)
    await p.a.workflows.create(wf("p1", [call("c", "x")], **cap), ME)
    await p.a.workflows.create(wf("q", [call("c", "p1")], **cap), ME)
    for _ in range(BATCH):
        await trigger(p.a, "p1")
    p.clock.advance(1)
    for i in range(BATCH):
        await trigger(p.a, "q" if i % 2 else "x")
    p.clock.advance(1)

    locked = {p.a: asyncio.Event(), p.b: asyncio.Event()}
    for me, other in ((p.a, p.b), (p.b, p.a)):
        def hold(me: Engine = me, other: Engine = other) -> Any:
            original = me.runner.capped

            async def capped(repo: Any, runs: Any) -> dict[str, int]:
                got = await original(repo, runs)
                if got and not locked[me].is_set():
                    locked[me].set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(locked[other].wait(), 0.5)
                return got
            return capped
        me.runner.capped = hold()  # type: ignore[method-assign]
    # A claims the BATCH oldest due runs (p1), B skips them and claims the next BATCH (q, x).
    first = asyncio.create_task(out.call("tick A", p.a.runner.tick(), set()))
    await asyncio.wait_for(locked[p.a].wait(), 5)
    await asyncio.gather(first, out.call("tick B", p.b.runner.tick(), set()))
    await _race_settle(p, out)
    out.check()  # no tick saw a deadlock (DATABASE_UNAVAILABLE) or anything else
    runs, steps, events, _ = await _load_all(p.db)
    # The folded start is reported by test_a_capped_parents_history_is_legal.
    problems = [f"{r.id}: {problem}" for r in runs.values()
                for problem in check_history(r, steps[r.id], events[r.id])
                if not FOLDED_START.search(problem)]
    assert not problems, "\n".join(problems[:20])
    assert len(runs) == 4 * BATCH
    assert all(r.status == RunStatus.COMPLETED for r in runs.values())


async def test_a_workflow_step_whose_config_template_fails_fails_the_step(engine: Engine) -> None:
    """A template that cannot render fails the step (like any attempt's), the run fails, and the
    pass of every other run goes on."""
    await engine.workflows.create(wf("target", [noop("n")]), ME)
    await engine.workflows.create(wf("garbled", [
        call("c", "target", payload={"v": "{{ payload.nope.x }}"})]), ME)
    await engine.workflows.create(wf("fine", [call("c", "target")]), ME)
    bad = await trigger(engine, "garbled")
    good = await trigger(engine, "fine")
    await settle(engine)
    s = await step(engine, bad, "c")
    assert s.status == StepStatus.FAILED and s.error.startswith("template: "), (s.status, s.error)
    assert (await run_of(engine, bad)).status == RunStatus.FAILED
    assert (await run_of(engine, good)).status == RunStatus.COMPLETED
    assert await runs_of_workflow(engine, "target") == 1


async def test_a_capped_parents_history_is_legal(engine: Engine) -> None:
    """A run of a capped workflow starts in a runner pass that queues its `workflow` step and
    starts its child in one unit: the step's events must still replay legally per the
    transition table (as they do for an uncapped run, whose trigger recorded step.queued)."""
    await engine.workflows.create(wf("held", [approval("gate")]), ME)
    await engine.workflows.create(wf("capped_parent", [call("c", "held")], max_concurrent_runs=5), ME)
    await engine.workflows.create(wf("replayed", [call("c", "held")]), ME)
    capped = await trigger(engine, "capped_parent")
    replayed = await trigger(engine, "replayed")
    await settle(engine)
    await engine.steps.replay_subtree(replayed, "c", ME)
    await settle(engine)
    for run_id in (capped, replayed):
        run = await run_of(engine, run_id)
        steps = list((await steps_of(engine, run_id)).values())
        assert check_history(run, steps, await events_of(engine, run_id)) == [], run.workflow_name


async def test_a_child_payload_larger_than_a_trigger_may_send_is_refused(engine: Engine) -> None:
    """Found in review: a child's payload rendered from the parent's data could exceed the
    payload limit every trigger is held to; now the step fails CHILD_REFUSED, and no run starts."""
    await engine.workflows.create(wf("small", [noop("n")]), ME)
    await engine.workflows.create(wf("doubles", [
        call("c", "small", payload={"a": "{{ payload.s }}", "b": "{{ payload.s }}"})]), ME)
    blob = "x" * (40 * 1024)  # within a trigger's 64 KiB; twice that is not
    parent = await trigger(engine, "doubles", payload={"s": blob})
    await settle(engine)
    s = await step(engine, parent, "c")
    assert s.status == StepStatus.FAILED and s.attempt == 1
    assert s.error.startswith("CHILD_REFUSED: the child's payload is "), s.error
    assert await runs_of_workflow(engine, "small") == 0
    assert (await run_of(engine, parent)).status == RunStatus.FAILED
