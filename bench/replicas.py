"""Replicas on one PostgreSQL database: the trigger rate of one `conveyor serve` and of two
(clients split evenly over both), and cross-replica delivery latency.

Phases, on a fresh PostgreSQL database (created on 127.0.0.1:5432, dropped afterwards):

1. One replica (A): 64 closed-loop gRPC clients trigger runs of a 5-step noop workflow (as
   bench/trigger.py) for a fixed window.
2. Replica B is started on the same database; once A's backlog is finished, 32 clients on A and
   32 on B trigger in the same window (common.run_load twice, side by side). The rate is the sum;
   target: >= 1.5 x phase 1 (ISSUE 8: same run, same machine).
3. Cross-replica delivery: a watcher on B (WatchWorkflowRun of a run that stays running), one
   AddRunComment after the other on A; each latency is from A's answer (the comment committed)
   to the `run.comment` event on B's watch. Measured with the replicas idle and again while 32
   clients trigger on each replica. Target: p99 < 100 ms. The event reaches B through
   PostgreSQL NOTIFY (sent in the committing transaction) and B's LISTEN connection.

The machine's cores are shared by the replicas, PostgreSQL and the clients: on a 2-core machine
two replicas cannot double one replica's rate, whatever the engine does. Each trigger phase
prints who was busy: the replicas and the clients, and the whole machine (/proc/stat), whose
remainder is PostgreSQL and every other process; a remainder well above PostgreSQL's share means
something else was competing and the ratio says little.

Run: .venv/bin/python bench/replicas.py [--seconds 10] [--concurrency 64] [--comments 300]
Exits 0 whether or not targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import common

from conveyor.storage.migrate import migrate
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"
WORKFLOW = "bench-replicas"
HOLD = "bench-replicas-hold"
SCALE_TARGET = 1.5
DELIVERY_P99_TARGET_MS = 100.0
# Between two comments: the latency of one comment, not the queue behind the one before.
COMMENT_GAP = 0.01
DRAIN_TIMEOUT = 600.0
SETTLE_SECONDS = 1.0
STARTUP_SECONDS = 6.0


async def delivery(a: str, b: str, run_id: str, comments: int,
                   until: float = float("inf")) -> tuple[list[float], list[float]]:
    """Latencies (s) of `comments` comments (fewer if time.time() passes `until`) added on A as
    seen by a watch of the run on B: from A's answer, and from the moment the call was sent."""
    async with common.open_channel(a) as ch_a, common.open_channel(b) as ch_b:
        on_a = runs_grpc.WorkflowRunsServiceStub(ch_a)
        on_b = runs_grpc.WorkflowRunsServiceStub(ch_b)
        call = on_b.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run_id))
        arrived: dict[str, float] = {}
        waiting: dict[str, asyncio.Event] = {}
        subscribed = asyncio.Event()

        async def read() -> None:
            async for message in call:
                kind = message.WhichOneof("message")
                if kind == "snapshot":
                    subscribed.set()
                elif kind == "event" and message.event.type == "run.comment":
                    arrived[message.event.message] = time.perf_counter()
                    if (event := waiting.get(message.event.message)) is not None:
                        event.set()

        reader = asyncio.create_task(read())
        try:
            async with asyncio.timeout(10):
                await subscribed.wait()
            from_ack: list[float] = []
            from_send: list[float] = []
            prefix = uuid.uuid4().hex[:8]
            for i in range(comments):
                if time.time() > until:
                    break
                text = f"{prefix}-{i}"
                waiting[text] = asyncio.Event()
                sent = time.perf_counter()
                await on_a.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run_id, content=text),
                                         timeout=10)
                acked = time.perf_counter()
                async with asyncio.timeout(35):  # past the 30 s safety poll: a lost event shows
                    await waiting[text].wait()
                # The event may beat the answer back to this process: that is 0, not negative.
                from_ack.append(max(0.0, arrived[text] - acked))
                from_send.append(arrived[text] - sent)
                await asyncio.sleep(COMMENT_GAP)
            return from_ack, from_send
        finally:
            reader.cancel()
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def machine_busy(seconds: float) -> float:
    """Cores of the whole machine busy during the load's window (it opens STARTUP_SECONDS after
    the load starts): the replicas, PostgreSQL, the clients and anything else running."""
    await asyncio.sleep(STARTUP_SECONDS)
    busy0, total0 = _cpu_ticks()
    await asyncio.sleep(seconds)
    busy1, total1 = _cpu_ticks()
    return (os.cpu_count() or 1) * common.ratio(busy1 - busy0, total1 - total0)


def busy_line(cores: float, result: common.LoadResult) -> str:
    ours = sum(result.cpu.values()) + result.client_cpu
    return (f"  machine: {cores:.2f} cores of {os.cpu_count()} busy; the replicas and clients {ours:.2f}, "
            f"PostgreSQL and every other process {cores - ours:.2f}")


def latency_line(label: str, from_ack: list[float], from_send: list[float]) -> str:
    ack, send = sorted(from_ack), sorted(from_send)
    return (f"{label}: {len(ack)} comments, commit-ack -> event on B "
            f"p50 {1000 * common.percentile(ack, 50):.1f} ms "
            f"p99 {1000 * common.percentile(ack, 99):.1f} ms max {1000 * ack[-1]:.1f} ms "
            f"(target p99 < {DELIVERY_P99_TARGET_MS:.0f} ms); call sent -> event p50 "
            f"{1000 * common.percentile(send, 50):.1f} ms p99 {1000 * common.percentile(send, 99):.1f} ms")


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    # Two pools of client processes start side by side (one per replica): give them the time to
    # spawn, import and connect before the window opens, or one starts late and the window it
    # measured is shorter than the one its rate is divided by.
    common.LOAD_STARTUP = STARTUP_SECONDS
    half = args.concurrency // 2
    print(f"{args.concurrency} concurrent gRPC clients, {args.seconds:g} s per phase, 5-step noop workflow, "
          f"PostgreSQL, {os.cpu_count()} cores")
    name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = PG_URL_PREFIX + name
    try:
        await migrate(url)
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-replicas-") as tmp:
            dir_a, dir_b = Path(tmp) / "a", Path(tmp) / "b"
            dir_a.mkdir()
            dir_b.mkdir()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    a = await stack.enter_async_context(common.spawn_server_on(url, dir_a))
                    await asyncio.sleep(SETTLE_SECONDS)
                    await common.create_workflow(a.grpc_target, WORKFLOW, common.chain(5))
                    hold_step = {"ref": "wait", "kind": "delay", "config": {"seconds": 3600}}
                    await common.create_workflow(a.grpc_target, HOLD, [hold_step])

                    one, busy_one = await asyncio.gather(
                        common.run_load("grpc-trigger", a.grpc_target, WORKFLOW, args.seconds,
                                        args.concurrency, 1, watch={"A": a.pid}),
                        machine_busy(args.seconds))
                    print(one.line("1 replica", "runs", "baseline"))
                    print(one.cpu_line())
                    print(busy_line(busy_one, one))
                    one.print_errors("1 replica")
                    drained = await common.wait_until_settled(a.grpc_target, WORKFLOW, DRAIN_TIMEOUT)
                    print(f"  A finished the phase's runs {drained:.1f} s after its window")

                    b = await stack.enter_async_context(common.spawn_server_on(url, dir_b))
                    await asyncio.sleep(SETTLE_SECONDS)
                    watch = {"A": a.pid, "B": b.pid}
                    on_a, on_b, busy_two = await asyncio.gather(
                        common.run_load("grpc-trigger", a.grpc_target, WORKFLOW, args.seconds, half, 1,
                                        watch=watch),
                        common.run_load("grpc-trigger", b.grpc_target, WORKFLOW, args.seconds,
                                        args.concurrency - half, 1),
                        machine_busy(args.seconds))
                    two = common.LoadResult(args.seconds, cpu=on_a.cpu)
                    two.merge(on_a)
                    two.merge(on_b)
                    print(two.line(f"2 replicas ({on_a.rate:.0f} on A + {on_b.rate:.0f} on B)", "runs",
                                   f"target >= {SCALE_TARGET} x 1 replica = {SCALE_TARGET * one.rate:.0f}"))
                    print(two.cpu_line())
                    print(busy_line(busy_two, two))
                    two.print_errors("2 replicas")
                    drained = await common.wait_until_settled(a.grpc_target, WORKFLOW, DRAIN_TIMEOUT)
                    print(f"  A and B finished the phase's runs {drained:.1f} s after its window")

                    async with common.open_channel(a.grpc_target) as channel:
                        hold = await runs_grpc.WorkflowRunsServiceStub(channel).TriggerWorkflowRun(
                            runs_pb.TriggerWorkflowRunRequest(workflow_id=HOLD), timeout=10)
                    idle = await delivery(a.grpc_target, b.grpc_target, hold.id, args.comments)
                    print(latency_line("cross-replica delivery, idle", *idle))

                    # The same under load: both replicas triggering while the comments go on.
                    load = asyncio.gather(
                        common.run_load("grpc-trigger", a.grpc_target, WORKFLOW, args.seconds, half, 1),
                        common.run_load("grpc-trigger", b.grpc_target, WORKFLOW, args.seconds,
                                        args.concurrency - half, 1))
                    await asyncio.sleep(common.LOAD_STARTUP)  # the load's window opens about now
                    busy = await delivery(a.grpc_target, b.grpc_target, hold.id, 100_000,
                                          until=time.time() + args.seconds)
                    loaded_a, loaded_b = await load
                    print(latency_line(f"cross-replica delivery, {loaded_a.rate + loaded_b.rate:.0f} "
                                       f"triggers/s on A + B", *busy))
                    await common.wait_until_settled(a.grpc_target, WORKFLOW, DRAIN_TIMEOUT)
            finally:
                for label, path in (("A", dir_a), ("B", dir_b)):
                    print(f"replica {label} ", end="")
                    common.print_server_problems(path / "server.log")
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    scale = common.ratio(two.rate, one.rate)
    print(f"2 replicas / 1 replica: {scale:.2f} ({two.rate:.0f} / {one.rate:.0f} runs/s) "
          f"(target >= {SCALE_TARGET})")
    p99 = 1000 * common.percentile(sorted(idle[0] + busy[0]), 99)
    print(f"cross-replica delivery p99 (idle and loaded together): {p99:.1f} ms "
          f"(target < {DELIVERY_P99_TARGET_MS:.0f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--comments", type=int, default=300, help="comments timed with idle replicas")
    args = parser.parse_args()
    return common.run_bench(bench(args))


if __name__ == "__main__":
    sys.exit(main())
