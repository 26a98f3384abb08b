"""Fill leases: which node of a fleet sharing one cache is downloading a key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fill_leases",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("synced", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(100), nullable=True),
        sa.Column("heartbeat", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("renewed_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_fill_leases_renewed_at", "fill_leases", ["renewed_at"])


def downgrade() -> None:
    op.drop_index("ix_fill_leases_renewed_at", table_name="fill_leases")
    op.drop_table("fill_leases")
