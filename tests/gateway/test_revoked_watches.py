"""Watches over SSE through a real Envoy end when their key stops working (issue 16, finding 4).

Once the body of an SSE response began, the client sees no HTTP status: a run or project watch
whose key is revoked or expires ends with a last frame carrying the error (StreamError) with
code 16 (UNAUTHENTICATED) and reason KEY_REVOKED or KEY_EXPIRED, then the body ends. Expiry is
judged by the engine's ManualClock (`holds.check()` is the holds loop's pass, called by hand).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest

from conveyor.engine.facade import Engine
from tests.auth import TEST_ADMIN
from tests.engine.test_engine import ME, trigger, wf
from tests.gateway.test_watch_streams import AT_ONCE, Served, served  # noqa: F401  (the fixture)

UNAUTHENTICATED = 16


async def _sse(rest: httpx.AsyncClient, path: str, token: str) -> httpx.Response:
    request = rest.build_request("GET", path, headers={"accept": "text/event-stream",
                                                       "authorization": f"Bearer {token}"})
    response = await asyncio.wait_for(rest.send(request, stream=True), AT_ONCE)
    assert response.status_code == 200, await response.aread()
    return response


async def _to_the_end(response: httpx.Response) -> list[dict[str, Any]]:
    """Every frame until the body ends (within AT_ONCE)."""
    try:
        async with asyncio.timeout(AT_ONCE):
            return [json.loads(line.removeprefix("data:")) async for line in response.aiter_lines()
                    if line.startswith("data:")]
    finally:
        await response.aclose()


async def _holding(engine: Engine, n: int) -> None:
    deadline = time.monotonic() + AT_ONCE
    while len(engine.keys.holds) != n:
        assert time.monotonic() < deadline, f"{n} watches never held their key"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["revoked", "expired"])
async def test_sse_watches_end_with_an_unauthenticated_last_frame_when_their_key_stops(
        served: Served, how: str) -> None:  # noqa: F811
    engine, clock = served.engine, served.clock
    await engine.workflows.create(wf("gated", [{"ref": "ok", "kind": "approval"}]), ME)
    run_id = await trigger(engine, "gated")
    await engine.tick()
    _, token = await engine.keys.create(TEST_ADMIN, "sse-viewer", "default", "viewer",
                                        expires_at=clock.now() + timedelta(hours=1))
    watches = [await _sse(served.rest, f"/v1/workflow-runs/{run_id}/watch", token),
               await _sse(served.rest, "/v1/projects/default/workflow-runs/watch", token)]
    await _holding(engine, 2)

    if how == "revoked":
        await engine.keys.revoke(TEST_ADMIN, "sse-viewer")
    else:
        clock.advance(3600)
        await engine.keys.holds.check()

    run_frames, project_frames = await asyncio.gather(*(_to_the_end(w) for w in watches))
    assert "snapshot" in run_frames[0]
    reason = "KEY_REVOKED" if how == "revoked" else "KEY_EXPIRED"
    for frames in (run_frames, project_frames):
        last = frames[-1]["error"]
        assert (last["code"], last["reason"]) == (UNAUTHENTICATED, reason)
        assert "sse-viewer" in last["message"]
    # The run itself goes on, watched by keys that work.
    assert (await engine.runs.get(run_id, ME)).status == "running"
