"""The initial index: blobs and references.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(100), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("last_access", sa.Double(), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_blobs_last_access", "blobs", ["last_access"])
    op.create_table(
        "refs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("digest", sa.String(100), nullable=False),
        sa.Column("fetched_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("validators", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.UniqueConstraint("source", "key", name="uq_refs_source_key"),
    )
    op.create_index("ix_refs_digest", "refs", ["digest"])


def downgrade() -> None:
    op.drop_index("ix_refs_digest", table_name="refs")
    op.drop_table("refs")
    op.drop_index("ix_blobs_last_access", table_name="blobs")
    op.drop_table("blobs")
