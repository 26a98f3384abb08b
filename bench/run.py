"""The benchmark command: starts the upstream, both caches and nginx, measures them in interleaved
repetitions, prints the table and writes it to bench/results/latest.md.

    python -m bench            # 1 GiB layer, 3 repetitions
    python -m bench --quick    # 256 MiB, 1 repetition: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.image import REPOSITORY, TAG, BenchImage, build_layout, push  # noqa: E402
from bench.measure import (  # noqa: E402
    MANIFEST_ACCEPT, aggregate_mib_per_second, concurrent_gets, peak_rss_bytes, request_rate, timed_get,
)
from tests.servers.nginx import Nginx  # noqa: E402
from bench.proxies import PROXIES, Proxy, PullthroughProxy  # noqa: E402
from bench.report import Results, environment, render_markdown, render_text  # noqa: E402
from tests.servers.ports import stop_all_processes  # noqa: E402
from tests.servers.registry import Distribution  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SEED = 1


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 1 repetition, short rate runs")
    parser.add_argument("--size-mib", type=int, help="size of the layer's payload in MiB (default 1024)")
    parser.add_argument("--reps", type=int, help="repetitions of every measurement (default 3); medians are reported")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the cold single-blob test")
    parser.add_argument("--warm-clients", type=int, default=32, help="concurrent clients for the warm throughput test")
    parser.add_argument("--rate-seconds", type=float, help="duration of each request-rate run (default 3)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections for rate runs")
    parser.add_argument("--proxies", default="pullthrough,pullthrough-drop,distribution",
                        help="comma-separated caches to measure (pullthrough, pullthrough-drop: with "
                             "drop_behind = true, distribution)")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / ".work",
                        help="where built images, upstream storage and run state are kept")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.md")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record py-spy flame graphs of pullthrough during its cold GETs into DIR")
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (256 if args.quick else 1024)
    args.reps = args.reps or (1 if args.quick else 3)
    args.rate_seconds = args.rate_seconds or (2 if args.quick else 3)
    args.proxies = [name.strip() for name in args.proxies.split(",") if name.strip()]
    unknown = set(args.proxies) - set(PROXIES)
    if unknown:
        parser.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    return args


def start_upstream(workdir: Path, run_dir: Path, image: BenchImage) -> Distribution:
    """The upstream registry; its storage is cached between runs so the image is pushed once."""
    storage = workdir / f"upstream-{image.layer_digest.split(':')[1][:12]}"
    upstream = Distribution.start(run_dir / "upstream",
                                  extra_config={"storage": {"filesystem": {"rootdirectory": str(storage)}}})
    marker = storage / "bench-pushed"
    if not marker.exists() or timed_get(upstream_url(upstream, image), {"Accept": MANIFEST_ACCEPT}).status != 200:
        log(f"pushing {image.layer_size / 2**20:.0f} MiB image to the upstream with skopeo")
        push(image, upstream.host)
        marker.write_text(image.manifest_digest)
    return upstream


def upstream_url(upstream: Distribution, image: BenchImage) -> str:
    return f"{upstream.url}/v2/{REPOSITORY}/manifests/{image.manifest_digest}"


def upstream_blob_gets(upstream: Distribution, mark: int, digest: str) -> tuple[int, int]:
    """(GET count, bytes sent) for `digest` in the upstream's access log since `mark`."""
    entries = [e for e in upstream.requests_since(mark)
               if e.method == "GET" and e.is_blob and e.targets(digest)]
    return len(entries), sum(e.bytes_sent for e in entries)


def settle_upstream(upstream: Distribution, mark: int, digest: str, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until the upstream log stops growing with GETs of `digest`: distribution logs a request
    only when it has finished, and a cache may still have a background fetch running."""
    deadline = time.monotonic() + timeout
    last = upstream_blob_gets(upstream, mark, digest)
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = upstream_blob_gets(upstream, mark, digest)
        if now != last:
            last, stable_since = now, time.monotonic()


@contextlib.contextmanager
def py_spy(proxy: Proxy, profile_dir: Path | None, what: str) -> Iterator[None]:
    """With `profile_dir`, sample pullthrough (not distribution: Go) with py-spy while the body runs."""
    if profile_dir is None or not isinstance(proxy, PullthroughProxy) or proxy.pid is None:
        yield
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    output = profile_dir / f"{proxy.name}-{what}-{time.strftime('%H%M%S')}.svg"
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(proxy.pid), "--rate", "200", "--threads", "--idle",
                            "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        log(f"py-spy: {output}")


def measure_cold(proxy: Proxy, upstream: Distribution, image: BenchImage, results: Results,
                 profile_dir: Path | None = None) -> None:
    proxy.fresh("cold + warm GET")
    mark = upstream.mark()
    with py_spy(proxy, profile_dir, "cold"):
        transfer = timed_get(proxy.blob_url).check(image.layer_size, f"{proxy.label} cold GET")
    proxy.wait_committed(image.layer_digest)
    settle_upstream(upstream, mark, image.layer_digest)
    gets, sent = upstream_blob_gets(upstream, mark, image.layer_digest)
    results.add("cold_s", proxy.name, transfer.seconds)
    results.add("cold_ttfb_s", proxy.name, transfer.first_byte)
    results.add("cold_upstream_gets", proxy.name, gets)
    results.add("cold_upstream_bytes", proxy.name, sent / image.layer_size)
    log(f"cold   {proxy.label:<20} {transfer.seconds:7.3f}s  upstream: {gets} GET(s), "
        f"{sent / image.layer_size:.2f}x the blob")


def measure_concurrent(proxy: Proxy, upstream: Distribution, image: BenchImage, clients: int,
                       results: Results, profile_dir: Path | None = None) -> None:
    proxy.fresh(f"{clients} concurrent cold GETs")
    mark = upstream.mark()
    with py_spy(proxy, profile_dir, "concurrent"):
        wall, transfers = concurrent_gets(proxy.blob_url, clients)
    # VmHWM only grows: read it now, and again after the manifest runs this instance goes on to.
    proxy.record_rss()
    proxy.phase = f"manifest rates (after {clients} concurrent cold GETs)"
    for transfer in transfers:
        transfer.check(image.layer_size, f"{proxy.label} concurrent cold GET")
    proxy.wait_committed(image.layer_digest)
    settle_upstream(upstream, mark, image.layer_digest)
    gets, sent = upstream_blob_gets(upstream, mark, image.layer_digest)
    results.add("concurrent_wall_s", proxy.name, wall)
    results.add("concurrent_over_single", proxy.name, wall / results.values["cold_s"][proxy.name][-1])
    if proxy.pid is not None:
        results.add("concurrent_peak_rss_mib", proxy.name, peak_rss_bytes(proxy.pid) / 2**20)
    results.add("concurrent_upstream_gets", proxy.name, gets)
    results.add("concurrent_upstream_bytes", proxy.name, sent / image.layer_size)
    log(f"{clients}x cold {proxy.label:<20} {wall:7.3f}s  upstream: {gets} GET(s), "
        f"{sent / image.layer_size:.2f}x the blob")


def measure_manifest_rates(name: str, digest_url: str, tag_url: str | None, seconds: float, connections: int,
                           results: Results, upstream: Distribution | None = None) -> None:
    """Requests per second for a cached manifest; with `upstream`, also how many requests the
    run caused there (a cache inside its tag TTL should cause none)."""
    headers = {"Accept": MANIFEST_ACCEPT}
    for kind, url in (("digest", digest_url), ("tag", tag_url)):
        if url is None:
            continue
        first = timed_get(url, headers)  # fills the cache, so that the rate run measures hits
        if first.status != 200:
            raise RuntimeError(f"{name}: manifest by {kind} answered {first.status}")
        mark = upstream.mark() if upstream is not None else 0
        rate = request_rate(url, seconds=seconds, connections=connections, headers=headers)
        results.add(f"manifest_{kind}_rps", name, rate.per_second)
        if rate.errors:
            results.note(f"{name}: {rate.errors} of {rate.requests} manifest-by-{kind} requests failed")
        extra = ""
        if upstream is not None:
            time.sleep(0.5)  # distribution logs a request once it has finished
            sent = len(upstream.requests_since(mark))
            results.add(f"manifest_{kind}_upstream_per_1k", name, 1000 * sent / max(rate.requests, 1))
            extra = f", {sent} upstream requests"
        log(f"manifest by {kind:<6} {name:<20} {rate.per_second:9.0f} req/s ({rate.tool}, {rate.errors} errors{extra})")


def run(args: argparse.Namespace) -> Results:
    workdir = args.workdir.resolve()
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    started = time.monotonic()
    log(f"building (or reusing) the {args.size_mib} MiB image under {workdir}")
    image = build_layout(workdir / f"layout-{args.size_mib}m-seed{SEED}", args.size_mib << 20, SEED)
    log(f"image ready: layer {image.layer_digest[:19]}, {image.layer_size} bytes "
        f"({time.monotonic() - started:.1f}s)")

    results = Results(size=image.layer_size, reps=args.reps, clients=args.clients, proxies=args.proxies,
                      environment=environment(), warm_clients=args.warm_clients)
    proxies: list[Proxy] = []
    upstream = nginx = None
    try:
        upstream = start_upstream(workdir, run_dir, image)
        nginx = Nginx.start(run_dir / "nginx", image.layout_dir / "blobs" / "sha256")
        references = {
            "nginx": f"{nginx.url}/{image.layer_digest.split(':')[1]}",
            "upstream": f"{upstream.url}/v2/{REPOSITORY}/blobs/{image.layer_digest}",
        }
        for name in args.proxies:
            proxies.append(PROXIES[name](image, run_dir / name, upstream.url))
        # Read the references once so every warm number is served from the page cache.
        for url in references.values():
            timed_get(url).check(image.layer_size, url)
        for proxy in proxies:
            proxy.record_idle_rss()

        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            # Rotate the order each repetition so that no server always goes first on a noisy box.
            order = proxies[rep % len(proxies):] + proxies[:rep % len(proxies)]
            for proxy in order:
                measure_cold(proxy, upstream, image, results, args.py_spy)
            direct = timed_get(references["upstream"]).check(image.layer_size, "direct upstream GET")
            results.add("cold_s", "upstream", direct.seconds)  # the wire: what a cold GET cannot beat
            log(f"direct {'upstream':<20} {direct.seconds:7.3f}s")
            warm_targets = [(p.name, p.blob_url) for p in order] + list(references.items())
            warm_targets = warm_targets[rep % len(warm_targets):] + warm_targets[:rep % len(warm_targets)]
            for name, url in warm_targets:
                transfer = timed_get(url).check(image.layer_size, f"{name} warm GET")
                results.add("warm_s", name, transfer.seconds)
                log(f"warm   {name:<20} {transfer.seconds:7.3f}s")
            many_targets = [(p.name, p.blob_url) for p in order if not p.cold_path_only] + [
                ("nginx", references["nginx"])]
            for name, url in many_targets:
                rate = aggregate_mib_per_second(url, args.warm_clients, image.layer_size)
                results.add("warm_many_mibps", name, rate)
                log(f"warm x{args.warm_clients} {name:<16} {rate:7.0f} MiB/s")
            for proxy in order:
                measure_concurrent(proxy, upstream, image, args.clients, results, args.py_spy)
            rate_targets = [(p.name, p.manifest_digest_url, p.manifest_tag_url, upstream)
                            for p in order if not p.cold_path_only] + [
                ("upstream", f"{upstream.url}/v2/{REPOSITORY}/manifests/{image.manifest_digest}",
                 f"{upstream.url}/v2/{REPOSITORY}/manifests/{TAG}", None),
                ("nginx", f"{nginx.url}/{image.manifest_digest.split(':')[1]}", None, None),
            ]
            for name, digest_url, tag_url, counted in rate_targets:
                measure_manifest_rates(name, digest_url, tag_url, args.rate_seconds, args.connections, results,
                                       counted)

        note_drop_behind(results)
        for proxy in proxies:
            proxy.record_rss()
            phase, peak = proxy.max_rss()
            results.add("peak_rss_mib", proxy.name, peak / 2**20)
            for idle in proxy.idle_rss:
                results.add("idle_rss_mib", proxy.name, idle / 2**20)
            by_phase: dict[str, int] = {}
            for what, rss in proxy.peak_rss:
                by_phase[what] = max(rss, by_phase.get(what, 0))
            results.note(f"{proxy.label}: peak RSS {peak / 2**20:.1f} MiB, reached during {phase}; highest per "
                         "phase: " + ", ".join(f"{what} {rss / 2**20:.0f} MiB" for what, rss in by_phase.items()))
            log(f"peak RSS {proxy.label:<20} {peak / 2**20:7.1f} MiB ({phase})")
    finally:
        for server in [*proxies, nginx, upstream]:
            if server is not None:
                server.stop()
        stop_all_processes()
    results.elapsed = time.monotonic() - started
    return results


def note_drop_behind(results: Results) -> None:
    """The table's ratio columns are the default pullthrough's: say the drop-behind variant's."""
    cold = results.get("cold_s", "pullthrough-drop")
    if cold is None:
        return
    ratios = [f"{cold / reference:.2f}× {name}" for name, reference in
              (("distribution", results.get("cold_s", "distribution")), ("direct", results.get("cold_s", "upstream")))
              if reference]
    warm, nginx = results.get("warm_s", "pullthrough-drop"), results.get("warm_s", "nginx")
    concurrent = results.get("concurrent_over_single", "pullthrough-drop")
    text = f"pullthrough with drop_behind = true: cold GET {cold:.3f} s ({', '.join(ratios)})"
    if warm is not None:
        text += f"; the first GET after its fill {warm:.3f} s" + (f" ({warm / nginx:.2f}× nginx)" if nginx else "")
    if concurrent is not None:
        text += f"; {results.clients} concurrent cold GETs {concurrent:.2f}× one"
    results.note(text)


def _exit_on_signal(signum: int, frame: object) -> None:
    # Turn SIGTERM/SIGHUP into SystemExit so that `finally` stops every server this run started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    results = run(args)
    print(render_text(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render_markdown(results, datetime.datetime.now(datetime.timezone.utc)))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
