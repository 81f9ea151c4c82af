"""Project secrets (issue 16, SPEC §11).

- secrets: (project_id, name) primary key (one value per name in a project), the value sealed
  with the server's key (ciphertext), created_at and updated_at.
- ix_secrets_project_created: a project's list, newest first.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-14
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Column types spelled out, not imported from models.py (a revision keeps creating what it did).
UTC_DATETIME = sa.DateTime(timezone=True)

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("project_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("project_id", "name", name=op.f("pk_secrets")),
    )
    op.create_index("ix_secrets_project_created", "secrets", ["project_id", "created_at", "name"])


def downgrade() -> None:
    op.drop_index("ix_secrets_project_created", table_name="secrets")
    op.drop_table("secrets")
