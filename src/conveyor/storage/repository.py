"""Repository: every SQL statement the engine and API need, on one AsyncConnection inside a
transaction opened by `Database.read()` / `Database.write()`.

Rows become domain records here and records become rows here; nothing above sees SQLAlchemy.
Every query that a client can reach is scoped by project (`project` = None means the caller
may see all projects). Dialect differences live here and in db.py only.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.domain.changes import Changes
from conveyor.domain.concurrency import Caps, Waiter
from conveyor.domain.errors import (
    ConcurrentChange,
    ConveyorError,
    DuplicateKey,
    ErrorKind,
    FieldViolation,
    invalid,
    not_found,
)
from conveyor.domain.event_waits import wait_changes
from conveyor.domain.feed import Key, keys_of
from conveyor.domain.records import (
    EventRecord,
    Page,
    RunFence,
    RunQuery,
    RunRecord,
    StepFence,
    StepRecord,
    WorkflowRecord,
)
from conveyor.domain.spec import WorkflowSpec
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.storage.access import AccessStatements
from conveyor.storage.db import json_text
from conveyor.storage.event_waits import EventWaitStatements
from conveyor.storage.events import EventStatements
from conveyor.storage.feed import CHANNEL, payloads
from conveyor.storage.models import (
    IdempotencyRow,
    RunEventRow,
    RunRow,
    RunTagRow,
    RunWakeupRow,
    StepRunRow,
    UTCDateTime,
    WorkflowRow,
    WorkflowVersionRow,
)
from conveyor.storage.notifications import NotificationStatements, outbox_of_new_runs, outbox_of_units
from conveyor.storage.paging import cursor_time, decode_cursor, encode_cursor, page_size
from conveyor.storage.retention import RetentionStatements
from conveyor.storage.run_changes import RunChangeStatements, status_changes
from conveyor.storage.secrets import SecretStatements
from conveyor.storage.versions import VersionStatements

# At most this many workflows may match a run list's `search` (their ids are bound parameters).
MAX_SEARCHED_WORKFLOWS = 10_000

# Declarative __table__ is typed as a FromClause; these are Tables.
runs_t = cast(Table, RunRow.__table__)
steps_t = cast(Table, StepRunRow.__table__)
events_t = cast(Table, RunEventRow.__table__)
tags_t = cast(Table, RunTagRow.__table__)
wf_t = cast(Table, WorkflowRow.__table__)
ver_t = cast(Table, WorkflowVersionRow.__table__)
idem_t = cast(Table, IdempotencyRow.__table__)
wakeups_t = cast(Table, RunWakeupRow.__table__)

_RUN_FIELDS = [f.name for f in fields(RunRecord) if f.name != "fence"]
_STEP_FIELDS = [f.name for f in fields(StepRecord) if f.name != "fence"]
_EVENT_FIELDS = [f.name for f in fields(EventRecord)]
# Columns a unit of work may change on existing rows (everything else is fixed at insert).
_RUN_MUTABLE = ["status", "status_message", "error", "output", "wake_at", "last_seq",
                "started_at", "finished_at", "updated_at", "max_parallel_steps", "expires_at"]
_STEP_MUTABLE = ["status", "attempt", "deps_completed", "input", "output", "error", "skip_reason",
                 "approved_by", "worker_id", "job_run_id", "ready_at", "due_at", "lease_expires_at",
                 "started_at", "finished_at", "updated_at", "losses", "loss_streak"]

# Runs a wake-up signal is still news to (a final run has nothing left to do).
_LIVE_RUN = [str(RunStatus.PENDING), str(RunStatus.RUNNING), str(RunStatus.PAUSED)]

# The run columns in RunRecord's field order (its last field, fence, is no column): a row selected
# as these is RunRecord's positional arguments, built without a lookup by name per column.
_RUN_COLUMNS = [runs_t.c[k] for k in _RUN_FIELDS]
# list_runs' statement before its filters, built once (a select coerces each column it is given).
_LIST_RUNS = select(*_RUN_COLUMNS)


def run_from_row(m: Any, positional: bool = False) -> RunRecord:
    """A run from a row mapping of workflow_runs, or (`positional`) a row selected as `_RUN_COLUMNS`."""
    rec = RunRecord(*m) if positional else RunRecord(**{k: m[k] for k in _RUN_FIELDS})
    rec.status = status = RunStatus(rec.status)
    rec.fence = RunFence(status, rec.last_seq)
    return rec


def step_from_row(m: Any) -> StepRecord:
    rec = StepRecord(**{k: m[k] for k in _STEP_FIELDS})
    rec.status = StepStatus(rec.status)
    rec.fence = StepFence(rec.status, rec.attempt, rec.lease_expires_at)
    return rec


def _run_record(row: list[Any]) -> RunRecord:
    """A run from its converted columns in RunRecord's field order (the SQLite fast path)."""
    rec = RunRecord(*row)
    rec.status = status = RunStatus(rec.status)
    rec.fence = RunFence(status, rec.last_seq)
    return rec


def _step_record(row: list[Any]) -> StepRecord:
    """A step from its converted columns in StepRecord's field order (the SQLite fast path)."""
    rec = StepRecord(*row)
    rec.status = StepStatus(rec.status)
    rec.fence = StepFence(rec.status, rec.attempt, rec.lease_expires_at)
    return rec


def event_from_row(m: Any) -> EventRecord:
    return EventRecord(**{k: m[k] for k in _EVENT_FIELDS})


def _row(rec: object, names: Iterable[str]) -> dict[str, Any]:
    return {k: getattr(rec, k) for k in names}


def _sqlite_time(value: datetime | None) -> str | None:
    """A datetime as SQLite stores it (naive UTC, SQLAlchemy's DATETIME format), so values
    written here compare as strings with those SQLAlchemy binds."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_json(value: Any) -> str | None:
    return None if value is None else json_text(value)


@functools.cache
def _sqlite_insert(table: Table, names: tuple[str, ...]) -> tuple[str, list[Any]]:
    """The INSERT statement of these columns and each column's value converter (None: as is;
    sqlite3 binds str subclasses such as the status enums as text)."""
    columns = ", ".join(f'"{n}"' for n in names)
    return (f"INSERT INTO {table.name} ({columns}) VALUES ({', '.join('?' * len(names))})",
            [_sqlite_converter(table, n) for n in names])


def _sqlite_converter(table: Table, name: str, read: bool = False) -> Any:
    """How a value of this column is bound on SQLite, or (`read`) read back (None: as is)."""
    kind = table.c[name].type
    if isinstance(kind, UTCDateTime):
        return _time_from_sqlite if read else _sqlite_time
    if isinstance(kind, JSON):
        return _json_from_sqlite if read else _sqlite_json
    return None


@functools.cache
def _sqlite_cas(table: Table, cols: tuple[str, ...],
                fence: tuple[str, ...]) -> tuple[str, list[Any], list[Any]]:
    """The compare-and-set UPDATE of these columns with this fence (`IS`: null-safe), and the
    converters of the set values and of the fence values."""
    sets = ", ".join(f'"{c}" = ?' for c in cols)
    fences = "".join(f' AND "{f}" IS ?' for f in fence)
    return (f'UPDATE {table.name} SET {sets} WHERE "id" = ? AND "status" = ?{fences}',
            [_sqlite_converter(table, c) for c in cols], [_sqlite_converter(table, f) for f in fence])


_MISSING: Any = object()


def _time_from_sqlite(text: str | None) -> datetime | None:
    """A stored time back as an aware UTC datetime (the C parser: no regex per value)."""
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


def _json_from_sqlite(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@functools.cache
def _sqlite_select(table: Table, names: tuple[str, ...], where: str) -> tuple[str, list[Any]]:
    """A SELECT of these columns with a `where` clause, and each column's result converter."""
    columns = ", ".join(f'"{n}"' for n in names)
    return (f"SELECT {columns} FROM {table.name} WHERE {where}",
            [_sqlite_converter(table, n, read=True) for n in names])


Q = TypeVar("Q", bound=Select[Any])


class Repository(AccessStatements, EventStatements, EventWaitStatements, NotificationStatements,
                 RunChangeStatements, RetentionStatements, SecretStatements, VersionStatements):
    """Statements over one connection; the caller owns the transaction."""

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    def _lock(self, stmt: Q, skip_locked: bool = False, key_share: bool = False) -> Q:
        # Row locks serialize writers of one run across replicas on PostgreSQL; SQLite writers
        # already hold the database lock (BEGIN IMMEDIATE), and SQLAlchemy would drop the clause.
        # `key_share`: FOR NO KEY UPDATE, which does not conflict with the key-share locks that
        # inserting rows referring to the locked one takes (a new run of a workflow).
        if self.dialect == "postgresql":
            return stmt.with_for_update(skip_locked=skip_locked, key_share=key_share)
        return stmt

    # -- workflows --------------------------------------------------------------------------

    async def insert_workflow(self, wf: WorkflowRecord, max_concurrent_runs: int) -> None:
        try:
            await self.conn.execute(insert(wf_t).values(
                id=wf.id, project_id=wf.project_id, name=wf.name, description=wf.spec.description,
                current_version=wf.version, current_version_id=wf.version_id,
                max_concurrent_runs=max_concurrent_runs, concurrency_max_runs=wf.spec.caps.per_key,
                retention_days=wf.spec.retention_days,
                created_by=wf.created_by,
                created_at=wf.created_at, updated_at=wf.updated_at,
                cron=wf.spec.schedule.cron if wf.spec.schedule else None,
                cron_timezone=wf.spec.schedule.timezone if wf.spec.schedule else None,
                next_fire_at=wf.next_fire_at, schedule_paused=wf.schedule_paused))
        except IntegrityError as e:
            raise ConveyorError(ErrorKind.ALREADY_EXISTS, "WORKFLOW_ALREADY_EXISTS",
                                f"workflow {wf.name!r} already exists in project {wf.project_id!r}") from e
        await self.insert_version(wf)

    async def insert_version(self, wf: WorkflowRecord) -> None:
        await self.conn.execute(insert(ver_t).values(
            id=wf.version_id, workflow_id=wf.id, project_id=wf.project_id, version=wf.version,
            spec=wf.spec.to_dict(), created_at=wf.updated_at))

    async def set_current_version(self, wf: WorkflowRecord) -> None:
        await self.conn.execute(update(wf_t).where(wf_t.c.id == wf.id).values(
            current_version=wf.version, current_version_id=wf.version_id,
            description=wf.spec.description, max_concurrent_runs=wf.spec.max_concurrent_runs,
            concurrency_max_runs=wf.spec.caps.per_key, retention_days=wf.spec.retention_days,
            cron=wf.spec.schedule.cron if wf.spec.schedule else None,
            cron_timezone=wf.spec.schedule.timezone if wf.spec.schedule else None,
            next_fire_at=wf.next_fire_at, schedule_paused=wf.schedule_paused,
            updated_at=wf.updated_at))

    async def set_webhook(self, workflow_id: str, token_hash: str | None, hint: str,
                          at: datetime | None) -> None:
        """Enable the workflow's webhook with a new token hash, or disable it (None)."""
        await self.conn.execute(update(wf_t).where(wf_t.c.id == workflow_id).values(
            webhook_hash=token_hash, webhook_hint=hint, webhook_rotated_at=at))

    async def workflow_by_webhook(self, token_hash: str) -> WorkflowRecord | None:
        m = (await self.conn.execute(
            self._workflow_select().where(wf_t.c.webhook_hash == token_hash))).mappings().first()
        return None if m is None else self._workflow_from_row(m)

    async def archive_workflow(self, workflow_id: str, now: datetime) -> None:
        await self.conn.execute(update(wf_t).where(wf_t.c.id == workflow_id, wf_t.c.archived_at.is_(None))
                                .values(archived_at=now, updated_at=now, next_fire_at=None))

    def _workflow_select(self) -> Select[Any]:
        return select(wf_t, ver_t.c.spec).join(ver_t, ver_t.c.id == wf_t.c.current_version_id)

    @staticmethod
    def _workflow_from_row(m: Any) -> WorkflowRecord:
        return WorkflowRecord(
            id=m["id"], project_id=m["project_id"], name=m["name"], version=m["current_version"],
            version_id=m["current_version_id"], spec=WorkflowSpec.from_dict(m["spec"]),
            created_by=m["created_by"], created_at=m["created_at"], updated_at=m["updated_at"],
            archived_at=m["archived_at"], next_fire_at=m["next_fire_at"],
            schedule_paused=m["schedule_paused"], webhook_enabled=m["webhook_hash"] is not None,
            webhook_hint=m["webhook_hint"], webhook_rotated_at=m["webhook_rotated_at"])

    async def find_workflow(self, ident: str, scope: str | None, project: str,
                            lock: bool = False) -> WorkflowRecord:
        """A workflow by id, or by name within `project`; NOT_FOUND outside the caller's `scope`."""
        cond = or_(wf_t.c.id == ident, and_(wf_t.c.project_id == project, wf_t.c.name == ident))
        if scope is not None:
            cond = and_(wf_t.c.project_id == scope, cond)
        stmt = self._workflow_select().where(cond)
        if lock:
            stmt = self._lock(stmt)
        m = (await self.conn.execute(stmt)).mappings().first()
        if m is None:
            raise not_found("workflow", ident)
        return self._workflow_from_row(m)

    async def list_workflows(self, project: str | None, limit: int, token: str,
                             include_archived: bool) -> Page[WorkflowRecord]:
        n = page_size(limit)
        stmt = self._workflow_select()
        if project is not None:
            stmt = stmt.where(wf_t.c.project_id == project)
        if not include_archived:
            stmt = stmt.where(wf_t.c.archived_at.is_(None))
        if token:
            at, ident = decode_cursor(token, 2)
            stmt = stmt.where(_before(wf_t.c.created_at, wf_t.c.id, at, ident))
        stmt = stmt.order_by(wf_t.c.created_at.desc(), wf_t.c.id.desc()).limit(n + 1)
        rows = (await self.conn.execute(stmt)).mappings().all()
        items = [self._workflow_from_row(m) for m in rows[:n]]
        nxt = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > n else ""
        return Page(items, nxt)

    async def specs(self, version_ids: Iterable[str]) -> dict[str, WorkflowSpec]:
        rows = await self.conn.execute(
            select(ver_t.c.id, ver_t.c.spec).where(ver_t.c.id.in_(set(version_ids))))
        return {r.id: WorkflowSpec.from_dict(r.spec) for r in rows}

    async def current_versions(self, workflow_ids: Iterable[str]) -> dict[str, tuple[str, bool]]:
        """Each workflow's current version id and whether it is archived."""
        rows = await self.conn.execute(
            select(wf_t.c.id, wf_t.c.current_version_id, wf_t.c.archived_at)
            .where(wf_t.c.id.in_(sorted(set(workflow_ids)))))
        return {r.id: (r.current_version_id, r.archived_at is not None) for r in rows}

    async def workflow_limits(self, workflow_ids: Iterable[str], lock: bool = False) -> dict[str, Caps]:
        """The concurrency slots of each workflow (max_concurrent_runs, the per-key cap); `lock`
        holds the workflow rows so that replicas hand out a capped workflow's slots, of every
        key, one at a time."""
        ids = sorted(set(workflow_ids))
        if not ids:
            return {}
        if self.dialect == "sqlite":  # every unit that may start or end runs asks (the writer lock holds)
            marks = ", ".join("?" * len(ids))
            return {r[0]: Caps(r[1], r[2]) for r in await self._sqlite_fetch(
                f"SELECT id, max_concurrent_runs, concurrency_max_runs FROM workflows WHERE id IN ({marks})",
                ids)}
        stmt = (select(wf_t.c.id, wf_t.c.max_concurrent_runs, wf_t.c.concurrency_max_runs)
                .where(wf_t.c.id.in_(ids)))
        if lock:
            # Serializes slot accounting, yet lets runs of these workflows be inserted meanwhile
            # (a child run, a trigger): their foreign key's check would otherwise wait on us while
            # we wait on theirs, a deadlock between two replicas starting each other's children.
            stmt = self._lock(stmt.order_by(wf_t.c.id), key_share=True)
        rows = await self.conn.execute(stmt)
        return {r.id: Caps(r.max_concurrent_runs, r.concurrency_max_runs) for r in rows}

    # -- triggering ---------------------------------------------------------------------------

    async def idempotency_lookup(self, keys: Sequence[tuple[str, str, str]],
                                 now: datetime) -> dict[tuple[str, str, str], tuple[str, str]]:
        """Live idempotency records of these (project, workflow, key)s -> (request_hash, run_id).
        Expired records of the same keys are deleted, so new ones can take their place: one
        statement for a whole batch, two when some of its keys have expired."""
        # Per (project, workflow), `key IN (...)`: a search of the primary key. (A row-value IN
        # of whole triples is a full scan of the table on SQLite.)
        by_workflow: dict[tuple[str, str], list[str]] = {}
        for project_id, workflow_id, key in sorted(set(keys)):
            by_workflow.setdefault((project_id, workflow_id), []).append(key)
        wanted = or_(*(and_(idem_t.c.project_id == project_id, idem_t.c.workflow_id == workflow_id,
                            idem_t.c.key.in_(group))
                       for (project_id, workflow_id), group in by_workflow.items()))
        rows = (await self.conn.execute(
            select(idem_t.c.project_id, idem_t.c.workflow_id, idem_t.c.key, idem_t.c.request_hash,
                   idem_t.c.run_id, idem_t.c.expires_at).where(wanted))).all()
        live = {(r.project_id, r.workflow_id, r.key): (r.request_hash, r.run_id)
                for r in rows if r.expires_at > now}
        if len(live) < len(rows):
            await self.conn.execute(delete(idem_t).where(wanted, idem_t.c.expires_at <= now))
        return live

    async def insert_runs(self, runs: list[RunRecord], steps: list[StepRecord], events: list[EventRecord],
                          idempotency: list[dict[str, Any]]) -> None:
        """Write new runs with all their steps, tags, first events and idempotency records.
        Raises DuplicateKey when another writer recorded one of the idempotency keys first."""
        if idempotency:
            try:
                await self._insert(idem_t, list(idempotency[0]), idempotency)
            except IntegrityError as e:
                raise DuplicateKey("idempotency key recorded concurrently") from e
        if not runs:
            return
        await self._insert(runs_t, _RUN_FIELDS, runs)
        tag_rows = [{"run_id": r.id, "key": k, "value": v} for r in runs for k, v in r.tags.items()]
        if tag_rows:
            await self.conn.execute(insert(tags_t), tag_rows)
        await self._insert(steps_t, _STEP_FIELDS, steps)
        await self._insert(events_t, _EVENT_FIELDS, events)
        await self.record_changes(status_changes(runs, ()))
        # Notifications of the runs' first events, in the same transaction (domain/notifications.py).
        await self.insert_outbox(outbox_of_new_runs(runs, steps, events))
        # Steps that wait for an event from the start (SPEC §9), and their runs if it is there.
        by_id = {r.id: r for r in runs}
        arrived = await self.record_event_waits(
            wait_changes((by_id[s.workflow_run_id], s, None) for s in steps))
        await self.signal(arrived, runs[0].created_at)

    async def _insert(self, table: Table, names: list[str], records: Sequence[Any]) -> None:
        """INSERT one row per record (a dataclass, or a dict of these names). On SQLite the
        rows go to the driver as tuples converted here (what SQLAlchemy's per-value bind
        processing would make of them, at a fraction of its cost: the inserts of new runs,
        steps, events and idempotency keys are the trigger's hot path)."""
        if not records:
            return
        as_dicts = isinstance(records[0], dict)
        if self.dialect != "sqlite":
            await self.conn.execute(insert(table), records if as_dicts else [_row(r, names) for r in records])
            return
        sql, converters = _sqlite_insert(table, tuple(names))
        # A batch's rows share most of their values' times (all stamped with one `now`):
        # each distinct one is formatted once.
        times: dict[datetime, str | None] = {}

        def time_text(value: datetime | None) -> str | None:
            if value is None:
                return None
            text = times.get(value)
            if text is None:
                text = times[value] = _sqlite_time(value)
            return text

        columns = [(n, time_text if conv is _sqlite_time else conv)
                   for n, conv in zip(names, converters, strict=True)]
        get: Any = dict.__getitem__ if as_dicts else getattr
        params = [tuple([get(r, n) if conv is None else conv(get(r, n)) for n, conv in columns])
                  for r in records]
        # Straight to aiosqlite, inside the transaction this unit began: one hop to its thread
        # instead of three (cursor, executemany, close) through SQLAlchemy's adapter.
        driver = (await self.conn.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            await driver.executemany(sql, params)
        except sqlite3.IntegrityError as e:
            raise IntegrityError(sql, None, e) from e  # what every caller catches

    async def purge_idempotency(self, now: datetime, batch: int) -> int:
        """Delete at most `batch` expired idempotency records, oldest first; returns how many.
        Bounded so one call never holds the write lock for long: a caller with a backlog calls
        again while the answer equals `batch`."""
        pk = (idem_t.c.project_id, idem_t.c.workflow_id, idem_t.c.key)
        oldest = (select(*pk).where(idem_t.c.expires_at <= now)
                  .order_by(idem_t.c.expires_at).limit(batch))
        res = await self.conn.execute(delete(idem_t).where(tuple_(*pk).in_(oldest)))
        return res.rowcount or 0

    # -- runs ---------------------------------------------------------------------------------

    async def get_run(self, run_id: str, project: str | None, lock: bool = False) -> RunRecord:
        stmt = select(runs_t).where(runs_t.c.id == run_id)
        if project is not None:
            stmt = stmt.where(runs_t.c.project_id == project)
        if lock:
            stmt = self._lock(stmt)
        m = (await self.conn.execute(stmt)).mappings().first()
        if m is None:
            raise not_found("run", run_id)
        return run_from_row(m)

    async def get_runs(self, run_ids: Sequence[str], project: str | None,
                       lock: bool = False, skip_locked: bool = False) -> list[RunRecord]:
        """These runs; `lock` holds them (in id order, so two lockers never deadlock), and
        `skip_locked` leaves out the ones another transaction holds instead of waiting."""
        if self.dialect == "sqlite":
            # Every report, lease and pass loads its runs (SQLite's writer lock already holds them).
            where = f"id IN ({', '.join('?' * len(run_ids))})"
            params = list(run_ids)
            if project is not None:
                where += " AND project_id = ?"
                params.append(project)
            return [_run_record(row) for row in
                    await self._sqlite_rows(runs_t, _RUN_FIELDS, where + " ORDER BY id", params)]
        stmt = select(runs_t).where(runs_t.c.id.in_(run_ids))
        if project is not None:
            stmt = stmt.where(runs_t.c.project_id == project)
        if lock:
            stmt = self._lock(stmt.order_by(runs_t.c.id), skip_locked=skip_locked)
        return [run_from_row(m) for m in (await self.conn.execute(stmt)).mappings()]

    async def list_runs(self, flt: RunQuery, project: str | None, limit: int, token: str) -> Page[RunRecord]:
        """Runs newest first. `project` is the caller's scope; `flt.project_id` a filter within it."""
        # Every filter is shaped so that an index ending in (created_at, id) serves it (see the
        # indexes of RunRow): equality on one value, the page a backward range scan, no sort.
        n = page_size(limit)
        stmt = _LIST_RUNS
        if project is not None:
            stmt = stmt.where(runs_t.c.project_id == project)
        if flt.project_id:
            stmt = stmt.where(runs_t.c.project_id == flt.project_id)
        if flt.statuses:
            statuses = sorted({str(s) for s in flt.statuses})
            stmt = stmt.where(runs_t.c.status == statuses[0] if len(statuses) == 1
                              else runs_t.c.status.in_(statuses))
        if flt.workflow_ids or flt.search:
            # Names and the search become workflow ids first (read from the workflows table,
            # small beside the runs), so the runs query compares workflow_id with constants:
            # with one workflow, equality on its index.
            ids = await self._listed_workflow_ids(flt, project)
            if not ids:
                return Page([], "")
            stmt = stmt.where(runs_t.c.workflow_id == ids[0] if len(ids) == 1
                              else runs_t.c.workflow_id.in_(ids))
        if flt.triggered_by:
            stmt = stmt.where(runs_t.c.triggered_by == flt.triggered_by)
        if flt.started_after is not None:
            stmt = stmt.where(runs_t.c.started_at >= flt.started_after)
        if flt.started_before is not None:
            # A run starts after it is created, so created_at < started_before too: said
            # explicitly, it lets the newest-first scan begin at the range's end.
            stmt = stmt.where(runs_t.c.started_at < flt.started_before,
                              runs_t.c.created_at < flt.started_before)
        for key, value in flt.tags:
            stmt = stmt.where(exists().where(tags_t.c.run_id == runs_t.c.id, tags_t.c.key == key,
                                             tags_t.c.value == value))
        if token:
            at, ident = decode_cursor(token, 2)
            # The cursor's time bounds created_at as a range too: the scan then starts at the
            # cursor in the index instead of stepping over every newer row (neither database
            # reads the OR of _before as a range), so a deep page costs what the first one does.
            stmt = stmt.where(runs_t.c.created_at <= cursor_time(at),
                              _before(runs_t.c.created_at, runs_t.c.id, at, ident))
        stmt = stmt.order_by(runs_t.c.created_at.desc(), runs_t.c.id.desc()).limit(n + 1)
        rows = (await self.conn.execute(stmt)).all()
        items = [run_from_row(row, positional=True) for row in rows[:n]]
        nxt = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > n else ""
        return Page(items, nxt)

    async def _listed_workflow_ids(self, flt: RunQuery, project: str | None) -> list[str]:
        """The ids of the workflows list_runs' workflow filter (ids or names) and search leave,
        within the caller's scope and the project filter; sorted."""
        columns = [wf_t.c.id, wf_t.c.name, wf_t.c.description] if flt.search else [wf_t.c.id]
        query = select(*columns)
        if flt.workflow_ids:
            query = query.where(or_(wf_t.c.id.in_(flt.workflow_ids), wf_t.c.name.in_(flt.workflow_ids)))
        if project is not None:
            query = query.where(wf_t.c.project_id == project)
        if flt.project_id:
            query = query.where(wf_t.c.project_id == flt.project_id)
        rows = (await self.conn.execute(query)).all()
        if flt.search:
            # Matched here rather than by SQL LIKE: SQLite's LIKE and lower() fold ASCII letters
            # only, so "é" would not find "É" there while PostgreSQL's would; the domain's one
            # rule answers the same on both (and no character of the search is a wildcard).
            rows = [row for row in rows if flt.search_matches(row.name, row.description)]
            if len(rows) > MAX_SEARCHED_WORKFLOWS:
                # The ids become bound parameters of the runs query (both databases cap them
                # near 32,767): a search this broad is the client's to narrow, not a 5xx.
                raise invalid(f"the search matches {len(rows)} workflows; at most "
                              f"{MAX_SEARCHED_WORKFLOWS} may match: search for more of the name",
                              [FieldViolation("search", "matches too many workflows")],
                              reason="SEARCH_TOO_BROAD")
        return sorted(row.id for row in rows)

    async def claim_due_runs(self, now: datetime, limit: int) -> list[RunRecord]:
        """Runs whose wake_at has passed, oldest first. On PostgreSQL they are locked and rows
        another replica holds are skipped, so replicas never advance the same run at once."""
        stmt = (select(runs_t).where(runs_t.c.wake_at <= now)
                .order_by(runs_t.c.wake_at).limit(limit))
        stmt = self._lock(stmt, skip_locked=True)
        return [run_from_row(m) for m in (await self.conn.execute(stmt)).mappings()]

    async def next_wake(self) -> datetime | None:
        """The earliest timer: a run's wake_at, a step's lease expiry or a run wake-up signal."""
        wake = (await self.conn.execute(select(func.min(runs_t.c.wake_at)))).scalar()
        lease = (await self.conn.execute(select(func.min(steps_t.c.lease_expires_at)))).scalar()
        signal = (await self.conn.execute(select(func.min(wakeups_t.c.at)))).scalar()
        return min((t for t in (wake, lease, signal) if t is not None), default=None)

    async def signal(self, run_ids: Iterable[str], at: datetime) -> None:
        """Leave "look at this run" for other runs: an insert, which locks nothing of theirs."""
        rows = [{"run_id": r, "at": at} for r in sorted(set(run_ids))]
        if rows:
            await self.conn.execute(insert(wakeups_t), rows)

    async def take_wakeups(self, now: datetime, limit: int) -> int:
        """Turn the oldest signals into the runs' wake_at = now and delete them; a run another
        transaction holds keeps its signal for a later pass (never waited for: the holder may
        be waiting for a lock of ours). Returns how many signals were taken."""
        rows = (await self.conn.execute(
            select(wakeups_t.c.id, wakeups_t.c.run_id).order_by(wakeups_t.c.id).limit(limit))).all()
        if not rows:
            return 0
        ids: Any = sorted({r.run_id for r in rows})
        if self.dialect == "postgresql":
            ids = [r[0] for r in await self.conn.execute(self._lock(
                select(runs_t.c.id).where(runs_t.c.id.in_(ids)).order_by(runs_t.c.id), skip_locked=True))]
        if ids:
            await self.conn.execute(update(runs_t).where(runs_t.c.id.in_(ids), runs_t.c.status.in_(_LIVE_RUN))
                                    .values(wake_at=now))
        # Delete exactly the signals read whose runs were woken (or are gone): a signal written
        # since, or for a run held elsewhere, stays.
        woken = set(ids)
        done = [r.id for r in rows if r.run_id in woken or self.dialect != "postgresql"]
        if done:
            await self.conn.execute(delete(wakeups_t).where(wakeups_t.c.id.in_(done)))
        return len(done)

    async def running_counts(self, workflow_ids: Iterable[str]) -> dict[str, int]:
        rows = await self.conn.execute(
            select(runs_t.c.workflow_id, func.count()).where(
                runs_t.c.workflow_id.in_(set(workflow_ids)), runs_t.c.status == RunStatus.RUNNING)
            .group_by(runs_t.c.workflow_id))
        return {r[0]: r[1] for r in rows}

    async def running_key_counts(self, workflow_id: str, keys: Iterable[str]) -> dict[str, int]:
        """Running runs of a workflow per concurrency key (ix_runs_key_queue), for these keys."""
        rows = await self.conn.execute(
            select(runs_t.c.concurrency_key, func.count()).where(
                runs_t.c.workflow_id == workflow_id, runs_t.c.concurrency_key.in_(sorted(set(keys))),
                runs_t.c.status == RunStatus.RUNNING)
            .group_by(runs_t.c.concurrency_key))
        return {r[0]: r[1] for r in rows}

    async def slot_waiters(self, workflow_id: str, n: int, now: datetime, key: str | None = None,
                           per_key: int = 0) -> list[Waiter]:
        """The first `n` pending runs of a workflow in slot order, highest priority then oldest
        (ix_runs_slot_queue; with `key`, of that concurrency key: ix_runs_key_queue), leaving out
        delayed runs not yet due. `per_key` > 0 leaves out the runs whose key already has that
        many running runs."""
        if n <= 0:
            return []
        stmt = (select(runs_t.c.id, runs_t.c.concurrency_key, runs_t.c.priority, runs_t.c.created_at)
                .where(runs_t.c.workflow_id == workflow_id, runs_t.c.status == RunStatus.PENDING,
                       or_(runs_t.c.start_at.is_(None), runs_t.c.start_at <= now)))
        if key is not None:
            stmt = stmt.where(runs_t.c.concurrency_key == key)
        if per_key > 0:
            held = runs_t.alias("held")
            running = (select(func.count()).where(
                held.c.workflow_id == workflow_id, held.c.concurrency_key == runs_t.c.concurrency_key,
                held.c.status == RunStatus.RUNNING).scalar_subquery())
            stmt = stmt.where(running < per_key)
        stmt = stmt.order_by(runs_t.c.priority.desc(), runs_t.c.created_at, runs_t.c.id).limit(n)
        rows = await self.conn.execute(stmt)
        return [Waiter(r.id, r.concurrency_key, r.priority, r.created_at) for r in rows]

    async def wake(self, run_ids: Sequence[str], at: datetime) -> None:
        """Make these runs due at `at`. A run another transaction holds is skipped, never waited
        for (waiting would invert the runs-then-workflows lock order): its holder is advancing
        it and, holding the workflow's row after us, sees the slot we freed."""
        if not run_ids:
            return
        ids: Any = list(run_ids)
        if self.dialect == "postgresql":
            ids = self._lock(select(runs_t.c.id).where(runs_t.c.id.in_(ids)).order_by(runs_t.c.id),
                             skip_locked=True).scalar_subquery()
        await self.conn.execute(update(runs_t).where(runs_t.c.id.in_(ids)).values(wake_at=at))

    # -- leases -------------------------------------------------------------------------------

    async def leasable_runs(self, project: str | None, queue: str, kinds: Sequence[str], now: datetime,
                            limit: int, skip: Sequence[str] = ()) -> list[str]:
        """Ids of running runs with a queued step of these kinds on `queue` whose slot is ready,
        highest priority first, then oldest ready (ix_step_runs_queue), but for the runs in `skip`.
        A run's steps share its priority."""
        if self.dialect == "sqlite":
            # Every poll and stream asks, most of them to find nothing: straight to the driver.
            sql = ("SELECT s.workflow_run_id, MAX(s.priority) AS prio, MIN(s.ready_at) AS ready "
                   "FROM step_runs s "
                   "JOIN workflow_runs r ON r.id = s.workflow_run_id "
                   f"WHERE s.queue = ? AND s.status = ? AND s.ready_at <= ? "
                   f"AND s.kind IN ({', '.join('?' * len(kinds))}) AND r.status = ?")
            params: list[Any] = [queue, str(StepStatus.QUEUED), _sqlite_time(now), *kinds,
                                 str(RunStatus.RUNNING)]
            if project is not None:
                sql += " AND s.project_id = ?"
                params.append(project)
            if skip:
                sql += f" AND s.workflow_run_id NOT IN ({', '.join('?' * len(skip))})"
                params += skip
            rows = await self._sqlite_fetch(
                sql + " GROUP BY s.workflow_run_id ORDER BY prio DESC, ready LIMIT ?", [*params, limit])
            return [r[0] for r in rows]
        priority = func.max(steps_t.c.priority)
        stmt = (select(steps_t.c.workflow_run_id, priority.label("prio"),
                       func.min(steps_t.c.ready_at).label("ready"))
                .join(runs_t, runs_t.c.id == steps_t.c.workflow_run_id)
                .where(steps_t.c.queue == queue, steps_t.c.status == StepStatus.QUEUED,
                       steps_t.c.ready_at <= now, steps_t.c.kind.in_(kinds),
                       runs_t.c.status == RunStatus.RUNNING)
                .group_by(steps_t.c.workflow_run_id).order_by(priority.desc(), "ready").limit(limit))
        if project is not None:
            stmt = stmt.where(steps_t.c.project_id == project)
        if skip:
            stmt = stmt.where(steps_t.c.workflow_run_id.not_in(skip))
        return [r.workflow_run_id for r in await self.conn.execute(stmt)]

    async def expired_lease_runs(self, now: datetime, limit: int) -> list[str]:
        """Ids of runs holding a step whose lease has expired (ix_step_runs_lease), a bounded batch."""
        rows = await self.conn.execute(
            select(steps_t.c.workflow_run_id).where(steps_t.c.lease_expires_at <= now)
            .order_by(steps_t.c.lease_expires_at).limit(limit))
        return list(dict.fromkeys(r.workflow_run_id for r in rows))

    async def database_now(self) -> datetime:
        """The database server's own clock (`DatabaseClock` judges every timer by it)."""
        if self.dialect == "postgresql":
            # clock_timestamp(), not now(): the time of the call, not of the transaction's start.
            return cast(datetime, (await self.conn.execute(select(func.clock_timestamp()))).scalar_one())
        # SQLite's 'now' is the host's clock: every process on one file shares it.
        value = (await self.conn.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))).scalar_one()
        return datetime.fromisoformat(value).replace(tzinfo=UTC)

    async def extend_lease(self, step_id: str, attempt: int, holder: str, until: datetime,
                           now: datetime) -> bool:
        """Move a live lease's expiry to `until`, touching only the step row; False when the
        lease is not (or no longer) this holder's attempt."""
        res = await self.conn.execute(
            update(steps_t).where(steps_t.c.id == step_id, steps_t.c.status == StepStatus.RUNNING,
                                  steps_t.c.attempt == attempt, steps_t.c.worker_id == holder,
                                  steps_t.c.lease_expires_at > now)
            .values(lease_expires_at=until, updated_at=now))
        return res.rowcount == 1

    async def get_steps(self, step_ids: Sequence[str]) -> dict[str, StepRecord]:
        """These steps by id (unknown ids are left out)."""
        ids = sorted(set(step_ids))
        if self.dialect == "sqlite":
            where = f"id IN ({', '.join('?' * len(ids))})"
            return {(s := _step_record(row)).id: s for row in
                    await self._sqlite_rows(steps_t, _STEP_FIELDS, where, ids)}
        result = await self.conn.execute(select(steps_t).where(steps_t.c.id.in_(ids)))
        return {(s := step_from_row(m)).id: s for m in result.mappings()}

    async def get_step(self, step_id: str, project: str | None) -> StepRecord:
        stmt = select(steps_t).where(steps_t.c.id == step_id)
        if project is not None:
            stmt = stmt.where(steps_t.c.project_id == project)
        m = (await self.conn.execute(stmt)).mappings().first()
        if m is None:
            raise not_found("task", step_id)
        return step_from_row(m)

    # -- steps and events ---------------------------------------------------------------------

    async def steps_of(self, run_ids: Sequence[str]) -> dict[str, list[StepRecord]]:
        """Every step of these runs, in position order."""
        out: dict[str, list[StepRecord]] = {r: [] for r in run_ids}
        if self.dialect == "sqlite":
            # Every unit of work that plans a run reads all its steps: on SQLite straight from the
            # driver, converted here (SQLAlchemy's per-value processing parsed each time with a
            # regex; this was the largest cost of a report batch).
            where = f"workflow_run_id IN ({', '.join('?' * len(run_ids))}) ORDER BY workflow_run_id, position"
            for row in await self._sqlite_rows(steps_t, _STEP_FIELDS, where, list(run_ids)):
                rec = _step_record(row)
                out[rec.workflow_run_id].append(rec)
            return out
        rows = await self.conn.execute(
            select(steps_t).where(steps_t.c.workflow_run_id.in_(run_ids))
            .order_by(steps_t.c.workflow_run_id, steps_t.c.position))
        for m in rows.mappings():
            out[m["workflow_run_id"]].append(step_from_row(m))
        return out

    async def _sqlite_fetch(self, sql: str, params: list[Any]) -> list[Any]:
        """Rows of a statement run on the driver inside this unit's transaction (SQLite only)."""
        driver = (await self.conn.get_raw_connection()).driver_connection
        assert driver is not None
        return list(await driver.execute_fetchall(sql, params))

    async def _sqlite_rows(self, table: Table, names: list[str], where: str,
                           params: list[Any]) -> list[list[Any]]:
        """Rows of `table` (these columns, converted) from the driver, inside this unit's
        transaction: one hop to aiosqlite's thread instead of three through SQLAlchemy."""
        if not params:
            return []
        sql, converters = _sqlite_select(table, tuple(names), where)
        # Rows written by one unit share their times (all stamped with its `now`): each distinct
        # one is parsed once per call.
        times: dict[str | None, datetime | None] = {None: None}

        def time_of(text: str | None) -> datetime | None:
            value = times.get(text, _MISSING)
            if value is _MISSING:
                value = times[text] = _time_from_sqlite(text)
            return cast(datetime | None, value)

        pairs = [(i, time_of if conv is _time_from_sqlite else conv) for i, conv in enumerate(converters)]
        return [[row[i] if conv is None else conv(row[i]) for i, conv in pairs]
                for row in await self._sqlite_fetch(sql, params)]

    async def list_steps(self, run_id: str, limit: int, token: str,
                         parent_ref: str | None = None) -> Page[StepRecord]:
        """A run's steps in position order; with `parent_ref`, only the items of that map."""
        n = page_size(limit)
        stmt = select(steps_t).where(steps_t.c.workflow_run_id == run_id)
        if parent_ref is not None:
            parent = steps_t.alias("parent")
            stmt = stmt.where(steps_t.c.parent_step_id == select(parent.c.id).where(
                parent.c.workflow_run_id == run_id, parent.c.step_ref == parent_ref).scalar_subquery())
        if token:
            (pos,) = decode_cursor(token, 1)
            stmt = stmt.where(steps_t.c.position > int(pos))
        rows = (await self.conn.execute(stmt.order_by(steps_t.c.position).limit(n + 1))).mappings().all()
        items = [step_from_row(m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].position) if len(rows) > n else "")

    async def item_states(self, run_id: str,
                          map_ids: Sequence[str]) -> dict[str, list[tuple[int | None, str]]]:
        """The (map_index, status) of each item of these map steps of the run, by map id."""
        out: dict[str, list[tuple[int | None, str]]] = {m: [] for m in map_ids}
        if map_ids:
            stmt = select(steps_t.c.parent_step_id, steps_t.c.map_index, steps_t.c.status).where(
                steps_t.c.workflow_run_id == run_id, steps_t.c.parent_step_id.in_(list(map_ids)))
            for parent, index, status in (await self.conn.execute(stmt)).all():
                out[parent].append((index, status))
        return out

    async def list_events(self, run_id: str, after_seq: int, limit: int, token: str,
                          type_: str = "") -> Page[EventRecord]:
        """A run's events in seq order; only those of one type when `type_` is given (a run's
        comments are its "run.comment" events)."""
        n = page_size(limit)
        if token:
            (after_seq,) = decode_cursor(token, 1)
        stmt = select(events_t).where(events_t.c.workflow_run_id == run_id, events_t.c.seq > int(after_seq))
        if type_:
            stmt = stmt.where(events_t.c.type == type_)
        stmt = stmt.order_by(events_t.c.seq).limit(n + 1)
        rows = (await self.conn.execute(stmt)).mappings().all()
        items = [event_from_row(m) for m in rows[:n]]
        return Page(items, encode_cursor(items[-1].seq) if len(rows) > n else "")

    # -- saving a unit of work ----------------------------------------------------------------

    async def notify(self, keys: set[Key]) -> None:
        """Tell the other replicas which feed keys this transaction fires, delivered when (and
        if) it commits (PostgreSQL; SQLite's one process fires them itself)."""
        if self.dialect != "postgresql" or not keys:
            return
        for payload in payloads(keys):
            await self.conn.execute(select(func.pg_notify(CHANNEL, payload)))

    async def save(self, units: Sequence[Changes]) -> None:
        """Apply the changes of several runs: compare-and-set updates of runs and steps, and
        their events, in the caller's transaction. Raises ConcurrentChange when a row moved
        (the caller's transaction must then roll back)."""
        units = [u for u in units if u.dirty]
        if not units:
            return
        run_params = [{"b_id": u.run.id, "b_status": str(u.run_fence.status),
                       "b_last_seq": u.run_fence.last_seq,
                       **{f"v_{k}": getattr(u.run, k) for k in _RUN_MUTABLE}}
                      for u in units if u.run_fence is not None]
        step_params = [{"b_id": s.id, "b_status": str(f.status), "b_attempt": f.attempt,
                        "b_lease_expires_at": f.lease_expires_at,
                        **{f"v_{k}": getattr(s, k) for k in _STEP_MUTABLE}}
                       for u in units for s in u.steps.values() if s.id not in u.added
                       for f in (u.step_fences[s.id],)]
        await self._cas(runs_t, _RUN_MUTABLE, ("last_seq",), run_params)
        await self._cas(steps_t, _STEP_MUTABLE, ("attempt", "lease_expires_at"), step_params)
        # Step rows a unit created (a map's items), as the unit leaves them; the run's fence,
        # checked above, says no other writer planned the run meanwhile.
        added = [s for u in units for s in u.added.values()]
        if added:
            await self._insert(steps_t, _STEP_FIELDS, added)
        for u in units:
            u.describe()
        events = [e for u in units for e in u.events]
        if events:
            try:
                await self._insert(events_t, _EVENT_FIELDS, events)
            except IntegrityError as e:
                # (run, seq) is the key: another writer appended to one of these runs first.
                raise ConcurrentChange("run_events: seq taken concurrently") from e
            # The notifications these events cause, committed or rolled back with them.
            await self.insert_outbox(outbox_of_units(units))
        # Steps that started or stopped waiting for an event (SPEC §9); a new wait whose event
        # is already there signals its own run.
        arrived = await self.record_event_waits(wait_changes(
            (u.run, s, u.step_fences[s.id].status) for u in units for s in u.steps.values()))
        await self.signal({r for u in units for r in u.signals} | arrived, units[0].now)
        await self.record_changes(status_changes((), units))
        await self.notify(keys_of(units))

    async def _cas(self, table: Table, cols: list[str], fence: tuple[str, ...],
                   params: list[dict[str, Any]]) -> None:
        """UPDATE each row only if it still matches its fence (id, status and the `fence`
        columns, null-safe), and check that every row matched: a row that did not was changed
        by another writer."""
        if not params:
            return
        if self.dialect == "sqlite":
            # Straight to the driver (see _insert): every unit of work saves this way. SQLite's
            # executemany sums the rows each parameter set matched; ids are unique, so the sum
            # equals the count only when every row matched.
            sql, set_conv, fence_conv = _sqlite_cas(table, tuple(cols), fence)
            sets = list(zip(cols, set_conv, strict=True))
            fences = list(zip(fence, fence_conv, strict=True))
            rows = [[p[f"v_{k}"] if c is None else c(p[f"v_{k}"]) for k, c in sets]
                    + [p["b_id"], p["b_status"]]
                    + [p[f"b_{k}"] if c is None else c(p[f"b_{k}"]) for k, c in fences]
                    for p in params]
            driver = (await self.conn.get_raw_connection()).driver_connection
            assert driver is not None
            matched = (await driver.executemany(sql, rows)).rowcount
        else:
            stmt = (update(table)
                    .where(table.c.id == bindparam("b_id"), table.c.status == bindparam("b_status"),
                           *(table.c[k].is_not_distinct_from(bindparam(f"b_{k}", type_=table.c[k].type))
                             for k in fence))
                    .values({k: bindparam(f"v_{k}") for k in cols}))
            # asyncpg reports no row count for executemany: one statement per row, each checked.
            matched = 0
            for p in params:
                matched += (await self.conn.execute(stmt, p)).rowcount
        if matched != len(params):
            raise ConcurrentChange(f"{table.name}: {len(params) - matched} rows changed concurrently")

    # -- schedules ----------------------------------------------------------------------------

    async def due_schedules(self, now: datetime, limit: int) -> list[WorkflowRecord]:
        """Workflows whose schedule is due (next_fire_at <= now, not paused, not archived),
        oldest tick first (ix_workflows_next_fire), their rows locked for the caller's
        transaction. PostgreSQL: rows another transaction holds are skipped, never waited for
        (a replica firing them, or an update/archive/pause that will set next_fire_at itself),
        and the lock is FOR NO KEY UPDATE of the workflow row only: it does not conflict with
        the key-share locks that inserting runs of the workflow takes (their foreign key), so a
        busy trigger stream cannot keep the schedule from being taken. SQLite: the one writer."""
        stmt = (self._workflow_select()
                .where(wf_t.c.next_fire_at <= now, wf_t.c.schedule_paused.is_(False),
                       wf_t.c.archived_at.is_(None))
                .order_by(wf_t.c.next_fire_at, wf_t.c.id).limit(limit))
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(of=wf_t, skip_locked=True, key_share=True)
        return [self._workflow_from_row(m) for m in (await self.conn.execute(stmt)).mappings()]

    async def advance_schedules(self, next_fire: dict[str, datetime | None]) -> None:
        """Set next_fire_at of these workflows (rows the caller holds, from due_schedules)."""
        if not next_fire:
            return
        await self.conn.execute(
            update(wf_t).where(wf_t.c.id == bindparam("b_id")).values(next_fire_at=bindparam("v_at")),
            [{"b_id": wf_id, "v_at": at} for wf_id, at in sorted(next_fire.items())])

    async def set_schedule(self, workflow_id: str, paused: bool, next_fire_at: datetime | None,
                           now: datetime) -> None:
        """Pause or resume a workflow's schedule (its row locked by the caller)."""
        await self.conn.execute(update(wf_t).where(wf_t.c.id == workflow_id).values(
            schedule_paused=paused, next_fire_at=next_fire_at, updated_at=now))

    async def unscheduled_workflows(self) -> list[WorkflowRecord]:
        """Live workflows with a running schedule but no next_fire_at (written before schedules
        fired), their rows locked like due_schedules' (skipping those another transaction holds)."""
        stmt = self._workflow_select().where(
            wf_t.c.cron.is_not(None), wf_t.c.next_fire_at.is_(None), wf_t.c.schedule_paused.is_(False),
            wf_t.c.archived_at.is_(None)).order_by(wf_t.c.id)
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(of=wf_t, skip_locked=True, key_share=True)
        return [self._workflow_from_row(m) for m in (await self.conn.execute(stmt)).mappings()]

    async def next_schedule_fire(self) -> datetime | None:
        """The earliest next_fire_at of any workflow: set only while a schedule may fire."""
        return (await self.conn.execute(select(func.min(wf_t.c.next_fire_at)))).scalar()


def _before(col_at: Any, col_id: Any, at: str, ident: str) -> Any:
    """Keyset condition for newest-first pages: rows strictly after the cursor position."""
    try:
        ts = cursor_time(at)  # decode_cursor checked it already; kept for direct callers
    except ValueError as e:
        raise invalid("page_token is not valid", reason="INVALID_PAGE_TOKEN") from e
    return or_(col_at < ts, and_(col_at == ts, col_id < ident))
