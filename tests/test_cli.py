"""The `pullthrough` command as an operator meets it: one rule for errors (2: usage or configuration,
1: a runtime failure, one line each, a traceback only with --debug), `config check`, read-only
commands that create nothing, honest `stats`, pins from what is on disk, `--platform`, bytes in
the progress and the summary, and `--json` on every command. Every test runs the real command."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REQUIRE_REAL, default_registries, drop_postgres_database, fresh_postgres_database
from tests.servers.pullthrough import render_config

RUN = [sys.executable, "-m", "proxy"]
DEAD_INDEX = "postgresql://pt:s3cretpw@127.0.0.1:1/nothing"
SET = "market-7"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
    child_env.update(env or {})
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, env=child_env)


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The one stderr line of a command that failed with `status`."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pullthrough: "), result.stderr
    return lines[0]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def write_config(path: Path, registries: list[dict] | None = None, **settings: object) -> Path:
    path.write_text(render_config(settings, registries or []))
    return path


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` on a read-only bind mount: root ignores permission bits, not a read-only mount."""
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot make a read-only bind mount: {mounted.stderr.strip()}"
        if REQUIRE_REAL:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def sqlite_revision(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]


# -- one rule for every command ----------------------------------------------------------------------

def test_a_log_level_that_names_no_level_is_one_line_naming_the_key_and_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", cache_dir=tmp_path / "cache", log_level="verbose")
    for command in (["serve"], ["config", "check"], ["purge"], ["pins"]):
        line = one_line(run(*command, "--config", str(config)), 2)
        assert line.startswith("pullthrough: log_level: "), line
    ok(run("config", "check", "--config", str(write_config(tmp_path / "upper.toml", cache_dir=tmp_path / "c", log_level="DEBUG"))))


def test_an_index_that_does_not_answer_is_one_line_without_its_password_and_exit_1(tmp_path: Path) -> None:
    tmp_path.joinpath("cache").mkdir()
    where = ["--cache-dir", str(tmp_path / "cache"), "--database-url", DEAD_INDEX]
    for command in (["purge"], ["verify"], ["stats", "--offline"], ["db", "upgrade"]):
        line = one_line(run(*command, *where), 1)
        assert "127.0.0.1:1" in line and "connection refused" in line.lower(), line
        assert "s3cretpw" not in line and "***" in line, line


def test_debug_shows_the_traceback_as_an_option_or_from_the_environment(tmp_path: Path) -> None:
    where = ["--cache-dir", str(tmp_path), "--database-url", DEAD_INDEX]
    flag = run("--debug", "purge", *where)
    assert flag.returncode == 1 and "Traceback (most recent call last)" in flag.stderr
    variable = run("purge", *where, env={"PULLTHROUGH_DEBUG": "1"})
    assert variable.returncode == 1 and "Traceback (most recent call last)" in variable.stderr


def test_only_sqlite_and_postgresql_with_psycopg_pass_as_the_index(tmp_path: Path) -> None:
    for command, url in ((["serve"], "mysql://u:p@127.0.0.1/x"), (["purge"], "mysql://u:p@127.0.0.1/x"),
                         (["config", "check"], "postgresql+psycopg2://u@127.0.0.1/x"), (["pins"], "not a url")):
        line = one_line(run(*command, "--cache-dir", str(tmp_path / "c"), "--database-url", url), 2)
        assert line.startswith("pullthrough: database_url: "), line
    assert not (tmp_path / "c").exists()


def test_a_postgresql_index_without_its_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from proxy.config import ConfigError, load_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^database_url: .*pip install 'pullthrough\[postgres\]'"):
        load_settings(database_url="postgresql://u@127.0.0.1/x")


def test_usage_errors_are_one_line_naming_the_option_and_exit_2(tmp_path: Path) -> None:
    where = ["--cache-dir", str(tmp_path / "c")]
    assert "--to-size: 'lots' is not a size" in one_line(run("purge", *where, "--to-size", "lots"), 2)
    assert "--older-than: " in one_line(run("purge", *where, "--older-than", "soon"), 2)
    assert "--bogus" in one_line(run("purge", "--bogus"), 2)
    assert "--platform: 'arm64' is not OS/ARCH" in one_line(run("prefetch", *where, "--platform", "arm64", "x:1"), 2)
    assert "at least one resource" in one_line(run("prefetch", *where), 2)
    assert "exclude each other" in one_line(run("stats", "--url", "http://127.0.0.1:1", "--offline"), 2)
    assert not (tmp_path / "c").exists()


def test_writing_to_a_read_only_cache_fails_in_one_line_and_verify_still_reads_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok(run("db", "upgrade", "--cache-dir", str(cache)))
    (cache / "blobs").mkdir()
    with read_only(cache):
        for command in (["purge", "--grace", "0s", "--older-than", "0s"], ["verify", "--repair"]):
            line = one_line(run(*command, "--cache-dir", str(cache)), 1)
            assert line == f"pullthrough: cannot write to {cache}: read-only file system", line
        checked = ok(run("verify", "--cache-dir", str(cache), "--json"))
        assert json.loads(checked.stdout) == {"bad": [], "repaired": False}
        assert ok(run("pins", "--cache-dir", str(cache))).stdout.strip() == "no resource sets configured and nothing pinned"


# -- config check ----------------------------------------------------------------------------------

def test_config_check_summarises_a_good_config_and_binds_and_creates_nothing(tmp_path: Path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    cache = tmp_path / "not" / "yet" / "cache"
    config = write_config(
        tmp_path / "c.toml", [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}],
        listen=f"127.0.0.1:{port}", cache_dir=cache, max_size="500GB", min_free="20GiB", default_ttl="1h30m",
        database_url=DEAD_INDEX, web={"allow": ["https://example.com/models/"]},
    )
    config.write_text(config.read_text() + f'\n[[resource_sets]]\nname = "{SET}"\nimages = ["docker.io/library/single:1"]\n')
    text = ok(run("config", "check", "--config", str(config)))
    assert f"listen          127.0.0.1:{port}" in text.stdout and "s3cretpw" not in text.stdout
    summary = json.loads(ok(run("config", "check", "--config", str(config), "--json")).stdout)
    assert summary["max_size"] == "500.0GB" and summary["min_free"] == "21.5GB" and summary["default_ttl"] == "1h30m"
    assert summary["index"] == "postgresql+psycopg://pt:***@127.0.0.1:1/nothing"  # checked, not connected to
    assert summary["registries"] == ["docker.io (default)"] and summary["resource_sets"] == [SET]
    assert summary["web_prefixes"] == ["https://example.com/models/"]
    assert not (tmp_path / "not").exists()  # created nothing
    held.close()  # and bound nothing: the port stayed ours throughout


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('max_size = "500 lightyears"\n', "max_size"),
        ('purge_interval = "often"\n', "purge_interval"),
        ('listen = "nowhere"\n', "listen"),
        ('cache_dirr = "/x"\n', "cache_dirr"),
        ('database_url = "mysql://u@h/x"\n', "database_url"),
    ],
)
def test_config_check_names_the_bad_key(tmp_path: Path, setting: str, key: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'cache_dir = "{tmp_path / "cache"}"\n' + setting)
    assert one_line(run("config", "check", "--config", str(config)), 2).startswith(f"pullthrough: {key}: ")


def test_config_check_refuses_a_cache_dir_that_could_not_be_written(tmp_path: Path) -> None:
    parent = tmp_path / "mnt"
    parent.mkdir()
    with read_only(parent):
        line = one_line(run("config", "check", "--cache-dir", str(parent / "cache")), 2)
    assert line == f"pullthrough: cache_dir: {parent} is not writable (and {parent / 'cache'} does not exist)"


# -- read-only commands ------------------------------------------------------------------------------

def test_read_only_commands_create_no_cache_and_no_index(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for command in (["pins"], ["verify", "--json"]):
        assert one_line(run(*command, "--cache-dir", str(cache)), 1) == f"pullthrough: no cache at {cache}"
    assert one_line(run("stats", "--offline", "--cache-dir", str(cache)), 1) == f"pullthrough: no index at {cache / 'index.db'}"
    assert not cache.exists()
    cache.mkdir()
    assert one_line(run("pins", "--cache-dir", str(cache)), 1) == f"pullthrough: no index at {cache / 'index.db'}"
    assert list(cache.iterdir()) == []


def test_read_only_commands_migrate_nothing_and_say_how_to_upgrade(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok(run("db", "upgrade", "--cache-dir", str(cache), "--revision", "0004"))
    for command in (["pins"], ["verify"], ["stats", "--offline"]):
        line = one_line(run(*command, "--cache-dir", str(cache)), 1)
        assert "is at revision 0004" in line and "run `pullthrough db upgrade`" in line, line
    assert sqlite_revision(cache / "index.db") == "0004"


# -- stats -------------------------------------------------------------------------------------------

def test_stats_fails_when_no_server_answers_and_reads_the_index_only_when_asked(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    line = one_line(run("stats", "--url", f"http://127.0.0.1:{port}"), 1)
    assert line.startswith(f"pullthrough: no server answers at http://127.0.0.1:{port}: connection refused"), line
    cache = tmp_path / "cache"
    ok(run("db", "upgrade", "--cache-dir", str(cache)))
    assert one_line(run("stats", "--cache-dir", str(cache), "--json"), 1)  # the default listen address: nobody there
    offline = json.loads(ok(run("stats", "--cache-dir", str(cache), "--offline", "--json")).stdout)
    assert offline["hits"] == 0 and offline["cache"]["entries"] == 0


# -- with an upstream: prefetch, platforms, progress, pins, json ---------------------------------------

@pytest.fixture(scope="module")
def prefetched(upstream, tmp_path_factory) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A cache holding the set SET, prefetched by the command; yields its config. Its index is
    SQLite, or in CI's PostgreSQL pass a database of its own (the read-only commands then read it
    through a READ ONLY session)."""
    root = tmp_path_factory.mktemp("cli")
    settings: dict[str, object] = {"cache_dir": str(root / "cache")}
    database = fresh_postgres_database() if os.environ.get("PULLTHROUGH_TEST_DATABASE") == "postgresql" else None
    if database:
        settings["database_url"] = database
    config = root / "pullthrough.toml"
    config.write_text(
        render_config(settings, default_registries(upstream))
        + f'\n[[resource_sets]]\nname = "{SET}"\nimages = ["docker.io/library/single:1"]\n'
    )
    try:
        done = ok(run("prefetch", "--config", str(config), "--set", SET))
        assert f"{SET}: docker.io/library/single:1: " in done.stdout
        yield config
    finally:
        if database:
            drop_postgres_database(database)


def test_platform_picks_the_manifest_of_a_multi_arch_image_and_defaults_to_the_nodes_own(upstream, prefetched, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = upstream.images["multi/index:1"]
    arches = {
        child.manifest_digest: json.loads(httpx.get(f"{upstream.url}/v2/multi/index/blobs/{child.config.digest}").content)["architecture"]
        for child in image.children
    }
    def laid_out(*platform_options: str) -> set[str]:
        target = tmp_path / f"layout{len(platform_options)}{'-'.join(platform_options).replace('/', '_')}"
        done = ok(run("materialize", "--config", str(prefetched), "docker.io/multi/index:1", "--to", str(target),
                      *platform_options, "--json"))
        assert json.loads(done.stdout)["files"] > 0
        return {"sha256:" + p.name for p in (target / "blobs" / "sha256").iterdir()}
    arm64 = laid_out("--platform", "linux/arm64")
    assert {d for d, arch in arches.items() if d in arm64} == {d for d, arch in arches.items() if arch == "arm64"}
    both = laid_out("--platform", "linux/amd64,linux/arm64")
    assert set(arches) <= both
    own = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    default = laid_out()
    assert {arch for d, arch in arches.items() if d in default} == {own}


def test_prefetch_counts_bytes_in_its_progress_and_its_summary(upstream, prefetched) -> None:  # type: ignore[no-untyped-def]
    big = upstream.images["library/big:1"]
    size = sum(b.size for b in big.all_blobs())
    done = ok(run("prefetch", "--config", str(prefetched), "--progress", "docker.io/library/big:1"))
    assert "1 of 1 resources in the cache, 32.0 MiB" in done.stdout
    assert "32.0MB" in done.stderr.replace("\r", "\n")  # tqdm's bytes (binary divisor), not a count of resources
    document = json.loads(ok(run("prefetch", "--config", str(prefetched), "docker.io/library/big:1", "--json")).stdout)
    assert document["bytes"] > size and document["failed"] == 0 and document["resources"][0]["error"] is None
    quiet = ok(run("prefetch", "--config", str(prefetched), "docker.io/library/big:1"))
    assert quiet.stderr == ""  # stderr is no terminal here: no bar unless --progress


def test_every_command_answers_one_json_document(prefetched, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = ["--config", str(prefetched)]
    assert json.loads(ok(run("purge", *config, "--dry-run", "--json")).stdout)["dry_run"] is True
    assert json.loads(ok(run("verify", *config, "--json")).stdout) == {"bad": [], "repaired": False}
    assert json.loads(ok(run("stats", *config, "--offline", "--json")).stdout)["cache"]["entries"] > 0
    assert json.loads(ok(run("pins", *config, "--json")).stdout)[SET]["pinned"] > 0
    assert json.loads(ok(run("config", "check", *config, "--json")).stdout)["resource_sets"] == [SET]
    assert json.loads(ok(run("db", "upgrade", *config, "--json")).stdout)["revision"] == "head"
    fetched = json.loads(ok(run("prefetch", *config, "docker.io/library/single:1", "--json")).stdout)
    assert fetched["resources"][0]["files"] > 0 and fetched["bytes"] > 0
    laid = json.loads(ok(run("materialize", *config, "docker.io/library/single:1", "--to", str(tmp_path / "o"), "--json")).stdout)
    assert laid["files"] == fetched["resources"][0]["files"] and laid["bytes"] == fetched["bytes"]
    failed = run("prefetch", *config, "ftp://nope", "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["failed"] == 1 and len(failed.stderr.splitlines()) == 1


def wait_listed(pt) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 90
    while True:
        listing = httpx.get(f"{pt.url}/api/markets/{SET}/required-resources", timeout=10).json()
        state = listing["status"]["images"]["docker.io/library/single:1"]
        if state["cached"] or state["error"]:
            return state
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)


def test_pins_come_from_the_disk_after_a_failed_prefetch_and_a_repair(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(resource_sets=[{"name": SET, "images": ["docker.io/library/single:1"]}])
    assert wait_listed(pt)["cached"]
    config = ["--config", str(pt.config_path)]
    before = json.loads(ok(run("pins", *config, "--json")).stdout)[SET]
    assert before["configured"] and before["pinned"] == before["present"] >= 3 and before["missing"] == []

    # The upstream goes away and the set also names an image the cache never had: its prefetch
    # fails (a cached one is served stale), and the pins stay as they were.
    dead = tmp_path / "dead.toml"
    dead.write_text(pt.config_path.read_text().replace(upstream.url, "http://127.0.0.1:9")
                    .replace('library/single:1"', 'library/single:1", "docker.io/library/many:1"'))
    assert "library/many:1" in dead.read_text()
    failed = run("prefetch", "--config", str(dead), "--set", SET)
    assert failed.returncode == 1 and f"{SET}: docker.io/library/many:1: failed: " in failed.stdout, failed.stdout
    assert json.loads(ok(run("pins", *config, "--json")).stdout)[SET] == before
    assert ok(run("pins", *config)).stdout.startswith(f"{SET}: {before['pinned']} blobs pinned, {before['present']} on disk (")

    # A pinned layer rots and `verify --repair` removes it: pins and the listing say so.
    layer = upstream.images["library/single:1"].layers[0].digest
    pt.blob_path(layer).write_bytes(b"rotten")
    assert layer in ok(run("verify", *config, "--repair")).stdout
    after = json.loads(ok(run("pins", *config, "--json")).stdout)[SET]
    assert after["pinned"] == before["pinned"] and after["present"] == before["present"] - 1 and after["missing"] == [layer]
    assert f"  missing: {layer}" in ok(run("pins", *config)).stdout
    listed = httpx.get(f"{pt.url}/api/markets/{SET}/required-resources", timeout=10).json()["status"]["images"]
    assert listed["docker.io/library/single:1"]["cached"] is False and listed["docker.io/library/single:1"]["missing"] == 1

    # A live server's stats, by the command, agree with its /stats.
    live = json.loads(ok(run("stats", *config, "--url", pt.url, "--json")).stdout)
    assert live["pins"][SET] == {"blobs": before["pinned"]}


def test_a_set_whose_only_prefetch_failed_is_listed_with_nothing_pinned(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}],
                          cache_dir=tmp_path / "cache")
    config.write_text(config.read_text() + f'\n[[resource_sets]]\nname = "{SET}"\nimages = ["docker.io/library/single:1"]\n')
    assert run("prefetch", "--config", str(config), "--set", SET).returncode == 1
    listed = ok(run("pins", "--config", str(config)))
    assert listed.stdout.startswith(f"{SET}: 0 blobs pinned, 0 on disk (0 B): never prefetched, or every prefetch of it failed")
    assert json.loads(ok(run("pins", "--config", str(config), "--json")).stdout)[SET]["pinned"] == 0
