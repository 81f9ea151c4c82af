"""Indexes for lists at scale (issue 5, item 8): every list_runs filter gets an index ending in
(created_at, id), the newest-first order and keyset cursor; list_workflows across projects gets
one too; indexes no query uses are dropped (ix_runs_parent, ix_workflows_next_fire: the child-run
and cron issues add theirs with the queries that use them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_runs_parent", table_name="workflow_runs")
    op.drop_index("ix_workflows_next_fire", table_name="workflows")
    # Gains the id column: oldest_pending orders by (created_at, id), list pages compare it.
    op.drop_index("ix_runs_workflow_status", table_name="workflow_runs")
    op.create_index("ix_runs_workflow_status", "workflow_runs",
                    ["workflow_id", "status", "created_at", "id"])
    op.create_index("ix_runs_created", "workflow_runs", ["created_at", "id"])
    op.create_index("ix_runs_status_created", "workflow_runs", ["status", "created_at", "id"])
    op.create_index("ix_runs_project_status_created", "workflow_runs",
                    ["project_id", "status", "created_at", "id"])
    op.create_index("ix_runs_workflow_created", "workflow_runs", ["workflow_id", "created_at", "id"])
    op.create_index("ix_runs_triggered_created", "workflow_runs", ["triggered_by", "created_at", "id"])
    # Gains run_id: a tag filter reads the matching runs from the index alone.
    op.drop_index("ix_run_tags_kv", table_name="run_tags")
    op.create_index("ix_run_tags_kv", "run_tags", ["key", "value", "run_id"])
    op.create_index("ix_workflows_created", "workflows", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_workflows_created", table_name="workflows")
    op.drop_index("ix_run_tags_kv", table_name="run_tags")
    op.create_index("ix_run_tags_kv", "run_tags", ["key", "value"])
    op.drop_index("ix_runs_triggered_created", table_name="workflow_runs")
    op.drop_index("ix_runs_workflow_created", table_name="workflow_runs")
    op.drop_index("ix_runs_project_status_created", table_name="workflow_runs")
    op.drop_index("ix_runs_status_created", table_name="workflow_runs")
    op.drop_index("ix_runs_created", table_name="workflow_runs")
    op.drop_index("ix_runs_workflow_status", table_name="workflow_runs")
    op.create_index("ix_runs_workflow_status", "workflow_runs", ["workflow_id", "status", "created_at"])
    op.create_index("ix_workflows_next_fire", "workflows", ["next_fire_at"])
    op.create_index("ix_runs_parent", "workflow_runs", ["parent_workflow_run_id"])
