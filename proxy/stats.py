"""What the cache saves: traffic counters per source and upstream, /stats, and /metrics.

Counters are kept in memory on the request path and added to the index every few seconds, so
they survive a restart and sum over every node sharing the index; Prometheus gets the same
events through prometheus_client.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import platform
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import prometheus_client
from prometheus_client import (
    CollectorRegistry, Counter as PromCounter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from proxy import __version__
from proxy.http.timing import CURRENT, Exchange
from proxy.store.events import Outcome
from proxy.store.index import Index, Sample
from proxy.store.pools import Pools
from proxy.store.records import CounterKey, Origin, ReadScope

log = logging.getLogger(__name__)

COUNTERS = ("requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream", "coalesced", "fleet_followed", "fleet_takeovers")
FLUSH_SECONDS = 10.0  # the default `stats_interval`: counters saved and a chart point taken this often
# The charts' points: the index keeps a day of them; /stats gives every point of the last three
# hours and one in five minutes before that (a day at 10 s would be 8640 points in every /stats).
HISTORY_SECONDS = 24 * 3600.0
RECENT_SECONDS = 3 * 3600.0
RECENT_POINTS = 2160  # at most, whatever stats_interval is (below 5 s, one point per 5 s is kept)
OLDER_STEP = 300.0
USAGE_SECONDS = 10.0  # how long a size/entry count from the index is reused
TOP = 10
Nameable = Callable[[str, str], Awaitable[bool]]  # (scope kind, name): may a report name it?
MAX_REPOSITORIES = 10_000
T = TypeVar("T")
# Seconds from a request's arrival to its last byte: a hot manifest takes well under a millisecond,
# a cold multi-GiB layer minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Every Counter and Histogram would also export a `_created` series per child: twice the series for
# nothing a dashboard or an alert reads. This is prometheus_client's process-wide switch.
prometheus_client.disable_created_metrics()


class _CacheSpace:
    """The cache's limits and the free space beside it, as gauges read at scrape time; a limit
    that is not configured is absent, so that `cache / max` has no result rather than a wrong one."""

    def __init__(self) -> None:
        self.max_size: int | None = None
        self.min_free: int | None = None
        self.free: int | None = None

    def collect(self) -> list[Metric]:
        metrics = []
        for name, value, doc in (
            ("pullthrough_cache_max_bytes", self.max_size, "The configured max_size of the cache."),
            ("pullthrough_cache_min_free_bytes", self.min_free, "The configured min_free of the cache's filesystem."),
            ("pullthrough_filesystem_free_bytes", self.free, "Bytes free to unprivileged users on the cache's filesystem."),
        ):
            if value is not None:
                metrics.append(GaugeMetricFamily(name, doc, value=value))
        return metrics


class _Exchanges:
    """Request durations and bytes served, counted in plain dicts and exposed at scrape time as a
    histogram and a counter. Every request passes here, on the event loop's thread only; a
    prometheus_client child takes a lock per update, which on the manifest hot path (about 60 µs
    a request) cost 2.7 µs a request where this costs under 1."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in (*self._bounds, math.inf)]
        self._counts: dict[tuple[str, str], list[int]] = {}  # (family, result) -> per bucket, +Inf last
        self._sums: dict[tuple[str, str], float] = {}
        self._served: dict[tuple[str, str, str], int] = {}  # (source, upstream, result) -> bytes

    def observe(self, family: str, result: str, seconds: float) -> None:
        key = (family, result)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * len(self._les)
            self._sums[key] = 0.0
        counts[bisect.bisect_left(self._bounds, seconds)] += 1  # the first bucket whose le >= seconds
        self._sums[key] += seconds

    def served(self, source: str, upstream: str, result: str, nbytes: int) -> None:
        key = (source, upstream, result)
        self._served[key] = self._served.get(key, 0) + nbytes

    def collect(self) -> list[Metric]:
        durations = HistogramMetricFamily(
            "pullthrough_request_duration_seconds", "Time from a request's arrival to its response's last byte.",
            labels=["family", "result"],
        )
        for key, counts in list(self._counts.items()):
            durations.add_metric(list(key), list(zip(self._les, itertools.accumulate(counts))), self._sums[key])
        served = CounterMetricFamily(
            "pullthrough_served_bytes", "Body bytes sent to clients: from the cache (hit) or while they arrived from the upstream (miss).",
            labels=["source", "upstream", "result"],
        )
        for key, nbytes in list(self._served.items()):
            served.add_metric(list(key), nbytes)
        return [durations, served]


@dataclass
class _Usage:
    at: float
    by_origin: list[dict[str, Any]]
    entries: int
    bytes: int


class Traffic:
    """Counts requests, hits, misses, bytes and coalesced followers: the store's events (StoreEvents)."""

    def __init__(self, index: Index, node: str, pools: Pools | None = None, interval: float = FLUSH_SECONDS) -> None:
        self._index = index
        self._node = node
        self._pools = pools
        self._pending: Counter[CounterKey] = Counter()
        self._saving: Counter[CounterKey] = Counter()  # handed to the index by a flush, not yet read back
        self._saved: dict[CounterKey, int] = {}
        self._repos: Counter[tuple[str, str]] = Counter()
        self._repo_bytes: Counter[tuple[str, str]] = Counter()
        self._keys: dict[tuple[Origin, str], CounterKey] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._usage: _Usage | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._interval = interval
        self._offset = zlib.crc32(node.encode()) % 1000 / 1000 * 0.3 * interval  # see _flush_periodically
        self.history: list[dict[str, float]] = []  # oldest first, as thin_history keeps them
        self.registry = CollectorRegistry()
        labels = ["source", "upstream"]
        self._requests = PromCounter("pullthrough_requests", "Requests for cached content.", [*labels, "result"], registry=self.registry)
        self._bytes = PromCounter("pullthrough_bytes", "Bytes served or fetched.", [*labels, "direction"], registry=self.registry)
        self._coalesced = PromCounter("pullthrough_coalesced", "Requests that joined a fill in progress.", labels, registry=self.registry)
        self._fills = Histogram(
            "pullthrough_fill_seconds", "Time to fetch and commit one blob.", [*labels, "outcome"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=self.registry,
        )
        self._fleet = PromCounter(
            "pullthrough_fleet_fills", "Fills another node of the fleet downloaded (followed) or that this node took over from a silent one.",
            [*labels, "event"], registry=self.registry,
        )
        self._running = Gauge("pullthrough_fills_in_progress", "Fills running in this process (fetching or following).", labels, registry=self.registry)
        self._exchanges = _Exchanges(DURATION_BUCKETS)
        self.registry.register(self._exchanges)  # type: ignore[arg-type]
        Info("pullthrough_build", "The running version.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._space = _CacheSpace()
        self.registry.register(self._space)  # type: ignore[arg-type]
        self._cache_bytes = Gauge("pullthrough_cache_bytes", "Bytes in the cache.", registry=self.registry)
        self._cache_entries = Gauge("pullthrough_cache_entries", "Blobs in the cache.", registry=self.registry)
        self.purges = PromCounter("pullthrough_purges", "Janitor passes.", ["reason"], registry=self.registry)
        self.purged_bytes = PromCounter("pullthrough_purged_bytes", "Bytes removed by the janitor.", ["reason"], registry=self.registry)

    # -- events, on the request path (no I/O) ---------------------------------------------------
    def request(self, origin: Origin, scope: ReadScope, outcome: Outcome, *, joined: bool) -> None:
        exchange = CURRENT.get()
        if exchange is not None:  # the client's request in progress: its duration and bytes are labelled by this read
            exchange.result, exchange.origin = ("hit" if outcome is Outcome.HIT else "miss"), origin
        self._count(origin, "requests")
        self._count(origin, "hits" if outcome is Outcome.HIT else "misses")
        self._child(self._requests, origin.source, origin.upstream, outcome.value).inc()
        if joined:
            self._count(origin, "coalesced")
            self._child(self._coalesced, origin.source, origin.upstream).inc()
        self._count_repo(self._repos, scope, 1)

    def sent_from_cache(self, origin: Origin, scope: ReadScope, nbytes: int) -> None:
        self._count(origin, "bytes_from_cache", nbytes)
        self._child(self._bytes, origin.source, origin.upstream, "from_cache").inc(nbytes)
        self._count_repo(self._repo_bytes, scope, nbytes)

    def fetched(self, origin: Origin, nbytes: int) -> None:
        """Bytes that came from upstream (small objects; blob fills report through fill_finished)."""
        self._count(origin, "bytes_from_upstream", nbytes)
        self._child(self._bytes, origin.source, origin.upstream, "from_upstream").inc(nbytes)

    def fill_finished(self, origin: Origin, nbytes: int, seconds: float, ok: bool) -> None:
        self.fetched(origin, nbytes)
        self._child(self._fills, origin.source, origin.upstream, "ok" if ok else "failed").observe(seconds)

    def fill_followed(self, origin: Origin) -> None:
        self._count(origin, "fleet_followed")
        self._child(self._fleet, origin.source, origin.upstream, "followed").inc()

    def fill_taken_over(self, origin: Origin) -> None:
        self._count(origin, "fleet_takeovers")
        self._child(self._fleet, origin.source, origin.upstream, "taken_over").inc()

    def fill_began(self, origin: Origin) -> None:
        self._child(self._running, origin.source, origin.upstream).inc()

    def fill_ended(self, origin: Origin) -> None:
        self._child(self._running, origin.source, origin.upstream).dec()

    def exchange_finished(self, exchange: Exchange) -> None:
        """A response's last byte went out (proxy/http/timing.py): its duration, and the bytes it
        sent by where they came from."""
        self._exchanges.observe(exchange.family, exchange.result, exchange.seconds)
        origin = exchange.origin
        if origin is not None:
            sent = exchange.sent
            if sent:
                self._exchanges.served(origin.source, origin.upstream, exchange.result, sent)

    def hot_answered(self, seconds: float, origin: Origin, sent: int) -> None:
        """A manifest the hot path answered (proxy/sources/oci/hot.py), outside the timing middleware."""
        self._exchanges.observe("oci", "hit", seconds)
        if sent:
            self._exchanges.served(origin.source, origin.upstream, "hit", sent)

    def cache_space(self, *, max_size: int | None, min_free: int | None, free: int | None) -> None:
        self._space.max_size, self._space.min_free, self._space.free = max_size, min_free, free

    def _count(self, origin: Origin, name: str, amount: int = 1) -> None:
        key = self._keys.get((origin, name))
        if key is None:
            key = self._keys[(origin, name)] = CounterKey(origin.source, origin.upstream, name)
        self._pending[key] += amount

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled child of a metric, looked up once: every request counts, so this is hot."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    @staticmethod
    def _count_repo(table: Counter[tuple[str, str]], scope: ReadScope, amount: int) -> None:
        """Per repository, for the top list: bounded, whatever names clients send (the least used
        half goes when it is full)."""
        table[(scope.kind, scope.name or scope.value)] += amount
        if len(table) > MAX_REPOSITORIES:
            for key, _ in table.most_common()[MAX_REPOSITORIES // 2 :]:
                del table[key]

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        """Index work in the store's index pool (a worker thread when there is no store: the CLI)."""
        if self._pools is not None:
            return await self._pools.index(call, *args)
        return await anyio.to_thread.run_sync(call, *args)

    # -- persistence --------------------------------------------------------------------------------
    def load(self) -> None:
        """Blocking: what every node saved so far, and the charts' points of the last day."""
        self._saved = self._index.counters.totals()
        now = time.time()
        self.history = thin_history([_point(sample) for sample in self._index.history.since(now - HISTORY_SECONDS)], now)

    async def start(self) -> None:
        await self._blocking(self.load)
        self._flusher = asyncio.create_task(self._flush_periodically(), name="counters flush")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    async def flush(self) -> None:
        """Save this node's counts, and read every node's back: /stats adds up the whole fleet.

        The counts being saved stay in `totals()` (as `_saving`) until the saved totals that include
        them replace `_saved`: a report in between must not see them vanish."""
        pending, self._pending = self._pending, Counter()
        self._saving.update(pending)
        try:
            if pending:
                await self._blocking(self._index.counters.add, self._node, dict(pending))
        except Exception:
            self._saving.subtract(pending)
            self._pending.update(pending)  # try again next time
            raise
        try:
            saved = await self._blocking(self._index.counters.totals)
        except Exception:
            self._saved = {key: self._saved.get(key, 0) + pending[key] for key in self._saved.keys() | pending.keys()}
            self._saving.subtract(pending)
            raise
        self._saved = saved  # and, in the same step, they stop counting as being saved
        self._saving.subtract(pending)

    async def _flush_periodically(self) -> None:
        while True:
            # Just after the slots' boundaries, each node at its own fixed offset (up to 30 % of a
            # slot): a slot's point is on time whichever node takes it, and hundreds of nodes on
            # one index do not all write in the same instant.
            await asyncio.sleep(self._interval - (time.time() - self._offset) % self._interval)
            try:
                await self.flush()
            except Exception:
                log.exception("could not save counters")
                continue  # no point: the totals were not read back
            try:
                await self._sample()
            except Exception:
                log.exception("could not save the traffic history")

    async def _sample(self) -> None:
        """A point of the dashboard's charts: the fleet's totals as the flush just read them back,
        saved in the index (the first node to take a slot writes its point) and kept for /stats."""
        now = time.time()
        totals: Counter[str] = Counter()
        for key, value in self._saved.items():
            totals[key.name] += value
        slot_ms = self._interval * 1000
        # The nearest boundary before this node's offset: the sleep may end a hair early and the
        # flush takes a moment.
        slot = int(round((now - self._offset) * 1000 / slot_ms) * slot_ms)
        sample = Sample(slot, now, {name: totals[name] for name in COUNTERS})
        await self._blocking(self._index.history.record, sample, now - HISTORY_SECONDS)
        point = _point(sample)
        if not self.history or point["t"] > self.history[-1]["t"]:
            self.history = thin_history([*self.history, point], now)

    # -- reports -------------------------------------------------------------------------------------
    def totals(self) -> dict[CounterKey, int]:
        merged = dict(self._saved)
        for counts in (self._saving, self._pending):
            for key, value in counts.items():
                if value:
                    merged[key] = merged.get(key, 0) + value
        return merged

    async def usage(self) -> _Usage:
        if self._usage is None or time.monotonic() - self._usage.at > USAGE_SECONDS:
            rows = await self._blocking(self._index.blobs.usage)
            by_origin = [
                {"source": r.source or "unknown", "upstream": r.upstream or "unknown", "entries": r.entries, "bytes": r.bytes}
                for r in rows
            ]
            self._usage = _Usage(time.monotonic(), by_origin, sum(r.entries for r in rows), sum(r.bytes for r in rows))
            self._cache_bytes.set(self._usage.bytes)
            self._cache_entries.set(self._usage.entries)
        return self._usage

    async def _top(self, nameable: Nameable | None) -> list[tuple[tuple[str, str], int]]:
        """The most requested repositories this report may name (`nameable`: none gated or private)."""
        top = []
        for (kind, name), count in self._repos.most_common(TOP * 5):
            if nameable is None or await nameable(kind, name):
                top.append(((kind, name), count))
            if len(top) == TOP:
                break
        return top

    async def report(
        self, *, max_size: int | None, last_purge: dict[str, Any] | None, pins: dict[str, Any], ratelimits: dict[str, str],
        nameable: Nameable | None = None,
    ) -> dict[str, Any]:
        totals = self.totals()
        usage = await self.usage()
        report: dict[str, Any] = {name: 0 for name in COUNTERS}
        per_source: dict[str, dict[str, int]] = {}
        per_upstream: dict[str, dict[str, Any]] = {}
        for key, value in totals.items():
            if key.name not in COUNTERS:
                continue
            report[key.name] += value
            per_source.setdefault(key.source, {n: 0 for n in COUNTERS})[key.name] += value
            entry = per_upstream.setdefault(f"{key.source}:{key.upstream}", {"source": key.source, "upstream": key.upstream, **{n: 0 for n in COUNTERS}})
            entry[key.name] += value
        for name, remaining in ratelimits.items():
            per_upstream.setdefault(f"oci:{name}", {"source": "oci", "upstream": name, **{n: 0 for n in COUNTERS}})["ratelimit_remaining"] = remaining
        served = report["hits"] + report["misses"]
        report.update(
            {
                "hit_ratio": round(report["hits"] / served, 4) if served else None,
                "cache": {"bytes": usage.bytes, "entries": usage.entries, "max_size": max_size, "by_origin": usage.by_origin},
                "per_source": per_source,
                "per_upstream": list(per_upstream.values()),
                "top_repositories": [
                    {"source": source, "repository": repo, "requests": count, "bytes_from_cache": self._repo_bytes[(source, repo)]}
                    for (source, repo), count in await self._top(nameable)
                ],
                "last_purge": last_purge,
                "pins": pins,
                "ratelimit_remaining": ratelimits,
                "history": list(self.history),
                "history_step": {"recent": self._interval, "older": OLDER_STEP},
            }
        )
        return report

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


def _point(sample: Sample) -> dict[str, float]:
    """A point as /stats shows it: when, and each counter's fleet total then (a counter the sample
    predates is absent, not zero: the charts draw no rate for it there)."""
    return {"t": round(sample.taken_at, 3), **{name: sample.totals[name] for name in COUNTERS if name in sample.totals}}


def thin_history(points: list[dict[str, float]], now: float) -> list[dict[str, float]]:
    """Every point of the last RECENT_SECONDS (at most RECENT_POINTS of them), one per OLDER_STEP
    before that, none older than HISTORY_SECONDS. The points are cumulative totals, so a rate over
    a dropped point's two neighbours is still the true average over that time."""
    recent = sum(1 for point in points if point["t"] >= now - RECENT_SECONDS)
    recent_step = RECENT_SECONDS / RECENT_POINTS if recent > RECENT_POINTS else 0.0
    kept: list[dict[str, float]] = []
    for point in points:
        t = point["t"]
        if t < now - HISTORY_SECONDS:
            continue
        step = recent_step if t >= now - RECENT_SECONDS else OLDER_STEP
        if kept and t - kept[-1]["t"] < step:
            continue
        kept.append(point)
    return kept
