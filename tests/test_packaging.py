"""The package as an operator installs it: a wheel built from this checkout, installed into a fresh
virtual environment (no system site-packages) with its dependencies and without the optional extras.
"""

from __future__ import annotations

import contextlib
import email.parser
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import httpx
import pytest

from tests.servers.ports import free_port, start_process, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
# What a build reads. Copied, so that the build starts from nothing setuptools left behind
# (a stale build/lib in the checkout would put deleted modules into the wheel).
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "proxy", "migrations"]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin("pullthrough"), *argv], capture_output=True, text=True, cwd=cwd, env=_clean_env(), timeout=timeout
        )


def _clean_env() -> dict[str, str]:
    """No PULLTHROUGH_* settings and no PYTHONPATH: the venv must stand on its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_") and k != "PYTHONPATH"}


def _check(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if not path.exists():
            continue  # the build (or a test below) says what its absence breaks
        if path.is_dir():
            # symlinks=True keeps proxy/_migrations a link to ../migrations, as in the checkout.
            shutil.copytree(path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = work / "dist"
    _check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("pullthrough-*.whl")
    venv = work / "venv"
    _check([sys.executable, "-m", "venv", str(venv)])
    # Dependencies come from the machine's package index (pip's own configuration).
    _check([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], timeout=300)
    return Installed(wheel, venv)


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_wheel_declares_the_license_and_carries_its_text(installed: Installed) -> None:
    metadata = _metadata(installed.wheel)
    assert metadata["License-Expression"] == "Apache-2.0"
    with zipfile.ZipFile(installed.wheel) as archive:
        license_files = [n for n in archive.namelist() if n.endswith("/licenses/LICENSE")]
        assert license_files, "the wheel carries no LICENSE"
        assert "Apache License" in archive.read(license_files[0]).decode()


def test_wheel_puts_s3_and_ipfs_behind_extras_and_bounds_every_dependency(installed: Installed) -> None:
    metadata = _metadata(installed.wheel)
    assert {"s3", "ipfs", "postgres", "test"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.startswith(("aioboto3", "multiformats"))], base
    assert any(r.startswith("aioboto3") and 'extra == "s3"' in r for r in requires)
    assert any(r.startswith("multiformats") and 'extra == "ipfs"' in r for r in requires)
    assert not [r for r in base if "[standard]" in r], "uvicorn[standard] brings watchfiles and websockets"
    unbounded = [r for r in requires if "pullthrough[" not in r and not ("<" in r.split(";")[0] and ">=" in r)]
    assert not unbounded, f"dependencies without a lower and an upper bound: {unbounded}"


def test_installed_command_reports_its_version(installed: Installed, tmp_path: Path) -> None:
    result = installed.run("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pullthrough, version 0.1.0"


def test_installed_package_carries_its_migrations(installed: Installed, tmp_path: Path) -> None:
    result = installed.run("db", "upgrade", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / "index.db").stat().st_size > 0


def test_installed_server_runs_without_extras_and_serves_its_dashboard(installed: Installed, tmp_path: Path) -> None:
    listed = subprocess.run([installed.bin("python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, env=_clean_env(), check=True).stdout.lower()
    packages = {line.split("==")[0] for line in listed.splitlines()}
    assert {"uvicorn", "httptools", "uvloop"} <= packages
    assert not packages & {"aioboto3", "botocore", "multiformats", "watchfiles", "websockets"}, packages
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = start_process([installed.bin("pullthrough"), "serve", "--cache-dir", str(tmp_path / "cache"),
                                "--listen", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
                               env=_clean_env(), cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", status=200, proc=server, log_path=log)
        page = wait_http(f"http://127.0.0.1:{port}/", status=200, proc=server, log_path=log)
        assert "<html" in page.text.lower() and "pullthrough" in page.text.lower()
        # Without the extras, their routes answer in their protocol's terms, never a 500 from an import.
        ipfs = httpx.get(f"http://127.0.0.1:{port}/ipfs/bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")
        assert ipfs.status_code == 503 and ipfs.json()["error"] == "NoGateway", ipfs.text
        s3 = httpx.get(f"http://127.0.0.1:{port}/s3/models/weights.bin")
        assert 400 <= s3.status_code < 500, s3.text
        # uvloop is a dependency because the server runs on it (every benchmark did): it must be loaded.
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "/uvloop/" in maps, "the server runs on asyncio's own event loop, not uvloop"
    finally:
        stop_process(server)


@pytest.mark.parametrize(
    ("table", "key", "extra"),
    [('[s3]\nbuckets = [{ name = "models" }]\n', "s3.buckets", "s3"),
     ('[web]\nipfs_gateways = ["https://ipfs.io"]\n', "web.ipfs_gateways", "ipfs")],
)
def test_configured_source_without_its_extra_stops_serve_with_one_line(
    installed: Installed, tmp_path: Path, table: str, key: str, extra: str
) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\ncache_dir = "{tmp_path / "cache"}"\n{table}')
    server = start_process([installed.bin("pullthrough"), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_clean_env(), cwd=tmp_path)
    try:
        _wait_for_exit_or_port(server, port)
        assert server.poll() is not None, "serve started instead of refusing the configuration"
        stderr = server.stderr.read().decode() if server.stderr else ""
    finally:
        stop_process(server)
    assert server.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert key in lines[0] and f"pip install 'pullthrough[{extra}]'" in lines[0]
    assert not (tmp_path / "cache").exists(), "serve got as far as creating the cache before refusing"


def _wait_for_exit_or_port(process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    """Until the process exits or something accepts connections on `port`, whichever comes first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
