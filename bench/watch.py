"""Run watches at scale (issue 8's targets), against one `conveyor serve --no-envoy` on SQLite.

1. Idle: 1,000 runs each waiting on an `approval` step, one WatchWorkflowRun on each, opened from
   this process over a few channels. Server CPU over a 10 s window (from /proc/<pid>/stat; the
   window is placed to include the watches' first 15 s heartbeat wave, the worst 10 s of a
   15 s cycle) next to < 0.02 cores, and the server's RSS growth from opening them next to
   < 50 MB. The same window with no watch open is printed as the engine's own idle cost.
2. The trigger rate (bench/trigger.py's closed loop: 5-step noop chain, 64 clients, 5 s) with
   the 1,000 idle watches open, against the mean of a phase before they were opened and one after
   they were closed, in the same run: ratio next to >= 0.9.
3. Busy: one run waiting on an approval, watched by 100 and then by 1,000 watchers (in
   --watch-procs client processes, grpc.aio, the streams spread over a few channels) while this
   process adds comments (AddRunComment) at a fixed pace; each comment is one committed event.
   The comments leave at their pace whether or not earlier ones were answered (open loop).
   Commit -> delivery is the time from the event's `at` (stamped by the server just before the
   commit) to a watcher receiving it, on the machine's wall clock (the same in every process).
   p99 next to < 15 ms (100 watchers) and < 100 ms (1,000), and events delivered per second in
   total next to >= 15,000
   (the pace at 1,000 watchers offers 20 comments/s = 20,000 deliveries/s). The watcher
   processes' CPU is printed: near 1.0 core per process means the client was the bottleneck.

The API key rate limit is disabled for this server (CONVEYOR_RATE_LIMIT=0): 1,000 watches open in
a burst, and the limit is not what is measured.

Run: .venv/bin/python bench/watch.py [--watches 1000] [--seconds 5] [--watch-procs 1]
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import common
import grpc

from conveyor.v1 import resources_pb2, workflow_runs_service_pb2
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

GATED = "bench-gated"
TRIGGER_WF = "bench-trigger"
IDLE_CPU_TARGET, IDLE_RSS_TARGET_MB = 0.02, 50.0
P99_100_MS, P99_1000_MS, RATE_TARGET = 15.0, 100.0, 15_000
TRIGGER_FACTOR = 0.9
CPU_WINDOW = 10.0
# The watches send a heartbeat after 15 s of quiet; the idle CPU window ends after it.
HEARTBEAT_SECONDS = 15.0
CHANNELS = 8
OPEN_CONCURRENCY = 64
DRAIN_TIMEOUT = 600.0
# Comments per second while the busy run is watched by 100 / by 1,000 watchers.
PACE_100, PACE_1000 = 50.0, 20.0
# Time the watcher processes get to start and open their watches before the first comment.
OPEN_SECONDS_PER_1000 = 12.0
# Time after the last comment for deliveries to arrive.
GRACE = 5.0
CLIENT_BOUND = 0.9


def _req(run_id: str) -> workflow_runs_service_pb2.WatchWorkflowRunRequest:
    return workflow_runs_service_pb2.WatchWorkflowRunRequest(workflow_run_id=run_id)


# --- idle watches (this process) ---------------------------------------------------------------


@dataclass
class IdleWatches:
    opened: int = 0
    events: int = 0
    heartbeats: int = 0
    ended: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def idle_watches(target: str, run_ids: list[str]):
    """One watch per run id, held open (read to the end) until the block exits."""
    state = IdleWatches()
    channels = [common.open_channel(target) for _ in range(CHANNELS)]
    stubs = [runs_grpc.WorkflowRunsServiceStub(c) for c in channels]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    all_open = asyncio.Event()

    async def one(i: int, run_id: str) -> None:
        await gate.acquire()
        released = False
        try:
            async for msg in stubs[i % CHANNELS].WatchWorkflowRun(_req(run_id)):
                kind = msg.WhichOneof("message")
                if kind == "snapshot":
                    state.opened += 1
                    gate.release()
                    released = True
                    if state.opened == len(run_ids):
                        all_open.set()
                elif kind == "event":
                    state.events += 1
                elif kind == "heartbeat":
                    state.heartbeats += 1
                elif kind == "error":
                    state.errors.append(f"StreamError {msg.error.reason}: {msg.error.message}")
            state.ended += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                state.errors.append(f"{e.code().name}: {e.details()}")
        finally:
            if not released:
                gate.release()
            if state.opened + len(state.errors) >= len(run_ids):
                all_open.set()

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(run_ids)]
    try:
        async with asyncio.timeout(120):
            await all_open.wait()
        yield state
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()


# --- busy run watchers (separate processes) ----------------------------------------------------


@dataclass
class BusyResult:
    opened_in_time: int = 0
    opened: int = 0
    ended: int = 0
    errors: list[str] = field(default_factory=list)
    received: list[tuple[int, float, float]] = field(default_factory=list)  # (seq, time.time(), latency)
    client_cpu: float = 0.0


def _busy_process(target: str, run_id: str, count: int, ready_at: float, stop_at: float) -> BusyResult:
    return asyncio.run(_busy(target, run_id, count, ready_at, stop_at))


async def _busy(target: str, run_id: str, count: int, ready_at: float, stop_at: float) -> BusyResult:
    result = BusyResult()
    channels = [common.open_channel(target) for _ in range(CHANNELS)]
    stubs = [runs_grpc.WorkflowRunsServiceStub(c) for c in channels]
    received = result.received
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(i: int) -> None:
        await gate.acquire()
        released = False
        try:
            async for msg in stubs[i % CHANNELS].WatchWorkflowRun(_req(run_id)):
                kind = msg.WhichOneof("message")
                if kind == "event":
                    now = time.time()
                    at = msg.event.at.seconds + msg.event.at.nanos / 1e9
                    received.append((msg.event.seq, now, now - at))
                elif kind == "snapshot":
                    result.opened += 1
                    result.opened_in_time += time.monotonic() < ready_at
                    gate.release()
                    released = True
                elif kind == "error":
                    result.errors.append(f"StreamError {msg.error.reason}: {msg.error.message}")
            result.ended += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                result.errors.append(f"{e.code().name}: {e.details()}")
        finally:
            if not released:
                gate.release()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await asyncio.sleep(max(0.0, ready_at - time.monotonic()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    result.client_cpu = (time.process_time() - before) / max(stop_at - ready_at, 1e-9)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    return result


async def busy_phase(served: common.Served, run_id: str, watchers: int, pace: float, seconds: float,
                     procs: int, p99_target: float, rate_target: float | None) -> None:
    open_seconds = 3.0 + OPEN_SECONDS_PER_1000 * watchers / 1000
    ready_at = time.monotonic() + open_seconds
    comments = int(pace * seconds)
    stop_at = ready_at + seconds + GRACE
    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}
    errors: list[str] = []

    async def commenter() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, ready_at - time.monotonic()))
        cpu0 = common.cpu_seconds(served.pid)
        t0 = time.monotonic()
        async with common.open_channel(served.grpc_target) as channel:
            stub = runs_grpc.WorkflowRunsServiceStub(channel)

            async def comment(i: int) -> None:
                try:
                    reply = await stub.AddRunComment(workflow_runs_service_pb2.AddRunCommentRequest(
                        workflow_run_id=run_id, content=f"comment {i}"), timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    return
                sent[reply.seq] = time.time()

            # Open loop: each comment leaves at its time, whether or not the previous one was
            # answered (a slow answer does not lower the offered load).
            calls = []
            for i in range(comments):
                await asyncio.sleep(max(0.0, t0 + i / pace - time.monotonic()))
                calls.append(asyncio.create_task(comment(i)))
            await asyncio.gather(*calls)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        return elapsed, (common.cpu_seconds(served.pid) - cpu0) / (stop_at - (t0))

    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        parts, (elapsed, server_cpu) = await asyncio.gather(
            asyncio.gather(*(loop.run_in_executor(pool, _busy_process, served.grpc_target, run_id, n,
                                                  ready_at, stop_at)
                             for n in common.split(watchers, procs) if n)),
            commenter())
    merged = BusyResult()
    cpus = []
    for part in parts:
        merged.opened += part.opened
        merged.opened_in_time += part.opened_in_time
        merged.ended += part.ended
        merged.errors.extend(part.errors)
        merged.received.extend(part.received)
        cpus.append(part.client_cpu)
    # Commit -> delivery: from the event's `at` (stamped by the server just before its commit) to
    # its arrival at the watcher, both on this machine's wall clock.
    first = min((t - lat for seq, t, lat in merged.received if seq in sent), default=0.0)
    latencies = sorted(lat for seq, _t, lat in merged.received if seq in sent)
    delivered = len(latencies)
    expected = watchers * len(sent)
    last = max((t for seq, t, _lat in merged.received if seq in sent), default=first)
    rate = delivered / (last - first) if last > first else float("nan")
    p50, p99 = common.percentile(latencies, 50) * 1000, common.percentile(latencies, 99) * 1000
    print(f"{watchers} watchers of one busy run, {len(sent)} comments in {elapsed:.1f} s "
          f"({len(sent) / elapsed:.0f}/s, pace {pace:g}/s; offered {watchers * pace:,.0f} deliveries/s):")
    print(f"  commit -> delivery p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 < {p99_target:g} ms); "
          f"max {latencies[-1] * 1000 if latencies else float('nan'):.1f} ms")
    rate_text = f"(target >= {rate_target:,.0f}/s)" if rate_target else "(no target at this size)"
    print(f"  delivered {delivered:,} of {expected:,} events, {rate:,.0f} events/s in total {rate_text}")
    if delivered < expected:
        print(f"  {expected - delivered:,} events were not delivered {GRACE:g} s after the last comment: "
              "the latencies above are of those delivered, the true p99 is higher")
    busy = [c for c in cpus if c >= CLIENT_BOUND]
    print(f"  CPU (cores of {os.cpu_count()}): server {server_cpu:.2f}, watcher process(es) "
          + ", ".join(f"{c:.2f}" for c in cpus)
          + (" -- the CLIENT was the bottleneck (a watcher process near a full core)" if busy else ""))
    if merged.opened_in_time < watchers:
        print(f"  only {merged.opened_in_time} of {watchers} watches were open when the comments began "
              f"({merged.opened} in all)")
    if merged.ended or merged.errors or errors:
        print(f"  {merged.ended} streams ended early; errors: {len(merged.errors)} watch, "
              f"{len(errors)} comment, e.g. {(merged.errors + errors)[:3]}")


# --- the benchmark ------------------------------------------------------------------------------


async def wait_none_pending(target: str, workflow: str, within: float = 120.0) -> None:
    async with common.open_channel(target) as channel:
        stub = runs_grpc.WorkflowRunsServiceStub(channel)
        async with asyncio.timeout(within):
            # Polling, not an event: the runs start in another process.
            while await common.list_runs(stub, workflow, [resources_pb2.RunStatus.pending],  # noqa: ASYNC110
                                         limit=1, max_pages=1):
                await asyncio.sleep(0.1)


async def trigger_phase(served: common.Served, label: str, seconds: float) -> common.LoadResult:
    result = await common.run_load("grpc-trigger", served.grpc_target, TRIGGER_WF, seconds=seconds,
                                   concurrency=64, procs=1, watch={"server": served.pid})
    print(result.line(f"trigger, {label}", "runs", "64 clients"))
    print(result.cpu_line())
    result.print_errors(label)
    await common.wait_until_settled(served.grpc_target, TRIGGER_WF, DRAIN_TIMEOUT)
    return result


async def server_cpu(pid: int, seconds: float) -> float:
    before = common.cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (common.cpu_seconds(pid) - before) / seconds


async def idle_phases(served: common.Served, idle_runs: list[str], args: argparse.Namespace) -> None:
    """Phases 1 and 2: idle watches' cost, and the trigger rate with them open."""
    target = served.grpc_target
    none_before = await trigger_phase(served, "no watches (before)", args.seconds)
    await asyncio.sleep(1.0)
    rss0 = common.rss_mb(served.pid)
    cpu0 = await server_cpu(served.pid, CPU_WINDOW)
    print(f"server idle, no watch open: CPU {cpu0:.3f} cores over {CPU_WINDOW:g} s, "
          f"RSS {rss0:.1f} MB")

    opened_at = time.monotonic()
    async with idle_watches(target, idle_runs) as idle:
        open_took = time.monotonic() - opened_at
        # Window [start, start + 10 s) ends 1 s after the first heartbeat wave.
        await asyncio.sleep(max(1.0, opened_at + HEARTBEAT_SECONDS + 1.0 - CPU_WINDOW
                                - time.monotonic()))
        rss1 = common.rss_mb(served.pid)
        hb0 = idle.heartbeats
        cpu1 = await server_cpu(served.pid, CPU_WINDOW)
        print(f"{idle.opened} idle watches open (opened in {open_took:.1f} s):")
        print(f"  server CPU {cpu1:.3f} cores over {CPU_WINDOW:g} s, {idle.heartbeats - hb0} "
              f"heartbeats in the window (target < {IDLE_CPU_TARGET} cores)")
        print(f"  server RSS {rss1:.1f} MB, growth {rss1 - rss0:+.1f} MB "
              f"(target < {IDLE_RSS_TARGET_MB:g} MB)")
        with_watches = await trigger_phase(served, f"{idle.opened} idle watches open",
                                           args.seconds)
        if idle.ended or idle.errors or idle.events:
            print(f"  idle watches: {idle.events} events, {idle.ended} ended, "
                  f"{len(idle.errors)} errors {idle.errors[:3]}")
    none_after = await trigger_phase(served, "no watches (after)", args.seconds)
    none_rate = (none_before.rate + none_after.rate) / 2
    print(f"trigger rate with {args.watches} idle watches / without: "
          f"{common.ratio(with_watches.rate, none_rate):.2f} ({with_watches.rate:.0f} vs mean "
          f"{none_rate:.0f} of {none_before.rate:.0f} before and {none_after.rate:.0f} after) "
          f"(target >= {TRIGGER_FACTOR})")


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    os.environ["CONVEYOR_RATE_LIMIT"] = "0"
    print(f"watches against one `conveyor serve --no-envoy` (SQLite); {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        data_dir = Path(tmp)
        try:
            async with common.spawn_server(data_dir, envoy=False) as served:
                target = served.grpc_target
                await common.create_workflow(target, GATED, [{"ref": "review", "kind": "approval"}])
                await common.create_workflow(target, TRIGGER_WF, common.chain(5))
                await common.trigger_all(target, GATED, args.watches + 1, 32)
                await wait_none_pending(target, GATED)
                async with common.open_channel(target) as channel:
                    stub = runs_grpc.WorkflowRunsServiceStub(channel)
                    gated = await common.list_runs(stub, GATED, common.UNFINISHED)
                busy_run, idle_runs = gated[0].id, [r.id for r in gated[1:args.watches + 1]]
                print(f"{len(gated)} runs waiting on an approval step")

                if not args.busy_only:
                    await idle_phases(served, idle_runs, args)
                await busy_phase(served, busy_run, 100, PACE_100, args.seconds, args.watch_procs,
                                 P99_100_MS, None)
                await busy_phase(served, busy_run, args.watches, PACE_1000, args.seconds,
                                 args.watch_procs, P99_1000_MS, RATE_TARGET)
        finally:
            common.print_server_problems(data_dir / "server.log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watches", type=int, default=1000,
                        help="idle watches and busy watchers (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="trigger phases and comment phases (default 5)")
    parser.add_argument("--watch-procs", type=int, default=1, help="busy-run watcher processes (default 1)")
    parser.add_argument("--busy-only", action="store_true", help="only the busy-run phases (to profile them)")
    args = parser.parse_args()
    return common.run_bench(bench(args))


if __name__ == "__main__":
    sys.exit(main())
