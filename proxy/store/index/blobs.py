"""Blob rows (size, access times, who filled them) and the read scopes that admitted each digest."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from sqlalchemy import Engine, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import BlobRow, BlobScopeRow, PinRow
from proxy.store.records import BlobRecord, UsageRow

_ADMITTED = select(BlobScopeRow.digest).where(BlobScopeRow.digest == bindparam("d"), BlobScopeRow.scope == bindparam("s"))
_BLOB = select(
    BlobRow.digest, BlobRow.size, BlobRow.media_type, BlobRow.created_at, BlobRow.last_access, BlobRow.hits,
    BlobRow.source, BlobRow.upstream,
).where(BlobRow.digest == bindparam("d"))
DELETE_BATCH = 500
TRANSACTION_ROWS = 50_000


class BlobIndex:
    """Queries over the blobs table. Blocking: the store calls it from its index threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def add(
        self, digest: str, size: int, media_type: str | None = None, *, source: str | None = None, upstream: str | None = None,
        created_at: float | None = None,
    ) -> None:
        """A committed blob's row; `created_at` (default now) is when it was downloaded, which a
        lifetime counted from the download starts at."""
        now = time.time()
        stmt = self._insert(BlobRow).values(
            digest=digest, size=size, media_type=media_type, created_at=now if created_at is None else created_at,
            last_access=now, hits=0,
            source=source, upstream=upstream,
        )
        # A row the sweep adopted ("unknown": it found the file before the committer's row, e.g.
        # across NFS clocks that disagree) takes the committer's origin when that row arrives.
        excluded = stmt.excluded
        unknown = BlobRow.source == "unknown"
        changes = {
            "source": case((unknown, excluded.source), else_=BlobRow.source),
            "upstream": case((unknown, excluded.upstream), else_=BlobRow.upstream),
        }
        if media_type is not None:
            changes["media_type"] = excluded.media_type
        stmt = stmt.on_conflict_do_update(index_elements=["digest"], set_=changes)
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)

    def get(self, digest: str) -> BlobRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(_BLOB, {"d": digest}).first()
        return BlobRecord(*row) if row is not None else None

    def record_access(self, accesses: Mapping[str, tuple[float, int]]) -> None:
        """Apply a batch of (last access, hit count) per digest in one transaction."""
        if not accesses:
            return
        table = BlobRow.__table__
        statement = (
            update(table)
            .where(table.c.digest == bindparam("d"))
            .values(last_access=bindparam("la"), hits=table.c.hits + bindparam("h"))
        )
        rows = [{"d": digest, "la": last, "h": hits} for digest, (last, hits) in accesses.items()]
        with self.engine.begin() as connection:
            connection.execute(statement, rows)

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
        return self._unpinned_before(BlobRow.last_access, cutoff, source=source, upstream=upstream, exclude=exclude, limit=limit)

    def downloaded_before(
        self, cutoff: float, *, source: str | None, upstream: str | None, exclude: list[tuple[str | None, str | None]], limit: int
    ) -> list[tuple[str, int]]:
        """As `unused_since`, by the row's creation (the commit of the download) instead of the last read."""
        return self._unpinned_before(BlobRow.created_at, cutoff, source=source, upstream=upstream, exclude=exclude, limit=limit)

    def _unpinned_before(
        self, column: InstrumentedAttribute[float], cutoff: float, *, source: str | None, upstream: str | None,
        exclude: list[tuple[str | None, str | None]], limit: int,
    ) -> list[tuple[str, int]]:
        query = select(BlobRow.digest, BlobRow.size).where(column < cutoff, ~BlobRow.digest.in_(select(PinRow.digest)))
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
            return [(d, s) for d, s in session.execute(query.order_by(column).limit(limit))]

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

    def remove(self, digests: list[str]) -> None:
        """Rows and their scopes, in transactions of 50,000 rows (a second or two each), so access
        flushes are not held up long."""
        for chunk in range(0, len(digests), TRANSACTION_ROWS):
            with Session(self.engine) as session, session.begin():
                part = digests[chunk : chunk + TRANSACTION_ROWS]
                for start in range(0, len(part), DELETE_BATCH):
                    batch = part[start : start + DELETE_BATCH]
                    session.execute(delete(BlobScopeRow).where(BlobScopeRow.digest.in_(batch)))
                    session.execute(delete(BlobRow).where(BlobRow.digest.in_(batch)))

    def all_digests(self) -> set[str]:
        with Session(self.engine) as session:
            return set(session.scalars(select(BlobRow.digest)))

    # -- read scopes -------------------------------------------------------------------------------
    def admit(self, scope: str, digests: Iterable[str]) -> None:
        """Record that `scope` may read these digests (idempotent)."""
        now = time.time()
        rows = [{"digest": d, "scope": scope, "created_at": now} for d in dict.fromkeys(digests)]
        if not rows:
            return
        stmt = self._insert(BlobScopeRow).on_conflict_do_nothing(index_elements=["digest", "scope"])
        with self.engine.begin() as connection:
            connection.execute(stmt, rows)

    def admitted(self, scope: str, digest: str) -> bool:
        # Core, not an ORM session: asked on the first hit of every (scope, blob) after a restart,
        # and a session costs three times the query.
        with self.engine.connect() as connection:
            return connection.execute(_ADMITTED, {"d": digest, "s": scope}).first() is not None

    def scopes_of(self, digest: str) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(BlobScopeRow.scope).where(BlobScopeRow.digest == digest)))

    def drop_unbacked_scopes(self, created_before: float) -> int:
        """Admissions of digests that never became (or no longer are) a blob, older than the cutoff:
        an upstream listed a layer nobody pulled."""
        stmt = delete(BlobScopeRow).where(
            BlobScopeRow.created_at < created_before, ~BlobScopeRow.digest.in_(select(BlobRow.digest))
        )
        with self.engine.begin() as connection:
            return int(connection.execute(stmt).rowcount or 0)
