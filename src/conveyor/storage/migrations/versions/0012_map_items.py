"""Map items (issue 17, SPEC §2.1): a `map` step's items are step rows of their own.

- step_runs.parent_step_id: the id of an item's map step ("" for every other step);
- step_runs.map_index: its index among the map's items (NULL for every other step).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("parent_step_id", sa.String(36), nullable=False, server_default=""))
        batch.add_column(sa.Column("map_index", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_column("map_index")
        batch.drop_column("parent_step_id")
