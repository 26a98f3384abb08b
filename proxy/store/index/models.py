"""The index's tables as SQLAlchemy models: the schema the migrations build (a test checks both agree)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Double, Integer, String, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BlobRow(Base):
    """One content-addressed file in the store."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(100), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    last_access: Mapped[float] = mapped_column(Double, index=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)  # who filled it first: oci, hf, …
    upstream: Mapped[str | None] = mapped_column(String(255), nullable=True)  # docker.io, huggingface.co, …


class BlobScopeRow(Base):
    """A read scope that admitted a digest: the upstream confirmed it readable there (a fill from
    that scope, a manifest of that repository listing it, or an upstream HEAD)."""

    __tablename__ = "blob_scopes"
    # On SQLite the rows live in the primary key's B-tree: removing a blob's scopes is one lookup,
    # not one in the key's index and another in the table (a purge at a million blobs removes 400,000).
    __table_args__ = {"sqlite_with_rowid": False}

    digest: Mapped[str] = mapped_column(String(100), primary_key=True)
    scope: Mapped[str] = mapped_column(String(512), primary_key=True)
    created_at: Mapped[float] = mapped_column(Double)


class PinRow(Base):
    """A blob a named resource set keeps: never purged while pinned."""

    __tablename__ = "pins"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    digest: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)
    created_at: Mapped[float] = mapped_column(Double)


class CounterRow(Base):
    """A traffic counter of one node, so that /stats survives a restart."""

    __tablename__ = "counters"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    upstream: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class HistoryRow(Base):
    """A point of the dashboard's charts: the fleet's counter totals (by counter name) at one time
    slot. One row per slot, whichever node of the fleet took it first: the totals are the fleet's."""

    __tablename__ = "traffic_history"

    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # ms since the epoch
    taken_at: Mapped[float] = mapped_column(Double)  # when the totals were read (rates divide by these)
    totals: Mapped[dict[str, int]] = mapped_column(JSON)


class PurgeRow(Base):
    """One pass of the janitor."""

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[float] = mapped_column(Double)
    finished_at: Mapped[float] = mapped_column(Double)
    reason: Mapped[str] = mapped_column(String(64))
    blobs_removed: Mapped[int] = mapped_column(BigInteger)
    bytes_removed: Mapped[int] = mapped_column(BigInteger)
    orphan_files: Mapped[int] = mapped_column(BigInteger)
    orphan_rows: Mapped[int] = mapped_column(BigInteger)


class ReferenceRow(Base):
    """A mutable or source-specific name (a tag, a revision, an object key) and its current digest."""

    __tablename__ = "refs"
    __table_args__ = (UniqueConstraint("source", "key", name="uq_refs_source_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(1024))
    digest: Mapped[str] = mapped_column(String(100), index=True)
    fetched_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    validators: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class FillLeaseRow(Base):
    """Which process of the fleet is downloading a key right now, so that the others follow it.

    `heartbeat` counts the owner's renewals: followers judge liveness by seeing it change on their
    own monotonic clock, so the nodes' wall clocks never have to agree.
    """

    __tablename__ = "fill_leases"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the fill key
    key: Mapped[str] = mapped_column(String(1024))
    owner: Mapped[str] = mapped_column(String(255))  # the owner's temp file name under tmp/
    node: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))  # opening, streaming, committed, failed
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Bytes of the temp file the owner has fdatasync'ed: followers read no further, because a
    # network file system may show a growing file's length before all of its bytes.
    synced: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str | None] = mapped_column(String(100), nullable=True)
    heartbeat: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[float] = mapped_column(Double)
    renewed_at: Mapped[float] = mapped_column(Double, index=True)
    # Set by a process that follows this fill: until then the owner neither syncs nor publishes.
    followed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
