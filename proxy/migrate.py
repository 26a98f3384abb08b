"""Alembic from inside pullthrough: `db upgrade`, and the automatic upgrade of an embedded SQLite.

The server itself never imports alembic: it reads the schema's revision with one query and, when an
embedded SQLite is behind, runs the upgrade in a child process (`python -m proxy.migrate`). Alembic
and its templates would otherwise stay in the server's memory for its whole life (about 10 MiB).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "_migrations"  # a link to the top-level migrations/ in a checkout


class DatabaseNotReady(Exception):
    """A shared database that is not at the schema this version needs."""


# The newest revision under _migrations/versions; tests/test_migrations.py checks it is alembic's head.
SCHEMA_HEAD = "0006"


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


# pg_advisory_lock key: nodes starting at once run the migrations one after the other.
MIGRATION_LOCK = 0x70756C6C  # "pull"


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

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


def current_revision(engine: Engine) -> str | None:
    """The schema's alembic revision, read without alembic (None: a database never migrated)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def prepare_database(engine: Engine, database_url: str) -> None:
    """Upgrade an embedded SQLite index; insist that a shared database was upgraded by `db upgrade`."""
    current = current_revision(engine)
    if current == SCHEMA_HEAD:
        return
    if engine.dialect.name == "sqlite":
        log.info("upgrading the index from revision %s to %s", current, SCHEMA_HEAD)
        done = subprocess.run([sys.executable, "-m", "proxy.migrate", database_url], capture_output=True, text=True)
        if done.returncode != 0:
            raise DatabaseNotReady(f"the index could not be upgraded: {done.stderr.strip().splitlines()[-1:]}")
        return
    raise DatabaseNotReady(f"database is at revision {current}, this version needs {SCHEMA_HEAD}: run `pullthrough db upgrade`")


if __name__ == "__main__":  # the server's child process for an embedded index
    logging.basicConfig(level=logging.WARNING)
    upgrade(sys.argv[1])
