"""Keeps the server's Envoy running: when it exits while the server runs (a crash, a kill -9, an
OOM kill), the supervisor notices at once, says so, and restarts it with exponential backoff.

The supervisor waits on the Envoy process itself (``EnvoyGateway.wait``), so an exit is seen the
moment the kernel reports it, not at the next poll. From then until the restarted Envoy is ready
the server is not ready: ``report(reason)`` is called with why, and ``report(None)`` once REST is
served again (the wiring makes that the answer of ``/ready``). The restart keeps Envoy's REST
port, so clients keep their URL.

The waits before restarts follow ``RestartBackoff``: ``first`` seconds, doubling after every exit
or failed restart up to ``cap``, and back to ``first`` once an Envoy has stayed up ``reset_after``
seconds. An Envoy that dies at once on every start (its port taken, a broken binary) is thus
retried every ``cap`` seconds, never in a hot loop, and retried for as long as the server runs:
the cause may go away, and ``/ready`` tells the orchestrator meanwhile.

A graceful shutdown stops the supervisor before Envoy (``App.stop``), so Envoy's planned exit is
never taken for a crash. Clock and sleep are injected, so tests drive the policy without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from conveyor.engine.background import Background

log = logging.getLogger(__name__)


class Supervised(Protocol):
    """What the supervisor needs of a gateway (``EnvoyGateway``)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    async def wait(self) -> int: ...

    async def restart(self) -> None: ...


class RestartBackoff:
    """The wait before each restart of a process that keeps exiting."""

    def __init__(self, first: float, cap: float, reset_after: float) -> None:
        if first <= 0 or cap < first or reset_after <= 0:
            raise ValueError(f"restart backoff needs 0 < first <= cap and reset_after > 0, "
                             f"not first={first}, cap={cap}, reset_after={reset_after}")
        self.first = first
        self.cap = cap
        self.reset_after = reset_after
        self._next = first

    def delay(self, uptime: float) -> float:
        """The wait before restarting a process that ran `uptime` seconds before it exited (0 for a
        start that failed): `first` after a run of at least `reset_after`, else the previous wait
        doubled, at most `cap`."""
        if uptime >= self.reset_after:
            self._next = self.first
        delay = self._next
        self._next = min(self.cap, delay * 2)
        return delay


class EnvoySupervisor:
    """Restarts a started gateway whenever it exits, until `stop`."""

    def __init__(self, gateway: Supervised, backoff: RestartBackoff,
                 report: Callable[[str | None], None], on_restart: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._gateway = gateway
        self._backoff = backoff
        self._report = report
        self._on_restart = on_restart
        self._clock = clock
        self._sleep = sleep
        self._background = Background("conveyor-envoy-supervisor", self._loop)

    def start(self) -> None:
        """Supervise the gateway, which is running now."""
        self._background.start()

    async def stop(self) -> None:
        """Stop supervising (before the gateway is stopped: its exit is then no crash)."""
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            started = self._clock()
            pid = self._gateway.pid
            code = await self._gateway.wait()
            uptime = self._clock() - started
            self._report("Envoy (REST) is down, restarting it")
            delay = self._backoff.delay(uptime)
            log.error("Envoy (pid %s) exited with code %d after %.1f s up (its log: %s); "
                      "restarting it in %.1f s", pid, code, uptime, self._gateway.log_path, delay)
            await self._restart(delay)
            self._on_restart()
            self._report(None)
            log.warning("Envoy restarted (pid %s); REST is served again", self._gateway.pid)

    async def _restart(self, delay: float) -> None:
        """Sleep `delay`, restart; after a failed restart wait the next delay and try again."""
        while True:
            await self._sleep(delay)
            try:
                await self._gateway.restart()
                return
            except Exception as e:  # whatever stops a start (port taken, binary gone): retried
                delay = self._backoff.delay(0.0)
                log.error("Envoy did not restart (%s; its log: %s); trying again in %.1f s",
                          next(iter(str(e).splitlines()), ""), self._gateway.log_path, delay)
