"""Liveness and readiness: what a load balancer, a kubelet or systemd asks before sending traffic.

`/livez` answers while the event loop runs. `/readyz` is 200 only while the index answers and the
cache dir takes a write, checked at most `MAX_AGE_SECONDS` before the answer (probes from many
places share one check), and 503 from the moment a shutdown starts (SIGTERM: the server drains).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import __version__
from proxy.store.pools import Pools

MAX_AGE_SECONDS = 2.0
CHECK_TIMEOUT_SECONDS = 5.0  # a check that takes longer is a failure (a hung NFS mount, a dead database)


@dataclass(frozen=True)
class Checks:
    index: str
    cache_dir: str
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return self.index == "ok" and self.cache_dir == "ok"


class Readiness:
    def __init__(self, engine: Engine, probe_dir: Path, node: str, pools: Pools) -> None:
        self._engine = engine
        self._probe = probe_dir / f".readyz-{node}-{os.getpid()}"
        self._pools = pools
        self._last: Checks | None = None
        self._running: asyncio.Task[Checks] | None = None
        self.started = False  # set once the runtime has started (migrations, sweep)
        self.draining = False  # set when a shutdown starts

    def routes(self) -> list[Route]:
        return [
            Route("/livez", self.livez, methods=["GET", "HEAD"]),
            Route("/readyz", self.readyz, methods=["GET", "HEAD"]),
            Route("/healthz", self.readyz, methods=["GET", "HEAD"]),  # the name older deployments probe
        ]

    async def livez(self, _request: Request) -> JSONResponse:
        return JSONResponse({"status": "live", "version": __version__})

    async def readyz(self, _request: Request) -> JSONResponse:
        if self.draining:
            return JSONResponse({"status": "draining", "version": __version__}, status_code=503)
        if not self.started:
            return JSONResponse({"status": "starting", "version": __version__}, status_code=503)
        checks = await self.checks()
        body = {"status": "ready" if checks.ok else "not ready", "version": __version__,
                "checks": {"index": checks.index, "cache_dir": checks.cache_dir}}
        return JSONResponse(body, status_code=200 if checks.ok else 503)

    async def checks(self) -> Checks:
        """The latest checks if recent enough, else one new run shared by every waiting probe."""
        if self._last is not None and time.monotonic() - self._last.at <= MAX_AGE_SECONDS:
            return self._last
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check())
        self._last = await asyncio.shield(self._running)
        return self._last

    async def _check(self) -> Checks:
        index, cache_dir = await asyncio.gather(
            self._bounded(self._pools.index, self._index_answers), self._bounded(self._pools.files, self._dir_writable)
        )
        return Checks(index, cache_dir)

    @staticmethod
    async def _bounded(pool, probe) -> str:  # type: ignore[no-untyped-def]
        try:
            await asyncio.wait_for(pool(probe), CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready", named by its kind
            return f"failing: {type(exc).__name__}"
        return "ok"

    def _index_answers(self) -> None:
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def _dir_writable(self) -> None:
        fd = os.open(self._probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ready?\n")
        finally:
            os.close(fd)
            os.unlink(self._probe)
