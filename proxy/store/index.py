"""The index: SQLAlchemy models and every SQL statement pullthrough runs.

Methods here block; the cache calls them from worker threads. SQLite (WAL) is the embedded
default, PostgreSQL the engine for a cache that several nodes share.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping
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
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
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
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)  # who filled it first: oci, hf, …
    upstream: Mapped[str | None] = mapped_column(String(255), nullable=True)  # docker.io, huggingface.co, …


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
    source: str | None = None
    upstream: str | None = None


@dataclass(frozen=True)
class FillLease:
    key_hash: str
    key: str
    owner: str
    node: str
    state: str
    size: int | None
    synced: int
    digest: str | None
    heartbeat: int
    started_at: float
    renewed_at: float


@dataclass(frozen=True)
class CounterKey:
    source: str
    upstream: str
    name: str


@dataclass(frozen=True)
class PurgeRecord:
    started_at: float
    finished_at: float
    reason: str
    blobs_removed: int
    bytes_removed: int
    orphan_files: int
    orphan_rows: int


@dataclass(frozen=True)
class UsageRow:
    source: str | None
    upstream: str | None
    entries: int
    bytes: int


def make_engine(url: str) -> Engine:
    """An engine tuned for the index: WAL and a busy timeout on SQLite."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # 64 MiB of page cache: a purge at a million rows rewrites three indexes, and the
            # 2 MiB default made it twice as slow.
            cursor.execute("PRAGMA cache_size=-65536")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Index:
    """Queries over blobs and references. Blocking; one instance per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _insert(self):  # type: ignore[no-untyped-def]
        return postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert

    def add_blob(
        self, digest: str, size: int, media_type: str | None = None, *, source: str | None = None, upstream: str | None = None
    ) -> None:
        now = time.time()
        stmt = self._insert()(BlobRow).values(
            digest=digest, size=size, media_type=media_type, created_at=now, last_access=now, hits=0,
            source=source, upstream=upstream,
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
            return BlobRecord(
                row.digest, row.size, row.media_type, row.created_at, row.last_access, row.hits, row.source, row.upstream
            )

    def record_access(self, accesses: Mapping[str, tuple[float, int]]) -> None:
        """Apply a batch of (last access, hit count) per digest in one transaction."""
        if not accesses:
            return
        statement = (
            update(BlobRow.__table__)
            .where(BlobRow.__table__.c.digest == bindparam("d"))
            .values(last_access=bindparam("la"), hits=BlobRow.__table__.c.hits + bindparam("h"))
        )
        rows = [{"d": digest, "la": last, "h": hits} for digest, (last, hits) in accesses.items()]
        with self.engine.begin() as connection:
            connection.execute(statement, rows)

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


    # -- lifecycle ------------------------------------------------------------------------------
    def usage(self) -> list[UsageRow]:
        """Entries and bytes per (source, upstream)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(BlobRow.source, BlobRow.upstream, func.count(), func.coalesce(func.sum(BlobRow.size), 0))
                .group_by(BlobRow.source, BlobRow.upstream)
            )
            return [UsageRow(source, upstream, int(n), int(total)) for source, upstream, n, total in rows]

    def unused_since(
        self, cutoff: float, *, source: str | None, upstream: str | None, exclude: list[tuple[str | None, str | None]], limit: int
    ) -> list[tuple[str, int]]:
        """Unpinned blobs last read before `cutoff`: those of one (source, upstream), or with None
        for both, every blob not of an `exclude`d pair (the default rule)."""
        query = select(BlobRow.digest, BlobRow.size).where(BlobRow.last_access < cutoff, ~BlobRow.digest.in_(select(PinRow.digest)))
        if source is not None:
            query = query.where(BlobRow.source == source)
            if upstream is not None:
                query = query.where(BlobRow.upstream == upstream)
        else:
            for ex_source, ex_upstream in exclude:
                pair = BlobRow.source == ex_source
                if ex_upstream is not None:
                    pair = and_(pair, BlobRow.upstream == ex_upstream)
                query = query.where(or_(BlobRow.source.is_(None), ~pair))
        with Session(self.engine) as session:
            return [(d, s) for d, s in session.execute(query.order_by(BlobRow.last_access).limit(limit))]

    def least_recently_used(self, *, accessed_before: float, limit: int) -> list[tuple[str, int]]:
        """Unpinned blobs, least recently read first."""
        query = (
            select(BlobRow.digest, BlobRow.size)
            .where(BlobRow.last_access < accessed_before, ~BlobRow.digest.in_(select(PinRow.digest)))
            .order_by(BlobRow.last_access)
            .limit(limit)
        )
        with Session(self.engine) as session:
            return [(d, s) for d, s in session.execute(query)]

    def remove_blobs(self, digests: list[str]) -> None:
        """In transactions of 50,000 rows (a second or two each), so access flushes are not held up long."""
        for chunk in range(0, len(digests), 50_000):
            with Session(self.engine) as session, session.begin():
                part = digests[chunk : chunk + 50_000]
                for start in range(0, len(part), 500):
                    session.execute(delete(BlobRow).where(BlobRow.digest.in_(part[start : start + 500])))

    def all_digests(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(BlobRow.digest)))

    def record_purge(self, record: PurgeRecord) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(PurgeRow(**record.__dict__))

    def last_purge(self) -> PurgeRecord | None:
        with Session(self.engine) as session:
            row = session.scalars(select(PurgeRow).order_by(PurgeRow.id.desc()).limit(1)).first()
            if row is None:
                return None
            return PurgeRecord(
                row.started_at, row.finished_at, row.reason, row.blobs_removed, row.bytes_removed, row.orphan_files, row.orphan_rows
            )

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A lock the database holds for every node sharing it (PostgreSQL advisory lock), taken
        without waiting: yields whether this process got it. On SQLite, always True: callers lock
        the shared cache directory instead."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")
        with self.engine.connect() as connection:
            got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            try:
                yield got
            finally:
                if got:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()

    # -- fill leases ----------------------------------------------------------------------------
    def claim_fill(self, key_hash: str, key: str, owner: str, node: str) -> FillLease:
        """Insert a lease for `owner` unless one exists; the lease that holds the key now."""
        now = time.time()
        stmt = self._insert()(FillLeaseRow).values(
            key_hash=key_hash, key=key[:1024], owner=owner, node=node, state="opening", synced=0,
            heartbeat=0, started_at=now, renewed_at=now,
        ).on_conflict_do_nothing(index_elements=["key_hash"])
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)
            row = session.get(FillLeaseRow, key_hash)
            assert row is not None
            return _lease(row)

    def take_over_fill(self, lease: FillLease, owner: str, node: str) -> bool:
        """Replace `lease` by one of `owner`, only if it is still exactly as seen (compare and swap)."""
        now = time.time()
        stmt = (
            update(FillLeaseRow)
            .where(
                FillLeaseRow.key_hash == lease.key_hash,
                FillLeaseRow.owner == lease.owner,
                FillLeaseRow.heartbeat == lease.heartbeat,
            )
            .values(owner=owner, node=node, state="opening", size=None, synced=0, digest=None, heartbeat=0, started_at=now, renewed_at=now)
        )
        with self.engine.begin() as connection:
            return connection.execute(stmt).rowcount == 1

    def update_fill(self, key_hash: str, owner: str, **values: Any) -> bool:
        """Renew the owner's lease (heartbeat + 1), setting state, size or digest; False if it was lost."""
        stmt = (
            update(FillLeaseRow)
            .where(FillLeaseRow.key_hash == key_hash, FillLeaseRow.owner == owner)
            .values(heartbeat=FillLeaseRow.heartbeat + 1, renewed_at=time.time(), **values)
        )
        with self.engine.begin() as connection:
            return connection.execute(stmt).rowcount == 1

    def release_fill(self, key_hash: str, owner: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(FillLeaseRow).where(FillLeaseRow.key_hash == key_hash, FillLeaseRow.owner == owner))

    def get_fill(self, key_hash: str) -> FillLease | None:
        with Session(self.engine) as session:
            row = session.get(FillLeaseRow, key_hash)
            return _lease(row) if row is not None else None

    def active_fills(self) -> list[FillLease]:
        with Session(self.engine) as session:
            rows = session.scalars(select(FillLeaseRow).where(FillLeaseRow.state.in_(("opening", "streaming"))))
            return [_lease(row) for row in rows]

    def drop_old_fills(self, *, finished_before: float, renewed_before: float) -> int:
        """Forget finished leases, and leases nobody renewed for a long time (their nodes are gone)."""
        stmt = delete(FillLeaseRow).where(
            or_(
                and_(FillLeaseRow.state.in_(("committed", "failed")), FillLeaseRow.renewed_at < finished_before),
                FillLeaseRow.renewed_at < renewed_before,
            )
        )
        with self.engine.begin() as connection:
            return int(connection.execute(stmt).rowcount or 0)

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, name: str, digests: list[str]) -> None:
        now = time.time()
        with Session(self.engine) as session, session.begin():
            for digest in digests:
                session.execute(
                    self._insert()(PinRow).values(name=name, digest=digest, created_at=now).on_conflict_do_nothing()
                )

    def unpin(self, name: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(PinRow).where(PinRow.name == name))

    def pinned(self) -> dict[str, set[str]]:
        with Session(self.engine) as session:
            pins: dict[str, set[str]] = {}
            for name, digest in session.execute(select(PinRow.name, PinRow.digest)):
                pins.setdefault(name, set()).add(digest)
            return pins

    # -- counters -------------------------------------------------------------------------------
    def add_counters(self, node: str, deltas: Mapping[CounterKey, int]) -> None:
        with Session(self.engine) as session, session.begin():
            for key, delta in deltas.items():
                stmt = self._insert()(CounterRow).values(node=node, source=key.source, upstream=key.upstream, name=key.name, value=delta)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["node", "source", "upstream", "name"], set_={"value": CounterRow.value + delta}
                )
                session.execute(stmt)

    def counters(self) -> dict[CounterKey, int]:
        """Every node's counters, summed."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(CounterRow.source, CounterRow.upstream, CounterRow.name, func.sum(CounterRow.value))
                .group_by(CounterRow.source, CounterRow.upstream, CounterRow.name)
            )
            return {CounterKey(source, upstream, name): int(value) for source, upstream, name, value in rows}


def _lease(row: FillLeaseRow) -> FillLease:
    return FillLease(
        row.key_hash, row.key, row.owner, row.node, row.state, row.size, row.synced, row.digest, row.heartbeat,
        row.started_at, row.renewed_at,
    )


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
