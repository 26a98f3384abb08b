"""The configured cache's files and index, opened by the commands that run without a server.

Commands that only read (`pins`, `stats --offline`, `verify`) open them read-only and never create
a folder, an index or a migration; commands that write (`purge`, `verify --repair`) may.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from proxy.config import Settings

if TYPE_CHECKING:
    from proxy.store.blobs import BlobStore
    from proxy.store.index import Index


class CacheUnavailable(Exception):
    """The cache or its index cannot be used as asked, worded for one line (a runtime failure)."""


def safe_url(url: str) -> str:
    """The database URL as it may be shown: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by its scheme alone
        return url.split("://", 1)[0] + "://…"


def database_cause(exc: BaseException) -> str:
    """The driver's reason in a few words: 'connection refused', 'unable to open database file'."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    cause = first.rsplit(": ", 1)[-1].strip().rstrip(".") or type(original).__name__
    return cause[0].lower() + cause[1:]


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite index; None for another database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return Path(parsed.database or "")


def open_cache(settings: Settings, *, write: bool, need_files: bool = True) -> tuple[BlobStore, Index]:
    """The store and index of the configured cache. Read-only (write=False): CacheUnavailable when
    the cache dir or the index does not exist or its schema is behind, and SQLite opened `mode=ro`."""
    from proxy.store.blobs import BlobStore
    from proxy.store.index import Index, make_engine

    url = settings.effective_database_url
    if write:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        _check_writable(settings.cache_dir)
    elif need_files and not settings.cache_dir.is_dir():
        raise CacheUnavailable(f"no cache at {settings.cache_dir}")
    path = sqlite_path(url)
    if path is not None and not write and not path.is_file():
        raise CacheUnavailable(f"no index at {path}")
    engine = make_engine(url) if write else _read_only_engine(url, path)
    _check_schema(engine, url, may_upgrade=write and path is not None)
    return BlobStore(settings.cache_dir, node_id=settings.node_name, drop_behind=settings.drop_behind), Index(engine)


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "permission denied"
        raise CacheUnavailable(f"cannot write to {folder}: {why}")


def _read_only_engine(url: str, path: Path | None) -> Engine:
    if path is None:
        engine = create_engine(url, pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.close()
            dbapi_connection.commit()

        return engine
    # mode=ro: SQLite itself refuses to write (and to create the file). Reading a WAL index needs
    # its -shm file, which SQLite cannot create in a folder this process may not write (a
    # read-only mount): there nothing can change the file either, so it is opened as immutable.
    # Only there: a folder this user merely may not write (a server's, running as another user)
    # may be written under us, and immutable skips the locks that keep such reads whole.
    read_only_mount = bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    options = "mode=ro&immutable=1" if read_only_mount else "mode=ro"
    return create_engine(f"sqlite:///file:{quote(str(path.resolve()))}?{options}&uri=true", connect_args={"timeout": 30})


def _check_schema(engine: Engine, url: str, *, may_upgrade: bool) -> None:
    from proxy.migrate import SCHEMA_HEAD, current_revision

    try:
        revision = current_revision(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise CacheUnavailable(f"cannot open the index at {safe_url(url)}: {database_cause(exc)}") from exc
    if revision == SCHEMA_HEAD:
        return
    if may_upgrade:  # an embedded index follows the version that uses it, as the server's does
        from proxy.migrate import upgrade

        upgrade(url)
        return
    engine.dispose()
    raise CacheUnavailable(
        f"the index at {safe_url(url)} is at revision {revision or 'none'}, this version needs {SCHEMA_HEAD}: "
        "run `pullthrough db upgrade`"
    )
