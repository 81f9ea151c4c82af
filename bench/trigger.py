"""Trigger throughput: runs of a 5-step noop workflow (a -> b -> c -> d -> e) triggered per second
by 64 concurrent closed-loop clients, over gRPC and over REST through Envoy, for a fixed time
each, with p50/p99 latency and the error count. Targets (2-core machine, SQLite): gRPC >= 600
runs/s with no errors (aim 2,000) and >= 0.3 x the echo yardstick; with a fresh Idempotency-Key
on every trigger >= 0.9 x the keyless rate; REST >= 0.7 x the gRPC figure; server idle RSS
< 100 MB; authentication (every call carries an API key) costs <= 5 % of the gRPC rate, measured
against a fresh server started with CONVEYOR_AUTH=disabled. Then one lone client: p50/p99 and
the server's CPU per trigger (aim p50 <= 4 ms, <= 2 ms of CPU).

Also measured, as a yardstick for this machine: the same clients against a bare grpc.aio server
answering grpc.health.v1 Check in a subprocess (bench/echo_server.py); trigger/echo is the
share of a trivial grpc.aio service's rate the trigger path keeps. The echo runs first, alone,
so nothing else competes with it.

Client processes: one by default (--client-procs). On a 2-core machine every client process
competes with the server for the same two cores, so more client processes do not make the server
faster, they take CPU from it. The CPU lines printed for each phase show where the limit is: the
Python server runs its event loop on one core and sits at ~1.0 core in every phase, while the
gRPC trigger client needs well under 0.1 core (about 0.1 ms of CPU per call, so ~0.8 core at the
echo's ~7,000 calls/s). Trials with two client processes were no faster, beyond run-to-run
noise, on either echo or trigger.
REST clients are httpx.AsyncClient over HTTP/1.1, 64 connections in all, split over 8 pools
(common.REST_POOLS explains why one pool of 64 would measure httpcore instead of the server).

Runs triggered in the gRPC phase keep the engine busy after the window closes; the REST phase
waits until they have all finished so it starts on an idle server like the gRPC phase did.

Run: .venv/bin/python bench/trigger.py [--seconds 10] [--concurrency 64] [--client-procs 1]
Exits 0 whether or not targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import common

from conveyor.v1 import resources_pb2
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

WORKFLOW = "bench-trigger"
GRPC_TARGET, GRPC_AIM = 600, 2000
REST_FACTOR = 0.7
ECHO_FACTOR = 0.3
KEYED_FACTOR = 0.9
LONE_P50_AIM_MS, LONE_CPU_AIM_MS = 4.0, 2.0
RSS_TARGET_MB = 100
AUTH_OVERHEAD_PCT = 5
# Time for the server to settle after start (imports, migrations, first allocations) before its
# idle memory is read.
SETTLE_SECONDS = 1.0
# Longest wait for the engine to finish the runs of the gRPC phase before the REST phase.
DRAIN_TIMEOUT = 600.0
FAILED = (resources_pb2.RunStatus.failed, resources_pb2.RunStatus.timed_out, resources_pb2.RunStatus.canceled)


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    load = {"seconds": args.seconds, "concurrency": args.concurrency, "procs": args.client_procs}
    print(f"{args.concurrency} concurrent clients in {args.client_procs} process(es), "
          f"{args.seconds:g} s per phase, 5-step noop workflow, SQLite")
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        data_dir = Path(tmp)
        async with common.spawn_echo_server(data_dir) as echo_server:
            echo = await common.run_load("echo", echo_server.grpc_target, "", **load,
                                         watch={"echo server": echo_server.pid})
        print(echo.line("echo (bare grpc.aio health Check)", "calls", "baseline"))
        print(echo.cpu_line())
        echo.print_errors("echo")

        try:
            async with common.spawn_server(data_dir, envoy=True) as served:
                await asyncio.sleep(SETTLE_SECONDS)
                idle_mb = common.rss_mb(served.pid)
                envoys = common.children_of(served.pid)
                envoy_mb = sum(common.rss_mb(pid) for pid in envoys)
                watch = {"server": served.pid} | {f"envoy {pid}": pid for pid in envoys}
                print(f"server idle RSS: {idle_mb:.1f} MB (target < {RSS_TARGET_MB} MB); "
                      f"Envoy {envoy_mb:.1f} MB besides")
                await common.create_workflow(served.grpc_target, WORKFLOW, common.chain(5))

                over_grpc = await common.run_load("grpc-trigger", served.grpc_target, WORKFLOW, **load,
                                                  watch=watch)
                print(over_grpc.line("trigger over gRPC", "runs",
                                     f"target >= {GRPC_TARGET}, aim {GRPC_AIM}"))
                print(over_grpc.cpu_line())
                over_grpc.print_errors("gRPC")
                drained = await common.wait_until_settled(served.grpc_target, WORKFLOW, DRAIN_TIMEOUT)
                print(f"  engine finished the runs of the gRPC phase {drained:.1f} s after its window")

                keyed = await common.run_load("grpc-trigger-keyed", served.grpc_target, WORKFLOW, **load,
                                              watch=watch)
                print(keyed.line("trigger over gRPC, Idempotency-Key on each", "runs",
                                 f"target >= {KEYED_FACTOR} x keyless = {KEYED_FACTOR * over_grpc.rate:.0f}"))
                print(keyed.cpu_line())
                keyed.print_errors("gRPC keyed")
                await common.wait_until_settled(served.grpc_target, WORKFLOW, DRAIN_TIMEOUT)

                lone = await common.run_load("grpc-trigger", served.grpc_target, WORKFLOW,
                                             seconds=args.seconds, concurrency=1, procs=1, watch=watch)
                print(lone.line("trigger over gRPC, 1 client", "runs",
                                f"aim p50 <= {LONE_P50_AIM_MS} ms"))
                lone_cpu_ms = 1000 * lone.cpu.get("server", 0.0) * lone.seconds / max(lone.count, 1)
                print(f"  server CPU per trigger at 1 client: {lone_cpu_ms:.2f} ms "
                      f"(aim <= {LONE_CPU_AIM_MS} ms)")
                lone.print_errors("gRPC 1 client")
                await common.wait_until_settled(served.grpc_target, WORKFLOW, DRAIN_TIMEOUT)

                over_rest = await common.run_load("rest-trigger", served.rest_url, WORKFLOW, **load,
                                                  watch=watch)
                rest_target = REST_FACTOR * over_grpc.rate
                print(over_rest.line("trigger over REST (Envoy)", "runs",
                                     f"target >= {REST_FACTOR} x gRPC = {rest_target:.0f}"))
                print(over_rest.cpu_line())
                over_rest.print_errors("REST")
                await common.wait_until_settled(served.grpc_target, WORKFLOW, DRAIN_TIMEOUT)
                loaded_mb = common.rss_mb(served.pid)
                await report_bad_runs(served.grpc_target)
        finally:
            common.print_server_problems(data_dir / "server.log")

        # The same gRPC phase on a fresh server that checks no API key: what authentication
        # (token lookup from its cache, role, rate bucket, audit entry) costs the trigger rate.
        bare_dir = data_dir / "no-auth"
        bare_dir.mkdir()
        async with common.spawn_server(bare_dir, envoy=False, auth=False) as bare:
            await asyncio.sleep(SETTLE_SECONDS)
            await common.create_workflow(bare.grpc_target, WORKFLOW, common.chain(5))
            no_auth = await common.run_load("grpc-trigger", bare.grpc_target, WORKFLOW, **load,
                                            watch={"server": bare.pid})
            print(no_auth.line("trigger over gRPC, authentication disabled", "runs", "baseline"))
            print(no_auth.cpu_line())
            no_auth.print_errors("gRPC without authentication")

    print(f"server RSS after both phases: {loaded_mb:.1f} MB")
    print(f"REST / gRPC: {common.ratio(over_rest.rate, over_grpc.rate):.2f} (target >= {REST_FACTOR})")
    print(f"trigger / echo over gRPC: {common.ratio(over_grpc.rate, echo.rate):.2f} "
          f"({over_grpc.rate:.0f} runs/s / {echo.rate:.0f} calls/s) (target >= {ECHO_FACTOR})")
    print(f"keyed / keyless over gRPC: {common.ratio(keyed.rate, over_grpc.rate):.2f} "
          f"(target >= {KEYED_FACTOR})")
    overhead = 100 * (1 - common.ratio(over_grpc.rate, no_auth.rate))
    print(f"authentication overhead: {overhead:.1f} % ({over_grpc.rate:.0f} runs/s with keys, "
          f"{no_auth.rate:.0f} without) (target <= {AUTH_OVERHEAD_PCT} %)")


async def report_bad_runs(target: str) -> None:
    """Every triggered noop run should complete; say so when some did not."""
    async with common.open_channel(target) as channel:
        bad = await common.list_runs(runs_grpc.WorkflowRunsServiceStub(channel), WORKFLOW, FAILED)
    if bad:
        statuses = {resources_pb2.RunStatus.Value.Name(r.status) for r in bad}
        print(f"  {len(bad)} runs did NOT complete ({', '.join(sorted(statuses))}), e.g. {bad[0].error!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    args = parser.parse_args()
    return common.run_bench(bench(args))


if __name__ == "__main__":
    sys.exit(main())
