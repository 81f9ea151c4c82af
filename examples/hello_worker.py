"""The example worker of the README: serves the two `task` steps of `hello_workflow.json`.

    make run                                              # terminal 1: the server
    # terminal 2: this worker, with a key that may only work the project's tasks
    export CONVEYOR_API_KEY=$(.venv/bin/conveyor keys create --project default --role worker \
        --name hello-worker | tail -1)
    .venv/bin/conveyor worker examples.hello_worker:worker
    curl -s -X POST localhost:8080/v1/workflows -d @examples/hello_workflow.json
    curl -s -X POST localhost:8080/v1/workflows/hello/runs -d '{"payload": {"name": "Ada"}}'

`greet` is async (it runs on the worker's event loop), `shout` is sync (it runs on a thread
and watches `ctx.cancelled`). Each handler takes `(ctx, input)`: `input` is the step's config
with its `{{ templates }}` rendered, and the dict it returns becomes the step's output.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.sdk import Context, NonRetryableError, Worker, task


@task(queue="hello-greet")
async def greet(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    name = str(input.get("name", "")).strip()
    if not name:
        # Retrying cannot fix a missing name: fail the step now.
        raise NonRetryableError("payload.name is empty")
    ctx.logger.info("greeting %s (attempt %d of %d)", name, ctx.attempt, ctx.max_attempts)
    await asyncio.sleep(0.1)  # stands in for real I/O; a cancel arrives here as CancelledError
    return {"greeting": f"Hello, {name}"}


@task(queue="hello-shout")
def shout(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    if ctx.wait_cancelled(0.1):  # a sync handler's sleep that wakes when the run is canceled
        return {}  # the lease is gone: this result is not reported
    return {"text": input["text"].upper() + "!", "run": ctx.run_id}


# One worker serving both queues (slots are divided between them).
worker = Worker(tasks=[greet, shout], slots=4)
