"""create_app(settings): the ASGI application, its routes and its lifespan (index, store, HTTP client)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import __version__
from proxy.config import Settings
from proxy.http.zerocopy import ZeroCopyMiddleware
from proxy.migrate import prepare_database
from proxy.sources.hf import HfMirror
from proxy.sources.oci import OciMirror
from proxy.http.download import BlobTransport
from proxy.store.blobs import BlobStore
from proxy.store.cache import BlobCache
from proxy.store.index import Index, make_engine

log = logging.getLogger(__name__)

USER_AGENT = f"pullthrough/{__version__}"


def upstream_http_client() -> httpx.AsyncClient:
    """One pooled client for every upstream; redirects are followed per request."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        headers={"User-Agent": USER_AGENT},
        trust_env=True,
    )


def create_app(settings: Settings) -> Starlette:
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    cache = BlobCache(BlobStore(settings.cache_dir), Index(engine))
    http = upstream_http_client()
    blob_transport = BlobTransport(user_agent=USER_AGENT)
    oci = OciMirror(settings, cache, http, blob_transport)
    hf = HfMirror(settings.hf, cache, http, blob_transport)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(prepare_database, engine, settings.effective_database_url)
        await cache.start()
        log.info("pullthrough %s serving %s from %s", __version__, settings.listen, settings.cache_dir)
        try:
            yield
        finally:
            await cache.aclose()
            await http.aclose()
            blob_transport.close()
            engine.dispose()

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    # The Hub's routes live at the root (HF_ENDPOINT is a host), so they come last.
    routes = [Route("/healthz", healthz, methods=["GET", "HEAD"]), *oci.routes(), *hf.routes()]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.cache = cache
    app.state.oci = oci
    return app


def create_server_app(settings: Settings) -> ZeroCopyMiddleware:
    """The app as `serve` runs it: zero-copy must wrap Starlette's own middleware to see the server."""
    return ZeroCopyMiddleware(create_app(settings))
