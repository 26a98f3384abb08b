"""References: a source's names (tags, revisions, object keys, API answers) and what each points at."""

from __future__ import annotations

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import ReferenceRow
from proxy.store.records import Reference


class ReferenceIndex:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def get(self, source: str, key: str) -> Reference | None:
        with Session(self.engine) as session:
            row = session.scalars(
                select(ReferenceRow).where(ReferenceRow.source == source, ReferenceRow.key == key)
            ).first()
            return _reference(row) if row is not None else None

    def drop_expired(self, sources: tuple[str, ...], before: float) -> int:
        """Forget references of these sources that expired before `before` (negative answers)."""
        if not sources:
            return 0
        stmt = delete(ReferenceRow).where(ReferenceRow.source.in_(sources), ReferenceRow.expires_at < before)
        with self.engine.begin() as connection:
            return int(connection.execute(stmt).rowcount or 0)

    def put(self, ref: Reference) -> None:
        values = {
            "source": ref.source,
            "key": ref.key,
            "digest": ref.digest,
            "fetched_at": ref.fetched_at,
            "expires_at": ref.expires_at,
            "validators": dict(ref.validators),
            "meta": dict(ref.meta),
        }
        stmt = self._insert(ReferenceRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["source", "key"], set_={k: v for k, v in values.items() if k not in ("source", "key")}
        )
        with Session(self.engine) as session, session.begin():
            session.execute(stmt)


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

