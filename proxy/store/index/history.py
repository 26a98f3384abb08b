"""The traffic history behind the dashboard's charts: one row of fleet-wide counter totals per time
slot, written by whichever node samples the slot first, and pruned to a bounded window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from proxy.store.index.engine import insert_for
from proxy.store.index.models import HistoryRow


@dataclass(frozen=True)
class Sample:
    """The fleet's counter totals (by counter name) as read at `taken_at`, for the slot `slot` (ms)."""

    slot: int
    taken_at: float
    totals: Mapping[str, int]


class HistoryIndex:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = insert_for(engine)

    def record(self, sample: Sample, keep_after: float) -> None:
        """Save `sample` unless another node took its slot already (its totals are the same fleet's,
        read moments apart), and forget the slots before `keep_after` (seconds since the epoch):
        only the node whose point was saved prunes, once per slot for the whole fleet."""
        stmt = self._insert(HistoryRow).values(slot=sample.slot, taken_at=sample.taken_at, totals=dict(sample.totals))
        with Session(self.engine) as session, session.begin():
            saved = session.execute(stmt.on_conflict_do_nothing(index_elements=["slot"])).rowcount
            if saved:
                session.execute(delete(HistoryRow).where(HistoryRow.slot < int(keep_after * 1000)))

    def since(self, after: float) -> list[Sample]:
        """The samples of the slots from `after` (seconds since the epoch) on, oldest first."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(HistoryRow.slot, HistoryRow.taken_at, HistoryRow.totals)
                .where(HistoryRow.slot >= int(after * 1000))
                .order_by(HistoryRow.slot)
            )
            return [Sample(slot, taken_at, totals) for slot, taken_at, totals in rows]
