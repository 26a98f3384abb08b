"""The index's database engine: SQLite (WAL) embedded, PostgreSQL for a fleet; one INSERT dialect for both."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event


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


def insert_for(engine: Engine) -> Any:
    """The INSERT construct with ON CONFLICT for this engine's dialect. Imported here, once per
    index object: the PostgreSQL dialect costs an embedded index 2 MiB of memory it never uses."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert
