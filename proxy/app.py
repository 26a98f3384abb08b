"""The composition root: `Runtime` builds every part once from the settings (index, store, counters,
sources, resource sets, janitor), and `create_app` serves it with its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import urllib3
from starlette.applications import Starlette
from starlette.types import ASGIApp

from proxy import __version__
from proxy.config import Settings
from proxy.http.download import BlobTransport
from proxy.http.offline import OfflineTransport
from proxy.http.timing import RequestTiming
from proxy.http.zerocopy import ZeroCopyMiddleware
from proxy.sources.oci.hot import HotPath
from proxy.migrate import prepare_database
from proxy.ops import Operations
from proxy.pins import ResourceSets
from proxy.readiness import Readiness
from proxy.sources.source import Sources, build_sources, expiring_references, purge_rules
from proxy.stats import Traffic
from proxy.store.index import Index, make_engine
from proxy.store.janitor import Janitor, Policy, PurgeResult
from proxy.store.pools import Pools, PoolSizes
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth

log = logging.getLogger(__name__)

USER_AGENT = f"pullthrough/{__version__}"


def upstream_http_client(timeout: float = 60.0, *, offline: bool = False) -> httpx.AsyncClient:
    """One pooled client for every upstream; redirects are followed per request. Offline, its
    transport refuses every request, and no proxy from the environment is mounted beside it."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=min(10.0, timeout), read=timeout, write=timeout, pool=30.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        headers={"User-Agent": USER_AGENT},
        trust_env=not offline,
        transport=OfflineTransport() if offline else None,
    )


def purge_policy(settings: Settings) -> Policy:
    return Policy(
        default_ttl=settings.default_ttl, rules=tuple(purge_rules(settings)), default_ttl_from=settings.ttl_from,
        max_size=settings.max_size, min_free=settings.min_free, forget=expiring_references(),
    )


@dataclass
class Runtime:
    """Every long-lived part of a running pullthrough, built once from the settings."""

    settings: Settings
    index: Index
    traffic: Traffic
    store: Store
    janitor: Janitor
    http: httpx.AsyncClient
    blob_transport: BlobTransport
    sources: Sources
    resource_sets: ResourceSets
    readiness: Readiness
    _purge_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        index = Index(make_engine(settings.effective_database_url))
        pools = Pools(PoolSizes(fills=settings.fill_threads, index=settings.index_threads, files=settings.file_threads))
        traffic = Traffic(index, node=settings.node_name, pools=pools, interval=settings.stats_interval)
        store = Store(
            settings.cache_dir, index, node=settings.node_name, events=traffic, pools=pools,
            lease_seconds=settings.fill_lease, follow_streams=settings.follow_fills == "stream", offline=settings.offline,
            drop_behind=settings.drop_behind,
        )
        http = upstream_http_client(settings.upstream_timeout, offline=settings.offline)
        timeout = urllib3.Timeout(connect=min(10.0, settings.upstream_timeout), read=settings.upstream_timeout)
        blob_transport = BlobTransport(user_agent=USER_AGENT, executor=pools.fills, timeout=timeout, offline=settings.offline)
        health = UpstreamHealth(traffic.registry)  # pullthrough_upstream_* beside the traffic metrics
        sources = build_sources(settings, store, http, blob_transport, health)
        return cls(
            settings, index, traffic, store, Janitor(store.files, index, purge_policy(settings)), http, blob_transport,
            sources, ResourceSets(settings.resource_sets, store, sources, http, offline=settings.offline),
            Readiness(index.engine, store.files.tmp_dir, settings.node_name),
        )

    async def start(self) -> None:
        await self.store.pools.index(prepare_database, self.index.engine, self.settings.effective_database_url)
        await self.store.start()
        await self.store.pools.files(self.janitor.sweep_alone)  # index and files agree before the first request
        await self.traffic.start()
        await self.resource_sets.restore()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Started (migrations, the sweep), with the janitor and the resource sets' prefetch in the
        background; closed on the way out."""
        await self.start()
        background = [asyncio.create_task(self.purge_periodically(), name="janitor")]
        if self.settings.offline and self.settings.prefetch_on_start and self.settings.resource_sets:
            log.info("offline: resource sets are not prefetched (they are served from what the cache holds)")
        elif self.settings.prefetch_on_start and self.settings.resource_sets:
            background.append(asyncio.create_task(self.resource_sets.run(), name="resource sets"))
        self.readiness.started = True
        try:
            yield
        finally:
            self.readiness.draining = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        await self.sources.aclose()
        await self.traffic.aclose()
        await self.http.aclose()
        self.blob_transport.close()
        await self.store.aclose()
        self.readiness.close()
        self.index.dispose()

    async def purge(self, **options: object) -> PurgeResult:
        async with self._purge_lock:
            await self.store.flush_access()  # last-access times the janitor must see
            result = await self.store.pools.files(lambda: self.janitor.purge(**options))  # type: ignore[arg-type]
        if not result.dry_run:
            reason = str(options.get("reason", "periodic"))
            self.traffic.purges.labels(reason).inc()
            self.traffic.purged_bytes.labels(reason).inc(result.bytes_removed)
        return result

    async def purge_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.purge_interval)
            try:
                await self.purge(reason="periodic")
            except Exception:
                log.exception("purge failed")

    async def nameable(self, kind: str, name: str) -> bool:
        """Whether /stats may name this scope to anyone: not a Hub repo unless it was seen public."""
        if kind != "hf":
            return True
        hf = self.sources.named("hf")
        return await hf.access.known_public(name)  # type: ignore[attr-defined, no-any-return]

    def ratelimits(self) -> dict[str, str]:
        oci = self.sources.named("oci")
        return oci.ratelimits()  # type: ignore[attr-defined, no-any-return]


def create_app(settings: Settings) -> Starlette:
    runtime = Runtime.build(settings)
    ops = Operations(settings, runtime.traffic, runtime.store, runtime.purge, runtime.ratelimits, runtime.nameable)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        """For ASGI servers other than `serve` (which starts the runtime itself, after binding)."""
        async with runtime.running():
            yield

    routes = [
        *runtime.readiness.routes(),
        *ops.routes(),
        *runtime.resource_sets.routes(ops.admin_refusal),
        *runtime.sources.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.runtime = runtime
    return app


def create_server_app(settings: Settings) -> tuple[ASGIApp, Runtime]:
    """The app as `serve` runs it, and its runtime (which `serve` starts and stops around the
    server): zero-copy must wrap Starlette's own middleware to see the server, and repeated
    manifest GETs are answered before either (proxy/sources/oci/hot.py)."""
    app = create_app(settings)
    runtime: Runtime = app.state.runtime
    oci = runtime.sources.named("oci")
    timed = RequestTiming(ZeroCopyMiddleware(app, send_timeout=settings.send_timeout), runtime.traffic.exchange_finished)
    served: ASGIApp = HotPath(timed, oci.hot, runtime.traffic.hot_answered)  # hot answers time themselves
    return served, runtime
