"""Priority, delayed starts and per-key concurrency (issue 17, SPEC §3).

- workflow_runs.priority (-100..100, default 0) and step_runs.priority (the run's, copied to
  its steps): slot waiters and a queue's tasks go highest priority first, then FIFO.
- workflow_runs.start_at: a delayed run's start (NULL: started as soon as it may); the run
  waits pending with wake_at = start_at and is no slot waiter before then.
- workflow_runs.concurrency_key: the workflow's `concurrency.key` rendered at trigger ("" when
  the workflow has none); workflows.concurrency_max_runs: the current version's per-key cap.
- ix_runs_slot_queue (workflow_id, status, priority DESC, created_at, id): a workflow's pending
  runs in the order they take its free slots.
- ix_runs_key_queue (workflow_id, concurrency_key, status, priority DESC, created_at, id): the
  running runs of one key (its count) and its pending runs in slot order.
- ix_step_runs_queue gains priority: a queue's queued tasks, highest priority first.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("concurrency_max_runs", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("workflow_runs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("start_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("concurrency_key", sa.String(200), nullable=False, server_default=""))
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_runs_slot_queue", "workflow_runs",
                    ["workflow_id", "status", sa.text("priority DESC"), "created_at", "id"])
    op.create_index("ix_runs_key_queue", "workflow_runs",
                    ["workflow_id", "concurrency_key", "status", sa.text("priority DESC"), "created_at",
                     "id"])
    op.drop_index("ix_step_runs_queue", table_name="step_runs")
    op.create_index("ix_step_runs_queue", "step_runs",
                    ["project_id", "queue", "status", sa.text("priority DESC"), "ready_at"])


def downgrade() -> None:
    op.drop_index("ix_step_runs_queue", table_name="step_runs")
    op.create_index("ix_step_runs_queue", "step_runs", ["project_id", "queue", "status", "ready_at"])
    op.drop_index("ix_runs_key_queue", table_name="workflow_runs")
    op.drop_index("ix_runs_slot_queue", table_name="workflow_runs")
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_column("priority")
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("concurrency_key")
        batch.drop_column("start_at")
        batch.drop_column("priority")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("concurrency_max_runs")
