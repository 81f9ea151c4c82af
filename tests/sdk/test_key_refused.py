"""A worker whose API key stops working (issue 16, finding 4): the SDK against the real server
(build_server on a real engine, in this process, so its log can be read).

Revoked while the worker serves, the key's task stream ends UNAUTHENTICATED KEY_REVOKED; the
worker logs one ERROR naming the reason, keeps running and retrying with backoff (each retry
refused at the gate, logged at DEBUG only), and leases nothing: a task made ready after the
revocation stays queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.api.server import build_server
from conveyor.domain.records import TriggerRequest
from conveyor.engine.facade import Engine
from conveyor.sdk import Context, Worker, task
from conveyor.settings import Settings
from conveyor.storage.db import Database
from tests.auth import TEST_ADMIN
from tests.sdk.conftest import eventually

handled: list[str] = []
REFUSED = "refused this worker's API key"


@task(queue="keyed")
async def work(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    handled.append(ctx.run_id)
    return {}


@pytest.fixture
async def target(engine: Engine, database: Database) -> AsyncIterator[str]:
    settings = Settings(db_url=str(database.url), grpc_host="127.0.0.1", grpc_port=0, envoy_enabled=False)
    server, port = await build_server(engine, settings)
    await server.start()
    handled.clear()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def ready_task(engine: Engine) -> str:
    run = await engine.runs.trigger(TriggerRequest(workflow_id="keyed"), TEST_ADMIN)
    await engine.tick()
    return run.id


async def test_a_worker_whose_key_is_revoked_says_so_leases_nothing_and_keeps_retrying(
        engine: Engine, target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="conveyor.sdk.worker")
    steps = [{"ref": "t", "kind": "task", "queue": "keyed"}]
    await engine.workflows.create({"name": "keyed", "steps": steps}, TEST_ADMIN)
    _, token = await engine.keys.create(TEST_ADMIN, "sdk-worker", "default", "worker")
    worker = Worker(tasks=[work], target=target, api_key=token, slots=2)
    serving = asyncio.create_task(worker.run_async())
    try:
        first = await ready_task(engine)
        await eventually(lambda: handled == [first], within=10, what="the worker key to work a task")

        await engine.keys.revoke(TEST_ADMIN, "sdk-worker")

        def refusals() -> list[logging.LogRecord]:
            return [r for r in caplog.records if REFUSED in r.getMessage()]

        await eventually(lambda: refusals(), within=5, what="the worker to log the refusal")
        (said,) = refusals()
        assert said.levelno == logging.ERROR
        assert "UNAUTHENTICATED KEY_REVOKED" in said.getMessage() and "sdk-worker" in said.getMessage()
        second = await ready_task(engine)
        # Two more attempts after the task became ready, each refused at the gate (the key is
        # unknown to it now): the worker keeps trying, quietly, and leases nothing.
        seen = len(refusals())
        await eventually(lambda: len(refusals()) >= seen + 2, within=10, what="the worker to retry")
        assert [r.levelno for r in refusals()[1:]] == [logging.DEBUG] * (len(refusals()) - 1)
        assert "INVALID_TOKEN" in refusals()[-1].getMessage()
        assert not serving.done()
        assert handled == [first]
        (step,) = (await engine.steps.list(second, 10, "", TEST_ADMIN)).items
        assert (step.status, step.worker_id) == ("queued", "")
    finally:
        worker.stop(force=True)
        await asyncio.wait_for(serving, 30)
