"""Envoy supervised by a real `conveyor serve` (gateway/supervisor.py; README "Metrics and
health"): kill -9 its Envoy and the server notices, says not ready, restarts it on the same REST
port with growing waits; an Envoy that cannot come back is retried, not spun; a graceful
shutdown stops Envoy for good. The restart policy itself: tests/gateway/test_supervisor.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.system.conftest import Served, SpawnFactory
from tests.system.test_metrics_health import metrics_url, samples

# The first wait before a restart, long enough that the test sees the server not ready in
# between (polled every 20 ms), short enough for REST to answer again within 5 s.
FIRST_WAIT = 1.2
# SPEC: REST answers again within this long after Envoy was killed.
BACK_WITHIN = 5.0


def envoy_pid(served: Served) -> int:
    """The running Envoy's pid, as the server records it."""
    return int((served.data_dir / "envoy" / "envoy.pid").read_text())


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def envoys_running(config: str) -> list[int]:
    """Pids of live processes whose command line names this config file (a scan of /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if config.encode() in args and alive(int(proc.name)):
                pids.append(int(proc.name))
    return pids


def server_log(served: Served) -> str:
    return (served.data_dir.parent / "server.log").read_text()


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, within: float) -> float:
    """Poll `check` every 20 ms until it is true; the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def rest_ok(http: httpx.AsyncClient, served: Served) -> bool:
    try:
        reply = await http.get(f"{served.rest_url}/v1/workflows", headers=served.headers, timeout=1.0)
    except httpx.TransportError:
        return False
    return reply.status_code == 200


async def kill_envoy_and_see_it_back(served: Served, http: httpx.AsyncClient, ready_url: str,
                                     wait: float) -> int:
    """kill -9 the Envoy; the server says not ready, then REST answers on the same URL within
    BACK_WITHIN, from a new Envoy; returns the new pid."""
    old = envoy_pid(served)
    assert alive(old) and await rest_ok(http, served)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)

    async def not_ready() -> bool:
        reply = await http.get(ready_url)
        return reply.status_code == 503 and "Envoy" in reply.text

    # The supervisor waits on the process: it reacts in milliseconds, long before the restart.
    noticed = await wait_for(not_ready, "/ready says 503 with Envoy as the reason", within=wait)
    assert noticed < wait
    body = (await http.get(ready_url)).text
    assert body == "not ready: Envoy (REST) is down, restarting it\n"
    assert not await rest_ok(http, served)
    await wait_for(lambda: rest_ok(http, served), "REST answers again",
                   within=BACK_WITHIN - (time.monotonic() - killed))
    assert time.monotonic() - killed >= wait  # it waited the backoff, not less
    reply = await http.get(ready_url)
    assert (reply.status_code, reply.text) == (200, "ready\n")
    new = envoy_pid(served)
    assert new != old and alive(new) and not alive(old)
    # One Envoy serves this server, not two.
    assert envoys_running(str((served.data_dir / "envoy" / "envoy.yaml").resolve())) == [new]
    return new


async def test_a_killed_envoy_is_noticed_reported_not_ready_and_restarted(
        spawn: SpawnFactory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_ENVOY_RESTART_FIRST_SECONDS", str(FIRST_WAIT))
    async with spawn(db_url, envoy=True) as served, httpx.AsyncClient() as http:
        base = metrics_url(served)
        first = envoy_pid(served)
        await kill_envoy_and_see_it_back(served, http, f"{base}/ready", FIRST_WAIT)
        # Killed again soon after: it kept dying, so the wait doubled.
        last = await kill_envoy_and_see_it_back(served, http, f"{base}/ready", 2 * FIRST_WAIT)
        waits = re.findall(r"Envoy \(pid (\d+)\) exited with code (-?\d+) after [\d.]+ s up "
                           r"\(its log: .*envoy\.log\); restarting it in ([\d.]+) s", server_log(served))
        assert [(int(pid), int(code), float(s)) for pid, code, s in waits][:1] == [(first, -9, FIRST_WAIT)]
        assert [float(s) for _, _, s in waits] == [FIRST_WAIT, 2 * FIRST_WAIT]
        got = samples((await http.get(f"{base}/metrics")).text)
        assert got[("conveyor_envoy_restarts_total", ())] == 2
        assert got[("conveyor_ready", ())] == 1
        # The REST URL printed at start is what came back (a port of 0 was asked for).
        assert urlsplit(served.rest_url).port != 0
        # A restarted Envoy still dies with its server, even a kill -9'd one.
        served.kill()
        await served.proc.wait()

        async def gone() -> bool:
            return not alive(last)

        await wait_for(gone, "the restarted Envoy died with its server", within=5)


async def test_an_envoy_that_cannot_come_back_is_retried_with_growing_waits(
        spawn: SpawnFactory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes the REST port while Envoy is down: every restart fails, the server
    stays not ready and retries ever later (no hot loop); once the port is free it comes back."""
    # Short, to keep the test short; long enough for the test to take the port first.
    monkeypatch.setenv("CONVEYOR_ENVOY_RESTART_FIRST_SECONDS", "0.3")
    async with spawn(db_url, envoy=True) as served, httpx.AsyncClient() as http:
        ready_url = f"{metrics_url(served)}/ready"
        port = urlsplit(served.rest_url).port
        assert port
        os.kill(envoy_pid(served), signal.SIGKILL)
        # Squat on the port as soon as the dead Envoy has let it go.
        squatter = socket.socket()
        # Past any connection of the dead Envoy in TIME_WAIT; a listening socket still keeps
        # Envoy's bind out.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 2
        while True:
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed Envoy's port was never freed"
                await asyncio.sleep(0.005)
        squatter.listen()
        try:
            async def failed_twice() -> bool:
                return server_log(served).count("Envoy did not restart") >= 2

            await wait_for(failed_twice, "two failed restarts", within=10)
            reply = await http.get(ready_url)
            assert reply.status_code == 503 and "Envoy" in reply.text
        finally:
            squatter.close()
        await wait_for(lambda: rest_ok(http, served), "REST answers once the port is free", within=15)
        assert (await http.get(ready_url)).status_code == 200
        retries = [float(s) for s in re.findall(r"Envoy did not restart .*; trying again in ([\d.]+) s",
                                                server_log(served))]
        assert len(retries) >= 2
        assert retries == sorted(retries) and retries[1] == 2 * retries[0]  # growing, not spinning


async def test_a_graceful_shutdown_stops_envoy_without_restarting_it(
        spawn: SpawnFactory, db_url: str) -> None:
    async with spawn(db_url, envoy=True) as served:
        pid = envoy_pid(served)
        assert alive(pid)
        served.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await served.proc.wait() == 0
        assert not alive(pid)
        log = server_log(served)
        assert "exited with code" not in log and "Envoy restarted" not in log
        assert not (served.data_dir / "envoy" / "envoy.pid").exists()
        # Nothing else runs Envoy with this server's config.
        config = str((served.data_dir / "envoy" / "envoy.yaml").resolve())
        assert not envoys_running(config)
