"""A database outage under load: how fast `conveyor serve` refuses, how fast it recovers, and
that it loses nothing it acknowledged (issue 15, item 3; README "Database outages").

One `conveyor serve` (default settings, gRPC only) on a fresh PostgreSQL database (created on
127.0.0.1:5432, dropped afterwards), reaching it through tests/faults/proxy.py's TCP proxy.
`--clients` loops trigger runs of a one-step workflow, each trigger with its own idempotency key,
for `--before` seconds; then the proxy cuts the database for `--outage` seconds (`--mode drop`:
connections closed and refused, as a restarted or unreachable server; `blackhole`: accepted and
never answered, as a network partition), then gives it back and the load runs `--after` more
seconds. Printed: what was refused during the outage and how, the slowest refusal (target: about
a second when connections are refused; the 2 s statement timeout on a silent network), the
recovery time (the database's return to the first trigger acknowledged after it; target: under
2 s), and how many acknowledged triggers are missing from the database (target: 0). The last
line is exactly

    faults: recovery N s, refused during outage N, lost N

Run: .venv/bin/python bench/faults.py [--outage 3] [--mode drop] [--clients 8]
Exits 0 whether or not targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

import asyncpg
import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' proxy and load

from conveyor.storage.migrate import migrate
from tests.faults.load import Tally, missing_runs, steady_triggers
from tests.faults.proxy import FaultProxy

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"
WORKFLOW = "bench-faults"
# The slowest refusal: ~1 s when connections are refused; the statement timeout (2 s by default)
# plus slack when the network goes silent.
REFUSAL_TARGET_S = {"drop": 1.5, "blackhole": 2.5}
RECOVERY_TARGET_S = 2.0
RECOVERY_WAIT_S = 60.0


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    name = f"conveyor_bench_faults_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await migrate(PG_URL_PREFIX + name)
        async with FaultProxy(5432) as proxy:
            url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{name}"
            with tempfile.TemporaryDirectory(prefix="conveyor-bench-faults-") as tmp:
                async with common.spawn_server_on(url, Path(tmp)) as served:
                    await common.create_workflow(served.grpc_target, WORKFLOW, [{"ref": "a", "kind": "noop"}])
                    tally = await _load(served.grpc_target, proxy, args)
                    common.print_server_problems(served.log_path)
        lost = len(await missing_runs(PG_URL_PREFIX + name, list(tally.acked.values())))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    recovery = tally.recovery_seconds
    print(f"acknowledged: {len(tally.acked)} triggers; refused: {sum(tally.refused.values())}")
    for what, n in sorted(tally.refused.items()):
        print(f"  refused {what}: {n}")
    print(f"slowest refusal: {tally.slowest_refusal:.2f} s (target: < {REFUSAL_TARGET_S[args.mode]} s)")
    print(f"recovery: {recovery:.2f} s (target: < {RECOVERY_TARGET_S} s); lost: {lost} (target: 0)")
    refused = tally.refused_during_outage
    print(f"faults: recovery {recovery:.1f} s, refused during outage {refused}, lost {lost}")


async def _load(target: str, proxy: FaultProxy, args: argparse.Namespace) -> Tally:
    tally = Tally()
    stop = asyncio.Event()
    async with common.open_channel(target) as channel:
        load = asyncio.create_task(steady_triggers(channel, WORKFLOW, stop, tally, clients=args.clients))
        try:
            await asyncio.sleep(args.before)
            print(f"before the outage: {len(tally.acked)} acknowledged; cutting the database ({args.mode}) "
                  f"for {args.outage} s", flush=True)
            tally.down = True
            proxy.set_mode(args.mode)
            await asyncio.sleep(args.outage)
            proxy.set_mode("pass")
            tally.heal()
            waited = 0.0
            while not tally.first_ack_after_heal and waited < RECOVERY_WAIT_S:
                await asyncio.sleep(0.05)
                waited += 0.05
            await asyncio.sleep(args.after)
        finally:
            stop.set()
            await load
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the database is gone")
    parser.add_argument("--mode", choices=("drop", "blackhole"), default="drop")
    parser.add_argument("--before", type=float, default=2.0, help="seconds of load before the outage")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of load after recovery")
    parser.add_argument("--clients", type=int, default=8, help="concurrent triggering clients")
    return common.run_bench(bench(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
