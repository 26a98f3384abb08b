"""The `pullthrough` command: serve, and db upgrade.

Configuration errors end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

import click

from proxy.config import ConfigError, Settings, load_settings

_SETTING_OPTIONS = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file (or PULLTHROUGH_CONFIG)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), help="Where blobs and the index live."),
    click.option("--database-url", help="SQLAlchemy URL of the index (default: SQLite in the cache dir)."),
]


def _setting_options(func: Any) -> Any:
    for option in reversed(_SETTING_OPTIONS):
        func = option(func)
    return func


def _fail(message: str) -> NoReturn:
    click.echo(f"pullthrough: {message}", err=True)
    sys.exit(2)


def _settings(config_file: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config_file, **flags)
    except ConfigError as exc:
        _fail(f"config error: {exc}")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # httpx logs every URL at INFO, and CDN redirect URLs carry signed credentials.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_quiet_tls_probes)
    logging.getLogger("uvicorn.error").addFilter(_condense_aborted_streams)


def _condense_aborted_streams(record: logging.LogRecord) -> bool:
    """A response cut short because its fill failed is expected: one line, not a traceback."""
    from proxy.store.fill import FillFailed

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, BaseExceptionGroup):
        error = next(iter(error.subgroup(FillFailed).exceptions), None) if error.subgroup(FillFailed) else None
    if isinstance(error, FillFailed):
        record.msg, record.args, record.exc_info = "response cut short: %s", (error,), None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _quiet_tls_probes(record: logging.LogRecord) -> bool:
    """podman and skopeo try TLS first on an insecure mirror; uvicorn warns of each ClientHello."""
    return record.getMessage() != "Invalid HTTP request received." or logging.getLogger().isEnabledFor(logging.DEBUG)


@click.group()
@click.version_option(package_name="pullthrough")
def main() -> None:
    """pullthrough: a pull-through cache for container images and ML models."""


@main.command()
@_setting_options
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000).")
def serve(config_file: str | None, cache_dir: str | None, database_url: str | None, listen: str | None) -> None:
    """Run the cache server."""
    import uvicorn

    from proxy.app import create_server_app

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url, listen=listen)
    _configure_logging(settings.log_level)
    try:
        app = create_server_app(settings)
    except OSError as exc:
        _fail(f"cannot use cache_dir {settings.cache_dir}: {exc.strerror}")
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
        server_header=False,
    )


@main.group()
def db() -> None:
    """The index database."""


@db.command("upgrade")
@_setting_options
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_file: str | None, cache_dir: str | None, database_url: str | None, revision: str) -> None:
    """Apply the index migrations (SQLite or PostgreSQL)."""
    from proxy.migrate import upgrade

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _configure_logging(settings.log_level)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, revision)
    click.echo(f"index at {revision}")
