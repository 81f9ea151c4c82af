"""/ready of health.py: every reason the server is not ready, the database's and the parts
reported down (Envoy while it is restarted), in one 503 answer; 200 once none is left."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from conveyor.health import OpsServer, Readiness


async def test_ready_names_every_reason_and_recovers_when_each_is_gone() -> None:
    reachable = False

    async def probe() -> None:
        if not reachable:
            raise ConnectionRefusedError("connection refused")

    readiness = Readiness(probe)
    ops = OpsServer(CollectorRegistry(), readiness, "127.0.0.1", 0)
    assert not await readiness.check()
    readiness.set_down("envoy", "Envoy (REST) is down, restarting it")
    assert ops.answer("GET", "/ready") == (
        503, "text/plain; charset=utf-8",
        b"not ready: the database is unreachable; Envoy (REST) is down, restarting it\n")
    reachable = True
    assert await readiness.check()
    assert ops.answer("GET", "/ready")[::2] == (503, b"not ready: Envoy (REST) is down, restarting it\n")
    readiness.set_down("envoy", None)
    readiness.set_down("envoy", None)  # reported up twice: still up, no error
    assert ops.answer("GET", "/ready?verbose=1")[::2] == (200, b"ready\n")
    # A part reported down does not touch the database's answer (the gRPC health status).
    readiness.set_down("envoy", "down")
    assert readiness.ready and ops.answer("HEAD", "/ready")[0] == 503
