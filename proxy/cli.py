"""The `pullthrough` command: serve, config check, db upgrade, purge, verify, stats, pins, prefetch,
materialize, export and import.

One rule for every command, kept in `_Pullthrough`: usage and configuration errors exit 2 with one
line on stderr (`pullthrough: <key>: <what>`), runtime failures exit 1 with one line naming the
cause, and a traceback only with `--debug` (or PULLTHROUGH_DEBUG=1).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from proxy.config import ConfigError, Settings, load_settings, parse_duration, parse_size
from proxy.logs import configure_logging

if TYPE_CHECKING:
    from proxy.resources import Fetched

_SETTING_OPTIONS = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file (or PULLTHROUGH_CONFIG)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), help="Where blobs and the index live."),
    click.option("--database-url", help="SQLAlchemy URL of the index (default: SQLite in the cache dir)."),
]
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document on stdout.")


def _setting_options(func: Any) -> Any:
    for option in reversed(_SETTING_OPTIONS):
        func = option(func)
    return func


# -- the one error rule --------------------------------------------------------------------------

_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {}))


class _Pullthrough(click.Group):
    """Turns every failure into one line on stderr and its exit status (see the module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `pullthrough` alone: the help, as click shows it
            exc.show()
            sys.exit(2)
        except click.UsageError as exc:
            _say(_usage_line(exc))
            sys.exit(2)
        except click.ClickException as exc:
            _say(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            _say("interrupted")
            sys.exit(130)
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            status, line = _describe(exc, ctx)
            _say(line)
            raise click.exceptions.Exit(status) from None


def _say(line: str) -> None:
    click.echo(f"pullthrough: {' '.join(line.split())}", err=True)


def _usage_line(exc: click.UsageError) -> str:
    message = exc.format_message()
    if isinstance(exc, click.BadParameter) and exc.param is not None and exc.param.opts:
        message = f"{exc.param.opts[0]}: {exc.message}"
    where = exc.ctx.command_path if exc.ctx is not None else "pullthrough"
    return f"{message} (see '{where} --help')"


def _describe(exc: Exception, ctx: click.Context) -> tuple[int, str]:
    """(exit status, one line) for a failure: 2 for what the operator must change in the
    configuration or the command line, 1 for what failed at run time."""
    import httpx
    from sqlalchemy.exc import DBAPIError

    from proxy.bundle import BadBundle
    from proxy.migrate import DatabaseNotReady
    from proxy.offline import CacheUnavailable, database_cause
    from proxy.resources import ResourceError
    from proxy.serving import ServeError

    if isinstance(exc, (ConfigError, ResourceError, BadBundle)):
        return 2, str(exc)
    if isinstance(exc, (CacheUnavailable, DatabaseNotReady, ServeError)):
        return 1, str(exc)
    if isinstance(exc, DBAPIError):
        where = ctx.meta.get("pullthrough.index", "the index")
        return 1, f"cannot use the index at {where}: {database_cause(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        what = exc.strerror[0].lower() + exc.strerror[1:]
        return 1, f"{exc.filename}: {what}" if exc.filename else what
    if isinstance(exc, httpx.HTTPError):
        return 1, f"{type(exc).__name__}: {exc}"
    return 1, f"{type(exc).__name__}: {exc} (--debug shows where)"


def _settings(config_file: str | None, **flags: Any) -> Settings:
    """The settings (ConfigError: exit 2); the index URL, without its password, for error lines."""
    from proxy.offline import safe_url

    settings = load_settings(config_file, **flags)
    context = click.get_current_context(silent=True)
    if context is not None:
        context.meta["pullthrough.index"] = safe_url(settings.effective_database_url)
    return settings


def _emit(as_json: bool, document: Any, lines: list[str]) -> None:
    """One JSON document, or the lines for a person."""
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    for line in lines:
        click.echo(line)


def _quiet_logging() -> None:
    """The commands answer in their own lines; the parts they run log only with --debug."""
    debug = click.get_current_context().find_root().params.get("debug")
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL + 1, stream=sys.stderr)


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _fail(message: str) -> NoReturn:
    raise click.UsageError(message)


@click.group(cls=_Pullthrough)
@click.version_option(package_name="pullthrough")
@click.option("--debug", is_flag=True, envvar="PULLTHROUGH_DEBUG",
              help="Show the traceback of a failure (or PULLTHROUGH_DEBUG=1).")
def main(debug: bool) -> None:
    """pullthrough: a pull-through cache for container images and ML models.

    Exit status: 0 done, 1 a runtime failure (one line on stderr names the cause), 2 a usage or
    configuration error (one line naming the option or key)."""


@main.command()
@_setting_options
@click.option("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000).")
def serve(config_file: str | None, cache_dir: str | None, database_url: str | None, listen: str | None) -> None:
    """Run the cache server."""
    from proxy.extras import require_extras
    from proxy.serving import run_server

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url, listen=listen)
    require_extras(settings)  # before anything binds or migrates
    configure_logging(settings.log_level, settings.log_format)
    run_server(settings)


# -- config check ----------------------------------------------------------------------------

@main.group("config")
def config_group() -> None:
    """The configuration."""


@config_group.command("check")
@_setting_options
@click.option("--listen", help="HOST:PORT to listen on.")
@_JSON_OPTION
def config_check(config_file: str | None, cache_dir: str | None, database_url: str | None, listen: str | None, as_json: bool) -> None:
    """Validate everything `serve` would (settings, the database URL and its driver, the extras of
    the configured sources, a writable cache dir) and print a summary. Binds nothing, creates
    nothing, connects to nothing. Exit 0, or 2 with one line naming the key."""
    from proxy.extras import require_extras
    from proxy.offline import safe_url, sqlite_path

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url, listen=listen)
    require_extras(settings)
    _check_writable("cache_dir", settings.cache_dir)
    index_file = sqlite_path(settings.effective_database_url)
    if index_file is not None:
        _check_writable("database_url", index_file.parent)
    summary = _summary(settings, safe_url(settings.effective_database_url))
    width = max(len(key) for key in summary)
    _emit(as_json, summary, [f"{key:<{width}}  {_shown(value)}" for key, value in summary.items()])


def _check_writable(key: str, path: Any) -> None:
    """ConfigError unless `path` is a writable folder, or could be created: its nearest existing
    parent is one. Nothing is created (os.access also sees a read-only mount)."""
    from pathlib import Path

    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable" + (f" (and {path} does not exist)" if existing != path else ""))


def _summary(settings: Settings, index: str) -> dict[str, Any]:
    from pydantic import ByteSize

    size = lambda n: ByteSize(n).human_readable(decimal=True) if n is not None else None  # noqa: E731
    return {
        "listen": settings.listen,
        "cache_dir": str(settings.cache_dir),
        "index": index,
        "registries": [r.name + (" (default)" if r.default else "") for r in settings.registries],
        "hf": settings.hf.base_url,
        "s3_buckets": [b.name for b in settings.s3.buckets],
        "web_prefixes": list(settings.web.allow),
        "resource_sets": [s.name for s in settings.resource_sets],
        "max_size": size(settings.max_size),
        "min_free": size(settings.min_free),
        "default_ttl": _seconds(settings.default_ttl),
        "purge_interval": _seconds(settings.purge_interval),
    }


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(value) if value else "-"
    return "-" if value is None else str(value)


def _seconds(seconds: float) -> str:
    """86400 -> '1d', 5400 -> '1h30m', 0.5 -> '500ms': how durations are written in the config."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts, rest = [], seconds
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= length:
            count, rest = divmod(rest, length)
            parts.append(f"{int(count)}{unit}")
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


# -- the index --------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """The index database."""


@db.command("upgrade")
@_setting_options
@click.option("--revision", default="head", show_default=True)
@_JSON_OPTION
def db_upgrade(config_file: str | None, cache_dir: str | None, database_url: str | None, revision: str, as_json: bool) -> None:
    """Apply the index migrations (SQLite or PostgreSQL)."""
    from proxy.migrate import upgrade
    from proxy.offline import safe_url, sqlite_path

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _quiet_logging()
    index_file = sqlite_path(settings.effective_database_url)
    if index_file is not None:
        index_file.parent.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, revision)
    _emit(as_json, {"index": safe_url(settings.effective_database_url), "revision": revision}, [f"index at {revision}"])


# -- the cache, without a server ---------------------------------------------------------------

@main.command()
@_setting_options
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--older-than", type=_Duration(), help="Remove every unpinned blob unused this long (e.g. 7d), whatever its TTL.")
@click.option("--to-size", type=_Size(), help="Evict least recently used blobs until the cache is this small (e.g. 100GB, 100GiB).")
@click.option("--grace", type=_Duration(), default="2m", show_default=True, help="Keep whatever was read this recently.")
@_JSON_OPTION
def purge(
    config_file: str | None, cache_dir: str | None, database_url: str | None,
    dry_run: bool, older_than: float | None, to_size: int | None, grace: float, as_json: bool,
) -> None:
    """Remove expired blobs and shrink the cache to its cap (pinned blobs stay)."""
    import dataclasses

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _quiet_logging()
    from proxy.app import purge_policy
    from proxy.offline import open_cache
    from proxy.store.janitor import Janitor

    policy = dataclasses.replace(purge_policy(settings), grace=grace)
    store, index = open_cache(settings, write=True)
    try:
        result = Janitor(store, index, policy).purge(dry_run=dry_run, older_than=older_than, to_size=to_size, reason="cli")
    finally:
        index.dispose()
    document = {"dry_run": dry_run, "skipped": result.skipped, "removed": [{"digest": d, "size": s} for d, s in result.removed],
                "bytes_removed": result.bytes_removed, "orphan_files": result.orphan_files, "orphan_rows": result.orphan_rows}
    if result.skipped:
        _emit(as_json, document, ["another janitor is running on this cache: nothing done"])
        return
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(result.removed)} blobs ({_human(result.bytes_removed)})"]
    lines += [f"  {digest}  {_human(size)}" for digest, size in (result.removed if dry_run else [])]
    _emit(as_json, document, lines)


@main.command()
@_setting_options
@click.option("--repair", is_flag=True, help="Remove the blobs that no longer match their digest.")
@_JSON_OPTION
def verify(config_file: str | None, cache_dir: str | None, database_url: str | None, repair: bool, as_json: bool) -> None:
    """Rehash every blob in the store; exit 1 if any does not match its digest (and was not
    repaired). Without --repair it only reads: nothing is created or migrated."""
    from proxy.offline import open_cache

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _quiet_logging()
    store, index = open_cache(settings, write=repair)
    from proxy.app import purge_policy
    from proxy.store.janitor import Janitor

    try:
        bad = Janitor(store, index, purge_policy(settings)).verify(repair=repair)
    finally:
        index.dispose()
    lines = [f"{'removed' if repair else 'corrupt'}: {digest}" for digest in bad]
    _emit(as_json, {"bad": bad, "repaired": repair}, [*lines, f"{len(bad)} blobs did not match their digest"])
    if bad and not repair:
        _say(f"{len(bad)} blobs did not match their digest (--repair removes them)")
        sys.exit(1)


@main.command()
@_setting_options
@click.option("--url", help="A running server's base URL (default: http://<listen> of the configuration).")
@click.option("--offline", is_flag=True, help="Read the index instead of asking a server (read-only).")
@_JSON_OPTION
def stats(
    config_file: str | None, cache_dir: str | None, database_url: str | None, url: str | None, offline: bool, as_json: bool
) -> None:
    """What the cache saves. Asks the running server (--url, else the configured listen address)
    and fails (exit 1) when none answers; --offline reads the totals from the index instead,
    which counts only what the servers had saved (every stats_interval, 10 s by default, and at shutdown)."""
    if url and offline:
        _fail("--url and --offline exclude each other")
    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    report = _index_report(settings) if offline else _server_report(settings, url)
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
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    if report.get("per_upstream"):
        lines += ["", f"{'upstream':<32} {'hits':>8} {'misses':>8} {'from upstream':>14}"]
        lines += [f"{u['source'] + ':' + u['upstream']:<32} {u['hits']:>8} {u['misses']:>8} {_human(u['bytes_from_upstream']):>14}"
                  for u in report["per_upstream"]]
    _emit(as_json, report, lines)


class _NoServer(Exception):
    pass


def _server_report(settings: Settings, url: str | None) -> dict[str, Any]:
    import httpx

    base = (url or f"http://{settings.listen}").rstrip("/")
    secret = settings.admin_secret()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        response = httpx.get(f"{base}/stats", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        cause = _connect_cause(exc)
        raise click.ClickException(f"no server answers at {base}: {cause} (--offline reads the index instead)") from None
    if response.status_code != 200:
        raise click.ClickException(f"{base}/stats answered {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError:
        raise click.ClickException(f"{base}/stats did not answer with a pullthrough report") from None


def _connect_cause(exc: Exception) -> str:
    """'connection refused', 'timed out', 'name or service not known': the innermost reason."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause).rsplit("] ", 1)[-1].lower() or type(exc).__name__


def _index_report(settings: Settings) -> dict[str, Any]:
    import asyncio

    from proxy.offline import open_cache
    from proxy.stats import Traffic

    _, index = open_cache(settings, write=False, need_files=False)
    try:
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
    finally:
        index.dispose()


@main.command()
@_setting_options
@_JSON_OPTION
def pins(config_file: str | None, cache_dir: str | None, database_url: str | None, as_json: bool) -> None:
    """Each resource set (configured, or still pinned in the index): its pinned blobs, how many
    are on disk and their bytes, and the ones missing. Read-only."""
    from proxy.offline import open_cache
    from proxy.pins import pinned_sets

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    store, index = open_cache(settings, write=False)
    try:
        sets = pinned_sets(settings.resource_sets, index.pins.all(), store)
    finally:
        index.dispose()
    lines = [] if sets else ["no resource sets configured and nothing pinned"]
    for pinned in sets:
        line = f"{pinned.name}: {len(pinned.digests)} blobs pinned, {pinned.present} on disk ({_human(pinned.bytes)})"
        if pinned.missing:
            line += f", {len(pinned.missing)} missing"
        if not pinned.digests:
            line += ": never prefetched, or every prefetch of it failed"
        if not pinned.configured:
            line += " (no longer configured)"
        lines.append(line)
        lines += [f"  missing: {digest}" for digest in pinned.missing]
    _emit(as_json, {p.name: p.as_json() for p in sets}, lines)


def _human(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as file systems and `du -h` count)."""
    from pydantic import ByteSize

    number, unit = re.fullmatch(r"([\d.]+)(\D+)", ByteSize(n).human_readable()).groups()  # type: ignore[union-attr]
    return f"{number} {unit}"


# -- prefetch and materialize --------------------------------------------------------------------

# platform.machine() -> the OCI architecture (and variant) of the node's own images.
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm/v7",
                  "armv6l": "arm/v6", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
                  "riscv64": "riscv64"}


def node_platform() -> str:
    """This node's own platform, e.g. linux/arm64 on an aarch64 GPU node."""
    machine = platform.machine().lower()
    return f"linux/{_ARCHITECTURES.get(machine, machine)}"


_PLATFORM_OPTION = click.option(
    "--platform", "platforms", multiple=True, metavar="OS/ARCH[/VARIANT]",
    help="Which images of a multi-arch image (repeat, or a comma list; default: this node's own, "
         f"{node_platform()}). Resource sets use their own `platforms`.",
)


def _platforms(given: tuple[str, ...]) -> list[str]:
    chosen = [p.strip() for value in given for p in value.split(",") if p.strip()] or [node_platform()]
    for value in chosen:
        parts = value.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise click.BadParameter(f"{value!r} is not OS/ARCH[/VARIANT] (e.g. linux/arm64)", param_hint="--platform")
    return chosen


@main.command()
@_setting_options
@click.argument("resources", nargs=-1)
@click.option("--set", "set_names", multiple=True, help="A configured resource set: fetch and pin all of it.")
@_PLATFORM_OPTION
@click.option("--progress/--no-progress", default=None,
              help="Show the bytes arriving (default: when stderr is a terminal).")
@_JSON_OPTION
def prefetch(
    config_file: str | None, cache_dir: str | None, database_url: str | None, resources: tuple[str, ...],
    set_names: tuple[str, ...], platforms: tuple[str, ...], progress: bool | None, as_json: bool,
) -> None:
    """Fetch resources into the cache: docker.io/library/alpine:3.20, hf://org/repo@rev,
    s3://bucket/prefix/, ipfs://cid, https://… (allowed in [web]), or --set NAME.
    Exit 1 when any of them failed (the others are fetched all the same)."""
    import asyncio

    from proxy.extras import require_extras

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    if not resources and not set_names:
        _fail("name at least one resource or --set NAME")
    wanted = _platforms(platforms)
    require_extras(settings)
    _quiet_logging()
    results = asyncio.run(_prefetch_all(settings, resources, set_names, wanted, progress=progress, quiet=as_json))
    failed = [r for r in results if r["error"]]
    total = sum(r["bytes"] for r in results if not r["error"])
    summary = f"{len(results) - len(failed)} of {len(results)} resources in the cache, {_human(total)}"
    document = {"platforms": wanted, "resources": results, "bytes": total, "failed": len(failed)}
    _emit(as_json, document, [summary])
    if failed:
        _say(f"{len(failed)} of {len(results)} resources failed: " + "; ".join(f"{r['resource']}: {r['error']}" for r in failed[:3]))
        sys.exit(1)


async def _prefetch_all(
    settings: Settings, resources: tuple[str, ...], set_names: tuple[str, ...], platforms: list[str], *,
    progress: bool | None, quiet: bool,
) -> list[dict[str, Any]]:
    """Every resource and set, one result each ({resource, files, bytes, error}); a line per result
    on stdout unless quiet (--json)."""
    from proxy.prefetch import ResourceError, arriving_bytes, fetch, fetch_set, running

    results: list[dict[str, Any]] = []
    finished = 0  # bytes of the resources done so far: the bar shows them plus what is arriving

    def arrived(n: int) -> None:
        bar.update(n)

    def done(resource: str, files: int, size: int, error: str | None, set_name: str | None = None) -> None:
        nonlocal finished
        results.append({"resource": resource, "set": set_name, "files": files, "bytes": size, "error": error})
        finished += size if error is None else 0
        bar.n = finished  # what arrived for it (caught up or corrected): its bytes, cache hits included
        bar.refresh()
        if not quiet:
            label = f"{set_name}: {resource}" if set_name else resource
            unit = "blobs" if set_name else "files"
            bar.write(f"{label}: " + (f"failed: {error}" if error else f"{files} {unit}, {_human(size)}"), file=sys.stdout)

    async with running(settings) as runtime:
        with _byte_bar(progress) as bar:
            async with arriving_bytes(runtime, arrived):
                for resource in resources:
                    bar.set_description(resource[:60])
                    try:
                        fetched = await fetch(runtime, resource, platforms)
                        done(resource, len(fetched.files), fetched.bytes, None)
                    except Exception as exc:  # noqa: BLE001 - one line per failed resource; the others go on
                        done(resource, 0, 0, _reason(exc))
                for name in set_names:
                    bar.set_description(f"set {name}"[:60])
                    try:
                        listing = await fetch_set(runtime, name)
                    except ResourceError as exc:
                        done(name, 0, 0, str(exc))
                        continue
                    for label, state in {**listing["status"]["images"], **listing["status"]["remote"]}.items():  # type: ignore[index]
                        error = state["error"] or (None if state["cached"] else "not in the cache")
                        done(label, state["blobs"], state["bytes"], error, set_name=name)
    return results


def _byte_bar(progress: bool | None) -> Any:
    """tqdm counting bytes as they arrive; off when stderr is no terminal unless --progress."""
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=None if progress is None else not progress,
                file=sys.stderr, mininterval=0.2, dynamic_ncols=True)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


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
@_PLATFORM_OPTION
@_JSON_OPTION
def materialize(
    config_file: str | None, cache_dir: str | None, database_url: str | None, resource: str, destination: str, link: bool,
    platforms: tuple[str, ...], as_json: bool,
) -> None:
    """Lay a resource out as files under --to: copies of the cache's files (reflinks where the file
    system can), or hard links with --link; an image becomes an OCI image layout."""
    import asyncio
    from pathlib import Path

    from proxy.extras import require_extras
    from proxy.prefetch import fetch, materialize as lay_out, running

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    wanted = _platforms(platforms)
    require_extras(settings)
    _quiet_logging()

    async def run() -> tuple[Fetched, list[Path]]:
        async with running(settings) as runtime:
            fetched = await fetch(runtime, resource, wanted)
        return fetched, lay_out(settings, fetched, Path(destination), link=link)

    try:
        fetched, written = asyncio.run(run())
    except (ConfigError, OSError):
        raise
    except Exception as exc:
        from proxy.resources import ResourceError

        if isinstance(exc, ResourceError) or click.get_current_context().find_root().params.get("debug"):
            raise
        raise click.ClickException(f"{resource}: {_reason(exc)}") from None
    document = {"resource": resource, "destination": destination, "platforms": wanted, "files": len(written),
                "bytes": fetched.bytes, "link": link}
    _emit(as_json, document, [f"{resource}: {len(written)} files, {_human(fetched.bytes)} under {destination}"])


# -- bundles: a set carried to an air-gapped node ----------------------------------------------------

@main.command("export")
@_setting_options
@click.option("--set", "set_name", required=True, help="The configured resource set to bundle.")
@click.argument("file")
@_JSON_OPTION
def export_bundle(config_file: str | None, cache_dir: str | None, database_url: str | None, set_name: str, file: str,
                  as_json: bool) -> None:
    """Write a resource set to FILE ("-": stdout) as one bundle (proxy/bundle.py): its blobs, the
    names and read scopes that serve them, its listing. The set is brought up to date first, as
    `prefetch --set` does; a set that is not whole in the cache is not exported (exit 1)."""
    from pathlib import Path

    from proxy.bundle import export_set
    from proxy.extras import require_extras

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    if file == "-" and as_json:
        _fail("--json and FILE '-' would both write to stdout: name a FILE")
    require_extras(settings)
    _quiet_logging()
    summary = export_set(settings, set_name, None if file == "-" else Path(file))
    line = (f"{summary.name}: {summary.blobs} blobs ({_human(summary.bytes)}), {summary.references} references, "
            f"{summary.scopes} read scopes: {_human(summary.bundle_bytes or 0)} to {file}")
    if file == "-":
        click.echo(line, err=True)
        return
    _emit(as_json, {**summary.as_json(), "file": file}, [line])


@main.command("import")
@_setting_options
@click.argument("file")
@_JSON_OPTION
def import_bundle(config_file: str | None, cache_dir: str | None, database_url: str | None, file: str, as_json: bool) -> None:
    """Load a bundle written by `export` (FILE "-": stdin) into the cache: every blob verified
    first, then committed, named and pinned under the set's name. A bundle with anything wrong is
    refused whole (exit 2, nothing imported). Needs no upstream and no server."""
    from pathlib import Path

    from proxy.bundle import import_bundle as load

    settings = _settings(config_file, cache_dir=cache_dir, database_url=database_url)
    _quiet_logging()
    summary = load(settings, None if file == "-" else Path(file))
    line = (f"{summary.name}: {summary.blobs} blobs ({_human(summary.bytes)}, {summary.new_blobs} new), "
            f"{summary.references} references ({summary.written_references} written), pinned")
    _emit(as_json, {**summary.as_json(), "file": file}, [line])
