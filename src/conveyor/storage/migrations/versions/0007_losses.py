"""Losses are not failures (issue 15, SPEC §4.3): a step run counts the attempts it lost (lease
expired with no report, released by its worker, cut by a server stop) apart from those that
failed, so losses spend no retry budget, and counts its losses in a row to end a poison task.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("losses", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("loss_streak", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_column("loss_streak")
        batch.drop_column("losses")
