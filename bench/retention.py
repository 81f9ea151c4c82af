"""Retention at scale (issue 15 item 5): how fast the sweep deletes expired runs, and how long
each of its transactions holds the writer (what a trigger arriving meanwhile waits at most).

An in-process Engine on a ManualClock over a fresh database (the real migrations): `--runs`
runs of a 5-step noop workflow (each with 5 steps, ~7 events, a tag and a feed row), half of
them in a workflow that keeps its runs 90 days; the clock moves 31 days and one
`Retention.sweep()` deletes the other half. Printed: runs deleted per second, and the longest
and median write transaction of the sweep next to the target (< 250 ms each: triggers and
reports wait no longer than that for the writer).

Run: .venv/bin/python bench/retention.py [--db sqlite|postgresql] [--runs 20000] [--batch 500]
`--db postgresql` creates its own database on 127.0.0.1:5432 and drops it afterwards.
Exits 0 whether or not the target is met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import common

from conveyor.domain.records import Caller, TriggerRequest
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.migrate import migrate
from conveyor.storage.store import SqlStore

TARGET_MAX_WRITE_MS = 250.0
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"
ME = Caller("bench")


class TimedStore:
    """The store, with every write transaction's duration recorded."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.writes: list[float] = []

    def read(self) -> Any:
        return self.store.read()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Any]:
        started = time.perf_counter()
        async with self.store.write() as repo:
            yield repo
        self.writes.append(time.perf_counter() - started)


async def bench(url: str, runs: int, batch: int) -> None:
    await migrate(url)
    db = Database(url)
    clock = ManualClock()
    engine = Engine(SqlStore(db), Settings(db_url=url, retention_batch_size=batch), clock)
    try:
        steps = [{"ref": f"s{i}", "kind": "noop", "depends_on": [f"s{i - 1}"] if i else []} for i in range(5)]
        await engine.workflows.create({"name": "short", "steps": steps}, ME)
        await engine.workflows.create({"name": "kept", "steps": steps, "retention_days": 90}, ME)
        loaded = time.perf_counter()
        for start in range(0, runs, 500):
            await asyncio.gather(*(engine.runs.trigger(TriggerRequest("short" if i % 2 else "kept",
                                                                      tags={"n": str(i)}), ME)
                                   for i in range(start, min(start + 500, runs))))
        print(f"loaded {runs} runs in {time.perf_counter() - loaded:.1f} s")
        clock.advance(31 * 24 * 3600)
        timed = TimedStore(engine.store)  # type: ignore[arg-type]
        engine.retention.store = timed  # type: ignore[assignment]
        started = time.perf_counter()
        deleted = await engine.retention.sweep()
        took = time.perf_counter() - started
        writes_ms = sorted(w * 1000 for w in timed.writes)
        print(f"deleted {deleted.get('runs', 0)} runs ({deleted.get('events', 0)} events, "
              f"{deleted.get('steps', 0)} steps, {deleted.get('changes', 0)} feed rows) in {took:.2f} s: "
              f"{deleted.get('runs', 0) / took:,.0f} runs/s, batches of {batch}")
        worst = writes_ms[-1]
        print(f"write transactions: {len(writes_ms)}, median {statistics.median(writes_ms):.1f} ms, "
              f"max {worst:.1f} ms (target < {TARGET_MAX_WRITE_MS:.0f} ms: "
              f"{'met' if worst < TARGET_MAX_WRITE_MS else 'NOT met'})")
        print(f"retention: {deleted.get('runs', 0) / took:.0f} runs/s, max write {worst:.0f} ms")
    finally:
        await engine.stop()
        await db.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    if args.db == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            await bench(f"sqlite+aiosqlite:///{Path(tmp) / 'conveyor.db'}", args.runs, args.batch)
        return
    name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await bench(PG_URL_PREFIX + name, args.runs, args.batch)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    raise SystemExit(common.run_bench(main()))
