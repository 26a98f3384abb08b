"""Read scopes: which scopes (an OCI repository, an HF repo, an S3 bucket, …) admitted each digest.

Existing blobs of S3, IPFS and the Hub's files are admitted under the scope their references name,
and each tag's manifest under its repository (its layers follow when the manifest is next served);
other OCI blobs are admitted again by the upstream on their next pull (one HEAD per blob and
repository, no byte fetched again), because the old index did not record the repository.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_scopes",
        sa.Column("digest", sa.String(100), primary_key=True),
        sa.Column("scope", sa.String(512), primary_key=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sqlite_with_rowid=False,
    )
    _admit_from_references()


def _admit_from_references() -> None:
    connection = op.get_bind()
    refs = sa.table("refs", sa.column("source", sa.String), sa.column("key", sa.String), sa.column("digest", sa.String))
    scopes = sa.table("blob_scopes", sa.column("digest", sa.String), sa.column("scope", sa.String), sa.column("created_at", sa.Double))
    now = time.time()
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for source, key, digest in connection.execute(sa.select(refs.c.source, refs.c.key, refs.c.digest)):
        if source == "hf-file" and digest and len(digest) == 64:
            digest = "sha256:" + digest  # the Hub's files name their sha256 without the prefix
        if not digest or not digest.startswith("sha256:"):
            continue
        if source == "s3":
            scope = "s3:" + key.split("/", 1)[0]
        elif source == "ipfs":
            scope = "ipfs"
        elif source == "hf-file":
            scope = "hf:" + key.split("@", 1)[0]
        elif source == "oci":
            scope = "oci:" + key.rsplit(":", 1)[0]  # a tag (registry/repository:tag) and its manifest
        else:
            continue
        if len(scope) <= 512:
            rows[(digest, scope)] = {"digest": digest, "scope": scope, "created_at": now}
    if rows:
        op.bulk_insert(scopes, list(rows.values()))


def downgrade() -> None:
    op.drop_table("blob_scopes")
