"""Retention (issue 15, SPEC §11): finished runs older than their workflow's `retention_days`
(or the server's default) are deleted with their families, and the audit log after its own
retention, in bounded batches found through indexes.

- workflows.retention_days: the current version's value (0: the server's default), so the sweep
  reads one column per workflow rather than every spec.
- ix_runs_root_finished (root_run_id, workflow_id, finished_at): top-level runs ("" root) of a
  workflow finished before a cutoff are one index range; a family (its runs by root) is a
  prefix of the same index.
- ix_audit_at: audit entries older than a cutoff.
- ix_notification_outbox_run: a deleted run's pending deliveries (and the foreign key's check
  when a run is deleted) without a scan of the outbox, which grows while a receiver is down.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("retention_days", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_runs_root_finished", "workflow_runs", ["root_run_id", "workflow_id", "finished_at"])
    op.create_index("ix_audit_at", "audit_entries", ["at"])
    op.create_index("ix_notification_outbox_run", "notification_outbox", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_notification_outbox_run", table_name="notification_outbox")
    op.drop_index("ix_audit_at", table_name="audit_entries")
    op.drop_index("ix_runs_root_finished", table_name="workflow_runs")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("retention_days")
