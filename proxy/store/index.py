"""The index: SQLAlchemy models and every SQL statement pullthrough runs.

Methods here block; the cache calls them from worker threads. SQLite (WAL) is the embedded
default, PostgreSQL the engine for a cache that several nodes share.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    Engine,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


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


@dataclass(frozen=True)
class Reference:
    source: str
    key: str
    digest: str
    fetched_at: float
    expires_at: float
    validators: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def is_fresh(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.expires_at


@dataclass(frozen=True)
class BlobRecord:
    digest: str
    size: int
    media_type: str | None
    created_at: float
    last_access: float
    hits: int


def make_engine(url: str) -> Engine:
    """An engine tuned for the index: WAL and a busy timeout on SQLite."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class Index:
    """Queries over blobs and references. Blocking; one instance per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _insert(self):  # type: ignore[no-untyped-def]
        return postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert

    def add_blob(self, digest: str, size: int, media_type: str | None = None) -> None:
        now = time.time()
        stmt = self._insert()(BlobRow).values(
            digest=digest, size=size, media_type=media_type, created_at=now, last_access=now, hits=0
        )
        if media_type is not None:
            stmt = stmt.on_conflict_do_update(index_elements=["digest"], set_={"media_type": media_type})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=["digest"])
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)

    def get_blob(self, digest: str) -> BlobRecord | None:
        with Session(self.engine) as session:
            row = session.get(BlobRow, digest)
            if row is None:
                return None
            return BlobRecord(row.digest, row.size, row.media_type, row.created_at, row.last_access, row.hits)

    def record_access(self, accesses: Mapping[str, tuple[float, int]]) -> None:
        """Apply a batch of (last access, hit count) per digest in one transaction."""
        if not accesses:
            return
        with Session(self.engine) as session, session.begin():
            for digest, (last_access, hits) in accesses.items():
                session.execute(
                    update(BlobRow)
                    .where(BlobRow.digest == digest)
                    .values(last_access=last_access, hits=BlobRow.hits + hits)
                )

    def get_reference(self, source: str, key: str) -> Reference | None:
        with Session(self.engine) as session:
            row = session.scalars(
                select(ReferenceRow).where(ReferenceRow.source == source, ReferenceRow.key == key)
            ).first()
            return _reference(row) if row is not None else None

    def put_reference(self, ref: Reference) -> None:
        values = {
            "source": ref.source,
            "key": ref.key,
            "digest": ref.digest,
            "fetched_at": ref.fetched_at,
            "expires_at": ref.expires_at,
            "validators": dict(ref.validators),
            "meta": dict(ref.meta),
        }
        stmt = self._insert()(ReferenceRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["source", "key"], set_={k: v for k, v in values.items() if k not in ("source", "key")}
        )
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)

    def references_to(self, digests: Iterable[str]) -> list[Reference]:
        with Session(self.engine) as session:
            rows = session.scalars(select(ReferenceRow).where(ReferenceRow.digest.in_(list(digests))))
            return [_reference(row) for row in rows]


def _reference(row: ReferenceRow) -> Reference:
    return Reference(
        source=row.source,
        key=row.key,
        digest=row.digest,
        fetched_at=row.fetched_at,
        expires_at=row.expires_at,
        validators=row.validators or {},
        meta=row.meta or {},
    )
