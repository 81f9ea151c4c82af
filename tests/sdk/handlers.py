"""The worker the SDK tests run as a child process: ``conveyor worker tests.sdk.handlers:worker``.

Each handler does what its input's `mode` says and writes what it saw to the JSON-lines ledger
named by $SDK_LEDGER (start, done, cancelled), so a test can tell what ran, how often, and what
reached the handler. $SDK_LEASE, $SDK_GRACE and $SDK_SLOTS configure the Worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from conveyor.sdk import Context, NonRetryableError, RetryAfter, Worker, task

LEDGER = os.environ.get("SDK_LEDGER", os.devnull)


def record(event: str, ctx: Context, **extra: Any) -> None:
    line = json.dumps({"event": event, "step": ctx.step_ref, "attempt": ctx.attempt, "task_id": ctx.task_id,
                       "run_id": ctx.run_id, "pid": os.getpid(), "t": time.time(), **extra})
    # One short O_APPEND write per line: lines of concurrent writers never interleave.
    with open(LEDGER, "a") as f:
        f.write(line + "\n")


def ctx_fields(ctx: Context) -> dict[str, Any]:
    return {"attempt": ctx.attempt, "max_attempts": ctx.max_attempts, "step_ref": ctx.step_ref,
            "run_id": ctx.run_id, "task_id": ctx.task_id, "queue": ctx.queue, "payload": ctx.payload,
            "project_id": ctx.project_id, "worker_id": ctx.worker_id, "cancelled": ctx.cancelled,
            "item": ctx.item, "index": ctx.index}


@task(queue="sdk-async")
async def run_async(ctx: Context, input: dict[str, Any]) -> Any:
    mode = input.get("mode", "echo")
    record("start", ctx, mode=mode)
    try:
        if mode == "echo":
            result: Any = {"input": input, "ctx": ctx_fields(ctx)}
        elif mode == "scalar":
            result = input.get("value")
        elif mode == "nonretryable":
            raise NonRetryableError("the input can never work")
        elif mode == "retry_after":
            if ctx.attempt == 1:
                raise RetryAfter(input["seconds"])
            result = {"attempt": ctx.attempt}
        elif mode == "flaky":
            if ctx.attempt < input["succeed_on"]:
                raise ValueError(f"flaky attempt {ctx.attempt}")
            result = {"attempt": ctx.attempt}
        elif mode == "big":
            result = {"blob": "x" * input["bytes"]}
        elif mode == "sleep":
            await asyncio.sleep(input["seconds"])
            result = {"slept": input["seconds"], "attempt": ctx.attempt}
        elif mode == "sleep_first":
            # Only the first attempt takes long: the one a test kills its worker during.
            if ctx.attempt == 1:
                await asyncio.sleep(input["seconds"])
            result = {"attempt": ctx.attempt}
        elif mode == "die":
            # A poison task: it takes its whole worker down (kill -9 of itself), every time.
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")
        else:
            raise NonRetryableError(f"unknown mode {mode!r}")
    except asyncio.CancelledError:
        record("cancelled", ctx, reason=ctx.cancel_reason, flag=ctx.cancelled)
        raise
    record("done", ctx)
    return result


@task(queue="sdk-sync")
def run_sync(ctx: Context, input: dict[str, Any]) -> Any:
    mode = input.get("mode", "upper")
    record("start", ctx, mode=mode)
    if mode == "upper":
        result = {"text": str(input["text"]).upper(), "ctx": ctx_fields(ctx)}
    elif mode == "wait":
        # A sync handler never gets an exception thrown into it: it watches the flag.
        if ctx.wait_cancelled(input["seconds"]):
            record("cancelled", ctx, reason=ctx.cancel_reason, flag=ctx.cancelled)
            return {"ignored": True}
        result = {"waited": input["seconds"]}
    elif mode == "boom":
        raise RuntimeError("sync handler exploded")
    else:
        raise NonRetryableError(f"unknown mode {mode!r}")
    record("done", ctx)
    return result


worker = Worker(tasks=[run_async, run_sync], slots=int(os.environ.get("SDK_SLOTS", "8")),
                lease_seconds=int(os.environ.get("SDK_LEASE", "30")),
                grace_seconds=float(os.environ.get("SDK_GRACE", "5")))
