"""WorkersService through the real server (SPEC §4.3, issue 6 items 1 and 6): leasing with
rendered configs, long-polls and streams woken by their own queue's commits, reports fenced by
(task, attempt, worker), heartbeats, lease expiry, every kind of revocation, and the edges of
what a worker may ask for.

Engine time moves only with `api.clock.advance` + `api.engine.tick()`. Long-polls and streams
wait in real asyncio time; where a test proves a wait is woken by its key, the safety poll is
pushed to 30 s so only the key can wake it within the test's bound.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.api.caller import ANONYMOUS
from conveyor.domain.errors import ConcurrentChange
from conveyor.engine import dispatch as dispatch_module
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, listed, stream_failure

RUN = pb.RunStatus
STEP = pb.StepStatus
# How long a test waits for something that a key (not the 30 s safety poll) must bring.
PROMPT = 2.0


# -- helpers --------------------------------------------------------------------------------


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def task_workflow(name: str = "work", queue: str = "q", project: str = "", **step: Any) -> dict[str, Any]:
    """A workflow of one task step `t` on `queue`."""
    wf: dict[str, Any] = {"name": name, "steps": [{"ref": "t", "kind": "task", "queue": queue, **step}]}
    if project:
        wf["project_id"] = project
    return wf


async def start(api: Api, definition: dict[str, Any], runs: int = 1, **trigger: Any) -> list[str]:
    """Create the workflow and trigger `runs` runs of it; their ids."""
    wf = await api.create_workflow(definition)
    return [(await api.trigger(wf.id, **trigger)).id for _ in range(runs)]


async def poll(api: Api, queue: str = "q", worker: str = "w1", **fields: Any) -> list[pb.Task]:
    request = workers_pb.PollTasksRequest(queue=queue, worker_id=worker, **fields)
    response = await api.workers.PollTasks(request)
    return list(response.tasks)


async def complete(api: Api, task: pb.Task, worker: str = "w1", result: dict[str, Any] | None = None,
                   attempt: int | None = None) -> None:
    await api.workers.CompleteTask(workers_pb.CompleteTaskRequest(
        task_id=task.task_id, attempt=task.attempt if attempt is None else attempt, worker_id=worker,
        result=struct(result or {})))


async def steps_of(api: Api, run_id: str) -> dict[str, pb.StepRun]:
    items, _ = await listed(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=run_id)))
    return {s.step_ref: s for s in items}


async def events_of(api: Api, run_id: str) -> list[pb.RunEvent]:
    items, _ = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id=run_id,
                                                                               limit=1000)))
    return items


async def run_of(api: Api, run_id: str) -> pb.WorkflowRun:
    return await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))


async def snapshot(api: Api, run_id: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Everything a refused report must leave as it was: the run, its steps, its events."""
    steps = {ref: as_dict(s) for ref, s in (await steps_of(api, run_id)).items()}
    return as_dict(await run_of(api, run_id)), steps, [as_dict(e) for e in await events_of(api, run_id)]


def expires(api: Api, seconds: float) -> Any:
    return api.clock.now() + timedelta(seconds=seconds)


def count_acquires(api: Api, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Wrap `engine.leases.acquire` to count its calls per queue."""
    calls: dict[str, int] = {}
    leases = api.engine.leases
    original = leases.acquire

    async def counted(queue: str, *args: Any, **kwargs: Any) -> Any:
        calls[queue] = calls.get(queue, 0) + 1
        return await original(queue, *args, **kwargs)

    monkeypatch.setattr(leases, "acquire", counted)
    return calls


async def until(predicate: Callable[[], bool], seconds: float = PROMPT) -> None:
    """Wait (real time, briefly) until `predicate` holds: for a long-poll to be parked."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def next_message(call: Any, seconds: float = PROMPT) -> workers_pb.StreamTasksResponse:
    message = await asyncio.wait_for(call.read(), seconds)
    assert message is not grpc.aio.EOF, "the stream ended"
    return message


@pytest.fixture
def quiet_is_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle stream sends a heartbeat within ~0.3 s: the sign that nothing else was sent. (The
    stream looks at the heartbeat only when it wakes, at the latest every safety poll.)"""
    monkeypatch.setattr(dispatch_module, "STREAM_HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 0.05)


@pytest.fixture
def slow_safety_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a key can wake a wait within a test's bound."""
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 30.0)


@pytest.fixture
async def streams(api: Api) -> AsyncIterator[list[Any]]:
    """StreamTasks calls opened by a test, canceled after it."""
    calls: list[Any] = []
    yield calls
    for call in calls:
        call.cancel()


def open_stream(api: Api, streams: list[Any], queue: str = "q", worker: str = "w1", **fields: Any) -> Any:
    call = api.workers.StreamTasks(workers_pb.StreamTasksRequest(queue=queue, worker_id=worker, **fields))
    streams.append(call)
    return call


# -- PollTasks ------------------------------------------------------------------------------


async def test_poll_hands_out_the_task_with_its_config_rendered(api: Api) -> None:
    retry = {"max_attempts": 3, "initial_interval_seconds": 5}
    (run_id,) = await start(api, {
        "name": "render", "project_id": "acme",
        "steps": [
            {"ref": "a", "kind": "task", "queue": "builds", "retry": retry, "timeout_seconds": 120,
             "config": {"whole": "{{ payload.spec }}", "count": "{{ payload.n }}",
                        "text": "n={{ payload.n }}", "fixed": [1, "two"]}},
            {"ref": "b", "kind": "task", "queue": "builds", "depends_on": ["a"],
             "config": {"sha": "{{ steps.a.output.sha }}", "size": "{{ steps.a.output.size }}",
                        "flags": "{{ steps.a.output.flags }}"}},
        ]}, payload={"spec": {"k": [1, 2], "on": True}, "n": 5})

    (task,) = await poll(api, "builds", project_id="acme", max_tasks=10)

    assert task.step_ref == "a" and task.workflow_run_id == run_id
    assert (task.queue, task.project_id, task.attempt) == ("builds", "acme", 1)
    assert (task.max_attempts, task.timeout_seconds) == (3, 120)
    # A template that is the whole string keeps its JSON type; one inside text is text.
    assert as_dict(task.config) == {"whole": {"k": [1, 2], "on": True}, "count": 5, "text": "n=5",
                                    "fixed": [1, "two"]}
    assert as_dict(task.payload) == {"spec": {"k": [1, 2], "on": True}, "n": 5}
    assert task.lease_expires_at.ToDatetime(tzinfo=api.clock.now().tzinfo) == expires(api, 30)

    step = (await steps_of(api, run_id))["a"]
    assert step.status == STEP.running and step.worker_id == "w1" and step.job_run_id
    assert step.id == task.task_id and step.attempt == 1
    running = [e for e in await events_of(api, run_id) if e.type == "step.running"]
    assert len(running) == 1 and running[0].step_ref == "a" and running[0].actor == "w1"
    data = as_dict(running[0].data)
    assert {k: v for k, v in data.items() if k != "change"} == {"attempt": 1, "worker_id": "w1"}
    assert data["change"]["status"] == "running" and data["change"]["worker_id"] == "w1"

    await complete(api, task, result={"sha": "abc", "size": 12, "flags": {"x": None, "y": [True]}})
    (second,) = await poll(api, "builds", project_id="acme")
    assert second.step_ref == "b"
    assert as_dict(second.config) == {"sha": "abc", "size": 12, "flags": {"x": None, "y": [True]}}


async def test_poll_takes_at_most_max_tasks_with_the_lease_asked_for(api: Api) -> None:
    await start(api, task_workflow(), runs=5)

    first = await poll(api, max_tasks=3, lease_seconds=90)
    rest = await poll(api, max_tasks=100)
    again = await poll(api, max_tasks=100)

    assert len(first) == 3 and len(rest) == 2 and again == []
    assert len({t.task_id for t in first + rest}) == 5
    now = api.clock.now()
    assert {t.lease_expires_at.ToDatetime(tzinfo=now.tzinfo) for t in first} == {expires(api, 90)}
    assert {t.lease_expires_at.ToDatetime(tzinfo=now.tzinfo) for t in rest} == {expires(api, 30)}


async def test_max_tasks_zero_means_one(api: Api) -> None:
    await start(api, task_workflow(), runs=3)

    assert len(await poll(api)) == 1


async def test_wait_zero_answers_at_once_when_nothing_is_ready(api: Api, slow_safety_poll: None) -> None:
    await start(api, task_workflow(queue="elsewhere"))
    began = time.monotonic()

    tasks = await poll(api, wait_seconds=0)

    assert tasks == [] and time.monotonic() - began < 1.0


async def test_a_long_poll_is_woken_by_a_trigger_on_its_queue(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                              slow_safety_poll: None) -> None:
    calls = count_acquires(api, monkeypatch)
    wf = await api.create_workflow(task_workflow())
    waiting = asyncio.create_task(poll(api, wait_seconds=30))
    await until(lambda: calls.get("q", 0) >= 1)  # looked once, found nothing, now parked

    began = time.monotonic()
    run = await api.trigger(wf.id)
    (task,) = await asyncio.wait_for(waiting, PROMPT)

    assert task.workflow_run_id == run.id and time.monotonic() - began < PROMPT
    assert calls["q"] == 2  # woken once, by its key


async def test_a_long_poll_is_not_woken_by_another_queue(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                         slow_safety_poll: None) -> None:
    calls = count_acquires(api, monkeypatch)
    on_a = await api.create_workflow(task_workflow("on-a", queue="a"))
    on_b = await api.create_workflow(task_workflow("on-b", queue="b"))
    waiting = asyncio.create_task(poll(api, "b", wait_seconds=30))
    await until(lambda: calls.get("b", 0) >= 1)

    for _ in range(3):
        await api.trigger(on_a.id)
    assert len(await poll(api, "a", max_tasks=10)) == 3
    await asyncio.sleep(0.3)
    assert calls["b"] == 1 and not waiting.done()  # queue a's commits did not re-query b

    run = await api.trigger(on_b.id)
    (task,) = await asyncio.wait_for(waiting, PROMPT)
    assert task.workflow_run_id == run.id and calls["b"] == 2


async def test_a_poll_never_gets_another_projects_tasks(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                        slow_safety_poll: None) -> None:
    calls = count_acquires(api, monkeypatch)
    await start(api, task_workflow("w", project="a"), runs=2)
    in_b = await api.create_workflow(task_workflow("w", project="b"))
    waiting_b = asyncio.create_task(poll(api, project_id="b", worker="wb", wait_seconds=30, max_tasks=10))
    await until(lambda: calls.get("q", 0) >= 1)

    tasks_a = await poll(api, project_id="a", max_tasks=10)
    assert len(tasks_a) == 2 and {t.project_id for t in tasks_a} == {"a"}
    await start(api, task_workflow("w2", project="a"))
    await asyncio.sleep(0.3)
    assert not waiting_b.done()  # project a's queue "q" is not project b's

    run_b = await api.trigger(in_b.id)
    (task_b,) = await asyncio.wait_for(waiting_b, PROMPT)
    assert task_b.workflow_run_id == run_b.id and task_b.project_id == "b"
    assert [t.project_id for t in await poll(api, project_id="b", max_tasks=10)] == []
    assert [t.project_id for t in await poll(api, project_id="a", max_tasks=10)] == ["a"]


async def test_a_task_whose_template_fails_is_a_failed_attempt_not_a_task(api: Api) -> None:
    retry = {"max_attempts": 2, "initial_interval_seconds": 10}
    (run_id,) = await start(api, task_workflow(retry=retry, config={"v": "{{ payload.missing.deep }}"}))

    assert await poll(api) == []
    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and step.attempt == 1 and "template" in step.error
    assert (await run_of(api, run_id)).status == RUN.running

    api.clock.advance(10)
    await api.engine.tick()
    assert await poll(api) == []  # attempt 2 fails the same way: no attempts left

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.failed and step.attempt == 2 and "template" in step.error
    assert (await run_of(api, run_id)).status == RUN.failed


async def test_a_failed_template_does_not_block_the_good_tasks_of_other_runs(api: Api) -> None:
    (good,) = await start(api, task_workflow("good", config={"v": "{{ payload.x }}"}), payload={"x": 1})
    (bad,) = await start(api, task_workflow("bad", config={"v": "{{ payload.nope.x }}"}))

    tasks = await poll(api, max_tasks=10)

    assert [t.workflow_run_id for t in tasks] == [good]
    assert (await run_of(api, bad)).status == RUN.failed


async def test_leasing_respects_max_parallel_steps(api: Api) -> None:
    (run_id,) = await start(api, {"name": "fan", "max_parallel_steps": 1, "steps": [
        {"ref": f"t{i}", "kind": "task", "queue": "q"} for i in range(3)]})

    first = await poll(api, max_tasks=10)
    assert len(first) == 1 and await poll(api, max_tasks=10) == []
    await complete(api, first[0])
    second = await poll(api, max_tasks=10)

    assert len(second) == 1 and second[0].step_ref != first[0].step_ref
    assert (await run_of(api, run_id)).status == RUN.running


async def test_a_paused_run_hands_out_no_new_task_but_takes_the_running_ones_report(api: Api) -> None:
    (run_id,) = await start(api, {"name": "pair", "max_parallel_steps": 1, "steps": [
        {"ref": "a", "kind": "task", "queue": "q"}, {"ref": "b", "kind": "task", "queue": "q"}]})
    (held,) = await poll(api)
    await api.runs.PauseWorkflowRun(runs_pb.PauseWorkflowRunRequest(workflow_run_id=run_id))

    await complete(api, held, result={"ok": True})  # a running step finishes
    assert await poll(api, max_tasks=10) == []  # no new step starts

    await api.runs.ResumeWorkflowRun(runs_pb.ResumeWorkflowRunRequest(workflow_run_id=run_id))
    await api.engine.tick()
    (other,) = await poll(api)
    assert other.step_ref != held.step_ref
    assert (await steps_of(api, run_id))[held.step_ref].status == STEP.completed


# -- CompleteTask / FailTask -----------------------------------------------------------------


async def test_complete_sets_the_output_and_the_next_task_is_pollable_at_once(api: Api) -> None:
    (run_id,) = await start(api, {"name": "chain", "steps": [
        {"ref": "a", "kind": "task", "queue": "q"},
        {"ref": "b", "kind": "task", "queue": "q", "depends_on": ["a"]}]})
    (a,) = await poll(api)
    assert await poll(api) == []

    await complete(api, a, result={"out": [1, {"deep": "x"}]})

    (b,) = await poll(api)  # no tick: the report planned the run on
    assert b.step_ref == "b"
    steps = await steps_of(api, run_id)
    assert steps["a"].status == STEP.completed and as_dict(steps["a"].output) == {"out": [1, {"deep": "x"}]}
    done = [e for e in await events_of(api, run_id) if e.type == "step.completed"]
    assert len(done) == 1 and done[0].actor == "w1"
    await complete(api, b)
    assert (await run_of(api, run_id)).status == RUN.completed


async def _leased(api: Api, retry: dict[str, Any] | None = None) -> tuple[str, pb.Task]:
    step: dict[str, Any] = {"retry": retry} if retry else {}
    (run_id,) = await start(api, task_workflow("work", **step))
    (task,) = await poll(api)
    return run_id, task


async def test_a_duplicate_complete_is_lease_lost_and_changes_nothing(api: Api) -> None:
    run_id, task = await _leased(api)
    await complete(api, task, result={"n": 1})
    before = await snapshot(api, run_id)

    error = await failure(complete(api, task, result={"n": 2}))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "LEASE_LOST"
    assert await snapshot(api, run_id) == before


async def test_a_report_of_an_old_attempt_is_lease_lost_and_changes_nothing(api: Api) -> None:
    run_id, first = await _leased(api, {"max_attempts": 3, "initial_interval_seconds": 1})
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=first.task_id, attempt=1, worker_id="w1",
                                                          error="boom"))
    api.clock.advance(1)
    await api.engine.tick()
    (second,) = await poll(api)
    assert second.task_id == first.task_id and second.attempt == 2
    before = await snapshot(api, run_id)

    for call in (complete(api, first),
                 api.workers.FailTask(workers_pb.FailTaskRequest(task_id=first.task_id, attempt=1,
                                                                 worker_id="w1", error="late"))):
        error = await failure(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.info is not None and error.info.reason == "LEASE_LOST"
    assert await snapshot(api, run_id) == before
    await complete(api, second)  # the live attempt still reports fine


async def test_a_report_by_another_worker_is_lease_lost_and_changes_nothing(api: Api) -> None:
    run_id, task = await _leased(api)
    before = await snapshot(api, run_id)

    error = await failure(complete(api, task, worker="w2"))
    fail_error = await failure(api.workers.FailTask(workers_pb.FailTaskRequest(
        task_id=task.task_id, attempt=task.attempt, worker_id="w2", error="x", non_retryable=True)))

    for e in (error, fail_error):
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION
        assert e.info is not None and e.info.reason == "LEASE_LOST"
    assert await snapshot(api, run_id) == before
    await complete(api, task)


async def test_a_report_after_the_lease_expired_is_lease_lost_even_before_the_sweep(api: Api) -> None:
    run_id, task = await _leased(api)
    api.clock.advance(30)  # the lease ends at exactly now + 30: no longer live
    before = await snapshot(api, run_id)

    error = await failure(complete(api, task))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "LEASE_LOST"
    assert await snapshot(api, run_id) == before
    assert (await steps_of(api, run_id))["t"].status == STEP.running  # not swept yet


async def test_a_report_for_an_unknown_task_is_not_found(api: Api) -> None:
    await _leased(api)

    error = await failure(api.workers.CompleteTask(workers_pb.CompleteTaskRequest(
        task_id="no-such-task", attempt=1, worker_id="w1")))
    fail_error = await failure(api.workers.FailTask(workers_pb.FailTaskRequest(
        task_id="no-such-task", attempt=1, worker_id="w1", error="x")))

    for e in (error, fail_error):
        assert e.code == grpc.StatusCode.NOT_FOUND
        assert e.info is not None and e.info.reason == "TASK_NOT_FOUND"


async def test_a_retryable_failure_comes_back_as_the_next_attempt_after_the_backoff(api: Api) -> None:
    run_id, task = await _leased(api, {"max_attempts": 3, "initial_interval_seconds": 10,
                                       "backoff_coefficient": 2})

    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=1, worker_id="w1",
                                                          error="disk full"))

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and step.attempt == 1 and step.error == "disk full"
    assert await poll(api) == []
    api.clock.advance(9)
    await api.engine.tick()
    assert await poll(api) == []
    api.clock.advance(1)
    await api.engine.tick()
    (again,) = await poll(api, worker="w2")
    assert (again.task_id, again.attempt, again.max_attempts) == (task.task_id, 2, 3)

    # The second failure waits twice as long (backoff_coefficient 2).
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=2, worker_id="w2",
                                                          error="disk full"))
    api.clock.advance(19)
    await api.engine.tick()
    assert await poll(api) == []
    api.clock.advance(1)
    await api.engine.tick()
    (third,) = await poll(api)
    assert third.attempt == 3
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=3, worker_id="w1",
                                                          error="still full"))
    assert (await steps_of(api, run_id))["t"].status == STEP.failed
    assert (await run_of(api, run_id)).status == RUN.failed
    failed = [e for e in await events_of(api, run_id) if e.step_ref == "t" and "error" in e.data]
    assert [int(e.data["attempt"]) for e in failed] == [1, 2, 3]


async def test_a_non_retryable_failure_fails_the_step_and_run_despite_attempts_left(api: Api) -> None:
    run_id, task = await _leased(api, {"max_attempts": 5, "initial_interval_seconds": 1})

    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=1, worker_id="w1",
                                                          error="bad input", non_retryable=True))

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.failed and step.attempt == 1 and step.error == "bad input"
    assert (await run_of(api, run_id)).status == RUN.failed
    api.clock.advance(3600)
    await api.engine.tick()
    assert await poll(api) == []


async def test_retry_after_holds_the_next_attempt_back_that_long(api: Api) -> None:
    _, task = await _leased(api, {"max_attempts": 3, "initial_interval_seconds": 1})

    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=1, worker_id="w1",
                                                          error="rate limited", retry_after_seconds=100))

    api.clock.advance(99)
    await api.engine.tick()
    assert await poll(api) == []
    api.clock.advance(1)
    await api.engine.tick()
    (again,) = await poll(api)
    assert again.attempt == 2


@pytest.mark.parametrize("retry_after", [-1.0, math.nan, math.inf, 1e12, 7 * 24 * 3600.0 + 1])
async def test_an_impossible_retry_after_is_invalid_and_changes_nothing(api: Api, retry_after: float) -> None:
    run_id, task = await _leased(api, {"max_attempts": 3, "initial_interval_seconds": 1})
    before = await snapshot(api, run_id)

    error = await failure(api.workers.FailTask(workers_pb.FailTaskRequest(
        task_id=task.task_id, attempt=1, worker_id="w1", error="x", retry_after_seconds=retry_after)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "retry_after_seconds" in error.message or any("retry_after" in f for f, _ in error.violations)
    assert await snapshot(api, run_id) == before
    await complete(api, task)  # the lease is still live


async def test_a_result_over_the_request_limit_is_refused_and_changes_nothing(api: Api) -> None:
    """A result larger than a step's output may be (256 KiB) never reaches the engine: the
    worker is told INVALID_ARGUMENT (the SDK then reports a non-retryable failure)."""
    run_id, task = await _leased(api)
    before = await snapshot(api, run_id)

    error = await failure(complete(api, task, result={"blob": "x" * (260 * 1024)}))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info is not None and error.info.reason == "JSON_TOO_LARGE"
    assert await snapshot(api, run_id) == before


# -- concurrent reports -----------------------------------------------------------------------


async def test_fifty_concurrent_completes_all_succeed_in_grouped_commits(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    run_ids = await start(api, task_workflow(), runs=50)
    tasks = await poll(api, max_tasks=100)
    assert len(tasks) == 50
    batches: list[int] = []
    leases = api.engine.leases
    original = leases._apply_once

    async def counted(batch: list[Any], handed: list[Any]) -> Any:
        batches.append(len(batch))
        return await original(batch, handed)

    monkeypatch.setattr(leases, "_apply_once", counted)

    await asyncio.gather(*(complete(api, t, result={"i": i}) for i, t in enumerate(tasks)))

    assert sum(batches) == 50 and len(batches) < 50, batches  # grouped, not one commit each
    for run_id in run_ids:
        assert (await run_of(api, run_id)).status == RUN.completed
    outputs = {t.workflow_run_id: i for i, t in enumerate(tasks)}
    for run_id in run_ids[:5]:
        assert as_dict((await steps_of(api, run_id))["t"].output) == {"i": outputs[run_id]}


async def test_twenty_concurrent_duplicate_completes_apply_once(api: Api) -> None:
    run_id, task = await _leased(api)

    results = await asyncio.gather(*(complete(api, task, result={"n": n}) for n in range(20)),
                                   return_exceptions=True)

    ok = [r for r in results if r is None]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(lost) == 19
    assert {e.code() for e in lost} == {grpc.StatusCode.FAILED_PRECONDITION}
    events = await events_of(api, run_id)
    assert len([e for e in events if e.type == "step.completed"]) == 1
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


# -- heartbeats -------------------------------------------------------------------------------


async def test_a_heartbeat_extends_the_lease_past_its_first_expiry(api: Api) -> None:
    run_id, task = await _leased(api, {"max_attempts": 3, "initial_interval_seconds": 1})
    tz = api.clock.now().tzinfo

    for _ in range(3):
        api.clock.advance(20)
        beat = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
            task_id=task.task_id, attempt=1, worker_id="w1", lease_seconds=30))
        assert not beat.revoked
        assert beat.lease_expires_at.ToDatetime(tzinfo=tz) == expires(api, 30)
        await api.engine.tick()

    # 60 s after the lease was taken for 30 s: still the same live attempt.
    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.running and step.attempt == 1
    assert not [e for e in await events_of(api, run_id) if "expired" in e.message]
    await complete(api, task)
    assert (await run_of(api, run_id)).status == RUN.completed


async def test_a_heartbeat_without_a_length_extends_by_the_default(api: Api) -> None:
    """workers_service.proto: HeartbeatTaskRequest.lease_seconds "default 30", as a poll's."""
    await start(api, task_workflow())
    (task,) = await poll(api, lease_seconds=300)
    api.clock.advance(100)

    beat = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id=task.task_id, attempt=1, worker_id="w1"))

    assert beat.lease_expires_at.ToDatetime(tzinfo=api.clock.now().tzinfo) == expires(api, 30)


async def test_a_heartbeat_of_a_lost_lease_answers_revoked(api: Api) -> None:
    _, task = await _leased(api)

    other = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id=task.task_id, attempt=1, worker_id="w2"))
    old = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id=task.task_id, attempt=2, worker_id="w1"))
    await complete(api, task)
    reported = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id=task.task_id, attempt=1, worker_id="w1"))

    assert other.revoked and old.revoked and reported.revoked
    assert not reported.HasField("lease_expires_at")
    error = await failure(api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id="ghost", attempt=1, worker_id="w1")))
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_batched_heartbeats_answer_each_lease_in_order(api: Api) -> None:
    run_ids = await start(api, task_workflow(), runs=4)
    tasks = {t.workflow_run_id: t for t in await poll(api, max_tasks=3)}
    (foreign,) = await poll(api, worker="w2")
    live1, canceled, live2 = (tasks[r] for r in run_ids if r in tasks)
    await _cancel(api, canceled.workflow_run_id)
    api.clock.advance(10)
    asked = [(live1.task_id, 1), (canceled.task_id, 1), ("ghost", 1), (foreign.task_id, 1),
             (live2.task_id, 2), (live2.task_id, 1)]

    response = await api.workers.HeartbeatTasks(workers_pb.HeartbeatTasksRequest(
        worker_id="w1", lease_seconds=45,
        leases=[workers_pb.TaskLease(task_id=t, attempt=a) for t, a in asked]))

    got = [(s.task_id, s.attempt, s.revoked) for s in response.leases]
    assert got == [(live1.task_id, 1, False), (canceled.task_id, 1, True), ("ghost", 1, True),
                   (foreign.task_id, 1, True), (live2.task_id, 2, True), (live2.task_id, 1, False)]
    tz = api.clock.now().tzinfo
    for status in response.leases:
        if status.revoked:
            assert not status.HasField("lease_expires_at")
        else:
            assert status.lease_expires_at.ToDatetime(tzinfo=tz) == expires(api, 45)
    # Extended for real: past the first expiry, the sweep leaves them alone; w2's lapses.
    api.clock.advance(30)
    await api.engine.tick()
    assert (await steps_of(api, live1.workflow_run_id))["t"].status == STEP.running
    assert (await steps_of(api, live2.workflow_run_id))["t"].status == STEP.running
    assert (await steps_of(api, foreign.workflow_run_id))["t"].status != STEP.running


async def test_batched_heartbeats_over_a_thousand_leases_are_invalid(api: Api) -> None:
    leases = [workers_pb.TaskLease(task_id=f"t{i}", attempt=1) for i in range(1001)]

    error = await failure(api.workers.HeartbeatTasks(workers_pb.HeartbeatTasksRequest(worker_id="w1",
                                                                                      leases=leases)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any(f == "leases" for f, _ in error.violations), error.violations
    ok = await api.workers.HeartbeatTasks(workers_pb.HeartbeatTasksRequest(worker_id="w1",
                                                                           leases=leases[:1000]))
    assert len(ok.leases) == 1000 and all(s.revoked for s in ok.leases)


# -- expiry -----------------------------------------------------------------------------------


async def test_an_expired_lease_is_a_failed_attempt_retried_with_the_next_attempt(api: Api) -> None:
    run_id, task = await _leased(api, {"max_attempts": 2, "initial_interval_seconds": 5})

    api.clock.advance(31)
    await api.engine.tick()

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and step.attempt == 1 and "expired" in step.error
    expired = [e for e in await events_of(api, run_id) if "expired" in e.message]
    assert len(expired) == 1 and "w1" in expired[0].message and "lease" in expired[0].message
    late = await failure(complete(api, task))
    assert late.info is not None and late.info.reason == "LEASE_LOST"
    beat = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(task_id=task.task_id, attempt=1,
                                                                           worker_id="w1"))
    assert beat.revoked

    api.clock.advance(5)
    await api.engine.tick()
    (again,) = await poll(api, worker="w2")
    assert (again.task_id, again.attempt) == (task.task_id, 2)
    late = await failure(complete(api, task))  # attempt 1's worker, still late
    assert late.info is not None and late.info.reason == "LEASE_LOST"
    await complete(api, again, worker="w2", result={"ok": True})
    assert (await run_of(api, run_id)).status == RUN.completed


async def release(api: Api, task: pb.Task, worker: str = "w1", reason: str = "deploying",
                  attempt: int | None = None) -> None:
    await api.workers.ReleaseTask(workers_pb.ReleaseTaskRequest(
        task_id=task.task_id, attempt=task.attempt if attempt is None else attempt, worker_id=worker,
        reason=reason))


def _lost_events(events: list[pb.RunEvent]) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(e.data) for e in events if "lost" in e.data]


async def test_an_expired_lease_is_a_loss_offered_again_at_once_with_no_retry_spent(api: Api) -> None:
    run_id, task = await _leased(api)  # max_attempts 1: a failure would end the run

    api.clock.advance(30)
    await api.engine.tick()

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and "lost" in step.error and "expired" in step.error
    assert (await run_of(api, run_id)).status == RUN.running
    (lost,) = _lost_events(await events_of(api, run_id))
    assert lost["attempt"] == 1 and "expired with no report" in lost["lost"]
    error = await failure(complete(api, task))  # the silent holder comes back too late
    assert error.info is not None and error.info.reason == "LEASE_LOST"
    (again,) = await poll(api, worker="w2")  # at once: no backoff
    assert again.task_id == task.task_id and again.attempt == 2
    assert again.max_attempts == 2  # the last attempt the policy allows, the lost one not counted
    await complete(api, again, worker="w2", result={"ok": True})
    assert (await run_of(api, run_id)).status == RUN.completed


async def test_a_released_task_is_offered_again_at_once_and_a_failure_still_counts(api: Api) -> None:
    run_id, task = await _leased(api, retry={"max_attempts": 2, "initial_interval_seconds": 60})

    await release(api, task, reason="SIGTERM")

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and step.attempt == 1
    (lost,) = _lost_events(await events_of(api, run_id))
    assert lost["lost"] == "released by 'w1': SIGTERM"
    (second,) = await poll(api, worker="w2", wait_seconds=0)  # no backoff, no clock moved
    assert second.attempt == 2
    # A verdict still counts: the policy's 2 attempts are both left after the loss.
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=second.task_id, attempt=2, worker_id="w2",
                                                          error="boom"))
    assert (await steps_of(api, run_id))["t"].status == STEP.queued
    api.clock.advance(60)
    await api.engine.tick()
    (third,) = await poll(api, worker="w3")
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=third.task_id, attempt=3, worker_id="w3",
                                                          error="boom again"))
    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.failed and step.attempt == 3 and step.error == "boom again"
    assert (await run_of(api, run_id)).status == RUN.failed


@pytest.mark.parametrize("who", [{"worker": "w2"}, {"attempt": 2}])
async def test_a_release_by_anyone_but_the_holder_of_the_attempt_is_lease_lost(
        api: Api, who: dict[str, Any]) -> None:
    run_id, task = await _leased(api)
    before = await snapshot(api, run_id)

    error = await failure(release(api, task, **who))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "LEASE_LOST"
    assert await snapshot(api, run_id) == before
    await complete(api, task)  # the holder's lease is untouched
    assert (await run_of(api, run_id)).status == RUN.completed


async def test_a_release_after_the_report_is_lease_lost(api: Api) -> None:
    run_id, task = await _leased(api)
    await complete(api, task)

    error = await failure(release(api, task))

    assert error.info is not None and error.info.reason == "LEASE_LOST"
    assert (await steps_of(api, run_id))["t"].status == STEP.completed


@pytest.mark.parametrize("fields", [{"task_id": ""}, {"task_id": "t" * 10_000}, {"worker_id": "w\x00"},
                                    {"reason": "r" * 100_000}])
async def test_a_bad_release_is_invalid_and_changes_nothing(api: Api, fields: dict[str, Any]) -> None:
    run_id, task = await _leased(api)
    before = await snapshot(api, run_id)
    request: dict[str, Any] = {"task_id": task.task_id, "attempt": 1, "worker_id": "w1", **fields}

    error = await failure(api.workers.ReleaseTask(workers_pb.ReleaseTaskRequest(**request)))

    assert error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert await snapshot(api, run_id) == before


async def test_max_losses_in_a_row_fail_a_poison_task_lost(api: Api) -> None:
    run_id, _ = await _leased(api, retry={"max_attempts": 3, "max_losses": 3})
    for attempt in (1, 2, 3):
        if attempt > 1:
            (task,) = await poll(api, worker=f"w{attempt}")
            assert task.attempt == attempt
        api.clock.advance(30)  # its worker died with it
        await api.engine.tick()

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.failed and step.error.startswith("LOST:") and "3 lost in a row" in step.error
    run = await run_of(api, run_id)
    assert run.status == RUN.failed
    final = json_format.MessageToDict(next(e for e in reversed(await events_of(api, run_id))
                                           if e.step_ref == "t").data)
    assert final["reason"] == "LOST" and final["attempt"] == 3


async def test_a_verdict_between_losses_starts_the_count_again(api: Api) -> None:
    run_id, task = await _leased(api, retry={"max_attempts": 5, "max_losses": 2,
                                             "initial_interval_seconds": 1})
    await release(api, task)  # lost 1 in a row
    (task,) = await poll(api)
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=task.task_id, attempt=2, worker_id="w1",
                                                          error="a verdict"))
    api.clock.advance(1)
    await api.engine.tick()
    (task,) = await poll(api)
    await release(api, task)  # lost 1 in a row again, not 2

    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and step.attempt == 3


# -- revocation -------------------------------------------------------------------------------


async def _cancel(api: Api, run_id: str) -> None:
    await api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=run_id))


async def _skip(api: Api, run_id: str) -> None:
    await api.steps.SkipStep(steps_pb.SkipStepRequest(workflow_run_id=run_id, step_ref="t",
                                                      reason="not needed"))


async def _replay(api: Api, run_id: str) -> None:
    await api.steps.ReplaySubtree(steps_pb.ReplaySubtreeRequest(workflow_run_id=run_id, step_ref="t"))


async def _force(api: Api, run_id: str) -> None:
    await api.steps.ForceCompleteStep(steps_pb.ForceCompleteStepRequest(workflow_run_id=run_id, step_ref="t",
                                                                        result=struct({"forced": 1})))


async def _step_timeout(api: Api, run_id: str) -> None:
    api.clock.advance(61)
    await api.engine.tick()


_run_deadline = _step_timeout

# name: (step fields, trigger fields, operation, words one of which the reason must hold)
REVOCATIONS: dict[str, tuple[dict[str, Any], dict[str, Any], Any, tuple[str, ...]]] = {
    "cancel": ({}, {}, _cancel, ("cancel",)),
    "skip": ({}, {}, _skip, ("skip", "not needed")),
    "replay": ({}, {}, _replay, ("reset", "replay")),
    "force-complete": ({}, {}, _force, ("complet",)),
    "step-timeout": ({"timeout_seconds": 60}, {}, _step_timeout, ("timed out", "timed_out")),
    "run-deadline": ({}, {"timeout_seconds": 60}, _run_deadline, ("timed out", "timed_out", "deadline")),
}


@pytest.mark.parametrize("how", list(REVOCATIONS))
async def test_every_revocation_reaches_the_stream_the_heartbeat_and_the_late_report(
        api: Api, streams: list[Any], slow_safety_poll: None, how: str) -> None:
    step_fields, trigger, operation, words = REVOCATIONS[how]
    (run_id,) = await start(api, task_workflow("work", **step_fields), **trigger)
    call = open_stream(api, streams, lease_seconds=600)
    task = (await next_message(call)).task
    assert task.workflow_run_id == run_id

    await operation(api, run_id)

    # In-process: the stream is told at once, not at the (30 s) safety poll. A replay makes the
    # step ready again, so the stream may also hand out the new attempt.
    revoked = None
    while revoked is None:
        message = await next_message(call)
        kind = message.WhichOneof("message")
        assert kind in ("revoked", "task"), message
        if kind == "revoked":
            revoked = message.revoked
        else:
            assert how == "replay" and message.task.attempt == task.attempt + 1
    assert (revoked.task_id, revoked.attempt) == (task.task_id, task.attempt)
    assert any(w in revoked.reason.lower() for w in words), revoked.reason
    beat = await api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(
        task_id=task.task_id, attempt=task.attempt, worker_id="w1"))
    assert beat.revoked
    error = await failure(complete(api, task))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.info is not None and error.info.reason == "LEASE_LOST"


async def test_a_workers_own_report_is_no_revocation_on_its_stream(api: Api, streams: list[Any],
                                                                   quiet_is_heartbeat: None) -> None:
    await start(api, task_workflow(retry={"max_attempts": 2, "initial_interval_seconds": 1}), runs=3)
    call = open_stream(api, streams)

    first = (await next_message(call)).task
    await complete(api, first)
    second = (await next_message(call)).task
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=second.task_id, attempt=1, worker_id="w1",
                                                          error="x", non_retryable=True))
    third = (await next_message(call)).task
    await api.workers.FailTask(workers_pb.FailTaskRequest(task_id=third.task_id, attempt=1, worker_id="w1",
                                                          error="retry me"))

    assert len({first.task_id, second.task_id, third.task_id}) == 3
    assert (await next_message(call)).WhichOneof("message") == "heartbeat"  # not "revoked"


async def _revoked_within(call: Any, seconds: float) -> workers_pb.TaskRevoked:
    """The next message must be a revocation, sent within `seconds` (default safety poll: 1 s)."""
    try:
        message = await next_message(call, seconds)
    except TimeoutError:
        raise AssertionError(f"the stream was not told of the revocation within {seconds}s") from None
    assert message.WhichOneof("message") == "revoked", message
    return message.revoked


async def test_a_revocation_reaches_a_worker_named_like_the_operator(api: Api, streams: list[Any]) -> None:
    """A worker that happens to carry the name of the key that cancels its run must still be
    told (at once, or at the latest by the 1 s safety poll)."""
    (run_id,) = await start(api, task_workflow())
    call = open_stream(api, streams, worker="test-admin")
    task = (await next_message(call)).task

    await _cancel(api, run_id)

    revoked = await _revoked_within(call, 3.0)
    assert (revoked.task_id, revoked.attempt) == (task.task_id, 1)


async def test_a_revocation_by_the_engine_reaches_a_worker_named_engine(api: Api, streams: list[Any]) -> None:
    """A worker id is the worker's to choose: one called "engine" must still be told when the
    engine's own sweep (a step timeout) ends its lease."""
    (run_id,) = await start(api, task_workflow(timeout_seconds=60))
    call = open_stream(api, streams, worker="engine", lease_seconds=600)
    task = (await next_message(call)).task

    await _step_timeout(api, run_id)

    revoked = await _revoked_within(call, 3.0)
    assert (revoked.task_id, revoked.attempt) == (task.task_id, 1)


async def test_revocations_of_other_workers_leases_stay_off_this_stream(api: Api, streams: list[Any],
                                                                        quiet_is_heartbeat: None) -> None:
    (mine,) = await start(api, task_workflow("mine", queue="q"))
    (theirs,) = await start(api, task_workflow("theirs", queue="q2"))
    call = open_stream(api, streams)
    assert (await next_message(call)).task.workflow_run_id == mine
    assert len(await poll(api, "q2", worker="w2")) == 1

    await _cancel(api, theirs)

    assert (await next_message(call)).WhichOneof("message") == "heartbeat"
    await _cancel(api, mine)
    assert (await next_message(call)).WhichOneof("message") == "revoked"


# -- StreamTasks ------------------------------------------------------------------------------


async def test_a_stream_holds_at_most_max_in_flight_and_refills_on_report(api: Api, streams: list[Any],
                                                                          quiet_is_heartbeat: None) -> None:
    await start(api, task_workflow(), runs=3)
    call = open_stream(api, streams, max_in_flight=2)

    first = (await next_message(call)).task
    second = (await next_message(call)).task
    assert first.task_id and second.task_id and first.task_id != second.task_id
    assert (await next_message(call)).WhichOneof("message") == "heartbeat"  # not a third task
    assert len(await poll(api, worker="other")) == 1  # the third is still there, unleased

    await complete(api, first)
    # The slot freed by the report is refilled: a fourth run's task comes at once.
    (run4,) = await start(api, task_workflow("fourth"))
    message = await next_message(call)
    assert message.WhichOneof("message") == "task" and message.task.workflow_run_id == run4


async def test_completing_one_sends_the_third_ready_task(api: Api, streams: list[Any],
                                                        slow_safety_poll: None) -> None:
    run_ids = await start(api, task_workflow(), runs=3)
    call = open_stream(api, streams, max_in_flight=2)
    first = (await next_message(call)).task
    second = (await next_message(call)).task

    await complete(api, first)

    third = (await next_message(call)).task
    assert {first.workflow_run_id, second.workflow_run_id, third.workflow_run_id} == set(run_ids)


async def test_a_report_leases_its_workers_next_task_in_its_own_transaction(
        api: Api, streams: list[Any], slow_safety_poll: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next step of a chain reaches the stream of the worker that completed the step before
    it without the stream leasing it itself: the report's transaction took it (and held it for
    the stream), so the stream never holds more than max_in_flight."""
    (run_id,) = await start(api, {"name": "chain", "steps": [
        {"ref": f"s{i}", "kind": "task", "queue": "q", **({"depends_on": [f"s{i - 1}"]} if i else {})}
        for i in range(4)]})
    call = open_stream(api, streams, max_in_flight=1)
    task = (await next_message(call)).task
    acquires = count_acquires(api, monkeypatch)
    for ref in ("s1", "s2", "s3"):
        await complete(api, task)
        message = await next_message(call)
        assert message.WhichOneof("message") == "task", message
        task = message.task
        assert task.step_ref == ref and task.workflow_run_id == run_id
    assert acquires.get("q", 0) == 0, acquires  # every next task came with the report
    demands = [d for ds in api.engine.leases._demands.values() for d in ds]
    assert len(demands) == 1 and demands[0].reserved == 0 and len(demands[0].held) == 1
    await complete(api, task)
    assert (await run_of(api, run_id)).status == RUN.completed


async def test_a_duplicate_or_refused_report_never_leases_a_stream_past_max_in_flight(
        api: Api, streams: list[Any], quiet_is_heartbeat: None) -> None:
    """Found in review: a slot was counted once per report, so a task reported twice in one
    batch (or a refused report beside an accepted one) reserved two slots for a stream that
    frees one, and the report's own transaction leased it past max_in_flight."""
    (run_id,) = await start(api, {"name": "fan", "steps": [
        {"ref": "a", "kind": "task", "queue": "q"},
        {"ref": "b", "kind": "task", "queue": "q", "depends_on": ["a"]},
        {"ref": "c", "kind": "task", "queue": "q", "depends_on": ["a"]}]})
    call = open_stream(api, streams, max_in_flight=1)
    a = (await next_message(call)).task
    leases, caller = api.engine.leases, ANONYMOUS
    results = await asyncio.gather(
        leases.complete(a.task_id, a.attempt, "w1", {}, caller),
        leases.complete(a.task_id, a.attempt, "w1", {}, caller),  # the same report again, same batch
        leases.fail(a.task_id, a.attempt + 1, "w1", "late", True, caller),  # refused: not its attempt
        return_exceptions=True)
    assert [r is None for r in results].count(True) == 1

    nxt = await next_message(call)
    assert nxt.WhichOneof("message") == "task" and nxt.task.step_ref in ("b", "c")
    # Exactly one slot was freed: the other ready step is not handed out, only a heartbeat.
    assert (await next_message(call)).WhichOneof("message") == "heartbeat"
    steps = await steps_of(api, run_id)
    assert sorted(str(steps[r].status) for r in ("b", "c")) == [str(STEP.queued), str(STEP.running)]


async def test_a_report_that_fails_to_commit_leaves_no_reserved_slots(
        api: Api, streams: list[Any], quiet_is_heartbeat: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report batch whose transaction rolls back hands out nothing and releases the slots it
    had reserved for the stream; the stream goes on leasing by itself."""
    await start(api, task_workflow(), runs=2)
    call = open_stream(api, streams, max_in_flight=1)
    first = (await next_message(call)).task
    leases = api.engine.leases
    original = leases._lease_ready

    def failing(*args: Any) -> Any:
        original(*args)
        raise ConcurrentChange("injected: the batch lost a race after leasing for the stream")

    monkeypatch.setattr(leases, "_lease_ready", failing)
    error = await failure(complete(api, first))
    assert error.code == grpc.StatusCode.ABORTED
    demand = next(d for ds in leases._demands.values() for d in ds)
    assert demand.reserved == 0 and demand.inbox == []
    monkeypatch.setattr(leases, "_lease_ready", original)
    await complete(api, first)
    second = await next_message(call)
    while second.WhichOneof("message") != "task":
        second = await next_message(call)
    assert second.task.task_id != first.task_id


async def test_an_idle_stream_sends_heartbeats(api: Api, streams: list[Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch_module, "STREAM_HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(dispatch_module, "SAFETY_POLL_SECONDS", 0.05)
    call = open_stream(api, streams)

    beats = [await next_message(call) for _ in range(3)]

    assert [m.WhichOneof("message") for m in beats] == ["heartbeat"] * 3
    assert beats[0].heartbeat.at.ToDatetime(tzinfo=api.clock.now().tzinfo) == api.clock.now()


async def test_a_stream_waiting_on_an_empty_queue_is_woken_by_the_trigger(api: Api, streams: list[Any],
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          slow_safety_poll: None) -> None:
    calls = count_acquires(api, monkeypatch)
    wf = await api.create_workflow(task_workflow())
    call = open_stream(api, streams)
    await until(lambda: calls.get("q", 0) >= 1)

    began = time.monotonic()
    run = await api.trigger(wf.id)
    message = await next_message(call, 1.0)

    assert message.task.workflow_run_id == run.id and time.monotonic() - began < 1.0


async def test_a_canceled_stream_ends_on_the_server(api: Api, monkeypatch: pytest.MonkeyPatch,
                                                    slow_safety_poll: None) -> None:
    ended = asyncio.Event()
    dispatch = api.engine.dispatch
    original = dispatch.stream

    async def tracked(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for item in original(*args, **kwargs):
                yield item
        finally:
            ended.set()

    monkeypatch.setattr(dispatch, "stream", tracked)
    await start(api, task_workflow(), runs=2)
    before = len(asyncio.all_tasks())
    call = api.workers.StreamTasks(workers_pb.StreamTasksRequest(queue="q", worker_id="w1"))
    first = (await next_message(call)).task

    call.cancel()

    await asyncio.wait_for(ended.wait(), PROMPT)
    await asyncio.sleep(0.1)
    assert len(asyncio.all_tasks()) <= before
    # The lease it handed out is still the worker's to report; a new stream of the same worker works.
    await complete(api, first)
    again = api.workers.StreamTasks(workers_pb.StreamTasksRequest(queue="q", worker_id="w1"))
    try:
        second = (await next_message(again)).task
        assert second.task_id != first.task_id
    finally:
        again.cancel()


# -- what a worker may ask for ------------------------------------------------------------------

BAD_POLLS: dict[str, dict[str, Any]] = {
    "empty queue": {"queue": ""},
    "empty worker": {"worker_id": ""},
    "max_tasks over 100": {"max_tasks": 101},
    "negative max_tasks": {"max_tasks": -1},
    "wait over 60": {"wait_seconds": 61},
    "negative wait": {"wait_seconds": -1},
    "lease over an hour": {"lease_seconds": 3601},
    "negative lease": {"lease_seconds": -5},
    "NUL in queue": {"queue": "q\x00"},
    "NUL in worker": {"worker_id": "w\x001"},
    "10 KB queue": {"queue": "q" * 10_000},
    "10 KB worker": {"worker_id": "w" * 10_000},
    "bad project": {"project_id": "no spaces/allowed"},
    "10 KB project": {"project_id": "p" * 10_000},
}


@pytest.mark.parametrize("bad", list(BAD_POLLS))
async def test_a_bad_poll_is_invalid_and_leases_nothing(api: Api, bad: str) -> None:
    (run_id,) = await start(api, task_workflow())
    fields = {"queue": "q", "worker_id": "w1", **BAD_POLLS[bad]}

    error = await failure(api.workers.PollTasks(workers_pb.PollTasksRequest(**fields)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message and error.message != "INVALID_ARGUMENT"
    assert (await steps_of(api, run_id))["t"].status == STEP.queued


BAD_STREAMS: dict[str, dict[str, Any]] = {
    "empty queue": {"queue": ""},
    "empty worker": {"worker_id": ""},
    "max_in_flight over 1000": {"max_in_flight": 1001},
    "lease over an hour": {"lease_seconds": 3601},
    "NUL in queue": {"queue": "\x00"},
    "10 KB worker": {"worker_id": "w" * 10_000},
    "bad project": {"project_id": "bad project"},
}


@pytest.mark.parametrize("bad", list(BAD_STREAMS))
async def test_a_bad_stream_is_invalid_and_leases_nothing(api: Api, bad: str) -> None:
    (run_id,) = await start(api, task_workflow())
    fields = {"queue": "q", "worker_id": "w1", **BAD_STREAMS[bad]}

    error = await stream_failure(api.workers.StreamTasks(workers_pb.StreamTasksRequest(**fields)))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message and error.message != "INVALID_ARGUMENT"
    assert (await steps_of(api, run_id))["t"].status == STEP.queued


async def test_the_limits_themselves_are_allowed(api: Api, streams: list[Any]) -> None:
    await start(api, task_workflow(), runs=2)

    tasks = await poll(api, max_tasks=100, lease_seconds=3600, wait_seconds=0)
    call = open_stream(api, streams, max_in_flight=1000, lease_seconds=3600, worker="w" * 200)

    assert len(tasks) == 2
    tz = api.clock.now().tzinfo
    assert {t.lease_expires_at.ToDatetime(tzinfo=tz) for t in tasks} == {expires(api, 3600)}
    await start(api, task_workflow("more"))
    assert (await next_message(call)).task.attempt == 1


@pytest.mark.parametrize("fields", [{"lease_seconds": 3601}, {"worker_id": "w\x00"},
                                    {"task_id": "t" * 10_000}])
async def test_a_bad_heartbeat_is_invalid_and_extends_nothing(api: Api, fields: dict[str, Any]) -> None:
    run_id, task = await _leased(api)
    request = {"task_id": task.task_id, "attempt": 1, "worker_id": "w1", **fields}

    error = await failure(api.workers.HeartbeatTask(workers_pb.HeartbeatTaskRequest(**request)))
    batch = await failure(api.workers.HeartbeatTasks(workers_pb.HeartbeatTasksRequest(
        worker_id=request["worker_id"], lease_seconds=request.get("lease_seconds", 0),
        leases=[workers_pb.TaskLease(task_id=request["task_id"], attempt=1)])))

    assert error.code == batch.code == grpc.StatusCode.INVALID_ARGUMENT
    api.clock.advance(30)
    await api.engine.tick()
    step = (await steps_of(api, run_id))["t"]
    assert step.status == STEP.queued and "expired" in step.error  # the lease was not extended: lost


async def test_whole_numbers_sent_over_grpc_stay_whole(api: Api) -> None:
    """Protobuf carries every number as a double: a payload's 5 reaches the run, a task's
    rendered config and its output as 5 (as the same JSON over REST would), 2.5 as 2.5."""
    (run_id,) = await start(api, task_workflow(config={"n": "{{ payload.n }}", "f": "{{ payload.f }}"}),
                            payload={"n": 5, "f": 2.5})
    (task,) = await poll(api)
    await complete(api, task, result={"count": 3})

    async with api.engine.store.read() as repo:
        run = await repo.get_run(run_id, None)
        (stored,) = (await repo.steps_of([run_id]))[run_id]
    assert run.payload == {"n": 5, "f": 2.5} and type(run.payload["n"]) is int
    assert stored.input == {"n": 5, "f": 2.5} and type(stored.input["n"]) is int
    assert stored.output == {"count": 3} and type(stored.output["count"]) is int
