"""Fixtures of the SDK tests: real processes all the way.

- `server`: `conveyor serve --no-envoy` as a child process on a fixed free port over the test
  database, so a test can SIGKILL it and start another where workers will find it again.
- `workers`: start `conveyor worker tests.sdk.handlers:worker` processes (the SDK as users run
  it) that write a shared JSON-lines ledger.
- `client`: gRPC stubs to create workflows, trigger, inspect and cancel runs, and poll for a
  condition with a deadline (real processes, real time: there is no clock to tick).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.auth import bearer_interceptors
from tests.processes import WorkerProc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def eventually(probe: Callable[[], Any], within: float = 15.0, interval: float = 0.05,
                     what: str = "condition") -> Any:
    """Poll `probe` (sync or async) until it returns something truthy (at most `within` s); that value."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Server:
    """A `conveyor serve` child process on a fixed port; restartable over the same database."""

    db_url: str
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The admin token the server wrote on its first start over this data directory."""
        return (self.data_dir / "admin.token").read_text().strip()

    async def start(self) -> None:
        args = [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", str(self.port), "--no-envoy",
                "--db-url", self.db_url, "--data-dir", str(self.data_dir)]
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
                if re.search(r"gRPC on (\S+)", line):
                    break

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            if self.proc is not None:
                await self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def server(db_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    s = Server(db_url=db_url, data_dir=tmp_path / "data", log_path=tmp_path / "server.log")
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


class Ledger:
    """The JSON lines the test handlers write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, **match: Any) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if all(r.get(k) == v for k, v in match.items())]

    async def wait(self, within: float = 15.0, **match: Any) -> dict[str, Any]:
        rows: list[dict[str, Any]] = await eventually(lambda: self.entries(**match), within,
                                                      what=f"ledger entry {match}")
        return rows[0]


WorkerFactory = Callable[..., Any]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.jsonl")


@pytest.fixture
async def workers(server: Server, ledger: Ledger, tmp_path: Path) -> AsyncIterator[WorkerFactory]:
    """``await workers(lease=2, grace=1)``: start a worker process against `server`."""
    started: list[WorkerProc] = []

    async def start(lease: int = 30, grace: float = 5.0, slots: int = 8,
                    spec: str = "tests.sdk.handlers:worker", extra_args: tuple[str, ...] = ()) -> WorkerProc:
        log_path = tmp_path / f"worker-{len(started)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_API_KEY": server.token,
               "SDK_LEDGER": str(ledger.path), "SDK_LEASE": str(lease),
               "SDK_GRACE": str(grace), "SDK_SLOTS": str(slots)}
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor.cli", "worker", spec, "--target", server.target, *extra_args,
                stdout=log, stderr=log, cwd=REPO, env=env)
        w = WorkerProc(proc, log_path)
        started.append(w)
        # Serving once it logs so (its streams open right after).
        await eventually(lambda: "serving" in w.log() or proc.returncode is not None, START_TIMEOUT,
                         what="the worker to start")
        # It served (one that leased a task which kills its worker may be gone already).
        assert "serving" in w.log(), w.log()
        return w

    try:
        yield start
    finally:
        for w in started:
            if w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()


@dataclass
class Client:
    """gRPC stubs over one channel plus the few calls the tests make."""

    channel: grpc.aio.Channel
    workflows: Any = None
    runs: Any = None
    steps_stub: Any = None

    def __post_init__(self) -> None:
        self.workflows = wf_grpc.WorkflowsServiceStub(self.channel)
        self.runs = runs_grpc.WorkflowRunsServiceStub(self.channel)
        self.steps_stub = steps_grpc.StepRunsServiceStub(self.channel)

    async def create_workflow(self, definition: dict[str, Any]) -> None:
        await self.workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(
            workflow=json_format.ParseDict(definition, pb.Workflow())))

    async def trigger(self, workflow: str, payload: dict[str, Any] | None = None) -> str:
        request = json_format.ParseDict({"workflow_id": workflow, "payload": payload or {}},
                                        runs_pb.TriggerWorkflowRunRequest())
        run = await self.runs.TriggerWorkflowRun(request)
        run_id: str = run.id
        return run_id

    async def run(self, run_id: str) -> dict[str, Any]:
        run = await self.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))
        return _as_dict(run)

    async def steps(self, run_id: str) -> dict[str, dict[str, Any]]:
        rows = [_as_dict(s) async for s in self.steps_stub.ListStepRuns(
            steps_pb.ListStepRunsRequest(workflow_run_id=run_id, limit=1000))]
        return {r["step_ref"]: r for r in rows}

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        return [_as_dict(e) async for e in self.runs.ListRunEvents(
            runs_pb.ListRunEventsRequest(workflow_run_id=run_id, limit=1000))]

    async def cancel(self, run_id: str) -> None:
        await self.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=run_id))

    async def wait_run(self, run_id: str, *statuses: str, within: float = 20.0) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            run = await self.run(run_id)
            return run if run["status"] in statuses else None

        try:
            result: dict[str, Any] = await eventually(probe, within, what=f"run {run_id} to be {statuses}")
        except AssertionError:
            raise AssertionError(f"run not {statuses}: {await self.run(run_id)}\n"
                                 f"steps: {await self.steps(run_id)}") from None
        return result


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    # The channel reconnects by itself after a restart of the server on the same port.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
    async with grpc.aio.insecure_channel(server.target, interceptors=bearer_interceptors(server.token),
                                         options=options) as channel:
        yield Client(channel)


def task_step(ref: str, queue: str, config: dict[str, Any], depends_on: tuple[str, ...] = (),
              max_attempts: int = 1, interval: float = 0.1, **extra: Any) -> dict[str, Any]:
    """A `task` step of a test workflow (quick retries by default)."""
    return {"ref": ref, "kind": "task", "queue": queue, "config": config, "depends_on": list(depends_on),
            "retry": {"max_attempts": max_attempts, "initial_interval_seconds": interval,
                      "backoff_coefficient": 1}, **extra}
