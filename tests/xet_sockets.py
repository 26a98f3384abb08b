"""Where a process connects, read from /proc while it runs: hf_xet opens its sockets from Rust, so
a Python hook in the client would not see them."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

_LISTEN = "0A"


def _address(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(host, 16)))
    else:
        words = struct.unpack("<4I", raw)
        ip = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))
        if ip.startswith("::ffff:"):
            ip = ip[len("::ffff:"):]
    return ip, int(port, 16)


def remote_endpoints(pid: int) -> set[tuple[str, int]]:
    """The remote (ip, port) of each TCP socket the process holds now (listening ones left out)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes and fields[3] != _LISTEN:
                found.add(_address(fields[2]))
    return found


class SocketWatch:
    """Polls a process's sockets in a thread until stopped; `remotes` is every endpoint seen."""

    def __init__(self) -> None:
        self.remotes: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, pid: int) -> None:
        def poll() -> None:
            while not self._stop.is_set() and os.path.exists(f"/proc/{pid}"):
                self.remotes |= remote_endpoints(pid)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
