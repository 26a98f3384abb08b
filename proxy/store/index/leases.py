"""Fill lease rows: claim, compare-and-swap takeover, renewal, and the janitor's clean-up."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import FillLeaseRow
from proxy.store.records import FillLease, LeaseState


class LeaseIndex:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def claim(self, key_hash: str, key: str, owner: str, node: str) -> FillLease:
        """Insert a lease for `owner` unless one exists; the lease that holds the key now."""
        now = time.time()
        stmt = self._insert(FillLeaseRow).values(
            key_hash=key_hash, key=key[:1024], owner=owner, node=node, state=LeaseState.OPENING, synced=0,
            heartbeat=0, started_at=now, renewed_at=now,
        ).on_conflict_do_nothing(index_elements=["key_hash"])
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)
            row = session.get(FillLeaseRow, key_hash)
            assert row is not None
            return _lease(row)

    def take_over(self, lease: FillLease, owner: str, node: str) -> bool:
        """Replace `lease` by one of `owner`, only if it is still exactly as seen (compare and swap)."""
        now = time.time()
        stmt = (
            update(FillLeaseRow)
            .where(
                FillLeaseRow.key_hash == lease.key_hash,
                FillLeaseRow.owner == lease.owner,
                FillLeaseRow.heartbeat == lease.heartbeat,
            )
            .values(
                owner=owner, node=node, state=LeaseState.OPENING, size=None, synced=0, digest=None, heartbeat=0,
                started_at=now, renewed_at=now, followed=False,
            )
        )
        with self.engine.begin() as connection:
            return connection.execute(stmt).rowcount == 1

    def update(self, key_hash: str, owner: str, *, live_only: bool = False, **values: Any) -> bool:
        """Renew the owner's lease (heartbeat + 1), setting state, size or digest; False if it was lost.
        With `live_only`, only while the fill is still opening or streaming: a renewal that reaches
        the database after the owner's own commit (or failure) must not turn it back."""
        conditions = [FillLeaseRow.key_hash == key_hash, FillLeaseRow.owner == owner]
        if live_only:
            conditions.append(FillLeaseRow.state.in_((LeaseState.OPENING, LeaseState.STREAMING)))
        stmt = (
            update(FillLeaseRow)
            .where(*conditions)
            .values(heartbeat=FillLeaseRow.heartbeat + 1, renewed_at=time.time(), **values)
        )
        with self.engine.begin() as connection:
            return connection.execute(stmt).rowcount == 1

    def follow(self, key_hash: str, owner: str) -> None:
        """Tell `owner` that another process follows its fill (it then publishes its progress)."""
        stmt = (
            update(FillLeaseRow)
            .where(FillLeaseRow.key_hash == key_hash, FillLeaseRow.owner == owner, FillLeaseRow.followed.is_(False))
            .values(followed=True)
        )
        with self.engine.begin() as connection:
            connection.execute(stmt)

    def release(self, key_hash: str, owner: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(FillLeaseRow).where(FillLeaseRow.key_hash == key_hash, FillLeaseRow.owner == owner))

    def get(self, key_hash: str) -> FillLease | None:
        with Session(self.engine) as session:
            row = session.get(FillLeaseRow, key_hash)
            return _lease(row) if row is not None else None

    def active(self) -> list[FillLease]:
        with Session(self.engine) as session:
            rows = session.scalars(select(FillLeaseRow).where(FillLeaseRow.state.in_((LeaseState.OPENING, LeaseState.STREAMING))))
            return [_lease(row) for row in rows]

    def drop_old(self, *, finished_before: float, renewed_before: float) -> int:
        """Forget finished leases, and leases nobody renewed for a long time (their nodes are gone)."""
        stmt = delete(FillLeaseRow).where(
            or_(
                and_(FillLeaseRow.state.in_((LeaseState.COMMITTED, LeaseState.FAILED)), FillLeaseRow.renewed_at < finished_before),
                FillLeaseRow.renewed_at < renewed_before,
            )
        )
        with self.engine.begin() as connection:
            return int(connection.execute(stmt).rowcount or 0)


def _lease(row: FillLeaseRow) -> FillLease:
    return FillLease(
        row.key_hash, row.key, row.owner, row.node, row.state, row.size, row.synced, row.digest, row.heartbeat,
        row.started_at, row.renewed_at, bool(row.followed),
    )
