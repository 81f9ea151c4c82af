"""A real `conveyor serve` under a steady trigger load loses its database and gets it back
(issue 15, item 3), with the server's default bounds: SQLite's file locked by another process;
PostgreSQL made unreachable (the proxy drops every connection and refuses new ones), then every
server connection terminated with pg_terminate_backend. During the outage triggers are refused
(UNAVAILABLE, or RESOURCE_EXHAUSTED when a bound is reached), never hang; afterwards the same
process acknowledges triggers again with no restart, and every trigger it acknowledged, before,
during or after, is in the database. On PostgreSQL its LISTEN connection is back too."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from google.protobuf import json_format

from conveyor.storage.db import normalize_url
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.conftest import PG_ADMIN_DSN
from tests.faults.conftest import Outage
from tests.faults.load import Tally, missing_runs, steady_triggers
from tests.system.conftest import SpawnFactory

# The outage: long enough for several batches and timeouts to meet it.
OUTAGE_SECONDS = 1.5
# The load runs this long before the outage and at least this long after it.
AROUND_SECONDS = 0.5
# With the default bounds (busy 1 s, connect 1 s, statement 2 s, pool 2 s) a refusal comes
# within about a second; this leaves a loaded machine room.
REFUSED_WITHIN = 4.0
RECOVERS_WITHIN = 10.0

pytestmark = pytest.mark.slow


async def _until(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def _feed_connections(outage: Outage) -> set[int]:
    """The server's LISTEN connections to its database (their backend pids)."""
    database = normalize_url(outage.real_url).database
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                                 "AND application_name = 'conveyor-feed'", database)
    finally:
        await admin.close()
    return {r["pid"] for r in rows}


async def test_a_served_conveyor_refuses_fast_during_an_outage_heals_and_loses_nothing(
        spawn: SpawnFactory, outage: Outage) -> None:
    async with spawn(outage.url) as served, served.channel() as channel:
        definition = json_format.ParseDict({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]},
                                           pb.Workflow())
        await wf_grpc.WorkflowsServiceStub(channel).CreateWorkflow(
            wf_pb.CreateWorkflowRequest(workflow=definition))
        feed_before = await _feed_connections(outage) if outage.proxy is not None else set()
        tally = Tally()
        stop = asyncio.Event()
        load = asyncio.create_task(steady_triggers(channel, "w", stop, tally))
        try:
            await _until(lambda: len(tally.acked) >= 10, 10, "the load is acknowledged")
            tally.down = True
            await outage.cut("drop")
            await asyncio.sleep(OUTAGE_SECONDS)  # the outage's length: the load meets it meanwhile
            await outage.heal()
            tally.heal()
            await _until(lambda: tally.first_ack_after_heal, RECOVERS_WITHIN, "a trigger acknowledged again")
            if outage.proxy is not None:
                # Every connection of the server killed behind its back: it heals from that too.
                admin = await asyncpg.connect(PG_ADMIN_DSN)
                try:
                    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE datname = $1 AND application_name LIKE 'conveyor%'",
                                        normalize_url(outage.real_url).database)
                finally:
                    await admin.close()
                tally.heal()
                await _until(lambda: tally.first_ack_after_heal, RECOVERS_WITHIN,
                             "acknowledged after the kill")
            await asyncio.sleep(AROUND_SECONDS)
        finally:
            stop.set()
            await load
        assert tally.refused_during_outage > 0, "the outage refused nothing: it did not happen"
        assert set(tally.refused) <= {"UNAVAILABLE DATABASE_UNAVAILABLE", "RESOURCE_EXHAUSTED QUEUE_FULL",
                                      "RESOURCE_EXHAUSTED SERVER_BUSY"}, tally.refused
        assert tally.slowest_refusal < REFUSED_WITHIN, tally.slowest_refusal
        # Nothing acknowledged is lost.
        assert await missing_runs(outage.real_url, list(tally.acked.values())) == []
        if outage.proxy is not None:
            # A LISTEN connection again, a new one (the old one was dropped).
            await _until(lambda: _feed_connections(outage), RECOVERS_WITHIN, "the change feed listens again")
            assert not (await _feed_connections(outage)) & feed_before
