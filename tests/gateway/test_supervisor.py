"""The restart policy of gateway/supervisor.py, driven by an injected clock and sleeper: the
waits between restarts grow to the cap for an Envoy that keeps dying and start over for one that
stayed up; failed restarts are retried; a stopped supervisor restarts nothing. (That a real
Envoy killed under a real server comes back: tests/system/test_envoy_supervision.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.gateway.supervisor import EnvoySupervisor, RestartBackoff

DOWN = "Envoy (REST) is down, restarting it"


def test_the_backoff_doubles_up_to_the_cap_and_starts_over_after_a_long_run() -> None:
    backoff = RestartBackoff(first=0.1, cap=10.0, reset_after=30.0)
    waits = [backoff.delay(uptime=1.0) for _ in range(10)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert backoff.delay(uptime=29.9) == 10.0  # not quite long enough: still at the cap
    assert backoff.delay(uptime=30.0) == pytest.approx(0.1)
    assert backoff.delay(uptime=0.0) == pytest.approx(0.2)


@pytest.mark.parametrize(("first", "cap", "reset_after"),
                         [(0, 10, 30), (-1, 10, 30), (5, 1, 30), (0.1, 10, 0)])
def test_a_backoff_that_could_spin_or_never_grow_is_refused(first: float, cap: float,
                                                            reset_after: float) -> None:
    with pytest.raises(ValueError, match="restart backoff"):
        RestartBackoff(first, cap, reset_after)


class Clock:
    """Monotonic seconds that move only when the test's sleeper or gateway moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedGateway:
    """Stands in for EnvoyGateway: each run lasts `uptimes[i]` seconds of the clock and then
    exits (code -9); once the script is over it runs until the test ends. `failures` restarts
    fail before one succeeds. Records what the supervisor saw at each step."""

    def __init__(self, clock: Clock, uptimes: list[float], failures: int = 0) -> None:
        self.clock = clock
        self.uptimes = list(uptimes)
        self.failures = failures
        self.restarts = 0
        self.running = True
        self.runs_forever = asyncio.Event()  # set when the script is over
        self.events: list[str] = []

    @property
    def pid(self) -> int | None:
        return 4000 + self.restarts if self.running else None

    @property
    def log_path(self) -> Path:
        return Path("/nonexistent/envoy.log")

    async def wait(self) -> int:
        if not self.uptimes:
            self.runs_forever.set()
            await asyncio.Future()  # never exits again
        self.clock.now += self.uptimes.pop(0)
        self.running = False
        self.events.append("exit")
        return -9

    async def restart(self) -> None:
        assert not self.running, "restarted while running"
        if self.failures:
            self.failures -= 1
            self.events.append("failed")
            raise RuntimeError("Envoy exited with code 1 during start\nerror: address in use")
        self.restarts += 1
        self.running = True
        self.events.append("restarted")


def supervise(gateway: ScriptedGateway, clock: Clock, reports: list[str | None],
              sleeps: list[float], backoff: RestartBackoff | None = None) -> EnvoySupervisor:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        gateway.events.append(f"sleep {seconds:g}")
        clock.now += seconds

    def report(reason: str | None) -> None:
        reports.append(reason)
        gateway.events.append("down" if reason else "up")

    return EnvoySupervisor(gateway, backoff or RestartBackoff(first=0.1, cap=10.0, reset_after=30.0),
                           report=report, clock=clock, sleep=sleep)


async def run_script(gateway: ScriptedGateway, supervisor: EnvoySupervisor) -> None:
    supervisor.start()
    async with asyncio.timeout(5):
        await gateway.runs_forever.wait()
    await supervisor.stop()


async def test_an_envoy_that_keeps_dying_is_restarted_with_growing_waits_not_in_a_loop() -> None:
    clock, reports, sleeps = Clock(), list[str | None](), list[float]()
    gateway = ScriptedGateway(clock, uptimes=[0.05] * 10)
    await run_script(gateway, supervise(gateway, clock, reports, sleeps))
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert gateway.restarts == 10
    # Not ready from each exit until its restart has succeeded, ready again after.
    assert reports == [DOWN, None] * 10
    assert gateway.events[:4] == ["exit", "down", "sleep 0.1", "restarted"]


async def test_an_envoy_that_stayed_up_a_while_is_restarted_after_the_first_wait_again() -> None:
    clock, reports, sleeps = Clock(), list[str | None](), list[float]()
    gateway = ScriptedGateway(clock, uptimes=[1.0, 1.0, 1.0, 45.0, 1.0, 3600.0])
    await run_script(gateway, supervise(gateway, clock, reports, sleeps))
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.1, 0.2, 0.1])


async def test_a_failed_restart_is_retried_after_the_next_wait_and_stays_not_ready() -> None:
    clock, reports, sleeps = Clock(), list[str | None](), list[float]()
    gateway = ScriptedGateway(clock, uptimes=[5.0], failures=3)
    await run_script(gateway, supervise(gateway, clock, reports, sleeps))
    assert gateway.events == ["exit", "down", "sleep 0.1", "failed", "sleep 0.2", "failed",
                              "sleep 0.4", "failed", "sleep 0.8", "restarted", "up"]
    assert reports == [DOWN, None]


async def test_a_stopped_supervisor_restarts_nothing() -> None:
    """The graceful shutdown stops the supervisor before Envoy: while it waits to restart, or
    while Envoy runs, stopping it ends the supervision and nothing is started again."""
    clock, reports = Clock(), list[str | None]()
    gateway = ScriptedGateway(clock, uptimes=[1.0])
    sleeping = asyncio.Event()

    async def sleep_long(seconds: float) -> None:
        sleeping.set()
        await asyncio.Future()  # the wait before the restart never ends by itself

    supervisor = EnvoySupervisor(gateway, RestartBackoff(0.1, 10.0, 30.0), report=reports.append,
                                 clock=clock, sleep=sleep_long)
    supervisor.start()
    async with asyncio.timeout(5):
        await sleeping.wait()
    await supervisor.stop()
    assert gateway.restarts == 0 and gateway.events == ["exit"]
    assert reports == [DOWN]
    await supervisor.stop()  # idempotent

    running = ScriptedGateway(clock, uptimes=[])
    supervisor = EnvoySupervisor(running, RestartBackoff(0.1, 10.0, 30.0), report=reports.append,
                                 clock=clock, sleep=sleep_long)
    supervisor.start()
    async with asyncio.timeout(5):
        await running.runs_forever.wait()
    await supervisor.stop()
    assert running.events == [] and running.restarts == 0
