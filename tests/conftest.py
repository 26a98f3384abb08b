"""Shared fixtures: the real upstream registry with the test images, pullthrough servers, tool checks.

Every process a fixture starts is stopped by that fixture; a session-end sweep stops anything a
crashed test left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.images import STANDARD_IMAGES, publish
from tests.servers.ports import stop_all_processes
from tests.servers.pullthrough import Pullthrough
from tests.servers.registry import Distribution

REQUIRE_REAL = os.environ.get("PULLTHROUGH_REQUIRE_REAL") == "1"

#: tag_ttl of the default test registries: long enough that no test sees a tag expire.
LONG_TAG_TTL = "1h"


def require_tool(name: str) -> str:
    """The path of executable `name`; skip the test without it, or fail under PULLTHROUGH_REQUIRE_REAL=1."""
    path = shutil.which(name)
    if path is None:
        for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
            candidate = Path(directory) / name
            if candidate.exists() and os.access(candidate, os.X_OK):
                return str(candidate)
        message = f"{name} is not installed (tests/run.sh installs it)"
        if REQUIRE_REAL:
            pytest.fail(message + "; PULLTHROUGH_REQUIRE_REAL=1 makes a missing tool a failure", pytrace=False)
        pytest.skip(message)
    return path


def require_module(name: str) -> None:
    """Skip a test whose Python module is missing, or fail it under PULLTHROUGH_REQUIRE_REAL=1."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        message = f"the Python module {name} is not installed (tests/run.sh installs the test extras)"
        if REQUIRE_REAL:
            pytest.fail(message + "; PULLTHROUGH_REQUIRE_REAL=1 makes a missing component a failure", pytrace=False)
        pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """Under PULLTHROUGH_REQUIRE_REAL=1 (CI) a skipped test is a failed one, whatever skipped it."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_REAL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, and PULLTHROUGH_REQUIRE_REAL=1 makes every skip a failure: {reason}"


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes():
    yield
    stop_all_processes()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Distribution:
    """A docker-registry holding STANDARD_IMAGES; `upstream.images` maps "name:tag" to ImageInfo.

    Shared by the whole session: tests must not change its storage or stop it (start their own
    Distribution for that).
    """
    require_tool("docker-registry")
    require_tool("skopeo")
    workdir = tmp_path_factory.mktemp("upstream")
    registry = Distribution.start(workdir / "registry")
    try:
        registry.images = publish(STANDARD_IMAGES, workdir / "layouts", registry.host)
    except BaseException:
        registry.stop()
        raise
    yield registry
    registry.stop()


def default_registries(upstream: Distribution, tag_ttl: str = LONG_TAG_TTL) -> list[dict]:
    """The upstream as "docker.io" (the default registry) and as "upstream.test" (for path prefixes)."""
    return [
        {"name": "docker.io", "url": upstream.url, "default": True, "tag_ttl": tag_ttl},
        {"name": "upstream.test", "url": upstream.url, "tag_ttl": tag_ttl},
    ]


@pytest.fixture
def pullthrough(request, tmp_path) -> Callable[..., Pullthrough]:
    """Factory: `pullthrough(registries=None, *, cache_dir=None, **settings)` starts a server.

    Without `registries` it serves the session `upstream` as docker.io (default) and upstream.test.
    Each call gets a fresh cache dir under tmp_path unless `cache_dir` is given. All servers it
    started are stopped after the test, and a failing test shows the tail of their logs.
    """
    started: list[Pullthrough] = []
    databases: list[str] = []

    def start(registries: list[dict] | None = None, *, cache_dir: Path | None = None, **settings) -> Pullthrough:
        if registries is None:
            registries = default_registries(request.getfixturevalue("upstream"))
        cache_dir = cache_dir or tmp_path / f"cache{len(started)}"
        if os.environ.get("PULLTHROUGH_TEST_DATABASE") == "postgresql" and "database_url" not in settings:
            settings["database_url"] = fresh_postgres_database()
            databases.append(settings["database_url"])
        try:
            server = Pullthrough.start(cache_dir, registries, **settings)
        except BaseException:
            _print_log_tail(cache_dir.parent / f"{cache_dir.name}.run" / "pullthrough.log")
            raise
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        _print_log_tail(server.log_path)
    for url in databases:
        drop_postgres_database(url)


@pytest.fixture
def origin(tmp_path):  # type: ignore[no-untyped-def]
    """nginx serving tmp_path/www, which holds models/, private/ and ipfs/: a web origin for /web/
    (allow its /models/) and an IPFS gateway (files named by CID under ipfs/). Yields (server, root)."""
    from tests.servers.nginx import Nginx

    require_tool("nginx")
    root = tmp_path / "www"
    for folder in ("models", "private", "ipfs"):
        (root / folder).mkdir(parents=True)
    server = Nginx.start(tmp_path / "nginx", root, access_log=True)
    yield server, root
    server.stop()


@pytest.fixture
def index_url(tmp_path) -> Iterator[str]:
    """The URL of a fresh, migrated index: SQLite in tmp_path, or with
    PULLTHROUGH_TEST_DATABASE=postgresql a PostgreSQL database of its own, dropped afterwards."""
    if os.environ.get("PULLTHROUGH_TEST_DATABASE") == "postgresql":
        url = fresh_postgres_database()
        yield url
        drop_postgres_database(url)
        return
    from proxy.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    yield url


POSTGRES_ADMIN_URL = os.environ.get("PULLTHROUGH_TEST_POSTGRES", "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres")


def fresh_postgres_database() -> str:
    """A new, migrated PostgreSQL database for one server (`pullthrough db upgrade` as operators run it)."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"pt_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    subprocess.run([sys.executable, "-m", "proxy", "db", "upgrade", "--database-url", url, "--cache-dir", "/tmp"],
                   check=True, capture_output=True, timeout=120)
    return url


def drop_postgres_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _print_log_tail(path: Path, lines: int = 60) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {path} (last {len(tail)} lines) ---")
        print("\n".join(tail))
