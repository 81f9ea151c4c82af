"""Three real `conveyor serve` replicas on one PostgreSQL database, one SIGKILLed mid-load.

Each replica is its own process with its own data directory and the same `--db-url`; each has
its own SDK worker process (`tests/system/crash_worker.py`, writing a fsynced ledger of every
attempt it starts and finishes). Through all of them at once the test drives:

- triggers, round-robin over the live replicas, each with an Idempotency-Key; a trigger whose
  replica failed (or was killed under it) is sent again with the same key to another replica;
- cancels of some of those runs, each on a replica other than the one that triggered it;
- a workflow capped at `max_concurrent_runs` = 2, whose running count is sampled from the
  database all along;
- a run watch on replica B of a run commented on through replica A: each comment reaches the
  watch long before the 30 s safety poll (that needs the LISTEN/NOTIFY feed).

Replica C is SIGKILLed once half the triggers are acknowledged, then restarted on the same data
directory once the load is through: it rejoins at once (the first start's admin key still
works, nothing is recreated), serves triggers of its own and watches fed by A's commits. Then:
every acknowledged trigger is one run (one run per key, the acknowledged id), every run ends in a
final state (canceled only when a cancel was acknowledged), every completed step completed once
(one `step.completed` event), a task attempt ran again only when the attempt before it was in
flight at the kill, and the cap was never exceeded. PostgreSQL only (the `postgresql_only`
marker: `make test-sqlite` deselects it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.auth import bearer_interceptors
from tests.conftest import BACKEND
from tests.system.conftest import Served, SpawnFactory
from tests.system.crash_worker import QUEUE

# ~25-35 s: three servers, three workers, a lease expiry after the kill.
pytestmark = [pytest.mark.postgresql_only, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REPLICAS = 3
START_TIMEOUT = 30.0
RUNS = 60  # triggers of the main workflow
CAPPED_RUNS = 12
CAP = 2
CANCEL_EVERY = 6  # every 6th acknowledged run is canceled (if it has not finished yet)
RESTARTED_RUNS = 6  # triggers sent to the restarted replica
COMMENTS = 5  # per watch round (one before the kill, one after)
# Short, so attempts lost with the killed replica come back soon; long enough that a loaded machine
# does not expire the lease of a task that is only slow (a repeat the test would blame on the kill).
LEASE_SECONDS = 4
# Well below the 30 s safety poll: a comment that needed the poll would take ~30 s.
WATCH_DELIVERY_LIMIT = 5.0
SETTLE_SECONDS = 45.0
WORK, CAPPED, HOLD = "rep-work", "rep-capped", "rep-hold"
FINAL = {"completed", "failed", "canceled", "timed_out"}


@dataclass
class Replica:
    index: int
    served: Served
    channel: grpc.aio.Channel | None = None

    @property
    def target(self) -> str:
        return self.served.grpc_target

    @property
    def proc(self) -> asyncio.subprocess.Process:
        return self.served.proc

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def runs(self) -> runs_grpc.WorkflowRunsServiceStub:
        assert self.channel is not None
        return runs_grpc.WorkflowRunsServiceStub(self.channel)


@asynccontextmanager
async def replica(spawn: SpawnFactory, index: int, db_url: str) -> AsyncIterator[Replica]:
    async with spawn(db_url, name=f"replica-{index}") as served:
        yield Replica(index, served)


@asynccontextmanager
async def worker(target: str, token: str, ledger: Path, log_path: Path) -> AsyncIterator[None]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_API_KEY": token, "CRASH_LEDGER": str(ledger),
           "CRASH_LEASE": str(LEASE_SECONDS), "CRASH_SLOTS": "8"}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor.cli", "worker", "tests.system.crash_worker:worker",
            "--target", target, stdout=log, stderr=log, cwd=REPO, env=env)
    try:
        await poll(lambda: "serving" in log_path.read_text() or proc.returncode is not None, START_TIMEOUT,
                   "a worker to start")
        assert proc.returncode is None, f"the worker exited: see {log_path}"
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def poll(probe: Any, within: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)


def task_step(ref: str, **extra: Any) -> dict[str, Any]:
    return {"ref": ref, "kind": "task", "queue": QUEUE,
            "config": {"op": "prep", "i": "{{ payload.i }}", "sleep": "{{ payload.sleep }}"},
            "retry": {"max_attempts": 6, "initial_interval_seconds": 0.2, "backoff_coefficient": 1}, **extra}


WORKFLOWS = [
    {"name": WORK, "steps": [task_step("t"), {"ref": "done", "kind": "noop", "depends_on": ["t"]}]},
    {"name": CAPPED, "max_concurrent_runs": CAP, "steps": [task_step("t")]},
    {"name": HOLD, "steps": [{"ref": "wait", "kind": "delay", "config": {"seconds": 600}}]},
]


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def watch_round(a: Replica, b: Replica, run_id: str, label: str) -> list[float]:
    """A watch of `run_id` on B; COMMENTS comments added on A, each timed from A's answer to the
    watch's event."""
    call = b.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run_id))
    seen: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    subscribed = asyncio.Event()

    async def read() -> None:
        async for message in call:
            kind = message.WhichOneof("message")
            if kind == "snapshot":
                subscribed.set()
            elif kind == "event" and message.event.type == "run.comment":
                seen.put_nowait((message.event.message, time.perf_counter()))

    reader = asyncio.create_task(read())
    try:
        # A comment committed before the snapshot would be in it, not an event: wait for it.
        async with asyncio.timeout(10):
            await subscribed.wait()
        latencies: list[float] = []
        for i in range(COMMENTS):
            text = f"{label}-{i}"
            await a.runs.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run_id, content=text),
                                       timeout=10)
            acked = time.perf_counter()
            async with asyncio.timeout(WATCH_DELIVERY_LIMIT + 25):
                while True:
                    message, at = await seen.get()
                    if message == text:
                        break
            latencies.append(at - acked)
        return latencies
    finally:
        reader.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader


async def test_three_replicas_share_the_work_and_survive_a_kill(spawn: SpawnFactory, db_url: str,
                                                                 tmp_path: Path) -> None:
    assert BACKEND == "postgresql", "postgresql_only: run with CONVEYOR_TEST_DB=postgresql"
    pg_dsn = db_url.replace("+asyncpg", "")
    ledger = tmp_path / "ledger.jsonl"
    async with AsyncExitStack() as stack:
        # The first start creates the admin key (and writes its token); the others find it.
        first = await stack.enter_async_context(replica(spawn, 0, db_url))
        token = first.served.token
        others = await asyncio.gather(*(stack.enter_async_context(replica(spawn, i, db_url))
                                        for i in range(1, REPLICAS)))
        replicas = [first, *others]
        for r in replicas:
            r.channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(r.target, interceptors=bearer_interceptors(token)))
        for r in replicas:
            log_path = tmp_path / f"worker-{r.index}.log"
            await stack.enter_async_context(worker(r.target, token, ledger, log_path))
        a, b, c = replicas
        wf = wf_grpc.WorkflowsServiceStub(a.channel)
        for definition in WORKFLOWS:
            await wf.CreateWorkflow(wf_pb.CreateWorkflowRequest(
                workflow=json_format.ParseDict(definition, pb.Workflow())), timeout=10)
        pg = await asyncpg.connect(pg_dsn)
        stack.push_async_callback(pg.close)

        # --- the cap, sampled from the database all along ---------------------------------------
        max_running = 0
        stop_sampling = asyncio.Event()
        sampling = await asyncpg.connect(pg_dsn)  # its own connection: it runs beside the others
        stack.push_async_callback(sampling.close)

        async def sample_cap() -> None:
            nonlocal max_running
            while not stop_sampling.is_set():
                n = await sampling.fetchval("SELECT count(*) FROM workflow_runs WHERE workflow_name = $1 "
                                      "AND status = 'running'", CAPPED)
                max_running = max(max_running, n)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample_cap())

        # --- triggers (round-robin, retried elsewhere with the same key), cancels -----------------
        acked: dict[str, str] = {}  # idempotency key -> run id
        served_by: Counter[int] = Counter()
        canceled: set[str] = set()
        half_acked = asyncio.Event()
        kill_time = 0.0

        def live(start: int) -> list[Replica]:
            order = replicas[start % REPLICAS:] + replicas[:start % REPLICAS]
            return [r for r in order if r.alive]

        async def trigger(workflow: str, key: str, n: int, sleep: float) -> str:
            request = runs_pb.TriggerWorkflowRunRequest(workflow_id=workflow, idempotency_key=key)
            request.payload.update({"i": n, "sleep": sleep})
            deadline = time.monotonic() + 20
            attempt = 0
            while True:
                candidates = live(n + attempt)
                r = candidates[0]
                try:
                    run = await r.runs.TriggerWorkflowRun(request, timeout=10)
                except grpc.aio.AioRpcError:
                    attempt += 1
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
                    continue
                served_by[r.index] += 1
                return str(run.id)

        async def cancel(run_id: str, n: int) -> None:
            r = live(n + 1)[0]
            try:
                request = runs_pb.CancelWorkflowRunRequest(workflow_run_id=run_id)
                await r.runs.CancelWorkflowRun(request, timeout=10)
            except grpc.aio.AioRpcError as e:
                # Finished already (or its replica died under the call: then it is not known to
                # have been canceled, and either ending is accepted for it below).
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    canceled.add("?" + run_id)
                return
            canceled.add(run_id)

        work = iter(range(RUNS))

        async def client() -> None:
            for n in work:
                key = f"work-{n}"
                acked[key] = await trigger(WORK, key, n, 0.4)
                if len(acked) >= RUNS // 2:
                    half_acked.set()
                if n % CANCEL_EVERY == 0:
                    await cancel(acked[key], n)

        async def capped_client() -> None:
            for n in range(CAPPED_RUNS):
                key = f"capped-{n}"
                acked[key] = await trigger(CAPPED, key, n, 0.3)

        async def killer() -> None:
            nonlocal kill_time
            await half_acked.wait()
            kill_time = time.time()
            c.proc.kill()
            await c.proc.wait()

        # A run that stays running, for the cross-replica watch.
        hold_id = await trigger(HOLD, "hold", 0, 0)
        before_kill = asyncio.create_task(watch_round(a, b, hold_id, "before"))
        await asyncio.gather(*(client() for _ in range(8)), capped_client(), killer())
        latencies = await before_kill
        latencies += await watch_round(a, b, hold_id, "after")

        # --- the killed replica restarts on its data directory and rejoins -----------------------
        restarted = await stack.enter_async_context(replica(spawn, c.index, db_url))
        assert not any("token" in line.lower() for line in restarted.served.printed), \
            "a restart printed a new admin token"
        restarted.channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(restarted.target, interceptors=bearer_interceptors(token)))
        replicas[c.index] = restarted
        for n in range(RESTARTED_RUNS):
            key = f"restarted-{n}"
            request = runs_pb.TriggerWorkflowRunRequest(workflow_id=WORK, idempotency_key=key)
            request.payload.update({"i": RUNS + n, "sleep": 0})
            acked[key] = (await restarted.runs.TriggerWorkflowRun(request, timeout=10)).id
        latencies += await watch_round(a, restarted, hold_id, "restarted")
        await a.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=hold_id), timeout=10)

        # --- everything settles -----------------------------------------------------------------
        run_ids = set(acked.values())

        async def unfinished() -> list[str]:
            rows = await pg.fetch("SELECT id, status FROM workflow_runs WHERE id = ANY($1::text[])",
                                  list(run_ids))
            return [r["id"] for r in rows if r["status"] not in FINAL]

        try:
            await poll(lambda: _empty(unfinished()), SETTLE_SECONDS, "every run to finish", interval=0.2)
        except AssertionError:
            raise AssertionError(f"runs still unfinished: {await unfinished()}") from None
        stop_sampling.set()
        await sampler

        # --- nothing lost, nothing doubled -----------------------------------------------------
        assert len(acked) == RUNS + CAPPED_RUNS + RESTARTED_RUNS
        assert len(run_ids) == len(acked), "two keys acknowledged the same run"
        assert all(served_by[i] for i in range(REPLICAS)), f"some replica served no trigger: {served_by}"
        rows = await pg.fetch("SELECT id, status, workflow_name, idempotency_key FROM workflow_runs "
                              "WHERE workflow_name = ANY($1::text[])", [WORK, CAPPED])
        by_key = defaultdict(list)
        for row in rows:
            by_key[row["idempotency_key"]].append(row["id"])
        assert {k: v for k, v in by_key.items() if len(v) != 1} == {}, "a key made more than one run"
        assert {k: v[0] for k, v in by_key.items()} == acked, "runs in the database != acknowledged triggers"
        status = {row["id"]: row["status"] for row in rows}
        sure_canceled = {r for r in canceled if not r.startswith("?")}
        maybe_canceled = {r[1:] for r in canceled if r.startswith("?")}
        assert sure_canceled, "no cancel landed before its run finished"
        for run_id, st in status.items():
            if run_id in sure_canceled:
                assert st == "canceled", (run_id, st)
            elif run_id in maybe_canceled:
                assert st in ("canceled", "completed"), (run_id, st)
            else:
                assert st == "completed", (run_id, st)

        # Every completed step completed once.
        completions = await pg.fetch(
            "SELECT e.workflow_run_id, e.step_ref, count(*) AS n FROM run_events e "
            "WHERE e.workflow_run_id = ANY($1::text[]) AND e.type = 'step.completed' "
            "GROUP BY e.workflow_run_id, e.step_ref", list(run_ids))
        assert [dict(r) for r in completions if r["n"] != 1] == []
        completed_steps = await pg.fetchval(
            "SELECT count(*) FROM step_runs WHERE workflow_run_id = ANY($1::text[]) AND status = 'completed'",
            list(run_ids))
        assert completed_steps == len(completions)

        # A task attempt ran again only after the one before it was in flight at the kill: leased
        # before it (a lease the killed replica granted may never have reached its worker) and,
        # when its handler started, started before it.
        leased_at = {(r["workflow_run_id"], r["step_ref"], int(r["attempt"])): r["at"].timestamp()
                     for r in await pg.fetch(
                         "SELECT workflow_run_id, step_ref, (data->>'attempt')::int AS attempt, at "
                         "FROM run_events WHERE workflow_run_id = ANY($1::text[]) AND type = 'step.running'",
                         list(run_ids))}
        starts: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        for row in ledger_rows(ledger):
            if row["event"] == "start":
                step = (row["run_id"], row["step_ref"])
                assert row["attempt"] not in starts[step], f"attempt started twice: {row}"
                starts[step][row["attempt"]] = row["t"]
        repeats = 0
        for step, attempts in starts.items():
            for attempt in attempts:
                if attempt > 1:
                    repeats += 1
                    leased = leased_at.get((*step, attempt - 1))
                    started = attempts.get(attempt - 1, 0.0)
                    assert leased is not None and leased < kill_time and started < kill_time, (
                        f"step {step} ran attempt {attempt} though the one before it was not in flight "
                        f"at the kill ({kill_time}): started {attempts}, attempt {attempt - 1} "
                        f"leased {leased}")
        tasks_done = await pg.fetchval(
            "SELECT count(*) FROM step_runs WHERE workflow_run_id = ANY($1::text[]) AND kind = 'task' "
            "AND status = 'completed'", list(run_ids))
        assert tasks_done > 0

        # The cap held across replicas, and the watch on B saw A's commits well before the poll.
        assert 0 < max_running <= CAP, f"{max_running} runs of {CAPPED} running at once (cap {CAP})"
        assert max(latencies) < WATCH_DELIVERY_LIMIT, latencies
        print(f"triggers per replica {dict(served_by)}, canceled {len(sure_canceled)}, task attempts "
              f"repeated after the kill {repeats}, max running of the capped workflow {max_running}, "
              f"cross-replica watch delivery max {1000 * max(latencies):.0f} ms")


async def _empty(pending: Any) -> bool:
    return not await pending
