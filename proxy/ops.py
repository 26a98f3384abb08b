"""The operator's endpoints: /stats, /metrics, the dashboard at /, and the admin actions.

Admin actions need `Authorization: Bearer <admin_token>` and are off when no token is
configured; /stats, /metrics and the dashboard are readable by anyone unless `public_stats` is
false, in which case they need the admin token too.
"""

from __future__ import annotations

import hmac
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.config import Settings
from proxy.stats import Nameable, Traffic
from proxy.store.store import Store
from proxy.store.janitor import PurgeResult

Purger = Callable[..., Awaitable[PurgeResult]]


class Operations:
    def __init__(
        self, settings: Settings, traffic: Traffic, store: Store, purge: Purger, ratelimits: Callable[[], dict[str, str]],
        nameable: Nameable,
    ) -> None:
        self._settings = settings
        self._nameable = nameable
        self._traffic = traffic
        self._store = store
        self._purge = purge
        self._ratelimits = ratelimits

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.dashboard, methods=["GET", "HEAD"]),
            Route("/stats", self.stats, methods=["GET", "HEAD"]),
            Route("/metrics", self.metrics, methods=["GET", "HEAD"]),
            Route("/admin/purge", self.purge, methods=["POST"]),
        ]

    async def report(self, *, admin: bool = False) -> dict[str, Any]:
        """The /stats report; names of gated or private repos only for the admin."""
        index = self._store.index
        last, pins = await self._store.pools.index(lambda: (index.purges.last(), index.pins.all()))
        return await self._traffic.report(
            max_size=self._settings.max_size,
            last_purge=asdict(last) if last else None,
            pins={name: {"blobs": len(digests)} for name, digests in sorted(pins.items())},
            ratelimits=self._ratelimits(),
            nameable=None if admin else self._nameable,
        )

    async def stats(self, request: Request) -> Response:
        if (refusal := self._refuse(request, reading=True)) is not None:
            return refusal
        return JSONResponse(await self.report(admin=self._is_admin(request)))

    async def metrics(self, request: Request) -> Response:
        if (refusal := self._refuse(request, reading=True)) is not None:
            return refusal
        await self._traffic.usage()  # refreshes the size gauges
        free = await self._store.pools.files(_free_bytes, str(self._settings.cache_dir))
        self._traffic.cache_space(max_size=self._settings.max_size, min_free=self._settings.min_free, free=free)
        return Response(self._traffic.metrics(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def dashboard(self, request: Request) -> Response:
        if (refusal := self._refuse(request, reading=True)) is not None:
            return refusal
        page = resources.files("proxy").joinpath("static/dashboard.html").read_text()
        return HTMLResponse(page)

    async def purge(self, request: Request) -> Response:
        if (refusal := self._refuse(request, reading=False)) is not None:
            return refusal
        params = request.query_params
        result = await self._purge(dry_run=params.get("dry_run") in ("1", "true"), reason="admin")
        return JSONResponse(
            {"dry_run": result.dry_run, "blobs_removed": len(result.removed), "bytes_removed": result.bytes_removed,
             "orphan_files": result.orphan_files, "orphan_rows": result.orphan_rows}
        )

    def admin_refusal(self, request: Request) -> Response | None:
        """None when the request carries the admin token; else the answer that refuses it."""
        return self._refuse(request, reading=False)

    def _refuse(self, request: Request, *, reading: bool) -> Response | None:
        if reading and self._settings.public_stats:
            return None
        if self._settings.admin_secret() is None:
            return JSONResponse({"error": "admin endpoints are off: no admin_token is configured"}, status_code=404)
        if not self._is_admin(request):
            return JSONResponse({"error": "admin token required"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    def _is_admin(self, request: Request) -> bool:
        secret = self._settings.admin_secret()
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return secret is not None and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), secret.encode())


def _free_bytes(path: str) -> int | None:
    """Blocking: the free space the janitor's min_free compares with (in a file-pool thread: a
    stalled network filesystem must not stall the event loop)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
