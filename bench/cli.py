"""How fast the `conveyor` command answers a person at a terminal (issue 7). Targets:
`conveyor --help` < 300 ms and `conveyor runs list` < 600 ms, median of 5 runs each.

Starts `conveyor serve --no-envoy` on free ports over a fresh SQLite file in a temporary data
directory, creates a workflow and 50 runs of it (a full default page), then times the console
script as a user runs it: `--help` with its output piped, and `runs list` on a pseudo-terminal
(so the rich table is part of the figure) and piped (tab-separated). Every command is run once
untimed first, so the figures are warm-cache starts, as a person's second command is.

Run: .venv/bin/python bench/cli.py. Exits 0 whether or not the targets are met (it reports, it
does not assert), 1 if it crashed or the server did not start.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from common import run_bench, spawn_server

from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

CONVEYOR = str(Path(sys.executable).parent / "conveyor")
SAMPLES = 5
RUNS = 50
HELP_TARGET_MS = 300
LIST_TARGET_MS = 600


def timed(args: list[str], env: dict[str, str], tty: bool) -> float:
    """Seconds one command takes, its output going to a pipe or a pseudo-terminal."""
    if tty:
        primary, secondary = os.openpty()
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=secondary, stderr=subprocess.PIPE, env=env)
        os.close(secondary)
        # Drained as it comes: a table longer than the terminal's buffer must not block the child.
        while True:
            try:
                if not os.read(primary, 65536):
                    break
            except OSError:  # EIO: the child closed its side
                break
        os.close(primary)
        _, err = proc.communicate()
    else:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {err.decode()[-500:]}")
    return elapsed


def median_ms(args: list[str], env: dict[str, str], tty: bool = False) -> float:
    timed(args, env, tty)  # warm the file cache
    return statistics.median(timed(args, env, tty) for _ in range(SAMPLES)) * 1000


def line(label: str, ms: float, target: int) -> str:
    verdict = "ok" if ms < target else "MISSED"
    return f"{label:<36} median {ms:6.0f} ms   target < {target} ms   {verdict}"


def apply_workflow(env: dict[str, str], directory: Path) -> None:
    """The workflow the runs belong to, created by the command itself."""
    definition = directory / "bench-cli.json"
    definition.write_text(json.dumps({"name": "bench-cli", "steps": [
        {"ref": "build", "kind": "noop"}, {"ref": "test", "kind": "noop", "depends_on": ["build"]}]}))
    subprocess.run([CONVEYOR, "workflows", "apply", "-f", str(definition)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(env: dict[str, str]) -> None:
    print(f"conveyor command, median of {SAMPLES} (after one untimed run), {RUNS} runs listed")
    print(line("conveyor --help", median_ms([CONVEYOR, "--help"], env), HELP_TARGET_MS))
    runs_list = [CONVEYOR, "runs", "list"]
    print(line("conveyor runs list (terminal table)", median_ms(runs_list, env, tty=True), LIST_TARGET_MS))
    print(line("conveyor runs list (piped)", median_ms(runs_list, env), LIST_TARGET_MS))


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-cli-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        async with spawn_server(data_dir, envoy=False) as served:
            # The server writes its first admin key there when authentication is on.
            token_file = data_dir / "admin.token"
            token = token_file.read_text().strip() if token_file.exists() else ""
            env = {**os.environ, "CONVEYOR_ADDRESS": served.grpc_target, "CONVEYOR_TOKEN": token,
                   "XDG_CONFIG_HOME": str(Path(tmp) / "config"), "COLUMNS": "160"}
            apply_workflow(env, Path(tmp))
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            async with grpc.aio.insecure_channel(served.grpc_target) as channel:
                stub = runs_grpc.WorkflowRunsServiceStub(channel)
                for _ in range(RUNS):
                    await stub.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(workflow_id="bench-cli"),
                                                  metadata=metadata)
            measure(env)


if __name__ == "__main__":
    sys.exit(run_bench(main()))
