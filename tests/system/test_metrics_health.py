"""Operators' endpoints of a real `conveyor serve`: /metrics after real runs, /ready and the gRPC
health status flipping when the database goes away and back, JSON log lines
(health.py, engine/metrics.py, logs.py; README "Metrics and health")."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conveyor.storage.db import normalize_url
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.conftest import PG_ADMIN_DSN
from tests.system.conftest import Served, SpawnFactory

# The probe runs every 2 s; a locked SQLite file is noticed after busy_timeout (5 s) more.
FLIP_DEADLINE = 30.0


def metrics_url(served: Served) -> str:
    for line in served.printed:
        if m := re.search(r"metrics on (\S+)/metrics", line):
            return m.group(1)
    raise AssertionError(f"no metrics line in {served.printed}")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def poll(check: Callable[[], object], what: str, deadline: float = FLIP_DEADLINE) -> None:
    """Poll `check` (maybe a coroutine function) until it returns true."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        await asyncio.sleep(0.1)


async def health_status(served: Served) -> int:
    async with grpc.aio.insecure_channel(served.grpc_target) as channel:  # health needs no key
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return reply.status


async def test_metrics_after_real_runs(spawn: SpawnFactory, db_url: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_LOG_FORMAT", "json")
    async with spawn(db_url) as served:
        base = metrics_url(served)
        async with served.channel() as channel, httpx.AsyncClient() as http:
            workflow = json_format.ParseDict({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]},
                                             pb.Workflow())
            await wf_grpc.WorkflowsServiceStub(channel).CreateWorkflow(
                wf_pb.CreateWorkflowRequest(workflow=workflow))
            runs = runs_grpc.WorkflowRunsServiceStub(channel)
            await asyncio.gather(*(runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="w"))
                                   for _ in range(5)))

            async def finished() -> bool:
                reply = await http.get(f"{base}/metrics")
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/plain")
                got = samples(reply.text)
                return got.get(("conveyor_runs_finished_total", (("status", "completed"),))) == 5

            await poll(finished, "5 runs completed in /metrics")
            got = samples((await http.get(f"{base}/metrics")).text)
            assert got[("conveyor_runs_triggered_total", (("origin", "trigger"),))] == 5
            assert got[("conveyor_trigger_batch_size_sum", ())] == 5
            key = (("kind", "noop"), ("queue", ""), ("status", "completed"))
            assert got[("conveyor_step_duration_seconds_count", key)] == 5
            assert got[("conveyor_runner_pass_seconds_count", ())] >= 1
            assert got[("conveyor_ready", ())] == 1
            pool = "writer" if db_url.startswith("sqlite") else "main"
            assert ("conveyor_db_pool_checked_out", (("pool", pool),)) in got
            assert (await http.get(f"{base}/ready")).status_code == 200
            assert (await http.get(f"{base}/healthz")).status_code == 200
            assert (await http.get(f"{base}/nope")).status_code == 404
    # The server's log: every line one JSON object.
    lines = [line for line in (served.data_dir.parent / "server.log").read_text().splitlines() if line]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys()


async def test_readiness_fails_while_the_database_is_unreachable(spawn: SpawnFactory, db_url: str,
                                                                 backend: str) -> None:
    async with spawn(db_url) as served, httpx.AsyncClient() as http:
        base = metrics_url(served)

        async def ready_is(code: int) -> bool:
            return (await http.get(f"{base}/ready")).status_code == code

        assert await ready_is(200)
        assert await health_status(served) == health_pb2.HealthCheckResponse.SERVING
        async with _unreachable(db_url, backend):
            await poll(lambda: ready_is(503), "/ready 503")
            assert await health_status(served) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await http.get(f"{base}/healthz")).status_code == 200  # alive all the same
            text = (await http.get(f"{base}/metrics")).text
            assert samples(text)[("conveyor_ready", ())] == 0
        await poll(lambda: ready_is(200), "/ready 200 again")
        assert await health_status(served) == health_pb2.HealthCheckResponse.SERVING


class _unreachable:
    """SQLite: another process holds the file's write lock. PostgreSQL: the database refuses
    connections and every connection to it is terminated."""

    def __init__(self, db_url: str, backend: str) -> None:
        self.url = normalize_url(db_url)
        self.backend = backend
        self.lock: sqlite3.Connection | None = None

    async def __aenter__(self) -> None:
        if self.backend == "sqlite":
            self.lock = sqlite3.connect(Path(self.url.database or ""), isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")
            return
        await self._admin(f'ALTER DATABASE "{self.url.database}" ALLOW_CONNECTIONS false',
                          "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          f"WHERE datname = '{self.url.database}'")

    async def __aexit__(self, *_: object) -> None:
        if self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
            return
        await self._admin(f'ALTER DATABASE "{self.url.database}" ALLOW_CONNECTIONS true')

    @staticmethod
    async def _admin(*statements: str) -> None:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            for statement in statements:
                await admin.execute(statement)
        finally:
            await admin.close()
