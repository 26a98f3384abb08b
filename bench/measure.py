"""The measuring instruments: timed GETs with curl, N concurrent GETs, a request-rate run with wrk
(or a bounded httpx loop when wrk is missing), and a process group's peak resident memory."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])

_CURL_FORMAT = "%{time_total} %{size_download} %{http_code} %{time_starttransfer}"


@dataclass(frozen=True)
class Transfer:
    """One GET as curl saw it: total seconds, body bytes, status, seconds to the first byte."""

    seconds: float
    size: int
    status: int
    first_byte: float

    def check(self, expected_size: int, what: str) -> "Transfer":
        if self.status != 200 or self.size != expected_size:
            raise RuntimeError(f"{what}: HTTP {self.status}, {self.size} bytes (expected 200, {expected_size})")
        return self


def _curl_argv(url: str, headers: dict[str, str] | None) -> list[str]:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", _CURL_FORMAT, "--max-time", "600"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    return argv + [url]


def _parse_curl(output: str) -> Transfer:
    seconds, size, status, first_byte = output.split()
    return Transfer(float(seconds), int(size), int(status), float(first_byte))


def timed_get(url: str, headers: dict[str, str] | None = None) -> Transfer:
    """GET `url` once with curl, discarding the body; curl streams at several GB/s, so the server
    is what is being timed."""
    result = subprocess.run(_curl_argv(url, headers), capture_output=True, text=True)
    if not result.stdout.strip():
        raise RuntimeError(f"curl {url} failed: exit {result.returncode} {result.stderr.strip()}")
    return _parse_curl(result.stdout)


def aggregate_mib_per_second(url: str, clients: int, expected_size: int) -> float:
    """`clients` curls of the same URL at once: bytes delivered to all of them per second of wall time."""
    wall, transfers = concurrent_gets(url, clients)
    for transfer in transfers:
        transfer.check(expected_size, f"{url} ({clients} concurrent)")
    return clients * expected_size / 2**20 / wall


def concurrent_gets(url: str, clients: int) -> tuple[float, list[Transfer]]:
    """Start `clients` curls at once; return the wall time until the last finished, and each one."""
    started = time.monotonic()
    procs = [subprocess.Popen(_curl_argv(url, None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    outputs = [proc.communicate()[0] for proc in procs]
    wall = time.monotonic() - started
    transfers = []
    for output, proc in zip(outputs, procs):
        if not output.strip():
            raise RuntimeError(f"curl {url} failed: exit {proc.returncode}")
        transfers.append(_parse_curl(output))
    return wall, transfers


@dataclass(frozen=True)
class Rate:
    """Requests per second over a fixed duration, and how many answers were not 2xx/3xx."""

    per_second: float
    requests: int
    errors: int
    tool: str


def request_rate(url: str, *, seconds: float, connections: int = 8, headers: dict[str, str] | None = None) -> Rate:
    """Hammer `url` on loopback for `seconds` (bounded) with `connections` keep-alive connections."""
    if shutil.which("wrk"):
        return _wrk(url, seconds, connections, headers or {})
    return asyncio.run(_httpx_loop(url, seconds, connections, headers or {}))


def _wrk(url: str, seconds: float, connections: int, headers: dict[str, str]) -> Rate:
    # One wrk thread: on a 2-core machine the other core is the server's.
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    result = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60)
    out = result.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if result.returncode != 0 or rate is None or total is None:
        raise RuntimeError(f"wrk {url} failed: {result.returncode} {out} {result.stderr}")
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match[1])
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in match.groups())
    return Rate(float(rate[1]), int(total[1]), errors, "wrk")


async def _httpx_loop(url: str, seconds: float, connections: int, headers: dict[str, str]) -> Rate:
    import httpx

    deadline = time.monotonic() + seconds
    done = errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            response = await client.get(url, headers=headers)
            done += 1
            errors += response.status_code >= 400

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        started = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(connections)))
        elapsed = time.monotonic() - started
    return Rate(done / elapsed, done, errors, "httpx")


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set) summed over the process group led by `pid`: the server process
    and any worker or wrapper it started."""
    return _status_sum(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """VmRSS (resident set now) summed over the process group led by `pid`."""
    return _status_sum(pid, "VmRSS")


def _status_sum(pid: int, field: str) -> int:
    total = 0
    for member in _group_members(pid) or [pid]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        if match := re.search(rf"^{field}:\s+(\d+) kB", status, re.M):
            total += int(match[1]) * 1024
    return total


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
