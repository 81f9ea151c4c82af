"""Real work (issue 6): schedules that can be paused, child runs that know their lineage, and
the run wake-up outbox.

- workflows.schedule_paused: a paused schedule keeps its definition but does not fire;
  ix_workflows_next_fire serves the schedule sweep (due schedules, oldest first).
- workflow_runs.root_run_id and lineage: the root of a run's family and the workflow ids of the
  run and all its ancestors, so a child run's loop check is one membership test (WORKFLOW_LOOP).
- run_wakeups: "look at this run" signals one run's unit of work leaves for another (a child
  that ended wakes its parent, a canceled parent step wakes its child). An insert takes no lock
  on the other run, so cross-run effects never wait for, or deadlock with, the other run's
  holder; the runner turns them into wake_at under the run's own lock.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("schedule_paused", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.create_index("ix_workflows_next_fire", "workflows", ["next_fire_at"])
    with op.batch_alter_table("workflow_runs") as batch:
        batch.add_column(sa.Column("root_run_id", sa.String(36), nullable=False, server_default=""))
        batch.add_column(sa.Column("lineage", JSON_DOC, nullable=True))
    op.create_table(
        "run_wakeups",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_wakeups")),
    )


def downgrade() -> None:
    op.drop_table("run_wakeups")
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("lineage")
        batch.drop_column("root_run_id")
    op.drop_index("ix_workflows_next_fire", table_name="workflows")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("schedule_paused")
