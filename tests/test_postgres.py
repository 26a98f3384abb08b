"""PostgreSQL as the index of a cache that several nodes share: migrations that several nodes may
run at once, and one janitor at a time. (The OCI suite itself runs against PostgreSQL with
PULLTHROUGH_TEST_DATABASE=postgresql, as .ci/run does.)"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, inspect

from proxy.store.index import Index, make_engine
from tests.conftest import drop_postgres_database, fresh_postgres_database, require_tool


@pytest.fixture
def database():  # type: ignore[no-untyped-def]
    require_tool("pg_isready")
    url = fresh_postgres_database()
    yield url
    drop_postgres_database(url)


def test_several_nodes_may_run_the_migrations_at_once(database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def upgrade(n: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "db", "upgrade", "--database-url", database,
                               "--cache-dir", str(tmp_path / f"node{n}")], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(upgrade, range(3)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    engine = create_engine(database)
    assert {"blobs", "refs", "pins", "counters", "purges", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_two_janitors_never_both_run(database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # This process holds the database's janitor lock; a node with another cache dir (so the lock
    # file cannot be what stops it) must skip its pass.
    index = Index(make_engine(database))
    with index.exclusive("janitor") as got:
        assert got
        with index.exclusive("janitor") as again:
            assert not again  # not even another connection of the same process
        other = subprocess.run([sys.executable, "-m", "proxy", "purge", "--database-url", database,
                                "--cache-dir", str(tmp_path / "node2")], capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr
        assert "another janitor is running" in other.stdout
    after = subprocess.run([sys.executable, "-m", "proxy", "purge", "--database-url", database,
                            "--cache-dir", str(tmp_path / "node2")], capture_output=True, text=True, timeout=120)
    assert "removed 0 blobs" in after.stdout
    index.engine.dispose()
