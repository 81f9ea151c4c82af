"""SQLAlchemy models of every table. Alembic migrations (storage/migrations) create the schema;
these classes only describe it for queries. Work is rows: timers, ready steps and leases are
indexed timestamp columns swept in bounded batches.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both dialects (SQLite stores naive ISO strings)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as strings: store them naive so every row has one format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSON documents: JSONB on PostgreSQL (indexable, compact), JSON text on SQLite. Python None is
# SQL NULL (not the JSON text 'null'), so `IS NULL` finds every row without a document.
JSONDoc = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

# Deterministic names for unnamed constraints: SQLite batch migrations can only drop or alter a
# constraint that has a name, and both dialects then share the names migrations refer to.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of all Conveyor tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONDoc}


class WorkflowRow(Base):
    """A workflow definition's identity; its versions hold the specs."""

    __tablename__ = "workflows"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    current_version: Mapped[int] = mapped_column(Integer)
    current_version_id: Mapped[str] = mapped_column(String(36))
    max_concurrent_runs: Mapped[int] = mapped_column(Integer, default=0)
    # The current version's `concurrency.max_runs` (0: no per-key cap), read with the slots.
    concurrency_max_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The current version's retention_days (0: the server's default), read by the retention sweep.
    retention_days: Mapped[int] = mapped_column(Integer, default=0)
    cron: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cron_timezone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    next_fire_at: Mapped[datetime | None] = mapped_column(nullable=True)
    schedule_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # The inbound webhook: its token's hash (unique: a delivery finds its workflow by it), the
    # token's first characters for display, and when it was issued. NULL hash: disabled.
    webhook_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    webhook_hint: Mapped[str] = mapped_column(String(16), default="")
    webhook_rotated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    archived_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        # Workflow by name within a project (find_workflow, list_runs' name filter); names are unique.
        Index("ux_workflows_project_name", "project_id", "name", unique=True),
        # list_workflows of one project, newest first.
        Index("ix_workflows_project_created", "project_id", "created_at", "id"),
        # list_workflows over every project, newest first.
        Index("ix_workflows_created", "created_at", "id"),
        # The schedule sweep: due schedules, oldest first.
        Index("ix_workflows_next_fire", "next_fire_at"),
    )


class WorkflowVersionRow(Base):
    """One immutable version of a workflow: the validated spec as JSON."""

    __tablename__ = "workflow_versions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id"))
    project_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (Index("ux_workflow_versions_wf_version", "workflow_id", "version", unique=True),)


class RunRow(Base):
    """A workflow run. `wake_at` is the run's next timer: the engine advances runs whose
    wake_at has passed (new runs, finished steps, due delays/retries, deadlines)."""

    __tablename__ = "workflow_runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128))
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id"))
    workflow_name: Mapped[str] = mapped_column(String(200))
    workflow_version: Mapped[int] = mapped_column(Integer)
    workflow_version_id: Mapped[str] = mapped_column(ForeignKey("workflow_versions.id"))
    status: Mapped[str] = mapped_column(String(16))
    status_message: Mapped[str] = mapped_column(Text, default="")
    triggered_by: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    max_parallel_steps: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]]
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict[str, Any]]
    entity_id: Mapped[str] = mapped_column(String(200), default="")
    idempotency_key: Mapped[str] = mapped_column(String(200), default="")
    retry_of_run_id: Mapped[str] = mapped_column(String(36), default="")
    parent_workflow_run_id: Mapped[str] = mapped_column(String(36), default="")
    parent_step_run_id: Mapped[str] = mapped_column(String(36), default="")
    depth: Mapped[int] = mapped_column(Integer, default=0)
    # The first run of this run's family of child runs ("" for a run nobody started).
    root_run_id: Mapped[str] = mapped_column(String(36), default="")
    # Workflow ids of this run and its ancestors: a child's loop check is one membership test.
    lineage: Mapped[list[str] | None] = mapped_column(JSONDoc, nullable=True)
    # Last RunEvent seq written for this run; events take last_seq+1 under the run's row lock.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    wake_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Webhooks told about chosen events ([{url, events}]); NULL for a run without any, so the
    # save of its events costs nothing more.
    notifications: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc, nullable=True)
    # -100..100: slot waiters and the run's tasks in their queues go highest first, then FIFO.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A delayed run's start (NULL: as soon as it may): it waits pending until then.
    start_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The workflow's `concurrency.key` rendered at trigger ("" without one).
    concurrency_key: Mapped[str] = mapped_column(String(200), default="", server_default="")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    # Every list_runs filter has an index that ends in (created_at, id), the list's newest-first
    # order and keyset cursor: a page is a short backward index range scan, never a sort.
    __table_args__ = (
        # list_runs with no filter (also drives the started_at range, triggered_by-less tag filters).
        Index("ix_runs_created", "created_at", "id"),
        # list_runs by project.
        Index("ix_runs_project_created", "project_id", "created_at", "id"),
        # list_runs by status, across projects.
        Index("ix_runs_status_created", "status", "created_at", "id"),
        # list_runs by project and status.
        Index("ix_runs_project_status_created", "project_id", "status", "created_at", "id"),
        # list_runs by workflow (a workflow lies in one project, so with or without project).
        Index("ix_runs_workflow_created", "workflow_id", "created_at", "id"),
        # list_runs by workflow and status; running_counts and oldest_pending (concurrency slots).
        Index("ix_runs_workflow_status", "workflow_id", "status", "created_at", "id"),
        # list_runs by triggered_by.
        Index("ix_runs_triggered_created", "triggered_by", "created_at", "id"),
        # claim_due_runs and next_wake: the runner's timer sweep.
        Index("ix_runs_wake", "wake_at"),
        # Retention: the top-level runs ("" root) of some workflows finished before a cutoff (a
        # range per workflow), and a family's runs by their root (the leading column alone).
        Index("ix_runs_root_finished", "root_run_id", "workflow_id", "finished_at"),
    )


# Slot and queue orders are highest priority first, then FIFO: indexes with a descending column,
# declared on the columns (not as text) so that migrations and models compare equal.
# oldest_pending: a workflow's pending runs in the order they take its free slots.
Index("ix_runs_slot_queue", RunRow.workflow_id, RunRow.status, RunRow.priority.desc(), RunRow.created_at,
      RunRow.id)
# Per-key concurrency: the running runs of one key (counted) and its pending runs in slot order.
Index("ix_runs_key_queue", RunRow.workflow_id, RunRow.concurrency_key, RunRow.status, RunRow.priority.desc(),
      RunRow.created_at, RunRow.id)


class RunTagRow(Base):
    """One tag of a run, kept beside the run's `tags` JSON so filters are plain indexed SQL."""

    __tablename__ = "run_tags"
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))

    # The primary key (run_id, key) serves list_runs' tag filter probed run by run in list order.
    __table_args__ = (
        # list_runs by a rare tag: the matching run ids straight from the index (covering).
        Index("ix_run_tags_kv", "key", "value", "run_id"),
    )


class StepRunRow(Base):
    """A step of a run. `ready_at` (queued steps: retry backoff), `due_at` (waiting steps:
    delays and step timeouts) and `lease_expires_at` (leased tasks) are the step's timers."""

    __tablename__ = "step_runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    workflow_run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"))
    project_id: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)
    step_ref: Mapped[str] = mapped_column(String(200))
    workflow_step_id: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    deps_required: Mapped[int] = mapped_column(Integer, default=0)
    deps_completed: Mapped[int] = mapped_column(Integer, default=0)
    input: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    skip_reason: Mapped[str] = mapped_column(Text, default="")
    approved_by: Mapped[str] = mapped_column(String(200), default="")
    worker_id: Mapped[str] = mapped_column(String(200), default="")
    job_run_id: Mapped[str] = mapped_column(String(36), default="")
    ready_at: Mapped[datetime | None] = mapped_column(nullable=True)
    due_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    loss_streak: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The run's priority, copied: a queue hands out its highest-priority tasks first.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A map item (SPEC §2.1): its map step's id ("" for other steps) and its index.
    parent_step_id: Mapped[str] = mapped_column(String(36), default="", server_default="")
    map_index: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ux_step_runs_run_ref", "workflow_run_id", "step_ref", unique=True),
        Index("ix_step_runs_run_position", "workflow_run_id", "position"),
        Index("ix_step_runs_lease", "lease_expires_at"),
        # The timer sweep finds waiting steps whose delay or timeout is due.
        Index("ix_step_runs_due", "due_at"),
    )


# Workers claim queued tasks of a queue highest priority first, then oldest first.
Index("ix_step_runs_queue", StepRunRow.project_id, StepRunRow.queue, StepRunRow.status,
      StepRunRow.priority.desc(), StepRunRow.ready_at)


class RunEventRow(Base):
    """The append-only history of a run: seq 1, 2, 3… per run, written in the same
    transaction as the change it records."""

    __tablename__ = "run_events"
    workflow_run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    step_ref: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    actor: Mapped[str] = mapped_column(String(200), default="")
    at: Mapped[datetime]


class RunChangeRow(Base):
    """A run's status change, in the order a project watch sends them. SQLite: by id (its one
    writer commits in id order). PostgreSQL: by (txid, id), read only below the oldest running
    transaction (`pg_snapshot_xmin`), since ids and xids are assigned before commit, not in
    commit order; every row under that bound is committed or gone, so a cursor never skips one."""

    __tablename__ = "run_changes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The writing transaction's id (PostgreSQL's pg_current_xact_id(); NULL on SQLite).
    txid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    project_id: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str] = mapped_column(String(36))
    workflow_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime]

    __table_args__ = (
        # A project watch: one project's changes after a cursor, in order (SQLite: by id).
        Index("ix_run_changes_project", "project_id", "id"),
        # The same on PostgreSQL, in commit-safe order.
        Index("ix_run_changes_project_txid", "project_id", "txid", "id"),
        # Housekeeping drops the changes older than the watch's retention.
        Index("ix_run_changes_at", "at"),
    )


class RunWakeupRow(Base):
    """A "look at this run" left by another run's unit of work (a child that ended, a parent
    step that stopped waiting for its child). Inserting one locks nothing of the other run; the
    runner moves it into the run's wake_at under that run's own lock and deletes it."""

    __tablename__ = "run_wakeups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36))
    at: Mapped[datetime]


class IdempotencyRow(Base):
    """An Idempotency-Key seen on a trigger, scoped to (project, workflow), kept 24 h."""

    __tablename__ = "idempotency_keys"
    project_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(36))
    expires_at: Mapped[datetime]

    # purge_idempotency: the oldest expired keys, a bounded batch at a time.
    __table_args__ = (Index("ix_idempotency_expires", "expires_at"),)


class ApiKeyRow(Base):
    """An API key: only its token's hash is stored (SPEC §6)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Unique: `keys revoke NAME` and the actor of events name one key.
    name: Mapped[str] = mapped_column(String(200), unique=True)
    project_id: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    # Resolving a token is a lookup by this unique index.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(16), default="")
    rate_limit: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AuditRow(Base):
    """One write call, accepted or refused. Append-only; ids give the newest-first order."""

    __tablename__ = "audit_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200), default="")
    project_id: Mapped[str] = mapped_column(String(128), default="")
    method: Mapped[str] = mapped_column(String(100))
    resource_id: Mapped[str] = mapped_column(String(200), default="")
    code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        # An admin of one project reads that project's entries, newest first.
        Index("ix_audit_project", "project_id", "id"),
        # Who did what: one key's entries, newest first.
        Index("ix_audit_actor", "actor", "id"),
        # Retention: the entries older than the audit log's retention, oldest first.
        Index("ix_audit_at", "at"),
    )


class NotificationRow(Base):
    """The notification outbox: one row per webhook delivery still to make, inserted in the
    transaction that wrote the event causing it (so a rolled-back change sends nothing and a
    committed one is never lost). `next_attempt_at` is its timer: due rows are claimed, the
    claim pushes it past the attempt's timeout (a lease), and the row is deleted once the
    delivery succeeded or was given up (the run's events record each outcome)."""

    __tablename__ = "notification_outbox"
    # "<run id>/<event seq>/<target index>": also the delivery id receivers de-duplicate by.
    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"))
    project_id: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(32))
    event_seq: Mapped[int] = mapped_column(Integer)
    # The JSON POSTed, fixed when the event was written.
    body: Mapped[dict[str, Any]]
    # Attempts claimed so far; a delivery's outcome is recorded only if it is still the latest
    # claim's (a claim whose lease ran out was taken over).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]

    __table_args__ = (
        # claim_notifications and next_notification: due deliveries, oldest timer first.
        Index("ix_notification_outbox_due", "next_attempt_at"),
        # Retention deletes a run's deliveries with it (and the foreign key's check on deleting a
        # run finds them) without scanning the outbox, which grows while a receiver is down.
        Index("ix_notification_outbox_run", "run_id"),
    )


class SecretRow(Base):
    """A project secret (SPEC §11): its value sealed with the server's key (engine/cipher.py),
    never in the clear; one value per name in a project."""

    __tablename__ = "secrets"
    project_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    # A project's list, newest first.
    __table_args__ = (Index("ix_secrets_project_created", "project_id", "created_at", "name"),)


class EventRow(Base):
    """A published event (SPEC §9), kept `event_retention_days`: what was published, and what
    its publish did (the answer a repeated publish of its id gets)."""

    __tablename__ = "events"
    project_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The client's idempotency id, or one the server assigned: one publish per (project, id).
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200), default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    # sha256 of {name, key, payload}: a repeated id with another body is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    resumed: Mapped[int] = mapped_column(Integer, default=0)
    started: Mapped[int] = mapped_column(Integer, default=0)
    # [{workflow_id, workflow_name, reason}] of listening workflows it started no run of.
    skipped: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200), default="")

    __table_args__ = (
        # Waits and lists by name and key, newest first.
        Index("ix_events_project_name_key", "project_id", "name", "key", "received_at", "id"),
        # A project's list, newest first.
        Index("ix_events_project_received", "project_id", "received_at", "id"),
        # Retention deletes the oldest.
        Index("ix_events_received", "received_at"),
    )


class EventListenerRow(Base):
    """A workflow whose current definition's `on_events` names an event: the index publishing
    reads instead of every definition, kept by the workflow use cases (create, update, archive)."""

    __tablename__ = "event_listeners"
    project_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id"), primary_key=True)

    # Replaced per workflow on update and archive.
    __table_args__ = (Index("ix_event_listeners_workflow", "workflow_id"),)


class EventWaitRow(Base):
    """A step's wait for an event (SPEC §9, domain/event_waits.py): `active` while the step
    waits; kept after, so a step that waits again takes only events after the one it consumed
    (`after_at`, `after_id`). Deleted with its run."""

    __tablename__ = "event_waits"
    step_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.id"))
    project_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean)
    # Events received before its run was created are not for it.
    since: Mapped[datetime]
    after_at: Mapped[datetime | None] = mapped_column(nullable=True)
    after_id: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (
        # A publish finds the waits of its (project, name, key).
        Index("ix_event_waits_key", "project_id", "name", "key", "active"),
        # Retention deletes a run's waits with it.
        Index("ix_event_waits_run", "run_id"),
    )
