"""Fill leases say whether another process follows the fill: only then does the owner sync its
temp file, publish a watermark and beat its heart every second.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fill_leases") as batch:
        batch.add_column(sa.Column("followed", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("fill_leases") as batch:
        batch.drop_column("followed")
