"""Alembic from inside pullthrough: `db upgrade`, and the automatic upgrade of an embedded SQLite."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "_migrations"  # a link to the top-level migrations/ in a checkout


class DatabaseNotReady(Exception):
    """A shared database that is not at the schema this version needs."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


# pg_advisory_lock key: nodes starting at once run the migrations one after the other.
MIGRATION_LOCK = 0x70756C6C  # "pull"


def upgrade(database_url: str, revision: str = "head") -> None:
    config = alembic_config(database_url)
    if not database_url.startswith("postgresql"):
        command.upgrade(config, revision)
        return
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            try:
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                connection.commit()
    finally:
        engine.dispose()


def prepare_database(engine: Engine, database_url: str) -> None:
    """Upgrade an embedded SQLite index; insist that a shared database was upgraded by `db upgrade`."""
    if engine.dialect.name == "sqlite":
        upgrade(database_url)
        return
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise DatabaseNotReady(f"database is at revision {current}, this version needs {head}: run `pullthrough db upgrade`")
