"""Lifecycle: where a blob came from (per-source TTLs), pins, persistent counters, purge history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=True))
        batch.add_column(sa.Column("upstream", sa.String(255), nullable=True))
    op.create_table(
        "pins",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("digest", sa.String(100), primary_key=True),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_pins_digest", "pins", ["digest"])
    op.create_table(
        "counters",
        sa.Column("node", sa.String(255), primary_key=True),
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("upstream", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "purges",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("blobs_removed", sa.BigInteger(), nullable=False),
        sa.Column("bytes_removed", sa.BigInteger(), nullable=False),
        sa.Column("orphan_files", sa.BigInteger(), nullable=False),
        sa.Column("orphan_rows", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("purges")
    op.drop_table("counters")
    op.drop_index("ix_pins_digest", table_name="pins")
    op.drop_table("pins")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("upstream")
        batch.drop_column("source")
