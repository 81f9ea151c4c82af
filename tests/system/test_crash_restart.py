"""Durability: SIGKILL a real server mid-run and mid-trigger-burst, start another on the same
database, and check that every acknowledged run finishes with nothing lost or doubled. And its
Envoy: a SIGKILLed server takes its Envoy with it, and a server restarted on the same ports
serves REST (an Envoy left over by other means is killed on start)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.system.conftest import Served, SpawnFactory

STEPS = ["a", "wait1", "b", "wait2", "c"]
WORKFLOW = {
    "name": "crashy",
    "steps": [
        {"ref": "a", "kind": "noop"},
        {"ref": "wait1", "kind": "delay", "depends_on": ["a"], "config": {"seconds": 1}},
        {"ref": "b", "kind": "noop", "depends_on": ["wait1"]},
        {"ref": "wait2", "kind": "delay", "depends_on": ["b"], "config": {"seconds": 1}},
        {"ref": "c", "kind": "noop", "depends_on": ["wait2"]},
    ],
}


async def _all_runs(runs: Any) -> list[pb.WorkflowRun]:
    return [r async for r in runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(limit=1000))]


async def test_sigkill_mid_run_loses_and_doubles_nothing(spawn: SpawnFactory, db_url: str) -> None:
    acknowledged: list[str] = []
    async with spawn(db_url) as served, served.channel() as channel:
        workflows = wf_grpc.WorkflowsServiceStub(channel)
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        await workflows.CreateWorkflow(wf_pb.CreateWorkflowRequest(
            workflow=json_format.ParseDict(WORKFLOW, pb.Workflow())))
        for _ in range(20):
            run = await runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="crashy"))
            acknowledged.append(run.id)

        enough = asyncio.Event()

        async def trigger_forever() -> None:
            while True:
                run = await runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="crashy"))
                acknowledged.append(run.id)
                if len(acknowledged) >= 120:
                    enough.set()

        burst = [asyncio.create_task(trigger_forever()) for _ in range(16)]
        # Let the burst run and the first runs reach their durable timers, then kill the server
        # while triggers are still in flight.
        await enough.wait()
        served.kill()
        await served.proc.wait()
        results = await asyncio.gather(*burst, return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)

    async with spawn(db_url) as served, served.channel() as channel:
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        steps = steps_grpc.StepRunsServiceStub(channel)
        async with asyncio.timeout(60):
            while True:
                listed = await _all_runs(runs)
                if listed and all(r.status == pb.RunStatus.completed for r in listed):
                    break
                await asyncio.sleep(0.2)
        ids = {r.id for r in listed}
        # Every run the server acknowledged survived; a run committed in the instant before the
        # kill (never acknowledged) may exist too, and it is just as complete.
        assert set(acknowledged) <= ids
        for run_id in ids:
            request = steps_pb.ListStepRunsRequest(workflow_run_id=run_id)
            step_runs = [s async for s in steps.ListStepRuns(request)]
            assert [s.step_ref for s in step_runs] == STEPS
            assert all(s.status == pb.StepStatus.completed and s.attempt == 1 for s in step_runs)
            events = [e async for e in runs.ListRunEvents(
                runs_pb.ListRunEventsRequest(workflow_run_id=run_id, limit=1000))]
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            completed = Counter(e.step_ref for e in events if e.type == "step.completed")
            assert completed == dict.fromkeys(STEPS, 1)
            assert [e.type for e in events].count("run.completed") == 1


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids.extend(int(k) for k in (task / "children").read_text().split())
    return kids


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no ports)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_envoy(pid: int) -> bool:
    return b"envoy" in Path(f"/proc/{pid}/cmdline").read_bytes()


async def _wait_dead(pid: int, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        # Polled: Envoy is the server's child, not ours.
        while True:
            if not _alive(pid):
                return
            await asyncio.sleep(0.02)


async def _rest_lists_workflows(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=10) as http:
        answer = await http.get("/v1/workflows")
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json(), list)


async def test_sigkill_takes_envoy_along_and_a_restart_on_the_same_ports_serves_rest(
        spawn: SpawnFactory, db_url: str) -> None:
    grpc_port, http_port = _free_port(), _free_port()
    async with spawn(db_url, envoy=True, grpc_port=grpc_port, http_port=http_port) as served:
        assert served.rest_url.endswith(f":{http_port}")
        await _rest_lists_workflows(served)
        (envoy_pid,) = _children(served.proc.pid)
        assert _is_envoy(envoy_pid)
        served.kill()
        await served.proc.wait()
        try:
            # PR_SET_PDEATHSIG: the kernel kills Envoy with its server, no one has to clean up.
            await _wait_dead(envoy_pid)
        finally:
            if _alive(envoy_pid):  # the assertion failed: do not leak it past the test
                os.kill(envoy_pid, signal.SIGKILL)

    async with spawn(db_url, envoy=True, grpc_port=grpc_port, http_port=http_port) as served:
        assert served.rest_url.endswith(f":{http_port}")
        assert served.grpc_target.endswith(f":{grpc_port}")
        await _rest_lists_workflows(served)


async def test_an_envoy_left_over_in_the_data_dir_is_killed_on_start(
        spawn: SpawnFactory, db_url: str) -> None:
    http_port = _free_port()
    async with spawn(db_url, envoy=True, http_port=http_port) as served:
        data_dir = served.data_dir
    envoy_dir = data_dir / "envoy"
    assert not (envoy_dir / "envoy.pid").exists()  # a clean stop removes it
    # An Envoy that outlived its server without PDEATHSIG (e.g. started from another thread, or
    # by an older version): the real binary on the server's own config, holding the REST port.
    leftover = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "envoy"), "--config-path", str(envoy_dir / "envoy.yaml"),
        "--disable-hot-restart", "--log-level", "error",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    # An unrelated process whose pid a stale file might name is never touched.
    bystander = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", start_new_session=True)
    try:
        async with asyncio.timeout(10):
            while True:  # until the leftover holds the port
                try:
                    with socket.create_connection(("127.0.0.1", http_port), timeout=1):
                        break
                except OSError:
                    await asyncio.sleep(0.05)
        (envoy_dir / "envoy.pid").write_text(f"{leftover.pid}\n")
        async with spawn(db_url, envoy=True, http_port=http_port) as served:
            assert await leftover.wait() == -signal.SIGKILL
            await _rest_lists_workflows(served)
            (envoy_dir / "envoy.pid").write_text(f"{bystander.pid}\n")
        async with spawn(db_url, envoy=True, http_port=http_port) as served:
            await _rest_lists_workflows(served)
        assert bystander.returncode is None
    finally:
        for proc in (leftover, bystander):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
