"""The worker SDK end to end: a real `conveyor serve`, real `conveyor worker` processes running
`tests/sdk/handlers.py`, and what the handlers wrote to their ledger."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import pytest

from tests.sdk.conftest import Client, Ledger, Server, WorkerFactory, task_step


async def test_a_chain_of_task_steps_completes_with_outputs_flowing_and_ctx_filled(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "chain", "steps": [
        task_step("shout", "sdk-sync", {"mode": "upper", "text": "{{ payload.name }}"}, max_attempts=2),
        task_step("echo", "sdk-async", {"mode": "echo", "prev": "{{ steps.shout.output.text }}", "n": 3},
                  depends_on=("shout",), max_attempts=3),
        task_step("scalar", "sdk-async", {"mode": "scalar", "value": "{{ steps.echo.output.input.prev }}"},
                  depends_on=("echo",)),
        task_step("nothing", "sdk-async", {"mode": "scalar"}, depends_on=("scalar",)),
    ]})
    await workers()
    run_id = await client.trigger("chain", {"name": "ada"})
    run = await client.wait_run(run_id, "completed", "failed")
    assert run["status"] == "completed", run
    steps = await client.steps(run_id)
    assert steps["shout"]["output"]["text"] == "ADA"
    echo = steps["echo"]["output"]
    # Integral numbers come back as ints, not 3.0.
    assert echo["input"] == {"mode": "echo", "prev": "ADA", "n": 3}
    ctx = echo["ctx"]
    assert ctx["attempt"] == 1
    assert ctx["max_attempts"] == 3
    assert ctx["step_ref"] == "echo"
    assert ctx["run_id"] == run_id
    assert ctx["task_id"] == steps["echo"]["id"]
    assert ctx["queue"] == "sdk-async"
    assert ctx["payload"] == {"name": "ada"}
    assert ctx["project_id"] == "default"
    assert ctx["cancelled"] is False
    assert steps["echo"]["worker_id"] == ctx["worker_id"]
    assert steps["shout"]["output"]["ctx"]["max_attempts"] == 2
    # A non-dict result is wrapped as {"value": v}; None is {}.
    assert steps["scalar"]["output"] == {"value": "ADA"}
    assert steps["nothing"]["output"] == {}
    assert len(ledger.entries(event="done")) == 4


async def test_non_retryable_error_fails_the_step_at_once(client: Client, workers: WorkerFactory,
                                                          ledger: Ledger) -> None:
    await client.create_workflow({"name": "bad", "steps": [
        task_step("s", "sdk-async", {"mode": "nonretryable"}, max_attempts=5)]})
    await workers()
    run_id = await client.trigger("bad")
    run = await client.wait_run(run_id, "failed", "completed")
    assert run["status"] == "failed"
    step = (await client.steps(run_id))["s"]
    assert step["status"] == "failed"
    assert step["attempt"] == 1
    assert step["error"] == "NonRetryableError: the input can never work"
    assert len(ledger.entries(event="start")) == 1


async def test_a_generic_exception_is_retried_per_policy(client: Client, workers: WorkerFactory,
                                                         ledger: Ledger) -> None:
    await client.create_workflow({"name": "flaky", "steps": [
        task_step("a", "sdk-async", {"mode": "flaky", "succeed_on": 3}, max_attempts=3),
        task_step("b", "sdk-sync", {"mode": "boom"}, depends_on=("a",), max_attempts=2)]})
    await workers()
    run_id = await client.trigger("flaky")
    await client.wait_run(run_id, "failed", "completed")
    steps = await client.steps(run_id)
    assert steps["a"]["status"] == "completed"
    assert steps["a"]["output"] == {"attempt": 3}
    assert [e["attempt"] for e in ledger.entries(event="start", step="a")] == [1, 2, 3]
    # The sync one fails both attempts; the error is the exception's type and message only.
    assert steps["b"]["status"] == "failed"
    assert steps["b"]["attempt"] == 2
    assert steps["b"]["error"] == "RuntimeError: sync handler exploded"
    messages = " ".join(e.get("message", "") for e in await client.events(run_id))
    assert "ValueError: flaky attempt 1" in messages
    assert "Traceback" not in messages


async def test_a_result_the_server_refuses_fails_the_step_without_retries(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    # Beyond the output limit the request is INVALID_ARGUMENT; beyond the gRPC message size the
    # server accepts it is RESOURCE_EXHAUSTED. Either way the same result would be refused
    # again: the SDK reports a non-retryable failure instead of retrying the report forever.
    sizes = {"over-limit": 300_000, "over-message": 13_000_000}
    for name, size in sizes.items():
        await client.create_workflow({"name": name, "steps": [
            task_step("s", "sdk-async", {"mode": "big", "bytes": size}, max_attempts=3)]})
    await workers()
    for name in sizes:
        run_id = await client.trigger(name)
        await client.wait_run(run_id, "failed", "completed")
        step = (await client.steps(run_id))["s"]
        assert (step["status"], step["attempt"]) == ("failed", 1), step
        assert step["error"].startswith("result refused: "), step["error"]
    assert len(ledger.entries(event="start")) == 2


async def test_retry_after_delays_the_next_attempt(client: Client, workers: WorkerFactory,
                                                   ledger: Ledger) -> None:
    await client.create_workflow({"name": "later", "steps": [
        task_step("s", "sdk-async", {"mode": "retry_after", "seconds": 1.5}, max_attempts=2, interval=0.1)]})
    await workers()
    run_id = await client.trigger("later")
    run = await client.wait_run(run_id, "completed", "failed")
    assert run["status"] == "completed"
    first, second = ledger.entries(event="start")
    assert (first["attempt"], second["attempt"]) == (1, 2)
    # The policy's own interval is 0.1 s; the handler asked for 1.5 s.
    assert second["t"] - first["t"] >= 1.4


async def test_cancel_reaches_an_async_handler_as_cancelled_error_and_nothing_is_reported(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "long", "steps": [
        task_step("s", "sdk-async", {"mode": "sleep", "seconds": 60}, max_attempts=3)]})
    worker = await workers()
    run_id = await client.trigger("long")
    await ledger.wait(event="start")
    t0 = time.monotonic()
    await client.cancel(run_id)
    cancelled = await ledger.wait(event="cancelled", within=10)
    # Through the stream's revocation, not a heartbeat 10 s later.
    assert time.monotonic() - t0 < 3
    assert cancelled["flag"] is True
    step = (await client.steps(run_id))["s"]
    assert step["status"] == "canceled"
    await asyncio.sleep(0.5)  # room for a (wrong) report to arrive
    assert "report refused" not in worker.log()
    assert not ledger.entries(event="done")
    assert (await client.steps(run_id))["s"]["status"] == "canceled"


async def test_cancel_reaches_a_sync_handler_as_the_cancelled_flag(client: Client, workers: WorkerFactory,
                                                                   ledger: Ledger) -> None:
    await client.create_workflow({"name": "long-sync", "steps": [
        task_step("s", "sdk-sync", {"mode": "wait", "seconds": 60})]})
    worker = await workers()
    run_id = await client.trigger("long-sync")
    await ledger.wait(event="start")
    await client.cancel(run_id)
    cancelled = await ledger.wait(event="cancelled", within=10)
    assert cancelled["flag"] is True
    await asyncio.sleep(0.5)
    assert "report refused" not in worker.log()
    assert (await client.steps(run_id))["s"]["status"] == "canceled"


async def test_sigterm_drains_finishes_short_handlers_and_releases_long_ones_to_the_next_worker(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    # max_attempts 1 everywhere: a deploy must not spend a retry, let alone fail a run.
    await client.create_workflow({"name": "drain", "steps": [
        task_step("short", "sdk-async", {"mode": "sleep", "seconds": 1}),
        task_step("long", "sdk-async", {"mode": "sleep_first", "seconds": 60})]})
    worker = await workers(grace=2)
    run_id = await client.trigger("drain")
    await ledger.wait(event="start", step="short")
    await ledger.wait(event="start", step="long")
    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit(15) == 0
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 8, elapsed
    steps = await client.steps(run_id)
    assert steps["short"]["status"] == "completed"
    assert steps["short"]["output"] == {"slept": 1, "attempt": 1}
    # The long one was canceled after the grace period and given back: queued for the next
    # worker at once, its one attempt unspent.
    assert ledger.entries(event="cancelled", step="long")
    assert steps["long"]["status"] == "queued", steps["long"]
    (lost,) = [e["data"]["lost"] for e in await client.events(run_id)
               if e.get("step_ref") == "long" and "lost" in e.get("data", {})]
    assert re.fullmatch(rf"released by '[^']*:{worker.pid}:[^']*': worker shutting down", lost)
    await workers()
    run = await client.wait_run(run_id, "completed", "failed", within=15)
    assert run["status"] == "completed"
    assert (await client.steps(run_id))["long"]["output"] == {"attempt": 2}


async def test_a_killed_worker_s_task_comes_back_after_its_lease_and_completes_once(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "killed", "steps": [
        task_step("s", "sdk-async", {"mode": "sleep_first", "seconds": 60})]})  # max_attempts 1
    first = await workers(lease=2)
    run_id = await client.trigger("killed")
    await ledger.wait(event="start", attempt=1)
    first.proc.kill()
    await first.proc.wait()
    t0 = time.monotonic()
    second = await workers(lease=2)
    run = await client.wait_run(run_id, "completed", "failed", within=20)
    assert run["status"] == "completed"
    assert time.monotonic() - t0 < 10
    step = (await client.steps(run_id))["s"]
    assert step["attempt"] == 2
    done = ledger.entries(event="done")
    assert [(d["attempt"], d["pid"]) for d in done] == [(2, second.pid)]
    lost = [e["data"]["lost"] for e in await client.events(run_id) if "lost" in e.get("data", {})]
    assert len(lost) == 1 and "expired with no report" in lost[0]


async def test_a_task_that_kills_every_worker_fails_lost_after_five_losses(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "poison", "steps": [
        task_step("s", "sdk-async", {"mode": "die"}, max_attempts=3)]})
    run_id = await client.trigger("poison")
    for attempt in range(1, 6):
        worker = await workers(lease=1)
        await ledger.wait(event="start", attempt=attempt, within=20)
        assert await worker.wait_exit(10) == -signal.SIGKILL
    run = await client.wait_run(run_id, "completed", "failed", within=20)
    assert run["status"] == "failed"
    step = (await client.steps(run_id))["s"]
    assert step["status"] == "failed" and step["attempt"] == 5 and step["error"].startswith("LOST:")
    final = [e for e in await client.events(run_id) if e.get("step_ref") == "s"][-1]
    assert final["data"]["reason"] == "LOST"


async def test_the_batched_heartbeat_keeps_tasks_alive_past_several_lease_lengths(
        client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "slow", "steps": [
        task_step("a", "sdk-async", {"mode": "sleep", "seconds": 6}, max_attempts=3),
        task_step("b", "sdk-sync", {"mode": "wait", "seconds": 6}, max_attempts=3)]})
    await workers(lease=2)
    run_id = await client.trigger("slow")
    run = await client.wait_run(run_id, "completed", "failed", within=20)
    assert run["status"] == "completed"
    steps = await client.steps(run_id)
    assert steps["a"]["attempt"] == 1 and steps["b"]["attempt"] == 1
    assert len(ledger.entries(event="start")) == 2


async def test_a_restarted_server_is_served_again_without_restarting_the_worker(
        server: Server, client: Client, workers: WorkerFactory, ledger: Ledger) -> None:
    await client.create_workflow({"name": "again", "steps": [
        task_step("s", "sdk-async", {"mode": "echo"})]})
    worker = await workers()
    first = await client.trigger("again")
    await client.wait_run(first, "completed")
    server.kill()
    await server.proc.wait()  # type: ignore[union-attr]
    await asyncio.sleep(1)  # the worker sees UNAVAILABLE and backs off
    await server.start()
    second = await client.trigger("again")
    run = await client.wait_run(second, "completed", "failed", within=20)
    assert run["status"] == "completed"
    assert worker.proc.returncode is None


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_server_restart_mid_task_spends_no_attempt(
        server: Server, client: Client, workers: WorkerFactory, ledger: Ledger, stop: str) -> None:
    # The server is away longer than the lease: the attempt is lost meanwhile (judged by the
    # database's clock when the server is back), never failed.
    await client.create_workflow({"name": "restart", "steps": [
        task_step("s", "sdk-async", {"mode": "sleep_first", "seconds": 3})]})  # max_attempts 1
    await workers(lease=1)
    run_id = await client.trigger("restart")
    await ledger.wait(event="start", attempt=1)
    if stop == "sigterm":
        await server.stop()
    else:
        server.kill()
        await server.proc.wait()  # type: ignore[union-attr]
    await asyncio.sleep(2)  # real processes: the lease runs out while the server is away
    await server.start()
    run = await client.wait_run(run_id, "completed", "failed", within=30)
    events = await client.events(run_id)
    assert run["status"] == "completed", [(e["type"], e.get("message")) for e in events]
    assert not [e for e in events if e.get("status") == "failed"]


async def test_a_map_item_s_handler_sees_its_item_and_index(client: Client, workers: WorkerFactory) -> None:
    items = [{"name": "a", "n": 1}, "b", 3, None]
    await client.create_workflow({"name": "fan", "steps": [
        {"ref": "plain", "kind": "task", "queue": "sdk-async", "config": {"mode": "echo"}},
        {"ref": "each", "kind": "map", "depends_on": ["plain"], "config": {"items": items, "step": {
            "kind": "task", "queue": "sdk-async", "config": {"mode": "echo", "file": "{{ item }}"}}}}]})
    await workers()
    run_id = await client.trigger("fan", {})
    run = await client.wait_run(run_id, "completed", "failed")
    assert run["status"] == "completed", run
    steps = await client.steps(run_id)
    assert (steps["plain"]["output"]["ctx"]["item"], steps["plain"]["output"]["ctx"]["index"]) == (None, None)
    seen = [(out["ctx"]["step_ref"], out["ctx"]["item"], out["ctx"]["index"], out["input"]["file"])
            for out in steps["each"]["output"]["items"]]
    assert seen == [(f"each[{i}]", item, i, item) for i, item in enumerate(items)]
