"""The worker bench/workers.py runs: one `task` handler that returns when it started, so the
bench can measure dispatch latency (ready -> handler start) from the steps' outputs."""

from __future__ import annotations

import time
from typing import Any

from conveyor.sdk import Context, Worker, task


@task(queue="bench")
async def step(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    return {"started": time.time()}


# `conveyor worker bench_worker:worker --target ... --slots 32` (run from bench/).
worker = Worker(tasks=[step], slots=32)
