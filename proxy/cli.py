"""The `pullthrough` command: serve, and db upgrade.

Configuration errors end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from proxy.config import ConfigError, Settings, load_settings
from proxy.logs import configure_logging

if TYPE_CHECKING:
    from proxy.store.blobs import BlobStore
    from proxy.store.index import Index

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


@click.group()
@click.version_option(package_name="pullthrough")
def main() -> None:
    """pullthrough: a pull-through cache for container images and ML models."""


@main.command()
@_setting_options
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000).")
def serve(config_file: str | None, cache_dir: str | None, database_url: str | None, listen: str | None) -> None:
    """Run the cache server."""
    from proxy.serving import ServeError, run_server

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url, listen=listen)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_server(settings)
    except ServeError as exc:
        click.echo(f"pullthrough: {exc}", err=True)
        sys.exit(1)


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
    configure_logging(settings.log_level, settings.log_format)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, revision)
    click.echo(f"index at {revision}")


def _offline_parts(settings: Settings) -> tuple[BlobStore, Index]:
    """The store and index of the configured cache, for commands that run without the server."""
    from proxy.migrate import upgrade
    from proxy.store.blobs import BlobStore
    from proxy.store.index import Index, make_engine

    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    if settings.effective_database_url.startswith("sqlite"):
        upgrade(settings.effective_database_url)
    return BlobStore(settings.cache_dir, node_id=settings.node_name), Index(make_engine(settings.effective_database_url))


@main.command()
@_setting_options
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--older-than", help="Remove every unpinned blob unused this long (e.g. 7d), whatever its TTL.")
@click.option("--to-size", help="Evict least recently used blobs until the cache is this small (e.g. 100G).")
@click.option("--grace", default="2m", show_default=True, help="Keep whatever was read this recently.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def purge(
    config_file: str | None, cache_dir: str | None, database_url: str | None,
    dry_run: bool, older_than: str | None, to_size: str | None, grace: str, as_json: bool,
) -> None:
    """Remove expired blobs and shrink the cache to its cap (pinned blobs stay)."""
    from proxy.app import purge_policy
    from proxy.config import parse_duration, parse_size
    from proxy.store.janitor import Janitor

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    try:
        age = parse_duration(older_than) if older_than is not None else None
        size = parse_size(to_size) if to_size is not None else None
        policy = dataclasses.replace(purge_policy(settings), grace=parse_duration(grace))
    except ValueError as exc:
        _fail(str(exc))
    store, index = _offline_parts(settings)
    result = Janitor(store, index, policy).purge(dry_run=dry_run, older_than=age, to_size=size, reason="cli")
    if result.skipped:
        click.echo("another janitor is running on this cache: nothing done")
        return
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": [{"digest": d, "size": s} for d, s in result.removed],
                               "bytes_removed": result.bytes_removed, "orphan_files": result.orphan_files,
                               "orphan_rows": result.orphan_rows}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(result.removed)} blobs ({_human(result.bytes_removed)})")
    for digest, size in result.removed if dry_run else []:
        click.echo(f"  {digest}  {_human(size)}")


@main.command()
@_setting_options
@click.option("--repair", is_flag=True, help="Remove the blobs that no longer match their digest.")
def verify(config_file: str | None, cache_dir: str | None, database_url: str | None, repair: bool) -> None:
    """Rehash every blob in the store; exit 1 if any does not match its digest (and was not repaired)."""
    from proxy.app import purge_policy
    from proxy.store.janitor import Janitor

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    store, index = _offline_parts(settings)
    bad = Janitor(store, index, purge_policy(settings)).verify(repair=repair)
    for digest in bad:
        click.echo(f"{'removed' if repair else 'corrupt'}: {digest}")
    click.echo(f"{len(bad)} blobs did not match their digest")
    if bad and not repair:
        sys.exit(1)


@main.command()
@_setting_options
@click.option("--url", help="A running server's base URL (default: the configured listen address).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def stats(config_file: str | None, cache_dir: str | None, database_url: str | None, url: str | None, as_json: bool) -> None:
    """What the cache saves: from a running server, or from the index when none answers."""
    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    report = _report(settings, url)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    ratio = report.get("hit_ratio")
    rows = [
        ("hits", str(report["hits"])),
        ("misses", str(report["misses"])),
        ("hit ratio", f"{ratio * 100:.1f} %" if ratio is not None else "-"),
        ("coalesced", str(report["coalesced"])),
        ("from cache", _human(report["bytes_from_cache"])),
        ("from upstream", _human(report["bytes_from_upstream"])),
        ("cache size", f"{_human(report['cache']['bytes'])} in {report['cache']['entries']} entries"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    if report.get("per_upstream"):
        click.echo("")
        click.echo(f"{'upstream':<32} {'hits':>8} {'misses':>8} {'from upstream':>14}")
        for u in report["per_upstream"]:
            click.echo(f"{u['source'] + ':' + u['upstream']:<32} {u['hits']:>8} {u['misses']:>8} {_human(u['bytes_from_upstream']):>14}")


@main.command()
@_setting_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def pins(config_file: str | None, cache_dir: str | None, database_url: str | None, as_json: bool) -> None:
    """The pinned resource sets and how many blobs each keeps."""
    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _, index = _offline_parts(settings)
    pinned = {name: sorted(digests) for name, digests in sorted(index.pins.all().items())}
    if as_json:
        click.echo(json.dumps(pinned, indent=2))
        return
    if not pinned:
        click.echo("no pinned sets")
    for name, digests in pinned.items():
        click.echo(f"{name}: {len(digests)} blobs")


def _report(settings: Settings, url: str | None) -> dict[str, Any]:
    import asyncio

    import httpx

    base = url or f"http://{settings.listen}"
    headers = {"Authorization": f"Bearer {settings.admin_secret()}"} if settings.admin_secret() else {}
    try:
        response = httpx.get(f"{base.rstrip('/')}/stats", headers=headers, timeout=10)
        if response.status_code == 200:
            return response.json()
    except httpx.HTTPError:
        pass
    from proxy.stats import Traffic

    _, index = _offline_parts(settings)
    traffic = Traffic(index, node="cli")
    traffic.load()
    last = index.purges.last()
    return asyncio.run(
        traffic.report(
            max_size=settings.max_size,
            last_purge=last.__dict__ if last else None,
            pins={name: {"blobs": len(d)} for name, d in index.pins.all().items()},
            ratelimits={},
        )
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@main.command()
@_setting_options
@click.argument("resources", nargs=-1)
@click.option("--set", "set_names", multiple=True, help="A configured resource set: fetch and pin all of it.")
def prefetch(config_file: str | None, cache_dir: str | None, database_url: str | None, resources: tuple[str, ...], set_names: tuple[str, ...]) -> None:
    """Fetch resources into the cache: docker.io/library/alpine:3.20, hf://org/repo@rev,
    s3://bucket/prefix/, ipfs://cid, https://… (allowed in [web]), or --set NAME."""
    import asyncio

    from tqdm import tqdm

    from proxy.prefetch import ResourceError, fetch, fetch_set, running

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    if not resources and not set_names:
        _fail("name at least one resource or --set NAME")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    failed = 0

    async def run() -> None:
        nonlocal failed
        async with running(settings) as runtime:
            with tqdm(total=len(resources) + len(set_names), unit="resource", disable=None) as bar:
                for resource in resources:
                    bar.set_description(resource[:60])
                    try:
                        fetched = await fetch(runtime, resource)
                        tqdm.write(f"{resource}: {len(fetched.files)} files, {_human(fetched.bytes)}")
                    except Exception as exc:  # noqa: BLE001 - one line per failed resource; the others go on
                        failed += 1
                        tqdm.write(f"{resource}: failed: {getattr(exc, 'message', None) or exc}")
                    bar.update()
                for name in set_names:
                    bar.set_description(f"set {name}"[:60])
                    try:
                        listing = await fetch_set(runtime, name)
                        for label, state in {**listing["status"]["images"], **listing["status"]["remote"]}.items():  # type: ignore[index]
                            ok = state["cached"] and not state["error"]
                            failed += 0 if ok else 1
                            tqdm.write(f"{name}: {label}: " + (f"{state['blobs']} blobs, {_human(state['bytes'])}" if ok else f"failed: {state['error']}"))
                    except ResourceError as exc:
                        failed += 1
                        tqdm.write(f"{name}: {exc}")
                    bar.update()

    asyncio.run(run())
    if failed:
        sys.exit(1)


@main.command()
@_setting_options
@click.argument("resource")
@click.option("--to", "destination", required=True, type=click.Path(file_okay=False), help="Where to lay the files out.")
@click.option(
    "--link", is_flag=True,
    help="Hard-link the files to the cache's instead of copying them. Saves the space and the copy, "
         "but a job that writes to a linked file (root ignores its read-only mode) changes the bytes "
         "the cache then serves to every client under their old digest: only for jobs that never write.",
)
def materialize(
    config_file: str | None, cache_dir: str | None, database_url: str | None, resource: str, destination: str, link: bool
) -> None:
    """Lay a resource out as files under --to: copies of the cache's files (reflinks where the file
    system can), or hard links with --link; an image becomes an OCI image layout."""
    import asyncio
    from pathlib import Path

    from proxy.prefetch import ResourceError, fetch, materialize as lay_out, running

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def run() -> list[Path]:
        async with running(settings) as runtime:
            fetched = await fetch(runtime, resource)
        return lay_out(settings, fetched, Path(destination), link=link)

    try:
        written = asyncio.run(run())
    except ResourceError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI's one-line answer
        _fail(f"{resource}: {getattr(exc, 'message', None) or exc}")
    click.echo(f"{resource}: {len(written)} files under {destination}")
