"""Soak: ten minutes of mixed load against one `conveyor serve` (with its Envoy) and one SDK
worker process, comparing the server at the start and at the end.

The load is open-loop (a steady pace, whatever the answers), so the start and the end see the
same offered work:
- gRPC triggers (8/s) and REST triggers through Envoy (4/s) of "soak-task", one task step the
  worker completes; every 10th gRPC-triggered run fails its first attempt, is watched until the
  server ends the watch (the run failed), and its step is retried (RetryStep), to completion;
- 1/s runs of "soak-gated" (a task, then an approval), each commented on, paused and resumed,
  then watched until its approval waits; every 4th is then canceled, the others approved; the
  watch must end by itself once the run is final.

Sampled every 2 s: the server process's RSS (/proc/<pid>/status VmRSS) and open file
descriptors (/proc/<pid>/fd). The first 10 % of the run (the first minute of ten) is warm-up;
"start" is the next 10 %, "end" the last 10 %: RSS and open files are the medians of their
samples there, trigger latency the p99 of the triggers sent there. Targets: growth under 10 %,
no errors. Errors: every failed call, a watch that did not end within 2 minutes, a run that did
not end as the script intended (completed, or canceled), and runs still unfinished a minute after
the load stops.

The API key rate limit is off for this server (CONVEYOR_RATE_LIMIT=0): the load is steady, not
hostile, and refused calls would be counted as errors.

Run: .venv/bin/python bench/soak.py [--minutes 10] [--db sqlite|postgresql]
Ends with the line `soak: RSS growth N %, open files growth N %, errors N`.
Exits 0 whether or not the targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import common
import grpc
import httpx

from conveyor.v1 import (
    resources_pb2,
    step_runs_service_pb2,
    workflow_runs_service_pb2,
)
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

TASK_WF, GATED_WF, QUEUE = "soak-task", "soak-gated", "soak"
GRPC_RATE, REST_RATE, GATED_RATE = 8.0, 4.0, 1.0
FAIL_EVERY, CANCEL_EVERY = 10, 4
GROWTH_TARGET = 10.0
# Warm-up, then the start window; the end window closes the run (shares of the duration).
WARMUP_SHARE = WINDOW_SHARE = 0.10
SAMPLE_SECONDS = 2.0
CALL_TIMEOUT = 30.0
# A watch of a run the script drives ends well within this; longer is an error.
WATCH_TIMEOUT = 120.0
# After the load stops, the runs still in flight get this long to end.
SETTLE_TIMEOUT = 60.0
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"
Status = resources_pb2.RunStatus


@dataclass
class Tally:
    """What the load saw, stamped with seconds since the load began."""

    began: float = field(default_factory=time.monotonic)
    grpc: list[tuple[float, float]] = field(default_factory=list)  # (when, latency s)
    rest: list[tuple[float, float]] = field(default_factory=list)
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (when, RSS MiB, fds)
    fd_kinds: list[tuple[float, Counter[str]]] = field(default_factory=list)  # (when, fds by kind)
    expected: dict[str, int] = field(default_factory=dict)  # run id -> the status it must end in
    ops: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.began

    def error(self, what: str, e: BaseException | str) -> None:
        self.errors += 1
        if len(self.error_samples) < common.ERROR_SAMPLES:
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
            self.error_samples.append(f"{what}: {detail}"[:300])


class Load:
    """The actors of the soak, over one gRPC channel and one REST client."""

    def __init__(self, channel: grpc.aio.Channel, rest: httpx.AsyncClient, tally: Tally) -> None:
        self.runs = runs_grpc.WorkflowRunsServiceStub(channel)
        self.steps = steps_grpc.StepRunsServiceStub(channel)
        self.rest = rest
        self.tally = tally

    async def _trigger(self, workflow: str, payload: dict[str, object]) -> str:
        request = workflow_runs_service_pb2.TriggerWorkflowRunRequest(workflow_id=workflow)
        request.payload.update(payload)
        when, t0 = self.tally.now(), time.perf_counter()
        run = await self.runs.TriggerWorkflowRun(request, timeout=CALL_TIMEOUT)
        self.tally.grpc.append((when, time.perf_counter() - t0))
        return str(run.id)

    async def grpc_task(self, n: int) -> None:
        fail = n % FAIL_EVERY == 0
        try:
            run_id = await self._trigger(TASK_WF, {"n": n, "fail": fail})
            self.tally.expected[run_id] = Status.completed
            if fail:
                await self._retry_after_failure(run_id)
        except grpc.aio.AioRpcError as e:
            self.tally.error("gRPC trigger or step retry", e)

    async def _retry_after_failure(self, run_id: str) -> None:
        await self._watch(run_id)
        run = await self.runs.GetWorkflowRun(
            workflow_runs_service_pb2.GetWorkflowRunRequest(workflow_run_id=run_id), timeout=CALL_TIMEOUT)
        if run.status != Status.failed:
            self.tally.error("a run asked to fail", f"ended {Status.Value.Name(run.status)}")
            return
        retry = step_runs_service_pb2.RetryStepRequest(workflow_run_id=run_id, step_ref="t")
        await self.steps.RetryStep(retry, timeout=CALL_TIMEOUT)
        self.tally.ops["step retries"] += 1

    async def rest_task(self, n: int) -> None:
        when, t0 = self.tally.now(), time.perf_counter()
        try:
            response = await self.rest.post(f"/v1/workflows/{TASK_WF}/runs", json={"payload": {"n": n}})
        except httpx.HTTPError as e:
            self.tally.error("REST trigger", f"{type(e).__name__}: {e}")
            return
        if response.status_code != 200:
            self.tally.error("REST trigger", f"HTTP {response.status_code}: {response.text[:200]}")
            return
        self.tally.rest.append((when, time.perf_counter() - t0))
        self.tally.expected[response.json()["id"]] = Status.completed

    async def gated(self, n: int) -> None:
        cancel = n % CANCEL_EVERY == 0
        try:
            run_id = await self._trigger(GATED_WF, {"n": n})
            self.tally.expected[run_id] = Status.canceled if cancel else Status.completed
            ident = workflow_runs_service_pb2
            comment = ident.AddRunCommentRequest(workflow_run_id=run_id, content=f"soak {n}")
            await self.runs.AddRunComment(comment, timeout=CALL_TIMEOUT)
            await self.runs.PauseWorkflowRun(ident.PauseWorkflowRunRequest(workflow_run_id=run_id),
                                             timeout=CALL_TIMEOUT)
            await self.runs.ResumeWorkflowRun(ident.ResumeWorkflowRunRequest(workflow_run_id=run_id),
                                              timeout=CALL_TIMEOUT)
            self.tally.ops["comments"] += 1
            self.tally.ops["pauses and resumes"] += 1

            async def decide() -> None:
                if cancel:
                    await self.runs.CancelWorkflowRun(ident.CancelWorkflowRunRequest(workflow_run_id=run_id),
                                                      timeout=CALL_TIMEOUT)
                    self.tally.ops["cancels"] += 1
                else:
                    await self.steps.ApproveStep(step_runs_service_pb2.ApproveStepRequest(
                        workflow_run_id=run_id, step_ref="ok", comment="soak"), timeout=CALL_TIMEOUT)
                    self.tally.ops["approvals"] += 1

            await self._watch(run_id, on_waiting=decide)
        except grpc.aio.AioRpcError as e:
            self.tally.error("gated run operations", e)

    async def _watch(self, run_id: str, on_waiting: Callable[[], Awaitable[None]] | None = None) -> None:
        """Watch a run until the server ends the watch (the run is final); call `on_waiting`
        once, when its approval step waits."""
        self.tally.ops["watches opened"] += 1
        request = workflow_runs_service_pb2.WatchWorkflowRunRequest(workflow_run_id=run_id)
        call = self.runs.WatchWorkflowRun(request)
        try:
            async with asyncio.timeout(WATCH_TIMEOUT):
                async for message in call:
                    waiting = (
                        any(s.step_ref == "ok" and s.status == resources_pb2.StepStatus.waiting
                            for s in message.snapshot.steps)
                        or (message.event.step_ref == "ok" and message.event.type == "step.waiting"))
                    if waiting and on_waiting is not None:
                        action, on_waiting = on_waiting, None
                        await action()
        except TimeoutError:
            call.cancel()
            self.tally.error("watch", f"run {run_id} still watched after {WATCH_TIMEOUT:.0f} s")
            return
        self.tally.ops["watches ended by the server"] += 1


async def paced(rate: float, until: float, action: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Start action(0), action(1), ... at `rate` per second until the monotonic time `until`,
    each as its own task (open loop), then wait for them all."""
    tasks: set[asyncio.Task[None]] = set()
    start, n = time.monotonic(), 0
    while True:
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        if time.monotonic() >= until:
            break
        task = asyncio.create_task(action(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)


def fd_kinds(pid: int) -> Counter[str]:
    """A process's open file descriptors by what they are: sockets, pipes, the database's files
    (SQLite: the file, its -wal and -shm, per connection), anything else by path."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed between the listing and the readlink
            continue
        kind = link.split(":", 1)[0] if ":" in link and not link.startswith("/") else link
        kinds["database" if "conveyor.db" in kind else kind] += 1
    return kinds


async def sample(pid: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        kinds = fd_kinds(pid)
        when = tally.now()
        tally.samples.append((when, common.rss_mb(pid), sum(kinds.values())))
        tally.fd_kinds.append((when, kinds))
        await asyncio.sleep(SAMPLE_SECONDS)


async def check_outcomes(target: str, tally: Tally) -> tuple[int, int]:
    """Wait for the runs to end; (runs that ended as intended, runs that did not)."""
    for workflow in (TASK_WF, GATED_WF):
        with contextlib.suppress(TimeoutError):
            await common.wait_until_settled(target, workflow, SETTLE_TIMEOUT)
    found: dict[str, int] = {}
    async with common.open_channel(target) as channel:
        stub = runs_grpc.WorkflowRunsServiceStub(channel)
        for workflow in (TASK_WF, GATED_WF):
            found.update((r.id, r.status) for r in await common.list_runs(stub, workflow, []))
    wrong = [(run_id, want, found.get(run_id)) for run_id, want in tally.expected.items()
             if found.get(run_id) != want]
    for run_id, want, got in wrong[:common.ERROR_SAMPLES]:
        seen = Status.Value.Name(got) if got is not None else "missing"
        tally.error("run outcome", f"{run_id} ended {seen}, not {Status.Value.Name(want)}")
    tally.errors += max(0, len(wrong) - common.ERROR_SAMPLES)
    return len(tally.expected) - len(wrong), len(wrong)


def growth(start: float, end: float) -> float:
    return (end - start) / start * 100 if start else float("nan")


def figures(tally: Tally, seconds: float) -> tuple[float, float]:
    """Print the start/end lines; (RSS growth %, open files growth %)."""
    warmup, window = seconds * WARMUP_SHARE, seconds * WINDOW_SHARE
    start, end = (warmup, warmup + window), (seconds - window, seconds)

    def during(values: list[tuple[float, float]], span: tuple[float, float]) -> list[float]:
        return sorted(v for when, v in values if span[0] <= when < span[1])

    rss = [(when, mib) for when, mib, _ in tally.samples]
    fds = [(when, float(n)) for when, _, n in tally.samples]
    rss0, rss1 = (statistics.median(during(rss, s) or [float("nan")]) for s in (start, end))
    fd0, fd1 = (statistics.median(during(fds, s) or [float("nan")]) for s in (start, end))
    print(f"windows: warm-up 0-{warmup:.0f} s, start {start[0]:.0f}-{start[1]:.0f} s, "
          f"end {end[0]:.0f}-{end[1]:.0f} s; {len(tally.samples)} samples every {SAMPLE_SECONDS:g} s")
    print(f"server RSS: start {rss0:.1f} MiB, end {rss1:.1f} MiB, growth {growth(rss0, rss1):.1f} % "
          f"(target < {GROWTH_TARGET:g} %)")
    print(f"server open files: start {fd0:.0f}, end {fd1:.0f}, growth {growth(fd0, fd1):.1f} % "
          f"(target < {GROWTH_TARGET:g} %)")
    for span, label in ((start, "start"), (end, "end")):
        kinds = next((k for when, k in reversed(tally.fd_kinds) if when < span[1]), Counter())
        print(f"  open files at the {label}: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    tenths = [statistics.median(during(rss, (seconds * i / 10, seconds * (i + 1) / 10)) or [float("nan")])
              for i in range(10)]
    print("  server RSS by tenth of the run (MiB): " + " ".join(f"{mib:.0f}" for mib in tenths))
    for label, latencies in (("gRPC", tally.grpc), ("REST", tally.rest)):
        p0, p1 = (common.percentile(during(latencies, s), 99) * 1000 for s in (start, end))
        print(f"trigger p99 {label}: start {p0:.1f} ms, end {p1:.1f} ms, growth {growth(p0, p1):.1f} % "
              f"(target < {GROWTH_TARGET:g} %) over {len(latencies)} triggers")
    return growth(rss0, rss1), growth(fd0, fd1)


@contextlib.asynccontextmanager
async def server(db: str, data_dir: Path) -> AsyncIterator[common.Served]:
    """`conveyor serve` with Envoy on a fresh SQLite file or PostgreSQL database (dropped after)."""
    if db == "sqlite":
        async with common.spawn_server(data_dir, envoy=True) as served:
            yield served
        return
    name = f"conveyor_soak_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        async with common.spawn_server_on(PG_URL_PREFIX + name, data_dir, envoy=True) as served:
            yield served
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def start_worker(target: str, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor.cli", "worker", "soak_worker:worker", "--target", target,
        cwd=common.BENCH_DIR, stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    seconds = args.minutes * 60
    os.environ["CONVEYOR_RATE_LIMIT"] = "0"
    print(f"soak: {args.minutes:g} min on {args.db}, one server with Envoy, one SDK worker process; "
          f"gRPC triggers {GRPC_RATE:g}/s (1 in {FAIL_EVERY} failing once, watched, step retried), "
          f"REST triggers {REST_RATE:g}/s, gated runs {GATED_RATE:g}/s (comment, pause, resume, watch, "
          f"then 1 in {CANCEL_EVERY} canceled, the rest approved)")
    with tempfile.TemporaryDirectory(prefix="conveyor-soak-") as tmp:
        data_dir = Path(tmp)
        async with server(args.db, data_dir) as served:
            target = served.grpc_target
            worker = await start_worker(target, data_dir / "worker.log")
            try:
                await common.create_workflow(target, TASK_WF, [{"ref": "t", "kind": "task", "queue": QUEUE}])
                await common.create_workflow(target, GATED_WF, [
                    {"ref": "t", "kind": "task", "queue": QUEUE},
                    {"ref": "ok", "kind": "approval", "depends_on": ["t"]}])
                tally = Tally()
                until = tally.began + seconds
                rest_client = httpx.AsyncClient(base_url=served.rest_url, headers=common.rest_headers(),
                                                timeout=CALL_TIMEOUT)
                async with common.open_channel(target) as channel, rest_client as rest:
                    load = Load(channel, rest, tally)
                    await asyncio.gather(
                        sample(served.pid, tally, until),
                        paced(GRPC_RATE, until, load.grpc_task),
                        paced(REST_RATE, until, load.rest_task),
                        paced(GATED_RATE, until, load.gated))
                good, bad = await check_outcomes(target, tally)
                print(f"runs: {good + bad} triggered, {good} ended as intended, {bad} did not; "
                      + ", ".join(f"{name} {count}" for name, count in sorted(tally.ops.items())))
                rss, fds = figures(tally, seconds)
                print(f"errors: {tally.errors} (target 0)")
                for sample_line in tally.error_samples:
                    print(f"  {sample_line}")
            finally:
                await stop(worker)
                common.print_server_problems(served.log_path)
    print(f"soak: RSS growth {rss:.1f} %, open files growth {fds:.1f} %, errors {tally.errors}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the server's database (PostgreSQL at 127.0.0.1:5432, a fresh database)")
    return common.run_bench(bench(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
