"""`pullthrough serve`: the uvicorn server around the app, its socket, its limits and its shutdown."""

from __future__ import annotations

import resource
import sys

import click
import uvicorn

from proxy.config import Settings
from proxy.http.server import HeadLimits, guarded_protocol


def run_server(settings: Settings) -> None:
    from proxy.app import create_server_app

    try:
        app = create_server_app(settings)
    except OSError as exc:
        click.echo(f"pullthrough: cannot use cache_dir {settings.cache_dir}: {exc.strerror}", err=True)
        sys.exit(2)
    _raise_open_file_limit(settings.max_connections)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        # X-Forwarded-For only matters to the access log: without it, skip the middleware that reads it.
        proxy_headers=settings.access_log,
        timeout_graceful_shutdown=10,
        server_header=False,
        http=guarded_protocol(HeadLimits(settings.header_timeout, settings.max_headers, settings.max_head_size)),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
    )


def _raise_open_file_limit(connections: int) -> None:
    """Every connection is a descriptor, and a busy mirror holds a few more per transfer: raise the
    soft limit towards the hard one (commonly 1024 soft, far more hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
