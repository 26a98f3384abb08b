"""The client side of the Hugging Face benchmarks (hf.py, hfxet.py): one `snapshot_download` in a fresh Python
process with an empty HF_HOME, timed inside that process, and the snapshot it left checked file by file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: argv: repo id, then optionally a revision and a MAX_HTTP_DOWNLOAD_SIZE. The time is the call alone:
#: interpreter start and import are left out.
CLIENT = r"""
import json, sys, time
t0 = time.perf_counter()
from huggingface_hub import constants, snapshot_download
if len(sys.argv) > 3:
    constants.MAX_HTTP_DOWNLOAD_SIZE = int(sys.argv[3])  # only hf_xet may fetch a larger file
t1 = time.perf_counter()
path = snapshot_download(sys.argv[1], revision=sys.argv[2] if len(sys.argv) > 2 else None)
t2 = time.perf_counter()
print(json.dumps({"path": path, "seconds": t2 - t1, "import_seconds": t1 - t0}))
"""


def client_env(endpoint: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                                                       "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               # hf_xet stays installed and enabled; should a mirror ever hand out Xet metadata, fail fast
               HF_XET_CLIENT_RETRY_MAX_ATTEMPTS="1", HF_XET_CLIENT_RETRY_MAX_DURATION="5s")
    return env


@contextmanager
def empty_home(home: Path) -> Iterator[Path]:
    """An empty HF_HOME for one snapshot (so empty client caches), removed once the snapshot in it is checked."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class ClientRun:
    """What one client process did: `seconds` of the call (NaN when it failed) and the snapshot's folder, or
    `problem`; `process_seconds` is the whole process, start and import included."""

    seconds: float
    process_seconds: float
    path: Path | None
    problem: str

    def check(self, expected: dict[str, str]) -> tuple[bool, str]:
        """(every file right?, what was wrong): the snapshot against `expected` (name -> sha256)."""
        return verify(self.path, expected) if self.path is not None else (False, self.problem)


def run_client(env: dict[str, str], timeout: float, repo_id: str, *options: str) -> ClientRun:
    """`snapshot_download(repo_id)` in a fresh process; `options` are CLIENT's optional arguments."""
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", CLIENT, repo_id, *options], env=env,
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # the child is killed by run(); count it as a failed snapshot
        result = subprocess.CompletedProcess([], -9, "", f"timed out after {timeout:.0f} s")
    process_seconds = time.monotonic() - started
    if result.returncode != 0:
        problem = f"snapshot_download exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"
        return ClientRun(float("nan"), process_seconds, None, problem)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return ClientRun(report["seconds"], process_seconds, Path(report["path"]), "")


def wait_quiet(count: Callable[[], int], quiet: float, limit: float = 30.0) -> None:
    """Until `count()` (requests logged upstream) has not changed for `quiet` seconds: background fetches count."""
    deadline = time.monotonic() + limit
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def verify(snapshot: Path, expected: dict[str, str]) -> tuple[bool, str]:
    """Every file of the model present, nothing else, each with the right sha256."""
    found = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()}
    if found != set(expected):
        return False, f"files differ: missing {sorted(set(expected) - found)}, extra {sorted(found - set(expected))}"
    for name, digest in expected.items():
        h = hashlib.sha256()
        with open(snapshot / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            return False, f"{name}: sha256 {h.hexdigest()} != {digest}"
    return True, ""
