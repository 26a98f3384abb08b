"""The fake Xet origin and the real client, for the tests that run hf_xet (test_fake_cas, test_xet_mirror):
the `cas` fixture, `hub` fixtures wired to it, and client scripts run each in a process of its own.

A client's TCP sockets are read from /proc while it runs (tests/xet_sockets.py): hf_xet connects from Rust,
out of a Python hook's sight.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.servers.fake_cas import FAST_FAILING_XET, FakeCas
from tests.servers.fake_hub import FakeHub
from tests.xet_sockets import SocketWatch

#: What a client script prints before the JSON of its result, on a line of its own.
RESULT_MARK = "@@RESULT@@"


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[FakeCas]:
    server = FakeCas.start(tmp_path / "cas")
    yield server
    server.stop()


def hub_with(declare: Callable[[FakeHub], None]):
    """A `hub` fixture: the fake Hub wired to `cas`, with what `declare` adds to it (the real hf_xet uploads the
    Xet files). The CAS's request log starts after those uploads, so a test sees its own traffic only."""

    @pytest.fixture
    def hub(tmp_path: Path, cas: FakeCas) -> Iterator[FakeHub]:
        server = FakeHub.start(tmp_path / "hub", cas=cas)
        declare(server)
        cas.reset_requests()
        yield server
        server.stop()

    return hub


def xet_hash(hub: FakeHub, repo: str, revision: str = "main", path: str = "model.safetensors") -> str:
    """The Xet file hash the Hub lists for a file of `repo` at `revision` (a branch or a commit)."""
    return hub.repo(repo).resolve(revision).files[path].xet_hash


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def client_env(home: Path, endpoint: str | None = None) -> dict[str, str]:
    """A huggingface_hub client's environment: none of ours, its own HF_HOME, hf_xet failing fast, short
    timeouts, no proxy for loopback; HF_ENDPOINT when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(FAST_FAILING_XET, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="20", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def run_client_script(script: str, argv: list[str], env: dict[str, str], cwd: Path, *, watch: SocketWatch | None = None,
               timeout: float = 120) -> dict:
    """`python -c script *argv` in its own process -> the JSON it printed after RESULT_MARK, with the tail of
    its stderr under "stderr". Its remote TCP endpoints go to `watch` while it runs."""
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if watch is not None:
        watch.follow(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        if watch is not None:
            watch.stop()
    for line in out.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result["stderr"] = err[-3000:]
            return result
    raise AssertionError(f"the client printed no result (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
