"""Load and hostile connections: does pullthrough keep answering while many clients hammer it and
hundreds of others hold connections they never use?

    python -m bench.load            # about a minute
    python -m bench.load --quick    # a smoke run

1. **Many connections**: wrk with 1000 keep-alive connections on a cached manifest by digest:
   requests per second, latency p50/p99, errors.
2. **Hostile connections held open**: 300 clients that request a big cached blob and never read
   it, and 200 that send half a request and stop; meanwhile `/healthz`, the cached manifest and a
   small cached blob are requested one after the other and timed (median and max).

Throughout, the server's resident memory is sampled. Targets (benchmarks, not tests): the three
timed requests under 50 ms median and 1 s max while the hostile connections are open; RSS under
150 MiB; no request fails that the limits do not refuse.
"""

from __future__ import annotations

import argparse
import datetime
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.measure import MANIFEST_ACCEPT
from bench.report import text_table
from tests.images import KIB, MIB, ImageSpec, publish
from tests.servers.pullthrough import Pullthrough
from tests.servers.registry import Distribution

TARGET_MEDIAN_MS, TARGET_MAX_MS, TARGET_RSS_MIB = 50.0, 1000.0, 150.0


def log(message: str) -> None:
    print(f"[bench.load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer connections, shorter runs")
    parser.add_argument("--connections", type=int, default=1000, help="wrk connections on the cached manifest")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the wrk run")
    parser.add_argument("--stuck", type=int, default=300, help="clients that never read a big blob")
    parser.add_argument("--half", type=int, default=200, help="clients that send half a request")
    parser.add_argument("--probes", type=int, default=100, help="timed requests of each kind while they are held")
    parser.add_argument("--output", type=Path, default=Path("bench/results/load-latest.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.seconds, args.stuck, args.half, args.probes = 200, 3.0, 60, 40, 20
    return args


@dataclass
class RssSampler:
    """VmRSS of one process, sampled every 100 ms on a thread until stopped."""

    pid: int
    samples: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            if match := re.search(r"^VmRSS:\s+(\d+) kB", status, re.M):
                self.samples.append(int(match[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.samples, default=0.0)


@dataclass
class Timed:
    what: str
    ms: list[float]
    failures: int

    @property
    def median(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    @property
    def max(self) -> float:
        return max(self.ms, default=float("nan"))


def wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s", "-H", f"Accept: {MANIFEST_ACCEPT}", url],
        capture_output=True, text=True, check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}  # type: ignore[index]
    for label, key in (("50%", "p50_ms"), ("99%", "p99_ms")):
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)", out, re.M).groups()  # type: ignore[union-attr]
        result[key] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(sum(int(n) for n in errors.groups()) if errors else 0) + float(non_2xx[1] if non_2xx else 0)
    return result


def hold_hostile(port: int, blob_path: str, stuck: int, half: int) -> list[socket.socket]:
    held = []
    for _ in range(stuck):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET {blob_path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        held.append(sock)
    for _ in range(half):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Never-Ends: ")
        held.append(sock)
    return held


def probe(url: str, what: str, count: int, headers: dict[str, str] | None = None) -> Timed:
    ms, failures = [], 0
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            start = time.perf_counter()
            try:
                ok = client.get(url, headers=headers).status_code == 200
            except httpx.HTTPError:
                ok = False
            ms.append((time.perf_counter() - start) * 1000)
            failures += not ok
    return Timed(what, ms, failures)


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[list[str]], list[str]]:
    registry = Distribution.start(workdir / "upstream")
    pullthrough = None
    try:
        images = publish([ImageSpec("bench/load", "1", seed=7, layers=[[64 * MIB], [100 * KIB]])], workdir / "layouts", registry.host)
        image = images["bench/load:1"]
        big, small = image.layers[0], image.layers[1]
        pullthrough = Pullthrough.start(workdir / "cache", [{"name": "docker.io", "url": registry.url, "default": True}])
        base = pullthrough.url
        manifest = f"{base}/v2/bench/load/manifests/{image.manifest_digest}"
        for url in (manifest, f"{base}/v2/bench/load/blobs/{big.digest}", f"{base}/v2/bench/load/blobs/{small.digest}"):
            assert httpx.get(url, headers={"Accept": MANIFEST_ACCEPT}, timeout=120).status_code == 200
        for digest in (big.digest, small.digest):
            deadline = time.monotonic() + 60
            while not pullthrough.blob_path(digest).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        rss = RssSampler(pullthrough.pid)  # type: ignore[arg-type]
        log(f"wrk: {args.connections} connections on a cached manifest for {args.seconds:g} s")
        rate = wrk(manifest, args.connections, args.seconds)
        log(f"holding {args.stuck} clients that never read a {big.size // MIB} MiB blob and {args.half} half-sent requests")
        held = hold_hostile(pullthrough.port, f"/v2/bench/load/blobs/{big.digest}", args.stuck, args.half)
        try:
            time.sleep(1.0)  # let the server take them all in
            timed = [
                probe(f"{base}/healthz", "/healthz", args.probes),
                probe(manifest, "cached manifest", args.probes, {"Accept": MANIFEST_ACCEPT}),
                probe(f"{base}/v2/bench/load/blobs/{small.digest}", f"cached {small.size // KIB} KiB blob", args.probes),
            ]
            still_open = sum(1 for sock in held if _open(sock))
        finally:
            for sock in held:
                sock.close()
        peak = rss.stop()
    finally:
        if pullthrough is not None:
            pullthrough.stop()
        registry.stop()
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    body = [
        [f"cached manifest, wrk -c{args.connections} (req/s)", f"{rate['rps']:.0f}", "—", "—"],
        ["  latency p50 / p99 (ms)", f"{rate['p50_ms']:.1f} / {rate['p99_ms']:.1f}", "—", "—"],
        ["  errors (socket errors and non-2xx)", f"{rate['errors']:.0f}", "0", yes(rate["errors"] == 0)],
    ]
    for t in timed:
        ok = t.median < TARGET_MEDIAN_MS and t.max < TARGET_MAX_MS and t.failures == 0
        body.append([f"{t.what} while {args.stuck} + {args.half} hostile held, median / max (ms)",
                     f"{t.median:.1f} / {t.max:.1f}", f"< {TARGET_MEDIAN_MS:g} / < {TARGET_MAX_MS:g}", yes(ok)])
        body.append([f"  {t.what}: failed of {len(t.ms)}", str(t.failures), "0", yes(t.failures == 0)])
    body.append(["peak RSS during both phases (MiB)", f"{peak:.0f}", f"< {TARGET_RSS_MIB:g}", yes(peak < TARGET_RSS_MIB)])
    notes = [f"hostile connections still open when the probes ended: {still_open} of {args.stuck + args.half}"]
    return body, notes


def _open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pullthrough-load-") as tmp:
        body, notes = run(args, Path(tmp))
    header = ["metric", "pullthrough", "target", "met"]
    print(text_table(header, body, [f"note: {n}" for n in notes]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Load and hostile connections ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"`python -m bench.load{' --quick' if args.quick else ''}`)", "", "| " + " | ".join(header) + " |",
             "| --- | ---: | ---: | ---: |", *("| " + " | ".join(row) + " |" for row in body), "", *(f"- {n}" for n in notes)]
    args.output.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
