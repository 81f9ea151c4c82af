"""`conveyor backup FILE` (issue 15 item 5, SPEC §11): a consistent copy of a live SQLite
database while a real server keeps taking triggers; restored (a server started on the copy), it
holds every run acknowledged before the backup began, whole. And the refusals: PostgreSQL (with
the pg_dump recipe), an existing FILE without --force, no database, the database itself.

SQLite only by nature (PostgreSQL is backed up with pg_dump, which the README's recipe uses).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc
from tests.system.conftest import SpawnFactory

pytestmark = pytest.mark.sqlite_only

WORKFLOW = {"name": "backed", "steps": [
    {"ref": "a", "kind": "noop", "config": {"output": {"n": "{{ payload.n }}"}}},
    {"ref": "b", "kind": "noop", "depends_on": ["a"]},
    {"ref": "gate", "kind": "approval", "depends_on": ["b"]}]}


def backup(*args: str) -> subprocess.CompletedProcess[str]:
    """`conveyor backup ARGS` as a child process."""
    return subprocess.run([sys.executable, "-m", "conveyor.cli", "backup", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CONVEYOR_DB_URL": ""})


def path_of(db_url: str) -> Path:
    return Path(db_url.split("///", 1)[1])


async def test_a_backup_during_load_restores_every_run_acknowledged_before_it(
        spawn: SpawnFactory, db_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    acknowledged: list[tuple[str, int]] = []
    async with spawn(db_url) as served, served.channel() as channel:
        await wf_grpc.WorkflowsServiceStub(channel).CreateWorkflow(wf_pb.CreateWorkflowRequest(
            workflow=json_format.ParseDict(WORKFLOW, pb.Workflow())))
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        counter = iter(range(10**9))

        async def trigger_forever() -> None:
            while True:
                n = next(counter)
                run = await runs.TriggerWorkflowRun(runs_pb.TriggerWorkflowRunRequest(
                    workflow_id="backed", payload=json_format.ParseDict({"n": n}, struct_pb2.Struct())))
                acknowledged.append((run.id, n))

        load = [asyncio.create_task(trigger_forever()) for _ in range(8)]
        try:
            async with asyncio.timeout(60):
                while len(acknowledged) < 400:
                    assert not any(task.done() for task in load), [t.exception() for t in load if t.done()]
                    await asyncio.sleep(0.01)
            before = list(acknowledged)
            done = await asyncio.to_thread(backup, str(copy), "--db-url", db_url)
            after = len(acknowledged)
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
        assert done.returncode == 0, done.stderr
        assert "integrity check ok" in done.stdout
        # The server kept acknowledging triggers while the copy was made.
        assert after > len(before)

    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # One self-contained file: no WAL beside it holds part of the copy.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        # Consistent: no run of the copy lacks a step or an event (one snapshot, not a blend).
        assert conn.execute("SELECT count(*) FROM workflow_runs r WHERE (SELECT count(*) FROM step_runs s "
                            "WHERE s.workflow_run_id = r.id) != 3 OR NOT EXISTS (SELECT 1 FROM run_events e "
                            "WHERE e.workflow_run_id = r.id)").fetchone()[0] == 0

    # Restore: a server on the copy serves every run acknowledged before the backup, whole. (Same
    # data directory: the copy holds the first server's admin key, whose token is kept there.)
    async with spawn(f"sqlite:///{copy}") as served, served.channel() as channel:
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        steps = steps_grpc.StepRunsServiceStub(channel)
        for run_id, n in before:
            run = await runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))
            assert run.status == pb.RunStatus.running  # waiting at its gate, as acknowledged
            assert json_format.MessageToDict(run.payload) == {"n": n}
        # And it goes on where the original left off: a restored run can be approved to the end.
        run_id, n = before[0]
        await steps.ApproveStep(steps_pb.ApproveStepRequest(workflow_run_id=run_id, step_ref="gate"))
        async with asyncio.timeout(30):
            while run.status != pb.RunStatus.completed:
                await asyncio.sleep(0.05)
                run = await runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))
        assert json_format.MessageToDict(run.output)["a"] == {"n": n}
        # Runs acknowledged after the backup ended are not in it (the copy is of one moment).
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=acknowledged[-1][0]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_refusals_are_clear_and_change_nothing(db_url: str, tmp_path: Path) -> None:
    source = path_of(db_url)
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")

    done = backup(str(existing), "--db-url", db_url)
    assert done.returncode == 2 and "exists; give --force" in done.stderr and "TARGET_EXISTS" in done.stderr
    assert existing.read_bytes() == b"keep me"

    done = backup(str(tmp_path / "pg.db"), "--db-url", "postgresql://conveyor:s3cret@db.example:5432/conveyor")
    assert done.returncode == 2 and "NOT_SQLITE" in done.stderr
    assert "pg_dump -Fc" in done.stderr and "pg_restore" in done.stderr
    assert "s3cret" not in done.stderr and "postgresql://conveyor@db.example:5432/conveyor" in done.stderr
    assert not (tmp_path / "pg.db").exists()

    done = backup(str(tmp_path / "x.db"), "--db-url", f"sqlite:///{tmp_path / 'nothing.db'}")
    assert done.returncode == 2 and "NO_DATABASE" in done.stderr
    assert not (tmp_path / "nothing.db").exists() and not (tmp_path / "x.db").exists()

    before = source.read_bytes()
    done = backup(str(source), "--force", "--db-url", db_url)
    assert done.returncode == 2 and "TARGET_IS_SOURCE" in done.stderr
    assert source.read_bytes() == before

    done = backup(str(existing), "--force", "--db-url", db_url)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(existing) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    # No partial file is left beside FILE, whatever happened.
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
