"""Crash safety with real processes (SPEC §4): a real `conveyor serve`, a real SDK worker process
(`tests/system/crash_worker.py`) and a local HTTP server, all writing ledgers of the effects they
see; the server (or the worker) is SIGKILLed at seeded random points while runs of a workflow
with a task step that fails its first attempt by design, an http step, an approval, a retried
`workflow` step and its child run's task step are under way.

What is proven after everything settles:

- nothing is lost: every run (parent and child) completed with the outputs a crash-free run has
  (by construction, and checked against a crash-free reference run of the same test);
- each state change once: every run's events are seqs 1..n, each step has one `step.completed`,
  each (task, attempt) ran at most once, and the completing attempt is one whose handler finished;
- effects repeat only for attempts in flight at a kill: each effect (a handler start, a request
  received) that is followed by another of the same step is either a designed failure (the
  handler raised / the server answered 503, as the step's events record), or was started before
  a kill of its executor and not reported before it, and every repeat carries a higher attempt.
  So the extra effects number at most the kills x the attempts in flight at each.

Replay a failure with CONVEYOR_CRASH_SEED=<seed printed>; CONVEYOR_CRASH_RUNS / _KILLS /
_WORKER_KILLS change the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.auth import bearer_interceptors
from tests.processes import WorkerProc
from tests.system.conftest import Served, SpawnFactory
from tests.system.crash_worker import DESIGNED_FAILURE, QUEUE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("CONVEYOR_CRASH_RUNS", "20"))
KILLS = int(os.environ.get("CONVEYOR_CRASH_KILLS", "8"))
WORKER_KILLS = int(os.environ.get("CONVEYOR_CRASH_WORKER_KILLS", "3"))
# The worker's lease (the lower bound of how long a task its killed worker held waits to come
# back). While its server is down a worker cannot heartbeat, so a server kill that lasts longer
# than the lease loses the worker's attempts too: the server test runs its worker with the
# shortest lease there is, shorter than a restart, so that its kills cost task attempts as well.
LEASE_SECONDS = 2
SERVER_TEST_LEASE_SECONDS = 1
# The http step's timeout: an attempt whose executor (the server) died is timed out this long
# after it started, by the restarted server, and retried with attempt+1.
HTTP_TIMEOUT_SECONDS = 3
# Enough attempts that kills can never exhaust a leased step: the designed failure, one lost
# attempt per kill, and the one that succeeds. (The `workflow` step keeps the brief's 3: a kill
# loses no attempt of it, its child run is a row.)
LEASED_ATTEMPTS = max(KILLS, WORKER_KILLS) + 2
# How long an interrupted task may take to come back: its lease, the sweep, a new worker's
# start, with room for a machine running both suites side by side (normally ~2 s).
COME_BACK_SECONDS = LEASE_SECONDS + 40
SETTLE_SECONDS = 90.0
COMMENT = "approved by the crash test"
PARENT = "crashwork"
CHILD = "crashwork-child"
PARENT_STEPS = ("prep", "call", "gate", "child", "finish")
CHILD_STEPS = ("leaf",)
FINAL_RUN = {"completed", "failed", "canceled", "timed_out"}
# gRPC errors the test's own calls meet while the server is down or the call raced a kill.
TRANSIENT = (grpc.aio.AioRpcError,)
T = TypeVar("T")


def _seed() -> int:
    env = os.environ.get("CONVEYOR_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _leased_retry() -> dict[str, Any]:
    return {"max_attempts": LEASED_ATTEMPTS, "initial_interval_seconds": 0.2, "backoff_coefficient": 1}


def workflows(http_url: str) -> list[dict[str, Any]]:
    """The child workflow and the parent workflow whose runs the tests crash."""
    child = {"name": CHILD, "steps": [
        {"ref": "leaf", "kind": "task", "queue": QUEUE, "retry": _leased_retry(),
         "config": {"op": "leaf", "token": "{{ payload.token }}", "sleep": "{{ payload.sleep }}"}},
    ]}
    parent = {"name": PARENT, "steps": [
        {"ref": "prep", "kind": "task", "queue": QUEUE, "retry": _leased_retry(),
         "config": {"op": "prep", "i": "{{ payload.i }}", "flaky": "{{ payload.flaky }}",
                    "sleep": "{{ payload.sleep }}"}},
        {"ref": "call", "kind": "http", "depends_on": ["prep"], "retry": _leased_retry(),
         "timeout_seconds": HTTP_TIMEOUT_SECONDS,
         "config": {"method": "POST", "url": f"{http_url}/effect", "headers": {"X-Run-Id": "{{ run.id }}"},
                    "body": {"run": "{{ run.id }}", "i": "{{ payload.i }}",
                             "square": "{{ steps.prep.output.square }}", "flaky": "{{ payload.flaky }}",
                             "delay": "{{ payload.delay }}"}}},
        {"ref": "gate", "kind": "approval", "depends_on": ["call"]},
        {"ref": "child", "kind": "workflow", "depends_on": ["gate"],
         "retry": {"max_attempts": 3, "initial_interval_seconds": 0.2},
         "config": {"workflow_id": CHILD, "payload": {"token": "{{ steps.call.output.body.token }}",
                                                      "sleep": "{{ payload.sleep }}"}}},
        {"ref": "finish", "kind": "task", "queue": QUEUE, "depends_on": ["child"], "retry": _leased_retry(),
         "config": {"op": "finish", "i": "{{ payload.i }}", "leaf": "{{ steps.child.output.leaf.word }}",
                    "sleep": "{{ payload.sleep }}"}},
    ]}
    return [child, parent]


def expected_outputs(i: int, run_id: str, gate: dict[str, Any]) -> dict[str, Any]:
    """What a crash-free run of payload `i` ends with, step by step (http: status and body; its
    headers carry a date)."""
    token = f"tok-{i}-{i * i}"
    return {
        "prep": {"square": i * i},
        "call": {"status": 200, "body": {"token": token, "run": run_id}},
        "gate": gate,
        "child": {"leaf": {"word": token.upper()}},
        "finish": {"summary": f"{i}:{token.upper()}"},
    }


def normalized(step_ref: str, output: dict[str, Any]) -> dict[str, Any]:
    if step_ref == "call":
        return {"status": output.get("status"), "body": output.get("body")}
    return output


# -- the local HTTP server the http step calls -------------------------------------------------


class EffectServer:
    """A minimal HTTP/1.1 server (keep-alive) that appends each request it receives to a ledger
    (on receipt, fsynced: that is the effect) and each answer after sending it. The first request
    of a run whose body says `flaky` is answered 503 (a designed, retried failure); every other
    one 200 with `{"token", "run"}` after the body's `delay`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def allow(self) -> dict[str, str]:
        """The server's environment that lets its http steps reach this one (loopback is denied
        by default)."""
        return {"CONVEYOR_HTTP_ALLOW": f"127.0.0.1:{self.port}"}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                raw = await reader.readexactly(int(headers.get("content-length") or 0))
                body = json.loads(raw) if raw else {}
                run_id = headers.get("x-run-id", "")
                n = len(self.rows)
                self._record({"event": "received", "n": n, "run_id": run_id, "i": body.get("i"),
                              "t": time.time()})
                status = 503 if body.get("flaky") and run_id not in self.seen else 200
                self.seen.add(run_id)
                await asyncio.sleep(float(body.get("delay") or 0))
                token = f"tok-{_number(body.get('i'))}-{_number(body.get('square'))}"
                answer = json.dumps({"token": token, "run": body.get("run")}
                                    if status == 200 else {"error": "designed 503"}).encode()
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Service Unavailable'}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
                             .encode() + answer)
                await writer.drain()
                self._record({"event": "answered", "n": n, "run_id": run_id, "status": status,
                              "t": time.time()})
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def _number(value: Any) -> Any:
    """A JSON number as text, integral ones without ".0" (a payload that came in over gRPC is a
    Struct, whose numbers are all doubles)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# -- the API, the worker process, the ledgers ---------------------------------------------------


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class Api:
    """gRPC stubs over one channel that reconnects by itself to a server restarted on its port."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.workflows = wf_grpc.WorkflowsServiceStub(channel)
        self.runs_stub = runs_grpc.WorkflowRunsServiceStub(channel)
        self.steps_stub = steps_grpc.StepRunsServiceStub(channel)

    @classmethod
    @asynccontextmanager
    async def connect(cls, target: str, token: str) -> AsyncIterator[Api]:
        async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(token), options=[
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]) as channel:
            yield cls(channel)

    async def create(self, definition: dict[str, Any]) -> None:
        await self.workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(
            workflow=json_format.ParseDict(definition, pb.Workflow())))

    async def trigger(self, payload: dict[str, Any]) -> str:
        run = await self.runs_stub.TriggerWorkflowRun(json_format.ParseDict(
            {"workflow_id": PARENT, "payload": payload}, runs_pb.TriggerWorkflowRunRequest()),
            wait_for_ready=True)  # the server may have just been restarted
        run_id: str = run.id
        return run_id

    async def runs(self) -> list[dict[str, Any]]:
        return [_as_dict(r) async for r in self.runs_stub.ListWorkflowRuns(
            runs_pb.ListWorkflowRunsRequest(limit=1000))]

    async def steps(self, run_id: str) -> dict[str, dict[str, Any]]:
        rows = [_as_dict(s) async for s in self.steps_stub.ListStepRuns(
            steps_pb.ListStepRunsRequest(workflow_run_id=run_id, limit=1000))]
        return {r["step_ref"]: r for r in rows}

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        return [_as_dict(e) async for e in self.runs_stub.ListRunEvents(
            runs_pb.ListRunEventsRequest(workflow_run_id=run_id, limit=1000))]

    async def approve(self, run_id: str) -> None:
        await self.steps_stub.ApproveStep(steps_pb.ApproveStepRequest(
            workflow_run_id=run_id, step_ref="gate", comment=COMMENT))

    async def approve_waiting(self, rng: random.Random, probability: float) -> None:
        """Approve (each with `probability`) the approval steps now waiting; an answer lost to a
        kill or a step already approved is fine, the next round looks again."""
        for run in await self.runs():
            if run["workflow_name"] != PARENT or run["status"] in FINAL_RUN:
                continue
            if (await self.steps(run["id"]))["gate"]["status"] == "waiting" and rng.random() < probability:
                with contextlib.suppress(*TRANSIENT):
                    await self.approve(run["id"])


async def start_worker(stack: AsyncExitStack, target: str, token: str, ledger: Path, log_path: Path,
                       lease: int = LEASE_SECONDS) -> WorkerProc:
    """`conveyor worker tests.system.crash_worker:worker` (imports from the repository root)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRASH_LEDGER": str(ledger), "CRASH_LEASE": str(lease),
           "CONVEYOR_API_KEY": token}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor.cli", "worker", "tests.system.crash_worker:worker",
            "--target", target, stdout=log, stderr=log, cwd=REPO, env=env)
    worker = WorkerProc(proc, log_path)

    async def cleanup() -> None:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    stack.push_async_callback(cleanup)
    async with asyncio.timeout(30):
        while "serving" not in worker.log():
            assert proc.returncode is None, worker.log()
            await asyncio.sleep(0.05)
    return worker


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def later_starts(ledger: Path, start: dict[str, Any]) -> list[dict[str, Any]]:
    """The handler starts of later attempts of `start`'s task."""
    return [r for r in read_ledger(ledger) if r["task_id"] == start["task_id"] and r["event"] == "start"
            and r["attempt"] > start["attempt"]]


def running_handlers(ledger: Path, pid: int) -> list[dict[str, Any]]:
    """The attempts whose handler process `pid` started and has not finished (nor raised)."""
    rows = [r for r in read_ledger(ledger) if r["pid"] == pid]
    ended = {(r["task_id"], r["attempt"]) for r in rows if r["event"] != "start"}
    return [r for r in rows if r["event"] == "start" and (r["task_id"], r["attempt"]) not in ended]


async def poll(probe: Callable[[], T], within: float, what: str, interval: float = 0.01) -> T:
    """`probe()` once it is truthy (polled every `interval` s, for at most `within` s)."""
    deadline = time.monotonic() + within
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)
    return value


# -- what happened, and the checks --------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    kind: str  # "server" or "worker"
    t: float
    pid: int


@dataclass(frozen=True)
class Effect:
    """One effect: a task attempt's handler started, or the HTTP server received a request."""

    kind: str  # "task" or "http"
    run_id: str
    step_ref: str
    attempt: int
    t: float
    pid: int = 0  # the worker process of a task attempt


@dataclass
class History:
    """Everything the checks read, gathered once everything settled."""

    runs: dict[str, dict[str, Any]]
    steps: dict[str, dict[str, dict[str, Any]]]
    events: dict[str, list[dict[str, Any]]]
    task_ledger: list[dict[str, Any]]
    http_ledger: list[dict[str, Any]]
    kills: list[Kill]
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def attempt_end(self, run_id: str, step_ref: str, attempt: int) -> dict[str, Any] | None:
        """The first event that ended `attempt` of the step (completed, queued for a retry,
        failed, timed out...), or None."""
        for e in self.events[run_id]:
            if e["step_ref"] == step_ref and e["type"] != "step.running" and e["type"].startswith("step.") \
                    and (e.get("data") or {}).get("attempt") == attempt:
                return e
        return None

    def effects(self) -> list[Effect]:
        found = [Effect("task", r["run_id"], r["step_ref"], r["attempt"], r["t"], r["pid"])
                 for r in self.task_ledger if r["event"] == "start"]
        for r in self.http_ledger:
            if r["event"] != "received":
                continue
            # The request's attempt: the last one the step started before it arrived (its lease
            # commits before the request is made; one attempt makes at most one request).
            started = [((e.get("data") or {}).get("attempt", 0), _ts(e["at"]))
                       for e in self.events[r["run_id"]]
                       if e["step_ref"] == "call" and e["type"] == "step.running"]
            before = [a for a, at in started if at <= r["t"]]
            assert before, f"http request {r} arrived before any attempt of its step started: {started}"
            found.append(Effect("http", r["run_id"], "call", max(before), r["t"]))
        return sorted(found, key=lambda e: e.t)

    def attempt_start(self, run_id: str, step_ref: str, attempt: int) -> dict[str, Any] | None:
        """The event that leased (started) `attempt` of the step, or None."""
        for e in self.events[run_id]:
            if e["step_ref"] == step_ref and e["type"] == "step.running" \
                    and (e.get("data") or {}).get("attempt") == attempt:
                return e
        return None

    def in_flight(self, effect: Effect, kill: Kill) -> bool:
        """The effect's attempt was started before the kill — its handler began, or its lease
        was committed (a task leased just before a server kill reaches its worker just after
        it, and its lease then runs out while the server is down) — and not reported before
        it, and the kill took its executor (the server runs http steps and holds every lease;
        a worker only its own attempts)."""
        if kill.kind == "worker" and (effect.kind != "task" or effect.pid != kill.pid):
            return False
        leased = self.attempt_start(effect.run_id, effect.step_ref, effect.attempt)
        started = min(effect.t, _ts(leased["at"])) if leased is not None else effect.t
        if started >= kill.t:
            return False
        end = self.attempt_end(effect.run_id, effect.step_ref, effect.attempt)
        return end is None or _ts(end["at"]) >= kill.t


def designed_failure(effect: Effect, end: dict[str, Any] | None) -> bool:
    """The attempt failed the way the workflow means it to: the handler raised on attempt 1, or
    the HTTP server answered the first request 503; the step's events say so."""
    if end is None or end["type"] == "step.completed":
        return False
    error = str((end.get("data") or {}).get("error", ""))
    if effect.kind == "task":
        return effect.attempt == 1 and DESIGNED_FAILURE in error
    return error.startswith("HTTP 503")


@dataclass
class Tally:
    kills: int = 0
    in_flight: list[int] = field(default_factory=list)
    repeats: Counter[str] = field(default_factory=Counter)
    designed: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)

    def __str__(self) -> str:
        return (f"kills={self.kills} in-flight-at-each-kill={self.in_flight} (sum {sum(self.in_flight)}) "
                f"effects={dict(self.effects)} designed-failures={dict(self.designed)} "
                f"repeated-effects={dict(self.repeats)}")


def check_runs(h: History, parents: Iterable[str], gate: dict[str, Any]) -> None:
    """Every run completed as a crash-free run does, with its child, its events in order and
    each step completed once."""
    parents = list(parents)
    children = {r["parent_workflow_run_id"]: r for r in h.runs.values() if r["workflow_name"] == CHILD}
    assert sorted(r["id"] for r in h.runs.values() if r["workflow_name"] == PARENT) == sorted(parents)
    assert len([r for r in h.runs.values() if r["workflow_name"] == CHILD]) == len(parents), \
        "one child run per parent run"
    for run_id in parents:
        run, steps, i = h.runs[run_id], h.steps[run_id], h.payloads[run_id]["i"]
        assert run["status"] == "completed", (run, steps)
        assert list(steps) == list(PARENT_STEPS), steps
        assert all(s["status"] == "completed" for s in steps.values()), steps
        want = expected_outputs(i, run_id, gate)
        assert {ref: normalized(ref, s["output"]) for ref, s in steps.items()} == want, (run_id, steps)
        assert {ref: normalized(ref, out) for ref, out in run["output"].items()} == want, run
        child = children[run_id]
        assert child["parent_step_run_id"] == steps["child"]["id"]
        assert steps["child"]["job_run_id"] == child["id"]
        assert child["status"] == "completed", child
        assert h.steps[child["id"]]["leaf"]["status"] == "completed"
        assert child["output"] == {"leaf": want["child"]["leaf"]}, child
    for run_id, events in h.events.items():
        refs = PARENT_STEPS if h.runs[run_id]["workflow_name"] == PARENT else CHILD_STEPS
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), (run_id, events)
        completed = Counter(e["step_ref"] for e in events if e["type"] == "step.completed")
        assert completed == dict.fromkeys(refs, 1), (run_id, completed, events)
        assert [e["type"] for e in events].count("run.completed") == 1, (run_id, events)
        for ref in refs:
            if ref == "gate":
                continue  # an approval has no attempts
            done = [e for e in events if e["step_ref"] == ref and e["type"] == "step.completed"]
            # The step's completing attempt is its last one.
            assert done[0]["data"]["attempt"] == h.steps[run_id][ref]["attempt"], (run_id, ref, events)


def check_effects(h: History) -> Tally:
    """Repeated effects happen only for attempts in flight at a kill, with a higher attempt."""
    tally = Tally(kills=len(h.kills))
    starts = Counter((r["task_id"], r["attempt"]) for r in h.task_ledger if r["event"] == "start")
    finishes = Counter((r["task_id"], r["attempt"]) for r in h.task_ledger if r["event"] == "finish")
    assert max(starts.values()) == 1, f"a task attempt was delivered twice: {starts.most_common(3)}"
    assert max(finishes.values()) == 1, f"a task attempt finished twice: {finishes.most_common(3)}"
    # The attempt that completed each task step is one whose handler finished.
    finished = {(r["run_id"], r["step_ref"], r["attempt"]) for r in h.task_ledger if r["event"] == "finish"}
    for run_id, steps in h.steps.items():
        for ref, s in steps.items():
            if s["kind"] == "task":
                assert (run_id, ref, s["attempt"]) in finished, (run_id, ref, s)

    by_step: dict[tuple[str, str], list[Effect]] = defaultdict(list)
    for effect in h.effects():
        by_step[(effect.run_id, effect.step_ref)].append(effect)
        tally.effects[effect.kind] += 1
    problems: list[str] = []
    for (run_id, ref), effects in by_step.items():
        attempts = [e.attempt for e in effects]
        if attempts != sorted(set(attempts)):
            problems.append(f"{run_id}/{ref}: effects' attempts do not increase: {effects}")
            continue
        assert effects[-1].attempt == h.steps[run_id][ref]["attempt"], (run_id, ref, effects)
        for prev, nxt in itertools.pairwise(effects):
            end = h.attempt_end(run_id, ref, prev.attempt)
            if designed_failure(prev, end):
                tally.designed[prev.kind] += 1
                continue
            if any(h.in_flight(prev, k) and k.t < nxt.t for k in h.kills):
                tally.repeats[prev.kind] += 1
                continue
            problems.append(f"{run_id}/{ref}: {prev} repeated by {nxt} though no kill took it in flight "
                            f"(its attempt ended with {end}); kills: {h.kills}")
    effects = h.effects()
    tally.in_flight = [sum(1 for e in effects if h.in_flight(e, k)) for k in h.kills]
    assert not problems, "\n".join(problems)
    assert sum(tally.repeats.values()) <= sum(tally.in_flight), str(tally)
    return tally


async def gather_history(api: Api, ledger: Path, http: EffectServer, kills: list[Kill],
                         payloads: dict[str, dict[str, Any]]) -> History:
    runs = {r["id"]: r for r in await api.runs()}
    return History(runs=runs, steps={i: await api.steps(i) for i in runs},
                   events={i: await api.events(i) for i in runs}, task_ledger=read_ledger(ledger),
                   http_ledger=list(http.rows), kills=kills, payloads=payloads)


async def settle(api: Api, rng: random.Random, want_runs: int) -> None:
    """Approve whatever waits until every run (parents and children) has ended."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        with contextlib.suppress(*TRANSIENT):
            await api.approve_waiting(rng, 1.0)
            runs = await api.runs()
            if len(runs) == 2 * want_runs and all(r["status"] in FINAL_RUN for r in runs):
                return
        if time.monotonic() > deadline:
            runs = await api.runs()
            stuck = [r for r in runs if r["status"] not in FINAL_RUN]
            raise AssertionError(f"runs not settled after {SETTLE_SECONDS}s: {len(runs)} runs, stuck: "
                                 f"{[(r['id'], r['workflow_name'], r['status']) for r in stuck]}\n"
                                 f"{[(r['id'], await api.steps(r['id'])) for r in stuck[:3]]}")
        await asyncio.sleep(0.2)


@asynccontextmanager
async def approving(api: Api, seed: int) -> AsyncIterator[None]:
    """Meanwhile, in the background: approve some of the waiting approvals each round, so runs
    move at different paces (and approvals race the kills)."""
    rng = random.Random(seed + 1)

    async def approve_forever() -> None:
        while True:
            with contextlib.suppress(*TRANSIENT):
                await api.approve_waiting(rng, 0.25)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(approve_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run_payload(rng: random.Random, i: int, slow: bool = False) -> dict[str, Any]:
    sleep = rng.uniform(0.3, 1.0) if slow else rng.uniform(0.05, 0.4)
    delay = rng.uniform(0.05, 0.3)
    return {"i": i, "flaky": rng.random() < 0.5, "sleep": round(sleep, 3), "delay": round(delay, 3)}


@dataclass
class Rig:
    """A test's processes: they are cleaned up with `stack`."""

    stack: AsyncExitStack
    served: Served
    api: Api
    http: EffectServer
    worker: WorkerProc
    port: int


@asynccontextmanager
async def setup(spawn: SpawnFactory, db_url: str, tmp_path: Path,
                lease: int = LEASE_SECONDS) -> AsyncIterator[Rig]:
    """Server on a fixed port, the API, the HTTP server, one worker, the workflows."""
    async with AsyncExitStack() as stack:
        http = EffectServer(tmp_path / "http-ledger.jsonl")
        await http.start()
        stack.push_async_callback(http.stop)
        port = _free_port()
        served = await stack.enter_async_context(spawn(db_url, grpc_port=port, env=http.allow))
        api = await stack.enter_async_context(Api.connect(f"127.0.0.1:{port}", served.token))
        worker = await start_worker(stack, f"127.0.0.1:{port}", served.token, tmp_path / "ledger.jsonl",
                                    tmp_path / "worker-0.log", lease)
        for definition in workflows(http.url):
            await api.create(definition)
        yield Rig(stack, served, api, http, worker, port)


async def reference_run(api: Api, rng: random.Random,
                        payloads: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """A crash-free run (flaky: its first attempts fail by design), complete before any kill."""
    payload = {"i": 0, "flaky": True, "sleep": 0.05, "delay": 0.05}
    ref = await api.trigger(payload)
    payloads[ref] = payload
    t0 = time.monotonic()
    await settle(api, rng, 1)
    return ref, time.monotonic() - t0


async def test_sigkill_the_server_at_random_points_loses_nothing_and_repeats_only_in_flight_effects(
        spawn: SpawnFactory, db_url: str, tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    print(f"\n[crash-work server] seed={seed} (replay: CONVEYOR_CRASH_SEED={seed}) runs={RUNS} kills={KILLS}")
    t_start = time.monotonic()
    kills: list[Kill] = []
    payloads: dict[str, dict[str, Any]] = {}
    async with setup(spawn, db_url, tmp_path, SERVER_TEST_LEASE_SECONDS) as rig:
        api, served = rig.api, rig.served
        ref, ref_seconds = await reference_run(api, rng, payloads)
        gate = (await api.steps(ref))["gate"]["output"]
        assert gate["comment"] == COMMENT and gate["approved_by"], gate

        # Half the runs at once, the rest in waves after each restart: work is under way at every
        # kill, not only at the first ones.
        numbers = list(range(1, RUNS + 1))
        rest = numbers[RUNS // 2:]
        waves = [numbers[: RUNS // 2] + rest[0::KILLS]] + [rest[k::KILLS] for k in range(1, KILLS)]
        async with approving(api, seed):
            for wave in waves:
                for i in wave:
                    payload = run_payload(rng, i)
                    payloads[await api.trigger(payload)] = payload
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                kills.append(Kill("server", time.time(), served.proc.pid))
                served.kill()
                await served.proc.wait()
                # Same database, same port: the worker and the test's channel find it again.
                served = await rig.stack.enter_async_context(spawn(db_url, grpc_port=rig.port,
                                                                   env=rig.http.allow))
        await settle(api, rng, RUNS + 1)
        assert rig.worker.proc.returncode is None, "the worker reconnects by itself, it never exits"
        history = await gather_history(api, tmp_path / "ledger.jsonl", rig.http, kills, payloads)
    try:
        check_runs(history, payloads, gate)
        tally = check_effects(history)
        assert sum(tally.in_flight) >= 1, f"no kill met an attempt in flight: it proved little ({tally})"
    except AssertionError:
        print(f"[crash-work server] FAILED with seed={seed}; ledgers and server.log under {tmp_path}")
        raise
    print(f"[crash-work server] {tally}; reference run {ref_seconds:.1f}s; "
          f"total {time.monotonic() - t_start:.1f}s")


async def test_sigkill_the_worker_mid_task_its_tasks_come_back_after_the_lease_and_complete_once(
        spawn: SpawnFactory, db_url: str, tmp_path: Path) -> None:
    seed = _seed()
    rng = random.Random(seed)
    runs = max(4, RUNS // 2)
    print(f"\n[crash-work worker] seed={seed} (replay: CONVEYOR_CRASH_SEED={seed}) runs={runs} "
          f"worker kills={WORKER_KILLS}")
    t_start = time.monotonic()
    kills: list[Kill] = []
    payloads: dict[str, dict[str, Any]] = {}
    ledger = tmp_path / "ledger.jsonl"
    returned_after: list[float] = []
    interrupted: list[dict[str, Any]] = []
    async with setup(spawn, db_url, tmp_path) as rig:
        api, worker = rig.api, rig.worker
        ref, _ = await reference_run(api, rng, payloads)
        gate = (await api.steps(ref))["gate"]["output"]
        for i in range(1, runs + 1):
            payload = run_payload(rng, i, slow=True)
            payloads[await api.trigger(payload)] = payload
        async with approving(api, seed):
            for n in range(WORKER_KILLS):
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                # Mid-task: when the worker runs a handler that has not finished.
                pid = worker.pid
                open_ = await poll(functools.partial(running_handlers, ledger, pid), 30, "a handler running")
                kills.append(Kill("worker", time.time(), pid))
                interrupted.extend(open_)
                worker.proc.kill()
                await worker.proc.wait()
                worker = await start_worker(rig.stack, rig.served.grpc_target, rig.served.token, ledger,
                                            tmp_path / f"worker-{n + 1}.log")
                # Each task the kill interrupted comes back, with attempt+1, on the new worker.
                for r in open_:
                    try:
                        again = await poll(functools.partial(later_starts, ledger, r), COME_BACK_SECONDS,
                                           f"task {r['task_id']} to come back")
                    except AssertionError as e:
                        # What the server says of the task, so a stranded one can be diagnosed.
                        steps = await api.steps(r["run_id"])
                        raise AssertionError(f"{e}; its run's steps: {steps}; "
                                             f"worker log: {worker.log()[-2000:]}") from e
                    assert again[0]["attempt"] == r["attempt"] + 1 and again[0]["pid"] == worker.pid, again
                    returned_after.append(again[0]["t"] - kills[-1].t)
        await settle(api, rng, runs + 1)
        history = await gather_history(api, ledger, rig.http, kills, payloads)
    try:
        check_runs(history, payloads, gate)
        tally = check_effects(history)
        # The attempts a kill interrupted mid-handler ended by their lease running out.
        for r in interrupted:
            end = history.attempt_end(r["run_id"], r["step_ref"], r["attempt"])
            assert end is not None and end["type"] == "step.queued" and "expired" in end["message"], (r, end)
        assert all(n >= 1 for n in tally.in_flight), tally
        assert sum(tally.repeats.values()) >= len(interrupted), tally
    except AssertionError:
        print(f"[crash-work worker] FAILED with seed={seed}; ledgers and logs under {tmp_path}")
        raise
    print(f"[crash-work worker] {tally}; interrupted tasks came back after "
          f"{[round(s, 2) for s in returned_after]}s; total {time.monotonic() - t_start:.1f}s")
