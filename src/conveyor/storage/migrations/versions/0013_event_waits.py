"""Waits for events (issue 17, SPEC §9: wait_event steps).

- event_waits: one row per step that has waited for an event (step_id primary key), its run,
  project, event name and rendered key, `active` while it waits, `since` (its run's creation:
  earlier events are not for it) and the last event it consumed (after_at, after_id).
- ix_event_waits_key (project_id, name, key, active): a publish finds the waits of its key;
  ix_event_waits_run: retention deletes a run's waits with it.

Revision ID: 0013
Revises: 0012 (renumbered from 0012 by the lead: part K committed 0012_map_items first)
Create Date: 2026-12-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_waits",
        sa.Column("step_id", sa.String(36), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("since", UTC_DATETIME, nullable=False),
        sa.Column("after_at", UTC_DATETIME, nullable=True),
        sa.Column("after_id", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["workflow_runs.id"],
                                name=op.f("fk_event_waits_run_id_workflow_runs")),
        sa.PrimaryKeyConstraint("step_id", name=op.f("pk_event_waits")),
    )
    op.create_index("ix_event_waits_key", "event_waits", ["project_id", "name", "key", "active"])
    op.create_index("ix_event_waits_run", "event_waits", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_event_waits_run", table_name="event_waits")
    op.drop_index("ix_event_waits_key", table_name="event_waits")
    op.drop_table("event_waits")
