"""The worker `tests/system/test_crash_work.py` runs as a real child process:
``conveyor worker tests.system.crash_worker:worker`` (cwd: the repository).

One handler serves the queue `crashwork`; what it computes depends on its input's `op` only, so
a step's output is the same whichever attempt produces it. It writes one JSON line to the ledger
named by $CRASH_LEDGER when an attempt STARTS (the effect), when it RAISES by design (attempt 1
of a run whose payload says `flaky`), when it FINISHES (returns its result), and when it is
cancelled — each line flushed and fsynced before the handler goes on, so a SIGKILL of this
process or of the server loses no line of what already happened. $CRASH_LEASE and $CRASH_SLOTS
configure the Worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from conveyor.sdk import Context, Worker, task

LEDGER = os.environ.get("CRASH_LEDGER", os.devnull)
QUEUE = "crashwork"
DESIGNED_FAILURE = "designed failure of attempt 1"


def record(event: str, ctx: Context) -> None:
    line = json.dumps({"event": event, "task_id": ctx.task_id, "attempt": ctx.attempt, "run_id": ctx.run_id,
                       "step_ref": ctx.step_ref, "pid": os.getpid(), "t": time.time()})
    # One O_APPEND write per line (lines of concurrent writers never interleave), on disk before
    # the handler goes on.
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def compute(input: dict[str, Any]) -> dict[str, Any]:
    """The step's result: a function of its (rendered) input only."""
    op = input["op"]
    if op == "prep":
        return {"square": input["i"] * input["i"]}
    if op == "leaf":
        return {"word": str(input["token"]).upper()}
    if op == "finish":
        return {"summary": f"{input['i']}:{input['leaf']}"}
    raise ValueError(f"unknown op {op!r}")


@task(queue=QUEUE)
async def crashwork(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    record("start", ctx)
    try:
        await asyncio.sleep(float(input.get("sleep", 0)))
        if input.get("flaky") and ctx.attempt == 1:
            record("raise", ctx)
            raise RuntimeError(DESIGNED_FAILURE)
        result = compute(input)
    except asyncio.CancelledError:
        record("cancelled", ctx)
        raise
    record("finish", ctx)
    return result


worker = Worker(tasks=[crashwork], slots=int(os.environ.get("CRASH_SLOTS", "32")),
                lease_seconds=int(os.environ.get("CRASH_LEASE", "2")), grace_seconds=1.0)
