"""The Alembic migrations build exactly the schema the SQLAlchemy models describe, and go down again."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from proxy.migrate import alembic_config, upgrade
from proxy.store.index import Base, make_engine


def test_migrations_match_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert {"blobs", "refs", "pins", "counters", "purges"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_migrations_go_down_to_nothing_and_up_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    assert "counters" in inspect(engine).get_table_names()
    engine.dispose()


def test_the_read_scope_migration_admits_what_each_reference_names(tmp_path: Path) -> None:
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url, "0003")
    engine = make_engine(url)
    digest = "sha256:" + "a" * 64
    rows = [
        ("oci", "docker.io/library/alpine:3.20", digest),
        ("s3", "models/sd/unet.bin", "sha256:" + "b" * 64),
        ("ipfs", "bafy123/x", "sha256:" + "c" * 64),
        ("hf-file", "models/acme/gated@" + "1" * 40 + "/model.safetensors", "d" * 64),  # the Hub's: bare hex
        ("hf-rev", "models/acme/gated@main", "1" * 40),  # a commit, not a blob: nothing to admit
        ("web", "https://example.com/x", "sha256:" + "e" * 64),  # its prefix is in the config, not here
    ]
    with engine.begin() as connection:
        for n, (source, key, value) in enumerate(rows):
            connection.execute(
                text("INSERT INTO refs (id, source, key, digest, fetched_at, expires_at, validators, meta) "
                     "VALUES (:id, :source, :key, :digest, 0, 0, '{}', '{}')"),
                {"id": n + 1, "source": source, "key": key, "digest": value},
            )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        admitted = set(connection.execute(text("SELECT digest, scope FROM blob_scopes")))
    engine.dispose()
    assert admitted == {
        (digest, "oci:docker.io/library/alpine"),
        ("sha256:" + "b" * 64, "s3:models"),
        ("sha256:" + "c" * 64, "ipfs"),
        ("sha256:" + "d" * 64, "hf:models/acme/gated"),
    }


def test_the_schema_head_the_server_checks_is_alembics_head(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from proxy.migrate import SCHEMA_HEAD

    head = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path / 'index.db'}")).get_current_head()
    assert head == SCHEMA_HEAD


def test_an_embedded_index_behind_the_head_is_upgraded_by_a_child_process(tmp_path: Path) -> None:
    from proxy.migrate import SCHEMA_HEAD, current_revision, prepare_database

    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url, "0003")
    engine = make_engine(url)
    assert current_revision(engine) == "0003"
    prepare_database(engine, url)
    assert current_revision(engine) == SCHEMA_HEAD
    assert "followed" in {column["name"] for column in inspect(engine).get_columns("fill_leases")}
    engine.dispose()


def test_the_history_migration_adds_its_table_beside_the_saved_counters_and_goes_down_again(tmp_path: Path) -> None:
    from sqlalchemy import text

    from proxy.store.index import Index, Sample

    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url, "0005")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO counters (node, source, upstream, name, value) VALUES ('a', 'oci', 'docker.io', 'hits', 7)"))
    engine.dispose()
    upgrade(url)
    index = Index(make_engine(url))
    index.history.record(Sample(10_000, 10.0, {"hits": 7}), keep_after=0)
    assert index.history.since(0) == [Sample(10_000, 10.0, {"hits": 7})]
    assert sum(index.counters.totals().values()) == 7
    index.dispose()
    command.downgrade(alembic_config(url), "0005")
    engine = make_engine(url)
    assert "traffic_history" not in inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT value FROM counters")).scalar() == 7
    engine.dispose()
