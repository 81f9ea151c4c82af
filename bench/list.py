"""Lists at scale: 1,000,000 runs across 50 workflows in 10 projects, and the p50/p99 latency of
ListWorkflowRuns over gRPC for each filter the API offers. Target: p99 < 10 ms for each of no
filter, project, workflow, status, tag, date range and a deep page via the cursor (issue 5).

The database is made fresh by the real migrations, then filled by a few bulk INSERT ... SELECT
statements inside the database (a recursive CTE on SQLite, generate_series on PostgreSQL), so
loading takes well under a minute or two instead of a million round trips. The data:

- workflow k (0..49) is `flow-k` in project `p{k % 10}`; run i belongs to workflow i % 50;
- created_at spreads the runs evenly over the last 30 days (one every 2.592 s), started_at is
  0-59 s later (none for pending runs), finished_at 60 s after that for finished runs;
- status from a hash of i: 70 % completed, 10 % failed, 5 % canceled, 5 % running, 5 % pending,
  3 % timed_out, 2 % paused; triggered_by `schedule` for 10 %, `api` otherwise;
- two tags per run: env in {prod, staging, dev} and team t0..t9 (so team:t3 is 10 % of runs);
- wake_at is NULL: the engine has nothing to do, the server only answers lists.

Each query is asked sequentially from one client (warm-up first, then `--samples` timed calls),
for a page of the default size (50). The same query is then timed through the Repository in this
process ("database part": SQL plus row decoding, no gRPC), to show where the time goes. The deep
page is page 50 of the unfiltered list, reached by following x-next-page-token, then asked again
and again with that token.

Run: .venv/bin/python bench/list.py [--db sqlite|postgresql] [--runs 1000000] [--samples 300]
`--db postgresql` creates its own database on 127.0.0.1:5432 and drops it afterwards.
Exits 0 whether or not the targets are met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import common
from google.protobuf import timestamp_pb2

from conveyor.domain.records import RunQuery
from conveyor.domain.states import RunStatus
from conveyor.storage.db import Database, normalize_url
from conveyor.storage.migrate import migrate
from conveyor.storage.store import SqlStore
from conveyor.v1 import resources_pb2, workflow_runs_service_pb2
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

TARGET_P99_MS = 10.0
PROJECTS, WORKFLOWS, DAYS = 10, 50, 30
WARMUP = 20
DEEP_PAGE = 50
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_PREFIX = "postgresql+asyncpg://postgres@127.0.0.1:5432/"

# The status of run i from bucket h = a hash of i into 0..99 (same split on both databases).
STATUS_CASE = """CASE WHEN h < 70 THEN 'completed' WHEN h < 80 THEN 'failed'
    WHEN h < 85 THEN 'canceled' WHEN h < 90 THEN 'running' WHEN h < 95 THEN 'pending'
    WHEN h < 98 THEN 'timed_out' ELSE 'paused' END"""
RUN_COLUMNS = """id, project_id, workflow_id, workflow_name, workflow_version, workflow_version_id,
    status, status_message, triggered_by, created_by, max_parallel_steps, payload, output, error,
    tags, entity_id, idempotency_key, retry_of_run_id, parent_workflow_run_id, parent_step_run_id,
    depth, last_seq, wake_at, started_at, finished_at, expires_at, created_at, updated_at"""


# --- loading ------------------------------------------------------------------------------------


def load_sqlite(path: Path, runs: int, base: datetime) -> None:
    """Fill a migrated SQLite file; timestamps in the naive 'YYYY-MM-DD HH:MM:SS.ffffff' UTC
    form the models store."""
    base_ms = int(base.timestamp() * 1000)
    ts = ("(strftime('%Y-%m-%d %H:%M:%S', ({ms}) / 1000, 'unixepoch') "
          "|| printf('.%06d', (({ms}) % 1000) * 1000))")
    created, started, finished = ts.format(ms="t"), ts.format(ms="t + s"), ts.format(ms="t + s + 60000")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA cache_size = -262144")  # 256 MiB while loading
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        _insert_workflows(db.execute, f"'{base.replace(tzinfo=None).isoformat(sep=' ')}'")
        db.execute(f"""
            WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {runs - 1}),
            r AS (SELECT i, ((i * 2654435761) % 4294967296) * 100 / 4294967296 AS h,
                         {base_ms} + i * {DAYS * 86400 * 1000 // runs} AS t, (i % 60) * 1000 AS s FROM n)
            INSERT INTO workflow_runs ({RUN_COLUMNS})
            SELECT printf('%08x-0000-4000-8000-%012x', i, i), 'p' || (i % {PROJECTS}),
                   'wf-' || (i % {WORKFLOWS}), 'flow-' || (i % {WORKFLOWS}), 1, 'wfv-' || (i % {WORKFLOWS}),
                   {STATUS_CASE}, '', CASE WHEN i % 10 = 0 THEN 'schedule' ELSE 'api' END, 'bench', 0,
                   '{{}}', NULL, '',
                   json_object('env', CASE (i / 7) % 3 WHEN 0 THEN 'prod' WHEN 1 THEN 'staging'
                               ELSE 'dev' END, 'team', 't' || ((i / 3) % 10)),
                   '', '', '', '', '', 0, 0, NULL,
                   CASE WHEN h BETWEEN 90 AND 94 THEN NULL ELSE {started} END,
                   CASE WHEN h < 85 OR h BETWEEN 95 AND 97 THEN {finished} ELSE NULL END,
                   NULL, {created}, {created}
            FROM r""")
        for key in ("env", "team"):
            db.execute(f"INSERT INTO run_tags (run_id, key, value) "
                       f"SELECT id, '{key}', json_extract(tags, '$.{key}') FROM workflow_runs")
        db.execute("COMMIT")
    finally:
        db.close()


async def load_postgres(dsn: str, runs: int, base: datetime) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            statements: list[str] = []
            _insert_workflows(statements.append, f"'{base.isoformat()}'::timestamptz")
            for statement in statements:
                await conn.execute(statement)
            step_ms = DAYS * 86400 * 1000 // runs
            created = "to_timestamp(t / 1000.0)"
            started = "to_timestamp((t + s) / 1000.0)"
            finished = "to_timestamp((t + s + 60000) / 1000.0)"
            await conn.execute(f"""
                WITH r AS (SELECT i, ((i * 2654435761) % 4294967296) * 100 / 4294967296 AS h,
                                  {int(base.timestamp() * 1000)}::bigint + i * {step_ms} AS t,
                                  (i % 60) * 1000 AS s
                           FROM generate_series(0::bigint, {runs - 1}) AS i)
                INSERT INTO workflow_runs ({RUN_COLUMNS})
                SELECT lpad(to_hex(i), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i), 12, '0'),
                       'p' || (i % {PROJECTS}), 'wf-' || (i % {WORKFLOWS}), 'flow-' || (i % {WORKFLOWS}), 1,
                       'wfv-' || (i % {WORKFLOWS}), {STATUS_CASE}, '',
                       CASE WHEN i % 10 = 0 THEN 'schedule' ELSE 'api' END, 'bench', 0,
                       '{{}}'::jsonb, NULL, '',
                       jsonb_build_object('env', CASE (i / 7) % 3 WHEN 0 THEN 'prod' WHEN 1 THEN 'staging'
                                          ELSE 'dev' END, 'team', 't' || ((i / 3) % 10)),
                       '', '', '', '', '', 0, 0, NULL,
                       CASE WHEN h BETWEEN 90 AND 94 THEN NULL ELSE {started} END,
                       CASE WHEN h < 85 OR h BETWEEN 95 AND 97 THEN {finished} ELSE NULL END,
                       NULL, {created}, {created}
                FROM r""")
            for key in ("env", "team"):
                await conn.execute(f"INSERT INTO run_tags (run_id, key, value) "
                                   f"SELECT id, '{key}', tags ->> '{key}' FROM workflow_runs")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def _insert_workflows(execute: Callable[[str], object], at: str) -> None:
    """The 50 workflows and their version 1 (a one-step noop spec); `at` is an SQL literal."""
    spec = '{"name": "flow", "steps": [{"ref": "a", "kind": "noop"}]}'
    for k in range(WORKFLOWS):
        execute(f"INSERT INTO workflows (id, project_id, name, description, current_version, "
                f"current_version_id, max_concurrent_runs, created_by, created_at, updated_at) VALUES "
                f"('wf-{k}', 'p{k % PROJECTS}', 'flow-{k}', '', 1, 'wfv-{k}', 0, 'bench', {at}, {at})")
        execute(f"INSERT INTO workflow_versions (id, workflow_id, project_id, version, spec, created_at) "
                f"VALUES ('wfv-{k}', 'wf-{k}', 'p{k % PROJECTS}', 1, '{spec}', {at})")


# --- measuring ----------------------------------------------------------------------------------


def _ts(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


async def _page(stub: runs_grpc.WorkflowRunsServiceStub,
                request: workflow_runs_service_pb2.ListWorkflowRunsRequest) -> tuple[int, str]:
    call = stub.ListWorkflowRuns(request, timeout=30)
    metadata = await call.initial_metadata()
    count = len([run async for run in call])
    return count, str(dict(metadata or ()).get("x-next-page-token", ""))


async def _measure(ask: Callable[[], Awaitable[tuple[int, str]]], samples: int) -> tuple[list[float], int]:
    for _ in range(WARMUP):
        await ask()
    latencies: list[float] = []
    count = 0
    for _ in range(samples):
        t0 = time.perf_counter()
        count, _token = await ask()
        latencies.append(time.perf_counter() - t0)
    return sorted(latencies), count


async def measure_all(target: str, url: str, base: datetime, samples: int) -> bool:
    """Each query over gRPC (the figure against the target), and the same query as the
    Repository runs it in this process (the database's share of the time)."""
    req = workflow_runs_service_pb2.ListWorkflowRunsRequest
    status = resources_pb2.RunStatus
    day10 = base + timedelta(days=10)
    day11 = day10 + timedelta(days=1)
    queries: list[tuple[str, workflow_runs_service_pb2.ListWorkflowRunsRequest, RunQuery]] = [
        ("no filter", req(), RunQuery()),
        ("project (p3)", req(project_id="p3"), RunQuery(project_id="p3")),
        ("workflow (flow-7, by name)", req(workflow_id=["flow-7"]), RunQuery(workflow_ids=["flow-7"])),
        ("status (running, 5 %)", req(status=[status.running]), RunQuery(statuses=[RunStatus.RUNNING])),
        ("status (failed + timed_out)", req(status=[status.failed, status.timed_out]),
         RunQuery(statuses=[RunStatus.FAILED, RunStatus.TIMED_OUT])),
        ("project + status (p3, running)", req(project_id="p3", status=[status.running]),
         RunQuery(project_id="p3", statuses=[RunStatus.RUNNING])),
        ("tag (team:t3, 10 %)", req(tag=["team:t3"]), RunQuery(tags=[("team", "t3")])),
        ("date range (started in day 10-11)", req(started_after=_ts(day10), started_before=_ts(day11)),
         RunQuery(started_after=day10, started_before=day11)),
        ("triggered_by (schedule, 10 %)", req(triggered_by="schedule"), RunQuery(triggered_by="schedule")),
    ]
    all_met = True
    db = Database(url)
    store = SqlStore(db)
    try:
        async with common.open_channel(target) as channel:
            stub = runs_grpc.WorkflowRunsServiceStub(channel)
            token = ""
            for _ in range(DEEP_PAGE - 1):
                _count, token = await _page(stub, req(page_token=token))
            queries.append((f"deep page ({DEEP_PAGE}, via cursor)", req(page_token=token), RunQuery()))
            width = max(len(label) for label, _, _ in queries)
            for label, request, query in queries:
                latencies, count = await _measure(lambda r=request: _page(stub, r), samples)  # type: ignore[misc]
                p50, p99 = common.percentile(latencies, 50) * 1000, common.percentile(latencies, 99) * 1000

                async def in_db(q: RunQuery = query, t: str = request.page_token) -> tuple[int, str]:
                    async with store.read() as repo:
                        page = await repo.list_runs(q, None, 50, t)
                    return len(page.items), page.next_token

                db_latencies, _ = await _measure(in_db, samples)
                db99 = common.percentile(db_latencies, 99) * 1000
                met = p99 < TARGET_P99_MS
                all_met &= met
                verdict = "met" if met else "NOT MET"
                print(f"  {label:<{width}}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                      f"(target p99 < {TARGET_P99_MS:.0f} ms: {verdict})  [{count} runs/page; "
                      f"database part p99 {db99:.2f} ms]")
    finally:
        await db.dispose()
    return all_met


async def main(db: str, runs: int, samples: int) -> None:
    common.cancel_on_sigterm()
    base = (datetime.now(UTC) - timedelta(days=DAYS)).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-list-") as tmp:
        data_dir = Path(tmp)
        pg_name = ""
        if db == "postgresql":
            pg_name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
            admin = await asyncpg.connect(PG_ADMIN_DSN)
            await admin.execute(f'CREATE DATABASE "{pg_name}"')
            await admin.close()
            url = PG_URL_PREFIX + pg_name
        else:
            url = f"sqlite+aiosqlite:///{data_dir / 'conveyor.db'}"
        try:
            await migrate(url)
            t0 = time.perf_counter()
            if db == "postgresql":
                await load_postgres(f"postgresql://postgres@127.0.0.1:5432/{pg_name}", runs, base)
            else:
                await asyncio.to_thread(load_sqlite, Path(normalize_url(url).database or ""), runs, base)
            print(f"list bench ({db}): loaded {runs:,} runs, {2 * runs:,} tags, {WORKFLOWS} workflows "
                  f"in {PROJECTS} projects in {time.perf_counter() - t0:.0f} s")
            async with common.spawn_server_on(url, data_dir) as served:
                print(f"ListWorkflowRuns over gRPC, {samples} sequential calls each, page of 50:")
                met = await measure_all(served.grpc_target, url, base, samples)
                print(f"all targets met: {'yes' if met else 'NO'}")
            common.print_server_problems(data_dir / "server.log")
        finally:
            if pg_name:
                admin = await asyncpg.connect(PG_ADMIN_DSN)
                await admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
                await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    sys.exit(common.run_bench(main(args.db, args.runs, args.samples)))
