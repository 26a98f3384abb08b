"""The index: SQLAlchemy models and every SQL statement pullthrough runs, one module per table family.

Methods block; the store calls them from its index threads. SQLite (WAL) is the embedded default,
PostgreSQL the engine for a cache that several nodes share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine

from proxy.store.index.blobs import BlobIndex
from proxy.store.index.engine import make_engine
from proxy.store.index.history import HistoryIndex, Sample
from proxy.store.index.housekeeping import CounterIndex, PinIndex, PurgeLog, exclusive
from proxy.store.index.leases import LeaseIndex
from proxy.store.index.models import Base
from proxy.store.index.references import ReferenceIndex
from proxy.store.index.sets import SetRows

__all__ = ["Base", "Index", "Sample", "make_engine"]


class Index:
    """Every table family of one database, each behind its own small query class."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.blobs = BlobIndex(engine)
        self.refs = ReferenceIndex(engine)
        self.leases = LeaseIndex(engine)
        self.pins = PinIndex(engine)
        self.counters = CounterIndex(engine)
        self.purges = PurgeLog(engine)
        self.history = HistoryIndex(engine)
        self.sets = SetRows(engine)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        with exclusive(self.engine, name) as got:
            yield got

    def dispose(self) -> None:
        self.engine.dispose()
