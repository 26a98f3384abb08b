"""Liveness and readiness: what a load balancer, a kubelet or systemd asks before sending traffic.

`/livez` answers while the event loop runs. `/readyz` is 200 only while the index answers and the
cache dir takes a write, checked at most `MAX_AGE_SECONDS` before the answer (probes from many
places share one check), and 503 from the moment a shutdown starts (SIGTERM: the server drains).

The checks run in threads of their own, not in the store's pools: under a rollout's load those
queue behind hashing and commits, and a probe that waited there would take a busy node out of
its Service. A check still blocked (a hung mount) is not started again; it answers "still waiting".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import __version__

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
    def __init__(self, engine: Engine, probe_dir: Path, node: str) -> None:
        self._engine = engine
        self._probe = probe_dir / f".readyz-{node}-{os.getpid()}"
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readyz")
        self._blocked: dict[str, Future[None]] = {}  # a check's call that outlived its timeout
        self._last: Checks | None = None
        self._running: asyncio.Task[Checks] | None = None
        self.started = False  # set once the runtime has started (migrations, sweep)
        self.draining = False  # set when a shutdown starts

    def routes(self) -> list[Route]:
        return [
            Route("/livez", self.livez, methods=["GET", "HEAD"]),
            Route("/readyz", self.readyz, methods=["GET", "HEAD"]),
            # Older deployments probe /healthz for liveness: it stays that, or an index blip would
            # restart every pod of a fleet that upgraded only its image.
            Route("/healthz", self.livez, methods=["GET", "HEAD"]),
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
            self._bounded("index", self._index_answers), self._bounded("cache_dir", self._dir_writable)
        )
        return Checks(index, cache_dir)

    async def _bounded(self, name: str, probe: Callable[[], None]) -> str:
        blocked = self._blocked.get(name)
        if blocked is not None and not blocked.done():
            return f"no answer: the check before is still waiting after more than {CHECK_TIMEOUT_SECONDS:.0f} s"
        self._blocked.pop(name, None)
        call = self._threads.submit(probe)
        try:
            await asyncio.wait_for(asyncio.wrap_future(call), CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            self._blocked[name] = call
            return f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready", named by its kind
            return f"failing: {type(exc).__name__}"
        return "ok"

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

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
