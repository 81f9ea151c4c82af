"""Events (issue 17, SPEC §9).

- events: (project_id, id) primary key (one publish per id in a project: a repeated publish
  meets it), name, key, payload, the body's hash, received_at, and what the publish did
  (resumed, started, skipped workflows with their reasons), who published it.
- ix_events_project_name_key (project_id, name, key, received_at, id): events of a name and key,
  newest first (waits, filtered lists); ix_events_project_received: a project's list;
  ix_events_received: retention deletes the oldest.
- event_listeners: (project_id, event_name, workflow_id), the workflows whose current
  definition's `on_events` names an event, so a publish reads only those;
  ix_event_listeners_workflow: replaced per workflow on update and archive.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("payload", JSON_DOC, nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("received_at", UTC_DATETIME, nullable=False),
        sa.Column("resumed", sa.Integer(), nullable=False),
        sa.Column("started", sa.Integer(), nullable=False),
        sa.Column("skipped", JSON_DOC, nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_project_name_key", "events",
                    ["project_id", "name", "key", "received_at", "id"])
    op.create_index("ix_events_project_received", "events", ["project_id", "received_at", "id"])
    op.create_index("ix_events_received", "events", ["received_at"])
    op.create_table(
        "event_listeners",
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("event_name", sa.String(200), nullable=False),
        sa.Column("workflow_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(["workflow_id"], ["workflows.id"],
                                name=op.f("fk_event_listeners_workflow_id_workflows")),
        sa.PrimaryKeyConstraint("project_id", "event_name", "workflow_id", name=op.f("pk_event_listeners")),
    )
    op.create_index("ix_event_listeners_workflow", "event_listeners", ["workflow_id"])


def downgrade() -> None:
    op.drop_index("ix_event_listeners_workflow", table_name="event_listeners")
    op.drop_table("event_listeners")
    op.drop_index("ix_events_received", table_name="events")
    op.drop_index("ix_events_project_received", table_name="events")
    op.drop_index("ix_events_project_name_key", table_name="events")
    op.drop_table("events")
