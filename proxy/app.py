"""create_app(settings): the ASGI application, its routes and its lifespan (index, store, HTTP clients,
counters, janitor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import __version__
from proxy.config import Settings
from proxy.http.download import BlobTransport
from proxy.http.zerocopy import ZeroCopyMiddleware
from proxy.migrate import prepare_database
from proxy.ops import Operations
from proxy.pins import ResourceSets
from proxy.sources.hf import HfMirror
from proxy.sources.oci import OciMirror
from proxy.sources.s3 import S3Mirror
from proxy.sources.web import WebMirror
from proxy.stats import Traffic
from proxy.store.blobs import BlobStore
from proxy.store.cache import BlobCache
from proxy.store.leases import FillLeases
from proxy.store.index import Index, make_engine
from proxy.store.janitor import Janitor, Policy, PurgeResult, TtlRule

log = logging.getLogger(__name__)

USER_AGENT = f"pullthrough/{__version__}"
IMMUTABLE_TTL = float(2**40)


def upstream_http_client() -> httpx.AsyncClient:
    """One pooled client for every upstream; redirects are followed per request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        headers={"User-Agent": USER_AGENT},
        trust_env=True,
    )


def purge_policy(settings: Settings) -> Policy:
    rules = [TtlRule("oci", r.name, r.ttl) for r in settings.registries if r.ttl is not None]
    if settings.hf.ttl is not None:
        rules.append(TtlRule("hf", urlsplit(settings.hf.url).netloc, settings.hf.ttl))
    if settings.s3.ttl is not None:
        rules.append(TtlRule("s3", None, settings.s3.ttl))
    rules.append(TtlRule("ipfs", None, IMMUTABLE_TTL))  # IPFS content never changes: only the size cap evicts it
    return Policy(default_ttl=settings.default_ttl, rules=tuple(rules), max_size=settings.max_size, min_free=settings.min_free)


def create_app(settings: Settings) -> Starlette:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    index = Index(engine)
    store = BlobStore(settings.cache_dir, node_id=settings.node_name)
    traffic = Traffic(index, node=store.node_id)
    leases = FillLeases(index, store.node_id, settings.fill_lease)
    cache = BlobCache(store, index, listener=traffic, leases=leases, follow_streams=settings.follow_fills == "stream")
    janitor = Janitor(store, index, purge_policy(settings))
    http = upstream_http_client()
    blob_transport = BlobTransport(user_agent=USER_AGENT)
    oci = OciMirror(settings, cache, http, blob_transport, traffic)
    hf = HfMirror(settings.hf, cache, http, blob_transport, traffic)
    s3 = S3Mirror(settings.s3, cache, traffic)
    web = WebMirror(settings.web, cache, http, blob_transport, traffic)
    purge_lock = asyncio.Lock()

    async def purge(**options: object) -> PurgeResult:
        async with purge_lock:
            await cache.flush_access()  # last-access times the janitor must see
            result = await anyio.to_thread.run_sync(lambda: janitor.purge(**options))  # type: ignore[arg-type]
        if not result.dry_run:
            reason = str(options.get("reason", "periodic"))
            traffic.purges.labels(reason).inc()
            traffic.purged_bytes.labels(reason).inc(result.bytes_removed)
        return result

    async def purge_periodically() -> None:
        while True:
            await asyncio.sleep(settings.purge_interval)
            try:
                await purge(reason="periodic")
            except Exception:
                log.exception("purge failed")

    ops = Operations(settings, traffic, index, purge, oci.ratelimits)
    resource_sets = ResourceSets(settings.resource_sets, cache, oci, hf, s3, web)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(prepare_database, engine, settings.effective_database_url)
        await cache.start()
        await anyio.to_thread.run_sync(janitor.sweep)  # index and files agree before the first request
        await traffic.start()
        janitor_task = asyncio.create_task(purge_periodically(), name="janitor")
        if settings.prefetch_on_start and settings.resource_sets:
            prefetch_task = asyncio.create_task(resource_sets.prefetch_all(), name="prefetch")
        log.info("pullthrough %s serving %s from %s", __version__, settings.listen, settings.cache_dir)
        try:
            yield
        finally:
            janitor_task.cancel()
            if settings.prefetch_on_start and settings.resource_sets:
                prefetch_task.cancel()
            await cache.aclose()
            await s3.aclose()
            await traffic.aclose()
            await http.aclose()
            blob_transport.close()
            engine.dispose()

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    # The Hub's routes live at the root (HF_ENDPOINT is a host), so they come last.
    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        *ops.routes(),
        *resource_sets.routes(ops.admin_refusal),
        *oci.routes(),
        *s3.routes(),
        *web.routes(),
        *hf.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.cache = cache
    app.state.traffic = traffic
    app.state.sources = {"oci": oci, "hf": hf, "s3": s3, "web": web}
    app.state.resource_sets = resource_sets
    return app


def create_server_app(settings: Settings) -> ZeroCopyMiddleware:
    """The app as `serve` runs it: zero-copy must wrap Starlette's own middleware to see the server."""
    return ZeroCopyMiddleware(create_app(settings))
