"""The index's bookkeeping beside the blobs: pins, per-node traffic counters, the janitor's passes,
and the lock that keeps one janitor at a time over a shared database."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping

from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.orm import Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import CounterRow, PinRow, PurgeRow
from proxy.store.records import CounterKey, PurgeRecord


class PinIndex:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def replace(self, name: str, digests: list[str]) -> None:
        """The set `name` pins exactly these digests, in one transaction."""
        now = time.time()
        with Session(self.engine) as session, session.begin():
            session.execute(delete(PinRow).where(PinRow.name == name))
            for digest in dict.fromkeys(digests):
                session.execute(self._insert(PinRow).values(name=name, digest=digest, created_at=now).on_conflict_do_nothing())

    def add(self, name: str, digests: list[str]) -> None:
        now = time.time()
        with Session(self.engine) as session, session.begin():
            for digest in digests:
                session.execute(self._insert(PinRow).values(name=name, digest=digest, created_at=now).on_conflict_do_nothing())

    def remove(self, name: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(PinRow).where(PinRow.name == name))

    def all(self) -> dict[str, set[str]]:
        with Session(self.engine) as session:
            pins: dict[str, set[str]] = {}
            for name, digest in session.execute(select(PinRow.name, PinRow.digest)):
                pins.setdefault(name, set()).add(digest)
            return pins


class CounterIndex:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def add(self, node: str, deltas: Mapping[CounterKey, int]) -> None:
        with Session(self.engine) as session, session.begin():
            for key, delta in deltas.items():
                stmt = self._insert(CounterRow).values(node=node, source=key.source, upstream=key.upstream, name=key.name, value=delta)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["node", "source", "upstream", "name"], set_={"value": CounterRow.value + delta}
                )
                session.execute(stmt)

    def totals(self) -> dict[CounterKey, int]:
        """Every node's counters, summed."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(CounterRow.source, CounterRow.upstream, CounterRow.name, func.sum(CounterRow.value))
                .group_by(CounterRow.source, CounterRow.upstream, CounterRow.name)
            )
            return {CounterKey(source, upstream, name): int(value) for source, upstream, name, value in rows}


class PurgeLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, record: PurgeRecord) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(PurgeRow(**record.__dict__))

    def last(self) -> PurgeRecord | None:
        with Session(self.engine) as session:
            row = session.scalars(select(PurgeRow).order_by(PurgeRow.id.desc()).limit(1)).first()
            if row is None:
                return None
            return PurgeRecord(
                row.started_at, row.finished_at, row.reason, row.blobs_removed, row.bytes_removed, row.orphan_files, row.orphan_rows
            )


@contextlib.contextmanager
def exclusive(engine: Engine, name: str) -> Iterator[bool]:
    """A lock the database holds for every node sharing it (PostgreSQL advisory lock), taken
    without waiting: yields whether this process got it. On SQLite, always True: callers lock
    the shared cache directory instead."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")
    with engine.connect() as connection:
        got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
        try:
            yield got
        finally:
            if got:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
