"""`map` steps (SPEC §2.1): items from a template or a literal, each its own step run `ref[i]` of
the inner kind, max_parallel, tolerate_failures, ordered output, caps, cancel. Real database,
ManualClock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.domain.errors import ConveyorError
from conveyor.domain.limits import Limits
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.store import SqlStore
from tests.engine.test_core import check_history
from tests.engine.test_engine import ME, noop, status, steps_of, trigger, wf
from tests.engine.test_races import Pair

WORKER = "worker-1"


def fan(ref: str, items: Any, step: dict[str, Any], *deps: str, **config: Any) -> dict[str, Any]:
    return {"ref": ref, "kind": "map", "depends_on": list(deps),
            "config": {"items": items, "step": step, **config}}


async def test_a_map_of_noop_items_completes_with_their_outputs_in_order(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [
        noop("list", output={"files": ["a", "b", "c"]}),
        fan("each", "{{ steps.list.output.files }}",
            {"kind": "noop", "config": {"output": {"file": "{{ item }}", "n": "{{ index }}"}}}, "list"),
        noop("after", "each", output={"count": "{{ size(steps.each.output.items) }}"})]), ME)
    run_id = await trigger(engine, "m")
    assert await status(engine, run_id) == RunStatus.COMPLETED
    steps = await steps_of(engine, run_id)
    assert steps["each"].output == {"items": [{"file": "a", "n": 0}, {"file": "b", "n": 1},
                                              {"file": "c", "n": 2}], "failed": []}
    assert [steps[f"each[{i}]"].status for i in range(3)] == [StepStatus.COMPLETED] * 3
    assert steps["each[1]"].parent_step_id == steps["each"].id and steps["each[1]"].map_index == 1
    assert steps["after"].output == {"count": 3}
    run = await engine.runs.get(run_id, ME)
    assert set(run.output or {}) == {"list", "each", "after"}  # items are in their map's output
    await check_history(engine, run_id)


async def test_an_empty_map_completes_at_once(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [], {"kind": "noop"})]), ME)
    run_id = await trigger(engine, "m")
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert (await steps_of(engine, run_id))["each"].output == {"items": [], "failed": []}


@pytest.mark.parametrize(("payload", "reason"), [
    ({"items": {"not": "a list"}}, "MAP_ITEMS_INVALID"),
    ({"items": "text"}, "MAP_ITEMS_INVALID"),
    ({"items": None}, "MAP_ITEMS_INVALID"),
    ({"items": list(range(6))}, "TOO_MANY_ITEMS"),
])
async def test_items_that_are_no_array_or_too_many_fail_the_map_for_good(
        database: Database, clock: ManualClock, payload: dict[str, Any], reason: str) -> None:
    engine = Engine(SqlStore(database), Settings(db_url=str(database.url), limits=Limits(max_map_items=5)),
                    clock)
    try:
        await _refused(engine, payload, reason)
    finally:
        await engine.stop()


async def _refused(engine: Engine, payload: dict[str, Any], reason: str) -> None:
    await engine.workflows.create(wf("m", [{**fan("each", "{{ payload.items }}", {"kind": "noop"}),
                                            "retry": {"max_attempts": 3}}]), ME)
    run_id = await trigger(engine, "m", payload=payload)
    assert await status(engine, run_id) == RunStatus.FAILED
    steps = await steps_of(engine, run_id)
    assert steps["each"].status == StepStatus.FAILED and steps["each"].attempt == 1
    assert steps["each"].error.startswith(reason)
    assert not any("[" in ref for ref in steps)


async def test_task_items_lease_at_most_max_parallel_at_once(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [10, 20, 30, 40, 50],
                                               {"kind": "task", "queue": "q", "config": {"n": "{{ item }}"}},
                                               max_parallel=2)]), ME)
    run_id = await trigger(engine, "m")
    first = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    assert sorted(lease.config["n"] for lease in first) == [10, 20]
    for lease in first:
        await engine.leases.complete(lease.step.id, 1, WORKER, {"double": lease.config["n"] * 2}, ME)
    done = first
    while len(done) < 5:
        batch = await engine.leases.acquire("q", WORKER, 30, 10, ME)
        assert 0 < len(batch) <= 2
        for lease in batch:
            await engine.leases.complete(lease.step.id, 1, WORKER, {"double": lease.config["n"] * 2}, ME)
        done += batch
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert (await steps_of(engine, run_id))["each"].output == {
        "items": [{"double": n * 2} for n in (10, 20, 30, 40, 50)], "failed": []}
    await check_history(engine, run_id)


async def test_tolerated_failures_leave_null_and_their_index(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2, 3], {"kind": "task", "queue": "q"},
                                               tolerate_failures=1)]), ME)
    run_id = await trigger(engine, "m")
    leases = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    by_index = {lease.step.map_index: lease for lease in leases}
    await engine.leases.fail(by_index[1].step.id, 1, WORKER, "bad item", False, ME)
    for i in (0, 2):
        await engine.leases.complete(by_index[i].step.id, 1, WORKER, {"i": i}, ME)
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert (await steps_of(engine, run_id))["each"].output == {"items": [{"i": 0}, None, {"i": 2}],
                                                               "failed": [1]}


async def test_failures_beyond_tolerance_fail_the_map_and_cancel_its_other_items(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2, 3], {"kind": "task", "queue": "q"})]), ME)
    run_id = await trigger(engine, "m")
    leases = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    await engine.leases.fail(leases[0].step.id, 1, WORKER, "bad item", False, ME)
    assert await status(engine, run_id) == RunStatus.FAILED
    steps = await steps_of(engine, run_id)
    assert steps["each"].status == StepStatus.FAILED and "1 of 3 items failed" in steps["each"].error
    others = [s for ref, s in steps.items() if ref.startswith("each[") and s.id != leases[0].step.id]
    assert [s.status for s in others] == [StepStatus.CANCELED] * 2
    for lease in leases[1:]:  # their leases were revoked: a late report changes nothing
        with pytest.raises(ConveyorError) as lost:
            await engine.leases.complete(lease.step.id, 1, WORKER, {}, ME)
        assert lost.value.reason == "LEASE_LOST"
    await check_history(engine, run_id)


async def test_canceling_the_run_cancels_running_items(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2], {"kind": "task", "queue": "q"})]), ME)
    run_id = await trigger(engine, "m")
    leases = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    await engine.runs.cancel(run_id, ME)
    steps = await steps_of(engine, run_id)
    assert {ref: s.status for ref, s in steps.items()} == {
        "each": StepStatus.CANCELED, "each[0]": StepStatus.CANCELED, "each[1]": StepStatus.CANCELED}
    with pytest.raises(ConveyorError):
        await engine.leases.complete(leases[0].step.id, 1, WORKER, {}, ME)
    await check_history(engine, run_id)


async def test_retrying_a_failed_map_resets_its_items(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2], {"kind": "task", "queue": "q"})]), ME)
    run_id = await trigger(engine, "m")
    leases = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    await engine.leases.fail(leases[0].step.id, 1, WORKER, "bad item", False, ME)
    assert await status(engine, run_id) == RunStatus.FAILED
    await engine.steps.retry(run_id, "each", ME)
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["each"].status == StepStatus.RUNNING and steps["each"].attempt == 2
    assert [steps[f"each[{i}]"].status for i in range(2)] == [StepStatus.QUEUED] * 2
    again = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    assert len(again) == 2
    for lease in again:
        await engine.leases.complete(lease.step.id, lease.step.attempt, WORKER, {"ok": True}, ME)
    assert await status(engine, run_id) == RunStatus.COMPLETED
    await check_history(engine, run_id)


async def test_one_item_is_skipped_force_completed_or_retried_by_its_ref(engine: Engine,
                                                                       clock: ManualClock) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2, 3], {"kind": "task", "queue": "q"},
                                               tolerate_failures=1)]), ME)
    run_id = await trigger(engine, "m")
    leases = {lease.step.map_index: lease for lease in await engine.leases.acquire("q", WORKER, 30, 10, ME)}
    await engine.steps.skip(run_id, "each[0]", "not needed", ME)
    await engine.steps.force_complete(run_id, "each[1]", {"forced": True}, ME)
    await engine.leases.fail(leases[2].step.id, 1, WORKER, "flaky", False, ME)  # tolerated: the map completes
    run = await engine.runs.get(run_id, ME)
    assert run.status == RunStatus.COMPLETED
    assert (await steps_of(engine, run_id))["each"].output == {"items": [None, {"forced": True}, None],
                                                               "failed": [2]}
    # The map has ended: its items are settled with it.
    with pytest.raises(ConveyorError) as refused:
        await engine.steps.retry(run_id, "each[2]", ME)
    assert refused.value.reason == "INVALID_TRANSITION" and "retry or replay the map" in refused.value.message
    await check_history(engine, run_id)


async def test_an_item_retried_while_its_map_runs_runs_again(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2], {"kind": "task", "queue": "q"},
                                               tolerate_failures=1)]), ME)
    run_id = await trigger(engine, "m")
    leases = {lease.step.map_index: lease for lease in await engine.leases.acquire("q", WORKER, 30, 10, ME)}
    await engine.leases.fail(leases[0].step.id, 1, WORKER, "flaky", False, ME)
    await engine.steps.retry(run_id, "each[0]", ME)
    await engine.tick()
    (again,) = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    assert again.step.step_ref == "each[0]" and again.step.attempt == 2
    await engine.leases.complete(again.step.id, 2, WORKER, {"n": 0}, ME)
    await engine.leases.complete(leases[1].step.id, 1, WORKER, {"n": 1}, ME)
    assert (await steps_of(engine, run_id))["each"].output == {"items": [{"n": 0}, {"n": 1}], "failed": []}
    await check_history(engine, run_id)


async def test_a_map_of_workflow_items_starts_one_child_run_per_item(engine: Engine) -> None:
    await engine.workflows.create(wf("child", [noop("echo", output={"got": "{{ payload.n }}"})]), ME)
    await engine.workflows.create(wf("m", [fan("each", [5, 6], {"kind": "workflow", "config": {
        "workflow_id": "child", "payload": {"n": "{{ item }}"}}})]), ME)
    run_id = await trigger(engine, "m")
    for _ in range(4):
        await engine.tick()
    assert await status(engine, run_id) == RunStatus.COMPLETED
    steps = await steps_of(engine, run_id)
    assert steps["each"].output == {"items": [{"echo": {"got": 5}}, {"echo": {"got": 6}}], "failed": []}
    children = [await engine.runs.get(steps[f"each[{i}]"].job_run_id, ME) for i in range(2)]
    assert all(c.parent_step_run_id == steps[f"each[{i}]"].id for i, c in enumerate(children))


async def test_items_take_the_runs_slots_but_the_map_holds_none(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2, 3], {"kind": "task", "queue": "q"}),
                                           {"ref": "side", "kind": "task", "queue": "q"}],
                                     max_parallel_steps=2), ME)
    run_id = await trigger(engine, "m")
    first = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    assert len(first) == 2  # two slots: the map itself takes none of them
    for lease in first:
        await engine.leases.complete(lease.step.id, 1, WORKER, {}, ME)
    rest = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    assert len(rest) == 2
    for lease in rest:
        await engine.leases.complete(lease.step.id, 1, WORKER, {}, ME)
    assert await status(engine, run_id) == RunStatus.COMPLETED


async def test_ten_thousand_and_one_items_fail_with_too_many_items(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", "{{ payload.items }}", {"kind": "noop"})]), ME)
    run_id = await trigger(engine, "m", payload={"items": [0] * 10_001})
    step = (await steps_of(engine, run_id))["each"]
    assert step.status == StepStatus.FAILED and step.error.startswith("TOO_MANY_ITEMS: 10001 items")


async def test_deeply_nested_items_reach_their_step_whole(engine: Engine) -> None:
    deep: Any = "leaf"
    for _ in range(15):
        deep = [deep]
    item_step = {"kind": "noop", "config": {"output": {"v": "{{ item }}"}}}
    await engine.workflows.create(wf("m", [fan("each", "{{ payload.items }}", item_step)]), ME)
    run_id = await trigger(engine, "m", payload={"items": [deep, {"k": deep}]})
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert (await steps_of(engine, run_id))["each"].output == {"items": [{"v": deep}, {"v": {"k": deep}}],
                                                               "failed": []}


async def test_skipping_the_map_cancels_its_items_and_its_dependents_run(engine: Engine) -> None:
    await engine.workflows.create(wf("m", [fan("each", [1, 2], {"kind": "task", "queue": "q"}),
                                           noop("after", "each")]), ME)
    run_id = await trigger(engine, "m")
    leases = await engine.leases.acquire("q", WORKER, 30, 10, ME)
    await engine.steps.skip(run_id, "each", "enough", ME)
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert steps["each"].status == StepStatus.SKIPPED and steps["after"].status == StepStatus.COMPLETED
    assert [steps[f"each[{i}]"].status for i in range(2)] == [StepStatus.CANCELED] * 2
    with pytest.raises(ConveyorError):
        await engine.leases.complete(leases[0].step.id, 1, WORKER, {}, ME)
    assert await status(engine, run_id) == RunStatus.COMPLETED
    await check_history(engine, run_id)


async def test_replaying_a_completed_map_runs_its_items_again(engine: Engine) -> None:
    item_step = {"kind": "noop", "config": {"output": {"v": "{{ item }}"}}}
    await engine.workflows.create(wf("m", [fan("each", "{{ payload.items }}", item_step)]), ME)
    run_id = await trigger(engine, "m", payload={"items": [1, 2, 3]})
    assert await status(engine, run_id) == RunStatus.COMPLETED
    first = await steps_of(engine, run_id)
    await engine.steps.replay_subtree(run_id, "each", ME)
    await engine.tick()
    steps = await steps_of(engine, run_id)
    assert await status(engine, run_id) == RunStatus.COMPLETED
    assert steps["each"].attempt == 2 and steps["each"].output == {
        "items": [{"v": 1}, {"v": 2}, {"v": 3}], "failed": []}
    assert {ref: s.id for ref, s in steps.items()} == {ref: s.id for ref, s in first.items()}  # rows reused
    assert [steps[f"each[{i}]"].attempt for i in range(3)] == [2, 2, 2]
    await check_history(engine, run_id)


async def test_item_reports_racing_a_cancel_on_two_engines_leave_nothing_running(pair: Pair) -> None:
    """Engine A reports items (as a worker would) while engine B cancels the run and both run
    passes: whatever wins, the run ends canceled or completed with no item left running or
    queued, and a report that lost is refused with LEASE_LOST, never half-applied."""
    await pair.a.workflows.create(wf("m", [fan("each", list(range(12)), {"kind": "task", "queue": "q"},
                                               max_parallel=12)]), ME)
    for round_ in range(4):
        run_id = await trigger(pair.a, "m")
        leases = await pair.a.leases.acquire("q", WORKER, 30, 20, ME)
        assert len(leases) == 12

        async def report(lease: Any) -> str:
            try:
                await pair.a.leases.complete(lease.step.id, 1, WORKER, {"i": lease.step.map_index}, ME)
            except ConveyorError as e:
                return e.reason
            return "ok"

        async def cancel(run_id: str) -> str:
            try:
                await pair.b.runs.cancel(run_id, ME)
            except ConveyorError as e:
                return e.reason
            return "canceled"

        half = 3 * round_
        results = await asyncio.gather(*(report(lease) for lease in leases[:half]), cancel(run_id),
                                       *(report(lease) for lease in leases[half:]), pair.b.tick())
        assert set(results[:-1]) <= {"ok", "canceled", "LEASE_LOST", "INVALID_TRANSITION"}, results
        await pair.a.tick()
        await pair.b.tick()
        run = await pair.a.runs.get(run_id, ME)
        steps = await steps_of(pair.a, run_id)
        assert run.status in (RunStatus.CANCELED, RunStatus.COMPLETED), run.status
        assert not [ref for ref, s in steps.items()
                    if s.status in (StepStatus.RUNNING, StepStatus.QUEUED, StepStatus.PENDING)]
        assert all(s.lease_expires_at is None for s in steps.values())
        reported = {lease.step.step_ref for lease, r in zip(leases, results[:half] + results[half + 1:-1],
                                                            strict=True) if r == "ok"}
        completed = {ref for ref, s in steps.items() if s.status == StepStatus.COMPLETED and "[" in ref}
        assert completed == reported
        await check_history(pair.a, run_id)
