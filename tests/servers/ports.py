"""Free loopback ports, HTTP readiness polls, and the process bookkeeping every test server shares.

Servers started by the tests run in their own process group and are registered here, so that
one session-end sweep (and an atexit hook) can stop whatever a failing test left behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Sequence

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, *, status: int | None = None, proc: subprocess.Popen | None = None,
              log_path: Path | None = None) -> httpx.Response:
    """Poll `url` until it answers (with `status`, when given); raise TimeoutError otherwise.

    With `proc`, fail at once when that process has exited instead of polling on, and quote the
    tail of `log_path` in the error so a server that died on start says why.
    """
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before {url} answered"
                               f"{_log_tail(log_path)}")
        try:
            response = httpx.get(url, timeout=2.0)
            if status is None or response.status_code == status:
                return response
            last = f"status {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s ({last}){_log_tail(log_path)}")
        time.sleep(0.05)


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} still accepts connections after {timeout}s")


def _log_tail(log_path: Path | None, lines: int = 30) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    text = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log_path) + " (tail) ---\n" + "\n".join(text)


# -- processes ------------------------------------------------------------------------------------

_live: set[subprocess.Popen] = set()


def start_process(argv: Sequence[str], *, stdout: IO | int | None = None, stderr: IO | int | None = None,
                  env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` in a new session (its own process group) and remember it for the final sweep."""
    proc = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd, start_new_session=True)
    _live.add(proc)
    return proc


def stop_process(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Send `sig` to the process group of `proc`, escalate to SIGKILL after `timeout`, and reap it."""
    if proc.poll() is None:
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # The leader may be gone while children it started still hold the group.
    _signal_group(proc, signal.SIGKILL)
    _live.discard(proc)


def kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group of `proc` at once (a crash, not a shutdown) and reap it."""
    stop_process(proc, sig=signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all_processes() -> None:
    """Stop every process started through `start_process` that is still registered."""
    for proc in list(_live):
        stop_process(proc, timeout=5.0)


atexit.register(stop_all_processes)
