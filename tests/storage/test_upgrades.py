"""Upgrades: a database holding data written at any earlier schema revision migrates to head
with every row intact, and the head code reads it and drives its unfinished runs to the end.

For each revision R of the Alembic history (read from the ScriptDirectory, so a new revision is
tested without touching this file): an empty database is migrated to R, filled with the rows of
tests/storage/history.py that R's schema can hold (every table at R must have rows there), then
migrated to head. The rows must read back unchanged, and an Engine over SqlStore must list the
workflows and runs, read each run's events and steps, resolve the API keys, list the audit log,
and complete the runs that were in flight: a queued task leased by a new worker, a task still
leased by a worker from before the upgrade, an approval. The latest revision also downgrades and
upgrades again with its data in place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, insert, null, select
from sqlalchemy.sql.elements import ClauseElement

from conveyor.domain.access import AuditQuery
from conveyor.domain.records import Caller, RunQuery
from conveyor.domain.states import RunStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.migrate import alembic_config, current_revision
from conveyor.storage.store import SqlStore
from tests.storage import history
from tests.storage.history import DRIVABLE, LEASED, OLD_WORKER, PROJECT, QUEUED, RUNS, WAITING, Rows

pytestmark = pytest.mark.empty_db

# Oldest first; `walk_revisions` goes from head down.
REVISIONS = [script.revision for script in
             reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))]
HEAD = REVISIONS[-1]
ADMIN = Caller("upgrade-test")


def since_for(revision: str) -> Callable[[str], bool]:
    """Whether a database at `revision` is at the given revision or later."""
    return lambda other: REVISIONS.index(revision) >= REVISIONS.index(other)


async def alembic(url: str, action: Callable[[Config], None]) -> None:
    """Run one Alembic command as storage/migrate.py runs `upgrade head`: in one transaction,
    under the database's schema-change lock."""
    database = Database(url)
    try:
        async with database.schema_change() as conn:
            await conn.run_sync(lambda sync_conn: action(alembic_config(sync_conn)))
    finally:
        await database.dispose()


async def upgrade(url: str, revision: str) -> None:
    await alembic(url, lambda config: command.upgrade(config, revision))
    assert await current_revision(url) == revision


async def downgrade(url: str, revision: str) -> None:
    await alembic(url, lambda config: command.downgrade(config, revision))
    assert await current_revision(url) == revision


async def reflect(url: str) -> MetaData:
    """The schema the database has now (not the models': those describe head only)."""
    database = Database(url)
    try:
        async with database.read() as conn:
            meta = MetaData()
            await conn.run_sync(meta.reflect)
            return meta
    finally:
        await database.dispose()


async def fill(url: str, revision: str, now: datetime) -> Rows:
    """Insert history's rows into the database at `revision`, each with the columns that exist
    there; returns what was written."""
    meta = await reflect(url)
    database = Database(url)
    data = history.rows(now, database.dialect, since_for(revision))
    tables = set(meta.tables) - {"alembic_version"}
    uncovered = sorted(t for t in tables if not data.get(t))
    assert not uncovered, f"tests/storage/history.py has no rows for {uncovered} (revision {revision})"
    written: Rows = {}
    try:
        async with database.write() as conn:
            for table in meta.sorted_tables:
                if table.name not in tables:
                    continue
                written[table.name] = [{k: v for k, v in row.items() if k in table.c}
                                       for row in data[table.name]]
                for row in written[table.name]:
                    # Python None is SQL NULL, as the models write it (a reflected JSON column
                    # would store the JSON text 'null').
                    await conn.execute(insert(table).values(
                        {k: null() if v is None else v for k, v in row.items()}))
    finally:
        await database.dispose()
    return written


def _comparable(value: Any) -> Any:
    if isinstance(value, datetime):  # SQLite gives naive UTC, PostgreSQL aware
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()
    return value


def _keyed(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps({k: _comparable(v) for k, v in row.items()}, sort_keys=True, default=str)
                  for row in rows)


async def assert_intact(url: str, written: Rows) -> None:
    """Every row written is there, every value it was given unchanged (the columns the schema
    still has; values the database computed, like a transaction id, are not compared)."""
    meta = await reflect(url)
    database = Database(url)
    try:
        async with database.read() as conn:
            for name, rows in written.items():
                table = meta.tables[name]
                columns = [c for c in rows[0] if c in table.c and not isinstance(rows[0][c], ClauseElement)]
                found = (await conn.execute(select(*(table.c[c] for c in columns)))).mappings().all()
                expected = [{c: row[c] for c in columns} for row in rows]
                assert _keyed([dict(r) for r in found]) == _keyed(expected), name
    finally:
        await database.dispose()


def narrowed(written: Rows, meta: MetaData) -> Rows:
    """The part of `written` a database with the schema `meta` holds."""
    return {name: [{k: v for k, v in row.items() if k in meta.tables[name].c} for row in rows]
            for name, rows in written.items() if name in meta.tables}


async def assert_usable(url: str, now: datetime, since: Callable[[str], bool]) -> None:
    """The head code reads everything and drives the runs that were in flight to the end."""
    database = Database(url)
    engine = Engine(SqlStore(database), Settings(db_url=url), ManualClock(now))
    try:
        workflows = await engine.workflows.list("", 100, "", False, ADMIN)
        assert sorted(w.name for w in workflows.items) == ["nightly", "work"]
        work = await engine.workflows.get("work", PROJECT, ADMIN)
        assert (work.version, [s.ref for s in work.spec.steps]) == (3, ["t", "ok"])
        assert len((await engine.workflows.versions("work", PROJECT, 10, "", ADMIN)).items) == 3
        assert bool(work.spec.notifications) == since("0005")
        nightly = await engine.workflows.get("nightly", PROJECT, ADMIN)
        assert nightly.spec.schedule is not None and nightly.spec.schedule.timezone == "Europe/Paris"
        assert nightly.schedule_paused == since("0003")
        assert nightly.webhook_enabled == since("0004")

        listed = await engine.runs.list(RunQuery(), 100, "", ADMIN)
        assert sorted(r.id for r in listed.items) == sorted(RUNS)
        failed = await engine.runs.list(RunQuery(statuses=[RunStatus.FAILED]), 100, "", ADMIN)
        assert [r.id for r in failed.items] == [history.FAILED]
        tagged = await engine.runs.list(RunQuery(tags=[("env", "prod")]), 100, "", ADMIN)
        assert [r.id for r in tagged.items] == [history.COMPLETED]
        for run_id in RUNS:
            run = await engine.runs.get(run_id, ADMIN)
            events = (await engine.runs.events(run_id, 0, 100, "", ADMIN)).items
            assert [e.seq for e in events] == list(range(1, run.last_seq + 1))
            assert (await engine.steps.list(run_id, 100, "", ADMIN)).items
        completed = await engine.runs.get(history.COMPLETED, ADMIN)
        assert (completed.status, completed.output, completed.tags) == (
            RunStatus.COMPLETED, {"t": {"rows": 17}}, history.TAGS)

        key = await engine.keys.resolve(history.KEY_TOKEN)
        assert key is not None and (key.name, key.project_id) == ("ci", PROJECT)
        assert await engine.keys.resolve("cvk_upgrade-test-old") is None  # revoked stays revoked
        if since("0004"):
            audit = await engine.audit.list(ADMIN, AuditQuery(), 10, "")
            assert len(audit.items) == 3

        # In flight at the upgrade: a new worker takes the queued task (not the paused run's),
        # the worker from before the upgrade reports its lease, a person approves.
        (lease,) = await engine.leases.acquire("q", "worker-after-upgrade", 60, 10, ADMIN)
        assert lease.run.id == QUEUED
        await engine.leases.complete(lease.step.id, lease.step.attempt, "worker-after-upgrade",
                                     {"done": "after"}, ADMIN)
        (held,) = [s for s in (await engine.steps.list(LEASED, 10, "", ADMIN)).items if s.step_ref == "t"]
        await engine.leases.complete(held.id, held.attempt, OLD_WORKER, {"done": "across"}, ADMIN)
        await engine.steps.approve(WAITING, "ok", "fine", ADMIN)
        await engine.tick()
        for run_id in DRIVABLE:
            assert (await engine.runs.get(run_id, ADMIN)).status == RunStatus.COMPLETED, run_id
        assert (await engine.runs.get(history.PAUSED, ADMIN)).status == RunStatus.PAUSED
    finally:
        await engine.stop()
        await database.dispose()


def test_the_history_is_every_revision_oldest_first() -> None:
    assert REVISIONS[0] == "0001" and len(REVISIONS) >= 7
    assert sorted(REVISIONS) == REVISIONS


@pytest.mark.parametrize("revision", REVISIONS)
async def test_data_written_at_a_revision_is_intact_and_usable_at_head(db_url: str, revision: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await upgrade(db_url, revision)
    written = await fill(db_url, revision, now)

    await upgrade(db_url, HEAD)

    await assert_intact(db_url, written)
    await assert_usable(db_url, now, since_for(revision))


async def test_the_latest_revision_downgrades_and_upgrades_again_with_its_data(db_url: str) -> None:
    previous = REVISIONS[-2]
    now = datetime.now(UTC).replace(microsecond=0)
    await upgrade(db_url, HEAD)
    written = await fill(db_url, HEAD, now)

    await downgrade(db_url, previous)
    kept = narrowed(written, await reflect(db_url))
    await assert_intact(db_url, kept)
    await upgrade(db_url, HEAD)

    # What the latest revision added comes back with its defaults; everything else as written.
    await assert_intact(db_url, kept)
    await assert_usable(db_url, now, since_for(previous))
