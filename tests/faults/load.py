"""A steady trigger load against a real server, and the tally of what it was told: which
triggers were acknowledged (and must be in the database afterwards), which were refused and how
fast. Shared by tests/faults/test_server_outage.py and bench/faults.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import grpc

from conveyor.storage.db import normalize_url
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from tests.api.support import decode

# A call's own deadline: far beyond any bound of the server, so a refusal is the server's answer.
CALL_TIMEOUT = 30.0


@dataclass
class Tally:
    """What the load was told. `down` marks the outage: refusals seen while it is set count as
    refused during the outage."""

    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> run id
    refused: Counter[str] = field(default_factory=Counter)  # "CODE REASON" -> how many
    refused_during_outage: int = 0
    slowest_refusal: float = 0.0
    down: bool = False
    healed_at: float = 0.0
    first_ack_after_heal: float = 0.0

    @property
    def recovery_seconds(self) -> float:
        """From the database's return to the first trigger acknowledged after it."""
        if not self.first_ack_after_heal:
            return float("inf")
        return max(0.0, self.first_ack_after_heal - self.healed_at)

    def heal(self) -> None:
        self.down = False
        self.healed_at = time.monotonic()
        self.first_ack_after_heal = 0.0


async def steady_triggers(channel: grpc.aio.Channel, workflow: str, stop: asyncio.Event, tally: Tally,
                          clients: int = 4, pause: float = 0.01) -> None:
    """`clients` loops triggering `workflow`, each trigger with a key of its own, until `stop`."""
    runs = runs_grpc.WorkflowRunsServiceStub(channel)

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"c{n}-{i}"
            i += 1
            started = time.monotonic()
            try:
                run = await runs.TriggerWorkflowRun(
                    runs_pb.TriggerWorkflowRunRequest(workflow_id=workflow, idempotency_key=key),
                    timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                error = decode(e)
                took = time.monotonic() - started
                reason = error.info.reason if error.info is not None else ""
                tally.refused[f"{error.code.name} {reason}".strip()] += 1
                if tally.down:
                    tally.refused_during_outage += 1
                tally.slowest_refusal = max(tally.slowest_refusal, took)
                await asyncio.sleep(pause * 10)  # a client backs off a little after a refusal
                continue
            tally.acked[key] = run.id
            if not tally.down and tally.healed_at and not tally.first_ack_after_heal:
                tally.first_ack_after_heal = time.monotonic()
            await asyncio.sleep(pause)

    await asyncio.gather(*(client(n) for n in range(clients)))


async def missing_runs(db_url: str, run_ids: list[str]) -> list[str]:
    """The acknowledged runs the database does not hold (read directly, not through the server)."""
    url = normalize_url(db_url)
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(url.database or "") as conn:
            found = {row[0] for row in conn.execute("SELECT id FROM workflow_runs")}
    else:
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            found = {row[0] for row in await conn.fetch("SELECT id FROM workflow_runs WHERE id = ANY($1)",
                                                        run_ids)}
        finally:
            await conn.close()
    return [r for r in run_ids if r not in found]
