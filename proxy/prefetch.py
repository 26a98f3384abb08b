"""`pullthrough prefetch` and `materialize`: resources into the configured cache, and out as files.

Both run the application in-process on the configured cache dir and index, which a running
server may share (temp files are per process, blobs appear by atomic rename, SQLite in WAL mode
takes both), and fetch through the same sources a client's request would use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from proxy.app import Runtime
from proxy.config import Settings
from proxy.resources import Fetched, ResourceError, parse_resource
from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Runtime]:
    """The application's parts, started on the configured cache, without a server."""
    runtime = Runtime.build(settings.model_copy(update={"prefetch_on_start": False}))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.aclose()


async def fetch(runtime: Runtime, text: str, platforms: Sequence[str]) -> Fetched:
    """One resource into the cache: an image reference, hf://, s3://, ipfs://, http(s)://; of a
    multi-arch image, the images of `platforms` ("linux/arm64")."""
    return await runtime.sources.prefetch(parse_resource(text), platforms)


@contextlib.asynccontextmanager
async def arriving_bytes(runtime: Runtime, report: Callable[[int], object], every: float = 0.2) -> AsyncIterator[None]:
    """Calls `report(n)` with the bytes that arrived since the last call while the block runs: the
    growth of this process's temp files (each fill writes its upstream's bytes to one, named
    node.pid.random, and renames it when done). A file committed between two looks counts up to its
    last size seen: a progress meter, not the books (those are the fills' own counts)."""
    prefix = f"{runtime.store.files.node_id}.{os.getpid()}."
    tmp_dir = runtime.store.files.tmp_dir
    seen: dict[str, int] = {}
    reported = 0

    def look() -> int:
        with contextlib.suppress(FileNotFoundError), os.scandir(tmp_dir) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        seen[entry.name] = max(seen.get(entry.name, 0), entry.stat().st_size)
        return sum(seen.values())

    async def poll() -> None:
        nonlocal reported
        while True:
            now = await asyncio.to_thread(look)
            if now > reported:
                report(now - reported)
                reported = now
            await asyncio.sleep(every)

    task = asyncio.create_task(poll(), name="progress")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def fetch_set(runtime: Runtime, name: str) -> dict[str, object]:
    sets = runtime.resource_sets
    if name not in sets.sets:
        raise ResourceError(f"no resource set named {name!r} in the configuration")
    return await sets.update(name)


def materialize(settings: Settings, fetched: Fetched, destination: Path, *, link: bool = False) -> list[Path]:
    """Lay the resource out under `destination` as copies (reflinks where the file system can), or
    with `link` as hard links into the cache: no copy, but a job that writes to one (root ignores
    the files' 0444) changes the cached bytes every other client is then served. An image becomes
    an OCI image layout."""
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    store = BlobStore(settings.cache_dir)
    for file in fetched.files:
        target = (destination / file.path).resolve()
        if destination.resolve() not in target.parents:
            raise ResourceError(f"{file.path}: refusing a path outside {destination}")
        _place(store.path_for(Digest.parse(file.digest)), target, link=link)
        written.append(target)
    if fetched.layout == "oci":
        top_path, top_digest, top_size = fetched.files[0].path, fetched.files[0].digest, fetched.files[0].size
        top = json.loads((destination / top_path).read_bytes())
        media_type = top.get("mediaType", "application/vnd.oci.image.index.v1+json")
        index = {
            "schemaVersion": 2,
            "manifests": [{"mediaType": media_type, "digest": top_digest, "size": top_size,
                           "annotations": {"org.opencontainers.image.ref.name": fetched.resource.text}}],
        }
        (destination / "index.json").write_text(json.dumps(index, indent=2))
        (destination / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return written


def _place(source: Path, target: Path, *, link: bool) -> None:
    """A copy of the cache's file at `target` (a reflink where the file system shares blocks, so
    it costs no space and no time), or with `link` a hard link: the same inode as the cache's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if os.path.samefile(source, target):
            if link:
                return
        target.unlink()
    if link:
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)  # copy_file_range underneath on Linux


FICLONE = 0x40049409  # ioctl: share the source's blocks (btrfs, XFS); any other file system refuses
