"""The project watch's feed (issue 8): run_changes, one row per run status change, ordered so a
cursor resumes with no gap and no duplicate across replicas (see models.RunChangeRow).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_changes",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("txid", sa.BigInteger(), nullable=True),
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("workflow_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_changes")),
    )
    op.create_index("ix_run_changes_project", "run_changes", ["project_id", "id"])
    op.create_index("ix_run_changes_project_txid", "run_changes", ["project_id", "txid", "id"])
    op.create_index("ix_run_changes_at", "run_changes", ["at"])


def downgrade() -> None:
    op.drop_table("run_changes")
