"""Real work end to end: task steps served by one SDK worker process, and http steps.

Default: 2,000 runs of a 5-step chain of `task` steps (queue "bench") served by one worker
process (`conveyor worker bench_worker:worker`, 32 slots), triggered by 64 concurrent clients.
Reports task steps completed per second = runs x steps / (first trigger -> last run's
finished_at); target >= 800 (aim 2,000). Dispatch latency is ready -> handler start: a step is
ready when the step before it finished (the first, when its run started: the trigger commits
the run running with its first step queued); the handler records when it started in its output.
Target p50 < 10 ms, p99 < 50 ms. The echo yardstick (a bare grpc.aio service) is measured first
in the same run, so the figures can be read against this machine's speed right now.

Then a one-task-step workflow: runs completed per second, as a ratio to Temporal's dev server
on this machine (10-24 one-activity workflows/s, measured 2026-11-23), and, side by side with
these, the noop-chain throughput (bench/throughput.py's figure) in the same server.

--http: 1,000 runs of one `http` step against a local HTTP server (its own process); target
>= 500 steps/s.

Run: .venv/bin/python bench/workers.py [--runs 2000] [--steps 5] [--slots 32] [--http]
Exits 0 whether or not the targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from google.protobuf import json_format

from conveyor.v1 import resources_pb2, step_runs_service_pb2, workflow_runs_service_pb2
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

TASKS, TASKS_AIM = 800, 2000
P50_MS, P99_MS = 10.0, 50.0
HTTP_TARGET = 500
NOOP_TARGET = 1000
# Temporal's dev server on this machine, one-activity workflows completed per second
# (measured 2026-11-23, 10-24/s over several runs): the yardstick of the one-task-step rate.
TEMPORAL_LOW, TEMPORAL_HIGH = 10.0, 24.0
FINISH_TIMEOUT = 600.0
# The latency phase: runs at a pace one worker keeps up with (5 task steps each).
LATENCY_RUNS, LATENCY_RATE = 200, 40
ECHO_SECONDS = 3.0


def task_chain(n: int) -> list[dict[str, Any]]:
    return [
        {"ref": f"t{i}", "kind": "task", "queue": "bench", **({"depends_on": [f"t{i - 1}"]} if i else {})}
        for i in range(n)
    ]


async def settle(target: str, workflow: str) -> list[resources_pb2.WorkflowRun]:
    """Wait until every run of `workflow` ended; its completed runs."""
    await common.wait_until_settled(target, workflow, FINISH_TIMEOUT)
    async with common.open_channel(target) as channel:
        stub = runs_grpc.WorkflowRunsServiceStub(channel)
        completed = await common.list_runs(stub, workflow, [resources_pb2.RunStatus.completed])
        failed = await common.list_runs(
            stub,
            workflow,
            [
                resources_pb2.RunStatus.failed,
                resources_pb2.RunStatus.timed_out,
                resources_pb2.RunStatus.canceled,
            ],
        )
    if failed:
        print(f"  {len(failed)} runs did NOT complete, e.g. {failed[0].error!r}")
    return completed


def last_finish(runs: list[resources_pb2.WorkflowRun]) -> float:
    return max(r.finished_at.ToNanoseconds() / 1e9 for r in runs)


async def dispatch_latencies(target: str, runs: list[resources_pb2.WorkflowRun]) -> list[float]:
    """ready -> handler start of every task step, in seconds, sorted."""
    out: list[float] = []
    async with common.open_channel(target) as channel:
        stub = steps_grpc.StepRunsServiceStub(channel)

        async def one(run: resources_pb2.WorkflowRun) -> None:
            call = stub.ListStepRuns(step_runs_service_pb2.ListStepRunsRequest(workflow_run_id=run.id))
            steps = {s.step_ref: s async for s in call}
            ready = run.started_at.ToNanoseconds() / 1e9
            for i in range(len(steps)):
                s = steps[f"t{i}"]
                started = json_format.MessageToDict(s.output)["started"]
                out.append(started - ready)
                ready = s.finished_at.ToNanoseconds() / 1e9

        sem = asyncio.Semaphore(16)

        async def bounded(run: resources_pb2.WorkflowRun) -> None:
            async with sem:
                await one(run)

        await asyncio.gather(*(bounded(r) for r in runs))
    return sorted(out)


async def trigger_paced(target: str, workflow: str, runs: int, rate: float) -> set[str]:
    """Trigger `runs` runs at a steady `rate` per second (open loop); their ids."""
    ids: set[str] = set()
    async with common.open_channel(target) as channel:
        stub = runs_grpc.WorkflowRunsServiceStub(channel)
        start = time.perf_counter()
        for n in range(runs):
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            run = await stub.TriggerWorkflowRun(
                workflow_runs_service_pb2.TriggerWorkflowRunRequest(workflow_id=workflow), timeout=30)
            ids.add(run.id)
    return ids


async def start_worker(target: str, slots: int, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor.cli",
        "worker",
        "bench_worker:worker",
        "--target",
        target,
        "--slots",
        str(slots),
        cwd=common.BENCH_DIR,
        stdout=log.open("ab"),
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def measure_echo(data_dir: Path, concurrency: int) -> float:
    async with common.spawn_echo_server(data_dir) as echo_server:
        echo = await common.run_load(
            "echo", echo_server.grpc_target, "", seconds=ECHO_SECONDS, concurrency=concurrency, procs=1
        )
    print(echo.line("echo (bare grpc.aio health Check)", "calls", "yardstick"))
    return echo.rate


async def bench_tasks(args: argparse.Namespace, data_dir: Path) -> None:
    echo = await measure_echo(data_dir, args.concurrency)
    async with common.spawn_server(data_dir, envoy=False) as served:
        target = served.grpc_target
        worker = await start_worker(target, args.slots, data_dir / "worker.log")
        try:
            await common.create_workflow(target, "bench-tasks", task_chain(args.steps))
            await common.create_workflow(target, "bench-one-task", task_chain(1))
            await common.create_workflow(target, "bench-noop", common.chain(10))
            await common.create_workflow(target, "bench-latency", task_chain(args.steps))
            await asyncio.sleep(1.0)  # the worker connects and opens its stream

            cpu0 = common.cpu_seconds(served.pid), common.cpu_seconds(worker.pid)
            first, triggered = await common.trigger_all(target, "bench-tasks", args.runs, args.concurrency)
            triggered.print_errors("trigger")
            completed = await settle(target, "bench-tasks")
            elapsed = last_finish(completed) - first
            server_cpu = (common.cpu_seconds(served.pid) - cpu0[0]) / elapsed
            worker_cpu = (common.cpu_seconds(worker.pid) - cpu0[1]) / elapsed
            steps = len(completed) * args.steps
            print(
                f"task steps: {steps / elapsed:.0f} steps/s (target >= {TASKS}, aim {TASKS_AIM}) = "
                f"{len(completed)} of {args.runs} runs x {args.steps} task steps in {elapsed:.2f} s, "
                f"one worker process, {args.slots} slots"
            )
            print(f"  CPU: server {server_cpu:.2f} cores, worker {worker_cpu:.2f} cores "
                  f"(of {os.cpu_count()})")
            lat = await dispatch_latencies(target, completed)
            print(f"  ready -> handler start under that load (steps wait for a free slot): "
                  f"p50 {common.percentile(lat, 50) * 1000:.0f} ms, "
                  f"p99 {common.percentile(lat, 99) * 1000:.0f} ms")

            # Dispatch latency proper: runs arrive at a steady pace the worker keeps up with, so
            # a ready step finds a free slot and the figure is the engine's ready -> start path.
            paced = await trigger_paced(target, "bench-latency", LATENCY_RUNS, LATENCY_RATE)
            done = await settle(target, "bench-latency")
            lat = await dispatch_latencies(target, [r for r in done if r.id in paced])
            p50, p99 = common.percentile(lat, 50) * 1000, common.percentile(lat, 99) * 1000
            print(
                f"dispatch latency ready -> handler start ({LATENCY_RATE} runs/s): p50 {p50:.1f} ms "
                f"(target < {P50_MS:g}), p99 {p99:.1f} ms (target < {P99_MS:g}) over {len(lat)} steps; "
                f"echo {echo:.0f} calls/s in this run"
            )

            one = args.runs // 2
            first, _ = await common.trigger_all(target, "bench-one-task", one, args.concurrency)
            done = await settle(target, "bench-one-task")
            rate = len(done) / (last_finish(done) - first)
            print(
                f"one-task-step runs: {rate:.0f} runs/s = "
                f"{rate / TEMPORAL_HIGH:.0f}x-{rate / TEMPORAL_LOW:.0f}x "
                f"Temporal's dev server ({TEMPORAL_LOW:g}-{TEMPORAL_HIGH:g} one-activity workflows/s "
                f"on this machine, measured 2026-11-23)"
            )

            first, _ = await common.trigger_all(target, "bench-noop", 1000, args.concurrency)
            done = await settle(target, "bench-noop")
            noop = len(done) * 10 / (last_finish(done) - first)
            print(
                f"side by side, same server: 10-step noop chain {noop:.0f} steps/s "
                f"(bench/throughput.py's figure; target >= {NOOP_TARGET})"
            )
        finally:
            await stop(worker)
            common.print_server_problems(served.log_path)


HTTP_RESPONSE = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


def serve_http() -> None:
    """A minimal HTTP/1.1 keep-alive server answering every request 200 {"ok": true}; prints
    its port. Its own process, so it takes no CPU from the benchmark's client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(HTTP_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


async def bench_http(args: argparse.Namespace, data_dir: Path) -> None:
    http = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-http",
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        assert http.stdout is not None
        port = int(await http.stdout.readline())
        # Loopback is denied to http steps unless allowed: the server gets this target only.
        os.environ["CONVEYOR_HTTP_ALLOW"] = f"127.0.0.1:{port}"
        async with common.spawn_server(data_dir, envoy=False) as served:
            target = served.grpc_target
            url = f"http://127.0.0.1:{port}/hook"
            await common.create_workflow(
                target,
                "bench-http",
                [
                    {
                        "ref": "call",
                        "kind": "http",
                        "config": {"method": "POST", "url": url, "body": {"n": "{{ payload.n }}"}},
                    }
                ],
            )
            runs = args.runs or 1000
            first, triggered = await common.trigger_all(target, "bench-http", runs, args.concurrency)
            triggered.print_errors("trigger")
            completed = await settle(target, "bench-http")
            elapsed = last_finish(completed) - first
            print(
                f"http steps: {len(completed) / elapsed:.0f} steps/s (target >= {HTTP_TARGET}) = "
                f"{len(completed)} of {runs} runs of one http step in {elapsed:.2f} s"
            )
            common.print_server_problems(served.log_path)
    finally:
        await stop(http)


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        if args.http:
            await bench_http(args, Path(tmp))
        else:
            args.runs = args.runs or 2000
            print(
                f"{args.runs} runs of a {args.steps}-step task chain, one SDK worker process "
                f"({args.slots} slots), {args.concurrency} triggering clients, SQLite"
            )
            await bench_tasks(args, Path(tmp))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=0, help="runs to trigger (default 2000; 1000 with --http)"
    )
    parser.add_argument("--steps", type=int, default=5, help="task steps per run (default 5)")
    parser.add_argument("--slots", type=int, default=32, help="worker slots (default 32)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent triggering clients")
    parser.add_argument("--http", action="store_true", help="http steps against a local server instead")
    parser.add_argument("--serve-http", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_http:
        serve_http()
        return 0
    return common.run_bench(bench(args))


if __name__ == "__main__":
    sys.exit(main())
