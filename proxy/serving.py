"""`pullthrough serve`: the listening socket, the runtime around the uvicorn server, and shutdown.

Order matters to an operator: the socket is bound first (a port in use fails at once, before
migrations, the sweep or prefetches run), then the runtime starts, and only then does the socket
listen: while a long start-up runs (a sweep of a large shared cache), clients are refused at once
and fall back to their next endpoint (containerd, dockerd) instead of waiting in a backlog. A
SIGTERM (or SIGINT) drains: `/readyz` answers 503 at once, the listener stays open `drain_delay`
so that load balancers see it, then closes, and running transfers get `shutdown_grace` to finish
before they are cut. A second signal closes the listener at once; a third cuts the transfers.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from proxy import __version__
from proxy.config import Settings
from proxy.http.server import HeadLimits, guarded_protocol
from proxy.readiness import Readiness

log = logging.getLogger("proxy.serving")

BACKLOG = 2048  # uvicorn's default (uvicorn calls listen() with it once the runtime has started)


class ServeError(RuntimeError):
    """A failure of `serve` worded for one line (no traceback needed to understand it)."""


def run_server(settings: Settings) -> None:
    listener = bind(settings.host, settings.port)
    try:
        _raise_open_file_limit(settings.max_connections)
        # uvloop when installed, as uvicorn.run chose it (every benchmark ran on it); asyncio.run would not.
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            runner.run(_serve(settings, listener))
    finally:
        listener.close()


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # a platform without it (uvloop is a dependency only where it builds)
        return None
    return uvloop.new_event_loop


def bind(host: str, port: int) -> socket.socket:
    """The socket, bound but not yet listening (IPv4 or IPv6, by what the host resolves to)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)  # EADDRINUSE here when another process listens on the port
    except OSError as exc:
        listener.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    listener.set_inheritable(True)
    return listener


# Imported by httpx and httpcore only because they happen to be installed (beside the tests, or in a
# shared environment): httpx's command-line module loads rich and pygments, httpcore loads trio for
# clients on trio's event loop. The server uses neither; without them it idles 6.5 MiB smaller.
_UNUSED_BY_HTTP_CLIENT = ("rich", "pygments", "trio")


def _import_http_client() -> None:
    """httpx and httpcore, each without the optional modules above: they take a failed import of
    one to mean it is not installed (httpx's `main` then says its CLI extra is missing). The block
    lasts only these two imports, and none is blocked that something already imported."""
    if "httpcore" in sys.modules:
        return
    blocked = [name for name in _UNUSED_BY_HTTP_CLIENT if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import then raises ImportError
    try:
        import httpcore  # noqa: F401
        import httpx  # noqa: F401
    finally:
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


async def _serve(settings: Settings, listener: socket.socket) -> None:
    _import_http_client()
    from proxy.app import create_server_app  # the sources' imports, after the socket is ours

    try:
        app, runtime = create_server_app(settings)
    except OSError as exc:
        raise ServeError(f"cannot use cache_dir {settings.cache_dir}: {exc.strerror or exc}") from None
    config = uvicorn.Config(
        app,
        lifespan="off",  # the runtime starts below, around the server
        log_config=None,
        access_log=settings.access_log,
        # X-Forwarded-For only matters to the access log: without it, skip the middleware that reads it.
        proxy_headers=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
        server_header=False,
        http=guarded_protocol(HeadLimits(settings.header_timeout, settings.max_headers, settings.max_head_size)),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
        backlog=BACKLOG,
    )
    server = DrainingServer(config, runtime.readiness, settings.drain_delay, settings.shutdown_grace)
    started = False
    try:
        async with runtime.running():
            started = True
            log.info("pullthrough %s serving %s from %s", __version__, settings.listen, settings.cache_dir)
            await server.serve(sockets=[listener])
    except Exception as exc:
        if started:
            raise
        raise ServeError(f"cannot start: {_cause(exc, settings)}") from exc


def _cause(exc: BaseException, settings: Settings) -> str:
    """One line on why the runtime could not start (the index, most often), without secrets: the
    same words the other commands use for the index (proxy/offline.py)."""
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.offline import database_cause, safe_url

    if isinstance(exc, SQLAlchemyError):
        return f"the index at {safe_url(settings.effective_database_url)} does not answer: {database_cause(exc)}"
    if isinstance(exc, OSError):
        return f"{exc.filename or settings.cache_dir}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before it stops listening (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, readiness: Readiness, drain_delay: float, grace: float) -> None:
        super().__init__(config)
        self._readiness = readiness
        self._drain_delay = drain_delay
        self._grace = grace
        self._stop_listening_at: float | None = None
        self._signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            self._readiness.draining = True
            self._stop_listening_at = time.monotonic() + self._drain_delay
            log.info(
                "draining: /readyz answers 503; the listener closes in %.0f s and running transfers get %.0f s more",
                self._drain_delay, self._grace,
            )
            return
        # A second signal: stop listening now; a third: cut transfers. (Not uvicorn's own handler,
        # which raises the signals again once the server stops, killing the process before the
        # runtime closes and saves its counters.)
        self.should_exit = True
        self.force_exit = self._signals >= 3

    async def on_tick(self, counter: int) -> bool:
        if self._stop_listening_at is not None and time.monotonic() >= self._stop_listening_at:
            self.should_exit = True
        return await super().on_tick(counter)


def _raise_open_file_limit(connections: int) -> None:
    """Every connection is a descriptor, and a busy mirror holds a few more per transfer: raise the
    soft limit towards the hard one (commonly 1024 soft, far more hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
