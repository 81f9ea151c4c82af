"""The worker bench/soak.py runs: one `task` handler on queue "soak" that fails the first
attempt of a run whose payload asks for it (`"fail": true`), so the soak can retry the step."""

from __future__ import annotations

from typing import Any

from conveyor.sdk import Context, NonRetryableError, Worker, task


@task(queue="soak")
async def step(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    if ctx.payload.get("fail") and ctx.attempt == 1:
        raise NonRetryableError("failing the first attempt, as the payload asks")
    return {"attempt": ctx.attempt}


# `conveyor worker soak_worker:worker --target ...` (run from bench/).
worker = Worker(tasks=[step], slots=16)
