"""The index at scale: lookup and access-time latency, and one janitor pass, over N blob rows.

    python -m bench.index            # 1,000,000 blobs (about 3-5 minutes and 1 GB of disk on 2 cores)
    python -m bench.index --quick    # 100,000 blobs: a smoke run
    python -m bench.index --blobs 250000 --output /tmp/index.md

One run builds a fresh SQLite index at the latest migration in a temporary folder, with an empty
file under blobs/sha256/xx/ for every row (so the janitor's orphan sweep finds index and disk in
agreement and the purge pass is the real one), measures BlobIndex.get, Store.holds and
Index.record_access, then times one Janitor.purge pass that expires about 30 % of the rows by TTL
and evicts another 10 % by the size cap. The folder is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event, insert, text

from proxy.migrate import upgrade
from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest
from proxy.store.index import Index, make_engine
from proxy.store.index.models import BlobRow, BlobScopeRow
from proxy.store.janitor import Janitor, Policy
from proxy.store.records import ReadScope
from proxy.store.store import Store

BENCH_DIR = Path(__file__).resolve().parent
DAY = 86400.0
SPREAD_DAYS = 30
INSERT_BATCH = 20_000
EXPIRE_FRACTION = 0.30
EVICT_FRACTION = 0.10
TARGET_LOOKUP_P99_MS = 2.0
TARGET_PURGE_S = 30.0

# (source, upstream, share of the rows)
UPSTREAMS = (("oci", "docker.io", 0.45), ("oci", "ghcr.io", 0.25), ("hf", "huggingface.co", 0.30))
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def log(message: str) -> None:
    print(f"[bench.index {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=None, help="rows in the index (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100,000 rows: a smoke run")
    parser.add_argument("--lookups", type=int, default=20_000, help="random lookups per latency measurement")
    parser.add_argument("--access-batch", type=int, default=10_000, help="accesses per Index.record_access batch")
    parser.add_argument("--access-batches", type=int, default=5, help="record_access batches measured")
    parser.add_argument("--pins", type=int, default=None, help="pinned blobs (default 0.5 %% of the rows, at most 5,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None, help="parent of the temporary folder (default: the system's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "index-latest.md")
    args = parser.parse_args(argv)
    args.blobs = args.blobs or (100_000 if args.quick else 1_000_000)
    args.pins = args.pins if args.pins is not None else min(5000, args.blobs // 200)
    return args


# -- the data ------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The generated rows, column by column (what the bench needs to know after inserting them)."""

    digests: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    last_access: list[float] = field(default_factory=list)


def blob_size(rng: random.Random, source: str) -> tuple[int, str | None]:
    """A plausible size (and media type, for manifests) for one blob of `source`."""
    if source == "oci":
        if rng.random() < 0.3:  # manifests, indexes and configs: a few KiB
            return int(rng.uniform(500, 20_000)), rng.choice(MANIFEST_TYPES)
        return min(int(rng.lognormvariate(15.9, 1.6)), 4 << 30), None  # layers: median ~8 MB
    if rng.random() < 0.5:  # config.json, tokenizer, README: small regular files
        return int(rng.uniform(200, 2_000_000)), None
    return min(int(rng.lognormvariate(19.1, 1.8)), 20 << 30), None  # LFS/Xet files: median ~200 MB


def generate(n: int, rng: random.Random, now: float) -> Iterator[list[dict[str, Any]]]:
    """Row batches for the blobs table; last_access uniform over the last SPREAD_DAYS days."""
    weights = [share for _, _, share in UPSTREAMS]
    batch: list[dict[str, Any]] = []
    for _ in range(n):
        source, upstream, _ = rng.choices(UPSTREAMS, weights)[0]
        size, media_type = blob_size(rng, source)
        last_access = now - rng.uniform(0, SPREAD_DAYS * DAY)
        created_at = last_access - rng.uniform(0, 10 * DAY)
        batch.append({
            "digest": f"sha256:{rng.randbytes(32).hex()}", "size": size, "media_type": media_type,
            "created_at": created_at, "last_access": last_access, "hits": rng.randrange(0, 50),
            "source": source, "upstream": upstream,
        })
        if len(batch) == INSERT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def insert_rows(index: Index, n: int, rng: random.Random, now: float) -> Rows:
    rows = Rows()
    table, scopes = BlobRow.__table__, BlobScopeRow.__table__
    with index.engine.begin() as connection:
        for batch in generate(n, rng, now):
            connection.execute(insert(table), batch)  # executemany
            # Every blob admitted to one read scope, as a server's fills would have recorded it.
            connection.execute(insert(scopes), [{"digest": r["digest"], "scope": str(SCOPE), "created_at": r["created_at"]} for r in batch])
            for row in batch:
                rows.digests.append(row["digest"])
                rows.sizes.append(row["size"])
                rows.last_access.append(row["last_access"])
    return rows


def create_files(store: BlobStore, digests: list[str]) -> None:
    """An empty file per digest: the sweep only needs the names (sizes come from the index)."""
    root = store.blobs_dir / "sha256"
    for shard in range(256):
        (root / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for digest in digests:
        hex_digest = digest[7:]
        os.close(os.open(f"{root}/{hex_digest[:2]}/{hex_digest}", flags, 0o644))


# -- measurements --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Latency:
        ordered = sorted(samples_ns)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6  # noqa: E731
        return cls(len(ordered), pick(0.50), pick(0.99), ordered[-1] / 1e6)


def time_get_blob(index: Index, digests: list[str]) -> tuple[Latency, Latency]:
    """Wall time and this thread's CPU time per call: a tail in the first but not the second is
    time spent off the CPU (preempted on a busy machine, or waiting for a lock or the disk)."""
    wall, cpu = [], []
    for digest in digests:
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        index.blobs.get(digest)
        cpu.append(time.thread_time_ns() - start_cpu)
        wall.append(time.perf_counter_ns() - start)
    return Latency.of(wall), Latency.of(cpu)


async def time_store_lookup(store: Store, digests: list[Digest]) -> tuple[Latency, int]:
    """The hit path of the store's door: the file's stat and the scope's admission, each a thread hop."""
    samples = []
    found = 0
    for digest in digests:
        start = time.perf_counter_ns()
        held = await store.holds(SCOPE, digest)
        samples.append(time.perf_counter_ns() - start)
        found += held
    return Latency.of(samples), found


class Phases:
    """Wall time of named calls, by wrapping bound methods of one object (behaviour unchanged)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj: object, method: str, label: str) -> None:
        original: Callable[..., Any] = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, method, timed)


class StatementProfile:
    """Execute time per distinct SQL statement (fetching a big result is not included: see Phases)."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.engine = engine
        self.stats: dict[str, list[float]] = {}  # statement -> [executions, seconds, rows of params]
        self.first_params: dict[str, Any] = {}
        self._started: dict[int, float] = {}

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        self._started[id(cursor)] = time.perf_counter()
        self.first_params.setdefault(statement, parameters[0] if executemany else parameters)

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        elapsed = time.perf_counter() - self._started.pop(id(cursor), time.perf_counter())
        entry = self.stats.setdefault(statement, [0, 0.0])
        entry[0] += 1
        entry[1] += elapsed

    @contextmanager
    def recording(self) -> Iterator[None]:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        try:
            yield
        finally:
            event.remove(self.engine, "before_cursor_execute", self._before)
            event.remove(self.engine, "after_cursor_execute", self._after)

    def top(self, n: int) -> list[tuple[str, int, float]]:
        ranked = sorted(self.stats.items(), key=lambda item: item[1][1], reverse=True)
        return [(statement, int(count), seconds) for statement, (count, seconds) in ranked[:n]]

    def explain(self, statement: str) -> list[str]:
        with self.engine.connect() as connection:
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", self.first_params.get(statement, ()))
            return [detail for _id, _parent, _unused, detail in plan]


def plan_policy(rows: Rows, pinned: set[int], now: float, n: int) -> tuple[Policy, int, int]:
    """A policy whose TTL expires ~EXPIRE_FRACTION of the rows and whose cap evicts EVICT_FRACTION more.

    Returns (policy, rows the TTL should remove, rows the cap should remove)."""
    order = sorted(range(n), key=rows.last_access.__getitem__)
    cut = int(EXPIRE_FRACTION * n)
    ttl_cutoff = (rows.last_access[order[cut - 1]] + rows.last_access[order[cut]]) / 2
    total = sum(rows.sizes)
    expired = [i for i in order[:cut] if i not in pinned]
    expired_bytes = sum(rows.sizes[i] for i in expired)
    evicted: list[int] = []
    for i in order[cut:]:
        if len(evicted) == int(EVICT_FRACTION * n):
            break
        if i not in pinned:
            evicted.append(i)
    evicted_bytes = sum(rows.sizes[i] for i in evicted)
    policy = Policy(default_ttl=now - ttl_cutoff, max_size=total - expired_bytes - evicted_bytes)
    return policy, len(expired), len(evicted)


def count_rows(index: Index) -> int:
    with index.engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM blobs")).scalar_one())


def count_files(store: BlobStore) -> int:
    return sum(len(os.listdir(shard.path)) for shard in os.scandir(store.blobs_dir / "sha256") if shard.is_dir())


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds`, so the cleanup below still runs."""

    def _expired(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"bench.index gave up after {seconds:.0f} s (--timeout)")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


SCOPE = ReadScope("oci:docker.io/library/bench")


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n = args.blobs
    result: dict[str, Any] = {"n": n, "phases": {}, "notes": []}
    url = f"sqlite:///{workdir / 'index.db'}"

    start = time.perf_counter()
    upgrade(url)
    engine = make_engine(url)
    index = Index(engine)
    store = BlobStore(workdir)
    store.prepare()
    result["migrate_s"] = time.perf_counter() - start

    now = time.time()
    log(f"inserting {n:,} blob rows")
    start = time.perf_counter()
    rows = insert_rows(index, n, rng, now)
    result["insert_s"] = time.perf_counter() - start
    log(f"inserted in {result['insert_s']:.1f} s; creating {n:,} empty files")

    start = time.perf_counter()
    create_files(store, rows.digests)
    result["files_s"] = time.perf_counter() - start

    pinned = set(rng.sample(range(n), args.pins))
    start = time.perf_counter()
    index.pins.add("bench-pinned", [rows.digests[i] for i in sorted(pinned)])
    result["pin_s"] = time.perf_counter() - start
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    result["db_mib"] = (workdir / "index.db").stat().st_size / 2**20
    log(f"files in {result['files_s']:.1f} s, {args.pins:,} pins in {result['pin_s']:.2f} s; index {result['db_mib']:.0f} MiB")

    gc.collect()
    lookups = min(args.lookups, n)
    sample = rng.sample(range(n), lookups)
    index.blobs.get(rows.digests[0])  # open the pool's connection
    result["get_blob"], result["get_blob_cpu"] = time_get_blob(index, [rows.digests[i] for i in sample])
    misses = [f"sha256:{rng.randbytes(32).hex()}" for _ in range(min(5000, lookups))]
    result["get_blob_miss"], _ = time_get_blob(index, misses)
    log(f"get_blob: {result['get_blob']}")

    cache = Store(workdir, index, node="bench", lease_seconds=None)
    lookup_digests = [Digest.parse(rows.digests[i]) for i in rng.sample(range(n), lookups)]
    result["lookup"], found = asyncio.run(time_store_lookup(cache, lookup_digests))
    if found != lookups:
        result["notes"].append(f"Store.holds found {found} of {lookups} blobs")
    log(f"Store.holds: {result['lookup']}")
    for digest in lookup_digests:  # what a hit records for the 15 s flusher
        cache._access.touch(digest)
    start = time.perf_counter()
    asyncio.run(cache.flush_access())  # what the 15 s flusher would write for those hits
    result["flush_s"] = time.perf_counter() - start
    result["flush_n"] = lookups
    touched = {str(d) for d in lookup_digests}

    batches = []
    batch_size = min(args.access_batch, n)
    for _ in range(args.access_batches):
        chosen = rng.sample(range(n), batch_size)
        stamp = time.time()
        start = time.perf_counter()
        index.blobs.record_access({rows.digests[i]: (stamp, 1) for i in chosen})
        batches.append(time.perf_counter() - start)
        touched.update(rows.digests[i] for i in chosen)
    result["record_access"] = batches
    log(f"record_access x{batch_size:,}: median {statistics.median(batches):.3f} s")
    flushed_at = time.time()
    position = {digest: i for i, digest in enumerate(rows.digests)} if touched else {}
    for digest in touched:
        rows.last_access[position[digest]] = flushed_at
    del position

    now = time.time()
    policy, expect_ttl, expect_lru = plan_policy(rows, pinned, now, n)
    result["policy"] = policy
    result["expected"] = (expect_ttl, expect_lru)
    janitor = Janitor(store, index, policy)

    # Lookups while the janitor selects (a dry run: no rows change), as a server would see them:
    # the purge runs in a worker thread of the same process, so it competes for the GIL.
    during: list[Digest] = [Digest.parse(rows.digests[i]) for i in rng.sample(range(n), lookups)]
    done = threading.Event()

    def dry_run() -> None:
        try:
            start = time.perf_counter()
            dry = janitor.purge(dry_run=True, reason="bench-dry-run")
            result["dry_run_s"] = time.perf_counter() - start
            result["dry_run_removed"] = len(dry.removed)
        finally:
            done.set()

    async def lookups_during_dry_run() -> list[int]:
        samples: list[int] = []
        for digest in during:
            if done.is_set():
                break
            start = time.perf_counter_ns()
            await cache.holds(SCOPE, digest)
            samples.append(time.perf_counter_ns() - start)
            await asyncio.sleep(0.0005)
        return samples

    log("dry-run purge with lookups running alongside")
    worker = threading.Thread(target=dry_run, name="dry-run purge", daemon=True)
    worker.start()
    samples = asyncio.run(lookups_during_dry_run())
    worker.join()
    result["lookup_during_purge"] = Latency.of(samples) if samples else None
    cache.pools.shutdown()

    phases = Phases()
    for method, label in (("sweep", "sweep (orphan files and rows)"), ("_expired", "TTL selection"),
                          ("_over_capacity", "size-cap (LRU) selection"), ("_remove", "removal (rows + files)")):
        phases.wrap(janitor, method, label)
    for target, method, label in (
        (index.blobs, "all_digests", "  sweep: BlobIndex.all_digests"), (index.blobs, "unused_since", "  TTL: BlobIndex.unused_since"),
        (index.blobs, "usage", "  cap: BlobIndex.usage"), (index.blobs, "least_recently_used", "  cap: BlobIndex.least_recently_used"),
        (index.blobs, "remove", "  removal: BlobIndex.remove (rows and their scopes)"), (index.purges, "record", "PurgeLog.record"),
    ):
        phases.wrap(target, method, label)
    profile = StatementProfile(engine)
    rows_before = count_rows(index)
    gc.collect()
    log(f"purge pass over {rows_before:,} rows")
    with profile.recording():
        start = time.perf_counter()
        purge = janitor.purge(reason="bench")
        result["purge_s"] = time.perf_counter() - start
    result["phases"] = phases
    result["purge"] = purge
    result["rows_after"] = count_rows(index)
    result["files_after"] = count_files(store)
    still_pinned = sum(index.blobs.get(rows.digests[i]) is not None for i in list(pinned)[:1000])
    result["pins_kept"] = (still_pinned, min(1000, len(pinned)))
    result["statements"] = [(s, c, t, profile.explain(s)) for s, c, t in profile.top(6)]
    log(f"purge: {result['purge_s']:.1f} s, {len(purge.removed):,} removed")
    engine.dispose()
    return result


# -- the report ----------------------------------------------------------------------------------
def render(result: dict[str, Any], args: argparse.Namespace, when: datetime.datetime) -> str:
    n = result["n"]
    get_blob: Latency = result["get_blob"]
    lookup: Latency = result["lookup"]
    miss: Latency = result["get_blob_miss"]
    cpu: Latency = result["get_blob_cpu"]
    during: Latency | None = result["lookup_during_purge"]
    access = result["record_access"]
    purge = result["purge"]
    phases: Phases = result["phases"]
    expect_ttl, expect_lru = result["expected"]
    sweep_s = phases.seconds.get("sweep (orphan files and rows)", 0.0)
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731

    lines = [
        f"# Index benchmark: {n:,} blobs",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC; `python -m bench.index --blobs {n}`; "
        f"Python {platform.python_version()}, SQLite {sqlite_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| metric | p50 | p99 | max | target | met |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| hit lookup, `Store.holds` (stat + admission, cold memo), ms, {lookup.count:,} random blobs "
        f"| {lookup.p50_ms:.3f} | {lookup.p99_ms:.3f} | {lookup.max_ms:.3f} | p99 < {TARGET_LOOKUP_P99_MS:g} | {yes(lookup.p99_ms < TARGET_LOOKUP_P99_MS)} |",
        f"| `BlobIndex.get` hit, ms, {get_blob.count:,} random rows "
        f"| {get_blob.p50_ms:.3f} | {get_blob.p99_ms:.3f} | {get_blob.max_ms:.3f} | p99 < {TARGET_LOOKUP_P99_MS:g} | {yes(get_blob.p99_ms < TARGET_LOOKUP_P99_MS)} |",
        f"| `BlobIndex.get` hit, CPU time of the calling thread, ms "
        f"| {cpu.p50_ms:.3f} | {cpu.p99_ms:.3f} | {cpu.max_ms:.3f} | — | — |",
        f"| `BlobIndex.get` miss, ms, {miss.count:,} | {miss.p50_ms:.3f} | {miss.p99_ms:.3f} | {miss.max_ms:.3f} | — | — |",
    ]
    if during is not None:
        lines.append(
            f"| hit lookup while a dry-run purge selects in another thread, ms, {during.count:,} "
            f"| {during.p50_ms:.3f} | {during.p99_ms:.3f} | {during.max_ms:.3f} | — | — |"
        )
    per_access_us = statistics.median(access) / args.access_batch * 1e6 if access else 0.0
    lines += [
        "",
        "| metric | value | target | met |",
        "| --- | ---: | ---: | ---: |",
        f"| **purge pass**, `Janitor.purge()` over {n:,} rows and files, s | {result['purge_s']:.2f} | < {TARGET_PURGE_S:g} | {yes(result['purge_s'] < TARGET_PURGE_S)} |",
        f"| purge pass without the orphan sweep, s | {result['purge_s'] - sweep_s:.2f} | — | — |",
        f"| orphan sweep alone (inside the pass), s | {sweep_s:.2f} | — | — |",
        f"| dry-run purge (selection only), s | {result.get('dry_run_s', float('nan')):.2f} | — | — |",
        f"| `Index.record_access`, {args.access_batch:,} accesses in one batch, s (median of {len(access)}; max) "
        f"| {statistics.median(access):.3f} ({per_access_us:.0f} µs each); {max(access):.3f} | — | — |",
        f"| `Store.flush_access` of the {result['flush_n']:,} lookups above, s | {result['flush_s']:.3f} | — | — |",
        f"| build: migrate / insert {n:,} rows / create {n:,} empty files / pin {args.pins:,}, s "
        f"| {result['migrate_s']:.2f} / {result['insert_s']:.1f} / {result['files_s']:.1f} / {result['pin_s']:.2f} | — | — |",
        f"| index file after the build, MiB | {result['db_mib']:.0f} | — | — |",
        "",
        f"The pass removed {len(purge.removed):,} blobs ({purge.bytes_removed / 2**40:.1f} TiB of index sizes; "
        f"expected {expect_ttl:,} by TTL + {expect_lru:,} by the cap = {expect_ttl + expect_lru:,}), "
        f"swept {purge.orphan_files} orphan files and {purge.orphan_rows} orphan rows; "
        f"{result['rows_after']:,} rows and {result['files_after']:,} files remain; "
        f"{result['pins_kept'][0]:,} of {result['pins_kept'][1]:,} sampled pinned blobs kept. "
        f"Policy: default_ttl {result['policy'].default_ttl / DAY:.1f} d, max_size {result['policy'].max_size / 2**40:.1f} TiB.",
        "",
        "## Where the purge pass goes",
        "",
        "| phase | s | calls |",
        "| --- | ---: | ---: |",
    ]
    for label, seconds in phases.seconds.items():
        lines.append(f"| {label} | {seconds:.2f} | {phases.calls[label]} |")
    lines += [
        "",
        "## Slowest statements of the pass (execute time; the fetch of a large result is not included)",
        "",
    ]
    for statement, count, seconds, plan in result["statements"]:
        shown = re.sub(r"\?(?:, \?){3,}", lambda m: f"?, … {m.group(0).count('?')} parameters", statement)
        lines += [f"- {count:,} × {seconds:.2f} s total:", "", "  ```sql", f"  {' '.join(shown.split())}", "  ```", ""]
        lines += ["  EXPLAIN QUERY PLAN:", "", "  ```"] + [f"  {step}" for step in plan] + ["  ```", ""]
    for note in result["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pullthrough-index-bench-", dir=args.work_dir))
    log(f"working in {workdir}")
    try:
        with deadline(args.timeout):
            result = run(args, workdir)
    finally:
        start = time.perf_counter()
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"removed {workdir} in {time.perf_counter() - start:.1f} s")
    report = render(result, args, datetime.datetime.now(datetime.timezone.utc))
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
