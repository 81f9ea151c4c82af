"""End-to-end engine throughput: 1,000 runs of a 10-step noop chain, triggered by 64 concurrent
clients, then executed to completion. Reports steps completed per second = runs x steps / (time
from the first trigger to the last run's finished_at). Target (2-core machine, SQLite): >= 1,000
steps/s (aim 5,000).

The engine starts executing runs while the rest are still being triggered, so the window holds
both; the trigger phase's own rate and latency are printed too. Noop steps need no worker, so
the engine may finish a run within one pass: when the last completion comes right after the last
trigger, the figure is bounded by the trigger path rather than by step execution. The end of the window is the
largest finished_at the server recorded (same host, same wall clock as the client's start), not
the moment a poll noticed, so the polling interval does not inflate the figure; the poll asks
for a single unfinished run at a time, which costs the engine next to nothing.

Client: the 1,000 triggers come from this very process (64 asyncio tasks over one channel). On a
2-core machine an extra client process would only take CPU from the server, and 1,000 calls are
a small fraction of what one process issues per second (see bench/trigger.py's echo figure).

Run: .venv/bin/python bench/throughput.py [--runs 1000] [--steps 10] [--concurrency 64]
Exits 0 whether or not the target is met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import common

from conveyor.v1 import resources_pb2
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

WORKFLOW = "bench-chain"
TARGET, AIM = 1000, 5000
# Longest wait for the runs to finish after the last trigger.
FINISH_TIMEOUT = 600.0


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    print(f"{args.runs} runs of a {args.steps}-step noop chain, {args.concurrency} concurrent "
          f"triggering clients, SQLite")
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        data_dir = Path(tmp)
        try:
            async with common.spawn_server(data_dir, envoy=False) as served:
                await common.create_workflow(served.grpc_target, WORKFLOW, common.chain(args.steps))
                cpu_before = common.cpu_seconds(served.pid)
                first, triggered = await common.trigger_all(served.grpc_target, WORKFLOW, args.runs,
                                                            args.concurrency)
                print(triggered.line(f"trigger phase ({triggered.count} runs in {triggered.seconds:.2f} s)",
                                     "runs", "not a target here"))
                triggered.print_errors("trigger")
                await common.wait_until_settled(served.grpc_target, WORKFLOW, FINISH_TIMEOUT)
                noticed = time.time()
                server_cpu = (common.cpu_seconds(served.pid) - cpu_before) / (noticed - first)
                async with common.open_channel(served.grpc_target) as channel:
                    stub = runs_grpc.WorkflowRunsServiceStub(channel)
                    completed = await common.list_runs(stub, WORKFLOW, [resources_pb2.RunStatus.completed])
                    final = await common.list_runs(stub, WORKFLOW, [
                        resources_pb2.RunStatus.failed, resources_pb2.RunStatus.timed_out,
                        resources_pb2.RunStatus.canceled])
        finally:
            common.print_server_problems(data_dir / "server.log")

    finished = [r.finished_at.ToNanoseconds() / 1e9 for r in completed if r.HasField("finished_at")]
    last = max(finished) if finished else noticed
    if len(finished) < len(completed):
        print(f"  {len(completed) - len(finished)} completed runs have no finished_at; "
              f"using the time the poll noticed instead")
        last = noticed
    elapsed = last - first
    steps = len(completed) * args.steps
    print(f"runs completed: {len(completed)} of {args.runs}"
          + (f"; {len(final)} did NOT complete, e.g. {final[0].error!r}" if final else ""))
    print(f"end to end: {steps / elapsed:.0f} steps/s (target >= {TARGET}, aim {AIM}) "
          f"= {steps} steps in {elapsed:.2f} s from first trigger to last completion "
          f"(poll noticed at {noticed - first:.2f} s)")
    print(f"  server CPU until the poll noticed: {server_cpu:.2f} cores of {os.cpu_count()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs to trigger (default 1000)")
    parser.add_argument("--steps", type=int, default=10, help="noop steps per run (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default 64)")
    args = parser.parse_args()
    return common.run_bench(bench(args))


if __name__ == "__main__":
    sys.exit(main())
