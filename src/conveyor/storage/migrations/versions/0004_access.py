"""Tenancy and access (issue 7): API keys that expire, carry a rate limit and remember their
last use; the audit log; inbound webhooks of workflows.

- api_keys: name unique (keys are revoked by name; events name their actor by it), token_prefix
  (a token's first characters, to recognize it), rate_limit, created_by, expires_at,
  last_used_at.
- audit_entries: every write call and its outcome, newest first by id, per project and per actor.
- workflows.webhook_hash (unique: a delivery finds its workflow by it), webhook_hint,
  webhook_rotated_at.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("token_prefix", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("rate_limit", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("created_by", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column("expires_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("last_used_at", UTC_DATETIME, nullable=True))
        batch.create_unique_constraint(op.f("uq_api_keys_name"), ["name"])
    op.create_table(
        "audit_entries",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("resource_id", sa.String(200), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_entries")),
    )
    op.create_index("ix_audit_project", "audit_entries", ["project_id", "id"])
    op.create_index("ix_audit_actor", "audit_entries", ["actor", "id"])
    with op.batch_alter_table("workflows") as batch:
        batch.add_column(sa.Column("webhook_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("webhook_hint", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("webhook_rotated_at", UTC_DATETIME, nullable=True))
        batch.create_unique_constraint(op.f("uq_workflows_webhook_hash"), ["webhook_hash"])


def downgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        batch.drop_constraint(op.f("uq_workflows_webhook_hash"), type_="unique")
        batch.drop_column("webhook_rotated_at")
        batch.drop_column("webhook_hint")
        batch.drop_column("webhook_hash")
    op.drop_table("audit_entries")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("uq_api_keys_name"), type_="unique")
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
        batch.drop_column("created_by")
        batch.drop_column("rate_limit")
        batch.drop_column("token_prefix")
