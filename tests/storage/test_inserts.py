"""New runs, steps and events written by `insert_runs` read back exactly as given, and their
times compare with times SQLAlchemy binds (on SQLite they go to the driver as converted tuples)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert

from conveyor.domain.errors import DuplicateKey
from conveyor.domain.records import EventRecord, RunRecord, StepRecord, WorkflowRecord
from conveyor.domain.spec import parse_workflow
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.storage.db import Database
from conveyor.storage.repository import events_t
from conveyor.storage.store import SqlStore

# A time with microseconds in another zone: stored as UTC, read back as the same instant.
AT = datetime(2026, 3, 1, 13, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1)))


async def test_inserted_rows_read_back_as_given(database: Database) -> None:
    store = SqlStore(database)
    spec = parse_workflow({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]})
    wf = WorkflowRecord(id="00000000-0000-7000-8000-000000000001", project_id="p", name="w", version=1,
                        version_id="00000000-0000-7000-8000-000000000002", spec=spec, created_by="t",
                        created_at=AT, updated_at=AT)
    run = RunRecord(id="00000000-0000-7000-8000-000000000003", project_id="p", workflow_id=wf.id,
                    workflow_name="w", workflow_version=1, workflow_version_id=wf.version_id,
                    status=RunStatus.RUNNING, created_at=AT, updated_at=AT,
                    payload={"ünï": ["ç", 1.5, None, {"deep": True}], "quote": "a\"b"}, tags={"k": "v"},
                    wake_at=AT + timedelta(microseconds=1), expires_at=None, last_seq=1)
    step = StepRecord(id="00000000-0000-7000-8000-000000000004", workflow_run_id=run.id, project_id="p",
                      position=0, step_ref="a", workflow_step_id="v/a", kind="noop",
                      status=StepStatus.COMPLETED, created_at=AT, updated_at=AT, output={"x": "é"},
                      input=None, started_at=AT, finished_at=AT)
    event = EventRecord(workflow_run_id=run.id, seq=1, project_id="p", type="run.running", at=AT,
                        status="running", data={"n": 1})
    async with store.write() as repo:
        await repo.insert_workflow(wf, 0)
        await repo.insert_runs([run], [step], [event], [])
        # An event inserted the ordinary SQLAlchemy way beside it, to compare storage forms.
        await repo.conn.execute(insert(events_t), [{
            "workflow_run_id": run.id, "seq": 2, "project_id": "p", "type": "x", "at": AT,
            "step_ref": "", "status": "", "message": "", "data": None, "actor": ""}])
    async with store.read() as repo:
        got = await repo.get_run(run.id, None)
        steps = (await repo.steps_of([run.id]))[run.id]
        events = (await repo.list_events(run.id, 0, 10, "")).items
    async with store.write() as repo:  # claiming locks rows on PostgreSQL: a write unit
        due = await repo.claim_due_runs(AT + timedelta(microseconds=1), 10)
        not_yet = await repo.claim_due_runs(AT, 10)
    assert got == run and got.wake_at == AT.astimezone(UTC) + timedelta(microseconds=1)
    assert steps == [step] and steps[0].input is None
    assert events[0] == event and events[1].at == events[0].at
    assert [r.id for r in due] == [run.id] and not_yet == []


async def test_an_idempotency_key_recorded_first_elsewhere_is_duplicate_key(database: Database) -> None:
    """The insert path reports a key another writer recorded first as the domain's DuplicateKey
    (on SQLite the rows go straight to the driver, whose own IntegrityError must not leak)."""
    store = SqlStore(database)
    record = {"project_id": "p", "workflow_id": "w", "key": "k", "request_hash": "h", "run_id": "r",
              "expires_at": AT}
    async with store.write() as repo:
        await repo.insert_runs([], [], [], [record])
    with pytest.raises(DuplicateKey):
        async with store.write() as repo:
            await repo.insert_runs([], [], [], [dict(record, run_id="r2")])
    async with store.read() as repo:
        assert await repo.idempotency_lookup([("p", "w", "k")], AT - timedelta(seconds=1)) == {
            ("p", "w", "k"): ("h", "r")}
