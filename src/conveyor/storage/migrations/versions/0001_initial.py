"""Initial schema: every table, index, unique constraint and foreign key of models.py.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# The column types spelled out here rather than imported from models.py: a revision must keep
# creating what it created when it was written.
# UTC timestamps: TIMESTAMP WITH TIME ZONE on PostgreSQL, ISO text on SQLite.
UTC_DATETIME = sa.DateTime(timezone=True)
# JSON documents: JSONB on PostgreSQL, JSON text on SQLite.
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("revoked_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_keys_token_hash")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("workflow_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("project_id", "workflow_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index("ix_idempotency_expires", "idempotency_keys", ["expires_at"], unique=False)
    op.create_table(
        "workflows",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("current_version_id", sa.String(length=36), nullable=False),
        sa.Column("max_concurrent_runs", sa.Integer(), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=True),
        sa.Column("cron_timezone", sa.String(length=64), nullable=True),
        sa.Column("next_fire_at", UTC_DATETIME, nullable=True),
        sa.Column("archived_at", UTC_DATETIME, nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_index("ix_workflows_next_fire", "workflows", ["next_fire_at"], unique=False)
    op.create_index(
        "ix_workflows_project_created", "workflows", ["project_id", "created_at", "id"], unique=False
    )
    op.create_index("ux_workflows_project_name", "workflows", ["project_id", "name"], unique=True)
    op.create_table(
        "workflow_versions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workflow_id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", JSON_DOC, nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_workflow_versions_workflow_id_workflows")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_versions")),
    )
    op.create_index(
        "ux_workflow_versions_wf_version", "workflow_versions", ["workflow_id", "version"], unique=True
    )
    op.create_table(
        "workflow_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("workflow_id", sa.String(length=36), nullable=False),
        sa.Column("workflow_name", sa.String(length=200), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("workflow_version_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=False),
        sa.Column("triggered_by", sa.String(length=200), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("max_parallel_steps", sa.Integer(), nullable=False),
        sa.Column("payload", JSON_DOC, nullable=False),
        sa.Column("output", JSON_DOC, nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("tags", JSON_DOC, nullable=False),
        sa.Column("entity_id", sa.String(length=200), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("retry_of_run_id", sa.String(length=36), nullable=False),
        sa.Column("parent_workflow_run_id", sa.String(length=36), nullable=False),
        sa.Column("parent_step_run_id", sa.String(length=36), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("wake_at", UTC_DATETIME, nullable=True),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("expires_at", UTC_DATETIME, nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_workflow_runs_workflow_id_workflows")
        ),
        sa.ForeignKeyConstraint(
            ["workflow_version_id"],
            ["workflow_versions.id"],
            name=op.f("fk_workflow_runs_workflow_version_id_workflow_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_runs")),
    )
    op.create_index("ix_runs_parent", "workflow_runs", ["parent_workflow_run_id"], unique=False)
    op.create_index(
        "ix_runs_project_created", "workflow_runs", ["project_id", "created_at", "id"], unique=False
    )
    op.create_index("ix_runs_wake", "workflow_runs", ["wake_at"], unique=False)
    op.create_index(
        "ix_runs_workflow_status", "workflow_runs", ["workflow_id", "status", "created_at"], unique=False
    )
    op.create_table(
        "run_events",
        sa.Column("workflow_run_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("step_ref", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSON_DOC, nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_run_id"],
            ["workflow_runs.id"],
            name=op.f("fk_run_events_workflow_run_id_workflow_runs"),
        ),
        sa.PrimaryKeyConstraint("workflow_run_id", "seq", name=op.f("pk_run_events")),
    )
    op.create_table(
        "run_tags",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["workflow_runs.id"], name=op.f("fk_run_tags_run_id_workflow_runs")
        ),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_run_tags")),
    )
    op.create_index("ix_run_tags_kv", "run_tags", ["key", "value"], unique=False)
    op.create_table(
        "step_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workflow_run_id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("step_ref", sa.String(length=200), nullable=False),
        sa.Column("workflow_step_id", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("deps_required", sa.Integer(), nullable=False),
        sa.Column("deps_completed", sa.Integer(), nullable=False),
        sa.Column("input", JSON_DOC, nullable=True),
        sa.Column("output", JSON_DOC, nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("skip_reason", sa.Text(), nullable=False),
        sa.Column("approved_by", sa.String(length=200), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("job_run_id", sa.String(length=36), nullable=False),
        sa.Column("ready_at", UTC_DATETIME, nullable=True),
        sa.Column("due_at", UTC_DATETIME, nullable=True),
        sa.Column("lease_expires_at", UTC_DATETIME, nullable=True),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_run_id"], ["workflow_runs.id"], name=op.f("fk_step_runs_workflow_run_id_workflow_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_runs")),
    )
    op.create_index("ix_step_runs_due", "step_runs", ["due_at"], unique=False)
    op.create_index("ix_step_runs_lease", "step_runs", ["lease_expires_at"], unique=False)
    op.create_index(
        "ix_step_runs_queue", "step_runs", ["project_id", "queue", "status", "ready_at"], unique=False
    )
    op.create_index("ix_step_runs_run_position", "step_runs", ["workflow_run_id", "position"], unique=False)
    op.create_index("ux_step_runs_run_ref", "step_runs", ["workflow_run_id", "step_ref"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_step_runs_run_ref", table_name="step_runs")
    op.drop_index("ix_step_runs_run_position", table_name="step_runs")
    op.drop_index("ix_step_runs_queue", table_name="step_runs")
    op.drop_index("ix_step_runs_lease", table_name="step_runs")
    op.drop_index("ix_step_runs_due", table_name="step_runs")
    op.drop_table("step_runs")
    op.drop_index("ix_run_tags_kv", table_name="run_tags")
    op.drop_table("run_tags")
    op.drop_table("run_events")
    op.drop_index("ix_runs_workflow_status", table_name="workflow_runs")
    op.drop_index("ix_runs_wake", table_name="workflow_runs")
    op.drop_index("ix_runs_project_created", table_name="workflow_runs")
    op.drop_index("ix_runs_parent", table_name="workflow_runs")
    op.drop_table("workflow_runs")
    op.drop_index("ux_workflow_versions_wf_version", table_name="workflow_versions")
    op.drop_table("workflow_versions")
    op.drop_index("ux_workflows_project_name", table_name="workflows")
    op.drop_index("ix_workflows_project_created", table_name="workflows")
    op.drop_index("ix_workflows_next_fire", table_name="workflows")
    op.drop_table("workflows")
    op.drop_index("ix_idempotency_expires", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("api_keys")
