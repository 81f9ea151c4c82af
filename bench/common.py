"""Shared benchmark machinery: spawning `conveyor serve` and the echo baseline, creating workflows,
the closed-loop load generator and percentile math. Measures nothing by itself.

The load generator runs its clients in separate processes (started with the `spawn` method, so
no gRPC state is forked). All of them warm up until an agreed wall-clock instant, then count the
calls that both start and finish inside the measuring window [start, start + seconds): calls in
flight at either edge are dropped symmetrically, so the rate is count / seconds without bias.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from conveyor.sdk.auth import bearer_interceptors
from conveyor.v1 import resources_pb2, workflow_runs_service_pb2, workflows_service_pb2
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2_grpc as workflows_grpc

BENCH_DIR = Path(__file__).resolve().parent
# A cold start (migrations, Envoy) takes about a second; leave room for a busy 2-core machine.
START_TIMEOUT = 30.0
# The server gets this long to shut down on SIGTERM before it is killed.
STOP_TIMEOUT = 15.0
# Time the load processes get to start (interpreter, grpc import, connect) and warm up before
# the measuring window opens; whatever is left after connecting is spent warming up.
LOAD_STARTUP = 3.0
# REST clients of one process share this many httpx.AsyncClient pools (HTTP/1.1, `concurrency`
# connections in all). httpcore's pool does work linear in its connection count on every request
# (encode/httpx#3215, encode/httpcore#924), so one pool of 64 connections makes the client the
# bottleneck: on this 2-core machine 64 tasks on one pool drove ~150-190 requests/s through Envoy
# with the client using ~0.9 core, against ~700-800/s with 8 pools of 8 and ~750/s from a raw
# asyncio HTTP/1.1 client on 64 connections. 8 pools of 8 measure the server, not httpcore.
REST_POOLS = 8
# Error messages kept per load process, to show what went wrong without flooding the output.
ERROR_SAMPLES = 5
# Server log lines that point at a server-side problem.
PROBLEM_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")

UNFINISHED = (resources_pb2.RunStatus.pending, resources_pb2.RunStatus.running,
              resources_pb2.RunStatus.paused)


class ServerStartError(RuntimeError):
    """The server (or the echo baseline) exited or stayed silent instead of starting."""


def cancel_on_sigterm() -> None:
    """Make SIGTERM cancel the calling task, as Ctrl-C does, so that `finally` blocks still stop
    the servers (Python's default SIGTERM action would exit without running them)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


# --- statistics -------------------------------------------------------------------------------


def run_bench(main: Coroutine[Any, Any, None]) -> int:
    """Run a benchmark's main coroutine: exit code 0 when it ran (targets met or not), 1 when it
    crashed, was interrupted or the server did not start."""
    try:
        asyncio.run(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 1
    except ServerStartError as e:
        print(f"server failed to start: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ratio(a: float, b: float) -> float:
    """a / b, NaN rather than a crash when nothing was measured."""
    return a / b if b else math.nan


@dataclass
class LoadResult:
    """What one load phase measured, merged over its client processes."""

    seconds: float
    count: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    late_start: bool = False
    # CPU used during the window, in cores (1.0 = one core busy all along): the client processes
    # together, and each watched server-side process by name.
    client_cpu: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def merge(self, other: LoadResult) -> None:
        self.count += other.count
        self.errors += other.errors
        self.latencies.extend(other.latencies)
        self.error_samples.extend(other.error_samples)
        self.late_start |= other.late_start
        self.client_cpu += other.client_cpu

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def ms(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) * 1000

    def line(self, label: str, unit: str, target: str) -> str:
        """`<label>: 1234 runs/s (target ...) p50 12.3 ms p99 45.6 ms errors 0`."""
        text = (f"{label}: {self.rate:.0f} {unit}/s ({target}) p50 {self.ms(50):.1f} ms "
                f"p99 {self.ms(99):.1f} ms errors {self.errors}")
        if self.late_start:
            text += " [a client process started late: the window was shorter than assumed]"
        return text

    def cpu_line(self) -> str:
        """`  CPU during the window (cores of 2): server 0.98, client 0.75`: who was busy."""
        cores = {**self.cpu, "client": self.client_cpu}
        busy = ", ".join(f"{name} {used:.2f}" for name, used in cores.items())
        return f"  CPU during the window (cores of {os.cpu_count()}): {busy}"

    def print_errors(self, label: str) -> None:
        if self.errors:
            print(f"  {label}: {self.errors} ERRORS, e.g.:")
            for sample in dict.fromkeys(self.error_samples):  # distinct, in order
                print(f"    {sample}")


# --- processes --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a live process in MiB, from /proc/<pid>/status VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a live process has used so far."""
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Direct children of a process (e.g. the server's Envoy); empty once it is gone."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids.extend(int(k) for k in (task / "children").read_text().split())
    return kids


@dataclass
class Served:
    """A running child server and where it listens."""

    proc: asyncio.subprocess.Process
    grpc_target: str
    rest_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


# The admin token of the server started last, in the environment so the load processes, workers
# (CONVEYOR_API_KEY) and `conveyor` commands the benchmarks start inherit it.
TOKEN_ENV = "CONVEYOR_TOKEN"


def open_channel(target: str, **options: Any) -> grpc.aio.Channel:
    """A gRPC channel whose calls carry the admin token of the server started last."""
    token = os.environ.get(TOKEN_ENV, "")
    return grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(token) if token else None,
                                     **options)


def rest_headers() -> dict[str, str]:
    """HTTP headers carrying the same token."""
    token = os.environ.get(TOKEN_ENV, "")
    return {"authorization": f"Bearer {token}"} if token else {}


def _adopt_token(data_dir: Path | None) -> None:
    """Use the admin token a server wrote into its data directory on its first start."""
    path = data_dir / "admin.token" if data_dir is not None else None
    if path is not None and path.exists():
        os.environ[TOKEN_ENV] = os.environ["CONVEYOR_API_KEY"] = path.read_text().strip()


@asynccontextmanager
async def _spawn(name: str, args: list[str], log_path: Path, want_rest: bool, data_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    """Start `args`, read "gRPC on HOST:PORT" (and "REST on URL") from its stdout, and always
    stop it on the way out: SIGTERM, wait, then SIGKILL it and any children it left behind."""
    log = log_path.open("ab")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=log,
                                                stdin=asyncio.subprocess.DEVNULL,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        grpc_target = rest_url = ""
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not grpc_target or (want_rest and not rest_url):
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        raise ServerStartError(f"{name} exited with {await proc.wait()}:\n"
                                               f"{log_tail(log_path)}")
                    if m := re.search(r"gRPC on (\S+)", line):
                        grpc_target = m.group(1)
                    if m := re.search(r"REST on (\S+)", line):
                        rest_url = m.group(1)
        except TimeoutError:
            raise ServerStartError(f"{name} did not start within {START_TIMEOUT:.0f} s:\n"
                                   f"{log_tail(log_path)}") from None
        _adopt_token(data_dir)
        yield Served(proc, grpc_target, rest_url, log_path)
    finally:
        await _stop(proc)
        log.close()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        # The server stops its Envoy itself on SIGTERM; a server that has to be killed cannot, and
        # Envoy lives in its own session, so it is killed here by pid.
        orphans = children_of(proc.pid)
        print(f"{proc.pid} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killing it", file=sys.stderr)
        proc.kill()
        await proc.wait()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def spawn_server(data_dir: Path, envoy: bool,
                 auth: bool = True) -> contextlib.AbstractAsyncContextManager[Served]:
    """`conveyor serve` on free ports over a fresh SQLite file in data_dir; its log in data_dir.
    `auth=False` serves without API keys (CONVEYOR_AUTH=disabled), the baseline of the
    authentication overhead."""
    # --metrics-port 0: replicas and back-to-back servers must not meet on the default 9464.
    args = [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", "0", "--http-port", "0",
            "--metrics-port", "0", "--db-url", f"sqlite+aiosqlite:///{data_dir / 'conveyor.db'}",
            "--data-dir", str(data_dir)]
    if not envoy:
        args.append("--no-envoy")
    return _spawn("conveyor serve", args, data_dir / "server.log", want_rest=envoy, data_dir=data_dir,
                  env={"CONVEYOR_AUTH": "enabled" if auth else "disabled"})


def spawn_server_on(db_url: str, data_dir: Path,
                    envoy: bool = False) -> contextlib.AbstractAsyncContextManager[Served]:
    """`conveyor serve` (gRPC only, unless `envoy`) on free ports over an existing database at
    `db_url`."""
    # --metrics-port 0: replicas and back-to-back servers must not meet on the default 9464.
    args = [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", "0", "--http-port", "0",
            "--metrics-port", "0", "--db-url", db_url, "--data-dir", str(data_dir)]
    if not envoy:
        args.append("--no-envoy")
    return _spawn("conveyor serve", args, data_dir / "server.log", want_rest=envoy, data_dir=data_dir)


def spawn_echo_server(data_dir: Path) -> contextlib.AbstractAsyncContextManager[Served]:
    """The baseline: a bare grpc.aio server answering grpc.health.v1 Check (bench/echo_server.py)."""
    args = [sys.executable, "-u", str(BENCH_DIR / "echo_server.py")]
    return _spawn("echo server", args, data_dir / "echo.log", want_rest=False)


def log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def print_server_problems(path: Path, shown: int = 8) -> None:
    """Summarize warnings, errors and tracebacks the server logged during the benchmark."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    problems = [line for line in lines if PROBLEM_RE.search(line)]
    if not problems:
        print("server log: no warnings or errors")
        return
    print(f"server log: {len(problems)} warning/error lines, first {min(shown, len(problems))}:")
    for line in problems[:shown]:
        print(f"  {line[:300]}")


# --- API helpers ------------------------------------------------------------------------------


def chain(n: int) -> list[dict[str, Any]]:
    """n noop steps in a line: a -> b -> c ... (s1 -> s2 ... beyond 26 steps)."""
    refs = [chr(ord("a") + i) if n <= 26 else f"s{i + 1}" for i in range(n)]
    return [{"ref": ref, "kind": "noop", **({"depends_on": [refs[i - 1]]} if i else {})}
            for i, ref in enumerate(refs)]


async def create_workflow(target: str, name: str, steps: list[dict[str, Any]]) -> None:
    """CreateWorkflow over gRPC, the definition parsed from its JSON form."""
    workflow = json_format.ParseDict({"name": name, "steps": steps}, resources_pb2.Workflow())
    async with open_channel(target) as channel:
        stub = workflows_grpc.WorkflowsServiceStub(channel)
        await stub.CreateWorkflow(workflows_service_pb2.CreateWorkflowRequest(workflow=workflow), timeout=10)


async def list_runs(stub: runs_grpc.WorkflowRunsServiceStub, workflow: str,
                    statuses: Sequence[int], limit: int = 1000,
                    max_pages: int | None = None) -> list[resources_pb2.WorkflowRun]:
    """Runs of a workflow in the given statuses, following `x-next-page-token` page after page."""
    runs: list[resources_pb2.WorkflowRun] = []
    token = ""
    pages = 0
    while True:
        call = stub.ListWorkflowRuns(workflow_runs_service_pb2.ListWorkflowRunsRequest(
            workflow_id=[workflow], status=list(statuses), limit=limit, page_token=token), timeout=30)
        metadata = await call.initial_metadata()
        runs.extend([run async for run in call])
        token = str(dict(metadata or ()).get("x-next-page-token", ""))
        pages += 1
        if not token or (max_pages is not None and pages >= max_pages):
            return runs


async def trigger_all(target: str, workflow: str, runs: int, concurrency: int) -> tuple[float, LoadResult]:
    """Trigger `runs` runs of `workflow` (payload {n}) from `concurrency` tasks over one channel;
    the wall-clock time of the first trigger and the phase's figures."""
    requests = iter(range(runs))
    result = LoadResult(seconds=0.0)
    async with open_channel(target) as channel:
        await channel.channel_ready()  # connecting is not part of the engine's throughput
        stub = runs_grpc.WorkflowRunsServiceStub(channel)

        async def client() -> None:
            for n in requests:  # one shared iterator: each run is triggered exactly once
                request = workflow_runs_service_pb2.TriggerWorkflowRunRequest(workflow_id=workflow)
                request.payload.update({"n": n})
                t0 = time.perf_counter()
                try:
                    await stub.TriggerWorkflowRun(request, timeout=30)
                except grpc.aio.AioRpcError as e:
                    result.errors += 1
                    if len(result.error_samples) < ERROR_SAMPLES:
                        result.error_samples.append(f"{e.code().name}: {e.details()}")
                    continue
                result.latencies.append(time.perf_counter() - t0)
                result.count += 1

        first = time.time()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return first, result


async def wait_until_settled(target: str, workflow: str, within: float, poll: float = 0.05) -> float:
    """Seconds until no run of the workflow is pending, running or paused.

    Asks for one unfinished run per poll, the cheapest question the API can answer, so polling
    takes next to no CPU from the engine it is waiting for.
    """
    start = time.perf_counter()
    async with open_channel(target) as channel:
        stub = runs_grpc.WorkflowRunsServiceStub(channel)
        async with asyncio.timeout(within):
            # Polling, not an event: the runs finish in another process.
            while True:
                if not await list_runs(stub, workflow, UNFINISHED, limit=1, max_pages=1):
                    return time.perf_counter() - start
                await asyncio.sleep(poll)


# --- closed-loop load -------------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """total spread over parts as evenly as possible (64 over 3 -> 22, 21, 21)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_load(kind: str, address: str, workflow: str, seconds: float, concurrency: int,
                   procs: int, watch: dict[str, int] | None = None) -> LoadResult:
    """`concurrency` closed-loop clients spread over `procs` processes, each issuing one call
    after the other for `seconds` after a common warm-up. kind: echo, grpc-trigger, rest-trigger.
    The CPU the `watch`ed processes (name: pid) use during the window is recorded too."""
    start_at = time.time() + LOAD_STARTUP
    loop = asyncio.get_running_loop()
    result = LoadResult(seconds)
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        parts, result.cpu = await asyncio.gather(
            asyncio.gather(*(
                loop.run_in_executor(pool, _load_process, kind, address, workflow, n, start_at, seconds)
                for n in split(concurrency, procs) if n)),
            _watch_cpu(watch or {}, start_at, seconds))
    for part in parts:
        result.merge(part)
    return result


async def _watch_cpu(pids: dict[str, int], start_at: float, seconds: float) -> dict[str, float]:
    await asyncio.sleep(max(0.0, start_at - time.time()))
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}


def _load_process(kind: str, address: str, workflow: str, concurrency: int, start_at: float,
                  seconds: float) -> LoadResult:
    return asyncio.run(_load(kind, address, workflow, concurrency, start_at, seconds))


async def _load(kind: str, address: str, workflow: str, concurrency: int, start_at: float,
                seconds: float) -> LoadResult:
    end_at = start_at + seconds
    result = LoadResult(seconds)
    async with _client(kind, address, workflow, concurrency) as call:
        # Connect before the clock matters. A failure here is only reported: the window decides
        # whether the server answers, and its errors are counted there.
        try:
            await call(0)
        except Exception as e:
            result.error_samples.append(f"(first call, before the window) {_describe(e)}")
        result.late_start = time.time() > start_at

        async def client(worker: int) -> None:
            n = worker
            while (started := time.time()) < end_at:
                t0 = time.perf_counter()
                try:
                    await call(n)
                    error = ""
                except Exception as e:
                    error = _describe(e)
                latency = time.perf_counter() - t0
                n += concurrency
                if started < start_at or time.time() > end_at:
                    continue  # warm-up, or finished after the window closed
                if error:
                    result.errors += 1
                    if len(result.error_samples) < ERROR_SAMPLES:
                        result.error_samples.append(error)
                else:
                    result.count += 1
                    result.latencies.append(latency)

        async def measure_cpu() -> None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            before = time.process_time()  # every thread of this process, gRPC's own included
            await asyncio.sleep(max(0.0, end_at - time.time()))
            result.client_cpu = (time.process_time() - before) / seconds

        await asyncio.gather(measure_cpu(), *(client(i) for i in range(concurrency)))
    return result


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"[:300]


@asynccontextmanager
async def _client(kind: str, address: str, workflow: str, concurrency: int) -> AsyncIterator[Any]:
    """A `call(n)` coroutine function issuing request number n of the given kind; request n comes
    from client task n % concurrency."""
    if kind == "rest-trigger":
        import httpx  # only the REST clients pay for the import

        # Several pools, each client task bound to one: see REST_POOLS.
        pools = min(REST_POOLS, concurrency)
        size = math.ceil(concurrency / pools)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        async with contextlib.AsyncExitStack() as stack:
            https = [await stack.enter_async_context(httpx.AsyncClient(
                         base_url=address, limits=limits, headers=rest_headers(), timeout=30))
                     for _ in range(pools)]
            path = f"/v1/workflows/{workflow}/runs"

            async def rest_call(n: int) -> None:
                # n % concurrency is the calling task's index: a task always uses the same pool.
                response = await https[n % concurrency % pools].post(path, json={"payload": {"n": n}})
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

            yield rest_call
        return

    async with open_channel(address) as channel:
        if kind == "echo":
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()

            async def echo_call(n: int) -> None:
                await health.Check(check, timeout=30)

            yield echo_call
        elif kind in ("grpc-trigger", "grpc-trigger-keyed"):
            runs = runs_grpc.WorkflowRunsServiceStub(channel)
            # keyed: a new Idempotency-Key on every trigger (unique across client processes).
            prefix = os.urandom(6).hex() if kind == "grpc-trigger-keyed" else ""

            async def trigger_call(n: int) -> None:
                request = workflow_runs_service_pb2.TriggerWorkflowRunRequest(
                    workflow_id=workflow, idempotency_key=f"{prefix}-{n}" if prefix else "")
                request.payload.update({"n": n})
                await runs.TriggerWorkflowRun(request, timeout=30)

            yield trigger_call
        else:
            raise ValueError(f"unknown load kind {kind!r}")
