"""`pullthrough serve` as an operator runs it: liveness and readiness, a drain on SIGTERM that lets
running transfers finish, and start-up failures that fail fast in one line."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from tests.conftest import POSTGRES_ADMIN_URL, drop_postgres_database, fresh_postgres_database, require_tool
from tests.servers.ports import free_port
from tests.servers.pullthrough import Pullthrough

BIG = "library/big:1"  # one 32 MiB layer


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def status(url: str) -> int | None:
    """The status of GET url on a new connection; None when nothing listens. A connection the
    kernel accepted into the backlog just as the server closed its listener is closed unanswered
    (RemoteProtocolError): that is the listener closing too, not a server that answers."""
    try:
        return httpx.get(url, timeout=10).status_code
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return None


def test_livez_and_readyz_answer_and_say_what_they_checked(pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    live = httpx.get(f"{pt.url}/livez")
    assert live.status_code == 200 and live.json()["status"] == "live"
    ready = httpx.get(f"{pt.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"index": "ok", "cache_dir": "ok"}
    assert not list(pt.cache_dir.glob("tmp/.readyz-*")), "the write probe leaves nothing behind"


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` mounted read-only over itself (root ignores file modes, not a read-only mount)."""
    require_tool("mount")
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_readyz_fails_while_the_cache_dir_takes_no_writes_and_recovers(pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    assert status(f"{pt.url}/readyz") == 200
    with read_only(pt.cache_dir / "tmp"):
        wait_until(lambda: status(f"{pt.url}/readyz") == 503, what="/readyz to fail on a read-only cache dir")
        body = httpx.get(f"{pt.url}/readyz").json()
        assert body["checks"]["index"] == "ok" and body["checks"]["cache_dir"] != "ok"
        assert status(f"{pt.url}/livez") == 200  # alive: restarting it would not help
    wait_until(lambda: status(f"{pt.url}/readyz") == 200, what="/readyz to recover")


def test_readyz_fails_while_the_index_does_not_answer_and_recovers(pullthrough) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, text

    url = fresh_postgres_database()
    name = url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        pt = pullthrough(database_url=url)
        assert status(f"{pt.url}/readyz") == 200
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name})
        wait_until(lambda: status(f"{pt.url}/readyz") == 503, what="/readyz to fail without its index")
        assert httpx.get(f"{pt.url}/readyz").json()["checks"]["cache_dir"] == "ok"
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_until(lambda: status(f"{pt.url}/readyz") == 200, what="/readyz to recover")
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        pt.stop()
        drop_postgres_database(url)


def slow_client() -> httpx.Client:
    """A client with a small receive buffer: the kernel cannot take a whole 32 MiB body off the
    server's hands (loopback buffers here reach 32 MiB), so a body the test does not read stays
    a running transfer on the server."""
    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)])
    return httpx.Client(transport=transport, timeout=120)


def warm_blob(pt: Pullthrough, upstream) -> tuple[str, str, int]:  # type: ignore[no-untyped-def]
    layer = upstream.images[BIG].layers[0]
    url = f"{pt.url}/v2/{BIG.split(':')[0]}/blobs/{layer.digest}"
    assert hashlib.sha256(httpx.get(url, timeout=120).content).hexdigest() == layer.digest.split(":")[1]
    return url, layer.digest, layer.size


def test_sigterm_drains_readyz_fails_the_listener_closes_and_a_running_transfer_finishes(pullthrough, upstream) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(drain_delay="3s", shutdown_grace="2m")
    url, digest, size = warm_blob(pt, upstream)
    hasher = hashlib.sha256()
    received = 0
    with slow_client() as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes(256 * 1024)
        first = next(chunks)
        hasher.update(first)
        received += len(first)
        pt._proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_until(lambda: status(f"{pt.url}/readyz") == 503, what="/readyz to say draining")
        assert httpx.get(f"{pt.url}/readyz").json()["status"] == "draining"
        wait_until(lambda: status(f"{pt.url}/livez") is None, what="the listener to close after the drain delay")
        assert pt.running, "the server waits for the transfer it is sending"
        for chunk in chunks:
            hasher.update(chunk)
            received += len(chunk)
    assert received == size and f"sha256:{hasher.hexdigest()}" == digest
    assert pt._proc.wait(timeout=60) == 0  # type: ignore[union-attr]
    assert "draining" in pt.log_text()


def test_a_transfer_that_outlasts_the_grace_is_cut_and_the_server_exits(pullthrough, upstream) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(shutdown_grace="1s")
    url, _, size = warm_blob(pt, upstream)
    with slow_client() as client, client.stream("GET", url) as response:
        chunks = response.iter_bytes(64 * 1024)
        received: int | None = len(next(chunks))  # then read nothing more: the server's sends stall
        pt._proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert pt._proc.wait(timeout=60) == 0  # type: ignore[union-attr]
        try:
            received += sum(len(chunk) for chunk in chunks)  # type: ignore[operator]
        except httpx.HTTPError:
            received = None  # the body was cut
    assert received is None or received < size, "the stalled transfer was cut, not finished"
    assert "graceful shutdown exceeded" in pt.log_text()


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_a_port_in_use_fails_at_once_in_one_line_before_anything_is_created(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cache = tmp_path / "cache"
    try:
        result = serve(tmp_path, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache))
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"pullthrough: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert not cache.exists(), "the socket is bound before the cache dir, the index or a migration is touched"


def test_an_index_that_does_not_answer_is_one_line_naming_it_without_its_password(tmp_path: Path) -> None:
    port = free_port()
    result = serve(tmp_path, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "cache"),
                   "--database-url", "postgresql://pt:s3cret-pw@127.0.0.1:1/pt")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("pullthrough: cannot start: the index at postgresql")
    assert "://pt:***@127.0.0.1:1/pt does not answer: " in lines[0] and "refused" in lines[0]
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_a_check_that_hangs_is_not_started_again_and_the_others_go_on(tmp_path: Path) -> None:
    """A hung mount: the write probe never returns. /readyz says so within the timeout, does not
    pile up blocked threads (the next check reports the one still waiting), and the index check
    keeps answering; once the mount answers again, so does the check."""
    import asyncio
    import threading

    from sqlalchemy import create_engine

    import proxy.readiness as readiness_module
    from proxy.readiness import Readiness

    engine = create_engine(f"sqlite:///{tmp_path / 'index.db'}")
    readiness = Readiness(engine, tmp_path, "node")
    mount_answers = threading.Event()
    calls = []

    def hung_write() -> None:
        calls.append(1)
        mount_answers.wait(60)

    readiness._dir_writable = hung_write  # type: ignore[method-assign]
    original_timeout, readiness_module.CHECK_TIMEOUT_SECONDS = readiness_module.CHECK_TIMEOUT_SECONDS, 0.3
    try:
        first = asyncio.run(readiness._check())
        second = asyncio.run(readiness._check())
        assert first.index == "ok" and first.cache_dir.startswith("no answer within")
        assert second.index == "ok" and "still waiting" in second.cache_dir
        assert len(calls) == 1, "a blocked check is not started again"
        mount_answers.set()
        readiness._dir_writable = lambda: None  # type: ignore[method-assign]
        wait_until(lambda: readiness._blocked["cache_dir"].done(), what="the hung call to return")
        assert asyncio.run(readiness._check()).ok
    finally:
        readiness_module.CHECK_TIMEOUT_SECONDS = original_timeout
        mount_answers.set()
        readiness.close()
        engine.dispose()


def test_serve_loads_the_http_client_without_rich_or_pygments_and_leaves_them_importable() -> None:
    """httpx's command-line module loads rich and pygments wherever they are installed (here: the
    test extra's typer and pytest bring them; huggingface_hub's `hf` does in many ML environments),
    6.5 MiB of idle memory the server never uses. `serve` imports the HTTP client without them,
    the server's app after it, and leaves both importable for whoever needs them later."""
    script = """
import importlib.util, sys
assert importlib.util.find_spec("rich") and importlib.util.find_spec("pygments"), "rich and pygments must be installed"
from proxy.serving import _import_http_client
_import_http_client()
import proxy.app
loaded = sorted(name for name in ("rich", "pygments", "trio") if sys.modules.get(name) is not None)
left_blocked = sorted(name for name in ("rich", "pygments", "trio") if name in sys.modules and sys.modules[name] is None)
import rich, pygments
print(loaded, left_blocked)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"
