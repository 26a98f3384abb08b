"""The dashboard's traffic history: the fleet's counter totals at each time slot, so that the charts
survive a restart (one row per slot, whichever node of the fleet took it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "traffic_history",
        sa.Column("slot", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("taken_at", sa.Double(), nullable=False),
        sa.Column("totals", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("traffic_history")
