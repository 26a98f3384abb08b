"""`pullthrough prefetch` and `materialize`: resources into the configured cache, and out as files.

Both run the application in-process on the configured cache dir and index, which a running
server may share (temp files are per process, blobs appear by atomic rename, SQLite in WAL mode
takes both), and fetch through the same sources a client's request would use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette

from proxy.app import create_app
from proxy.config import Settings
from proxy.sources.hf.names import parse_repo
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest


class ResourceError(Exception):
    """A resource string the CLI cannot use, worded for one line."""


@dataclass(frozen=True)
class Fetched:
    """A resource in the cache: its files as (relative path, digest, size)."""

    resource: str
    files: list[tuple[str, str, int]]
    layout: str = "files"  # or "oci": an image, laid out as an OCI image layout

    @property
    def bytes(self) -> int:
        return sum(size for _, _, size in self.files)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Starlette]:
    app = create_app(settings.model_copy(update={"prefetch_on_start": False}))
    async with app.router.lifespan_context(app):
        yield app


async def fetch(app: Starlette, resource: str) -> Fetched:
    """One resource into the cache: an image reference, hf://, s3://, ipfs://, http(s)://."""
    sources = app.state.sources
    cache = app.state.cache
    if resource.startswith("hf://"):
        spec = resource.removeprefix("hf://")
        repo_type = "model"
        for kind in ("datasets", "spaces"):
            if spec.startswith(f"{kind}/"):
                repo_type, spec = kind[:-1], spec[len(kind) + 1 :]
        repo_id, _, revision = spec.partition("@")
        repo = parse_repo(repo_type, repo_id.split("/"))
        return Fetched(resource, await sources["hf"].prefetch_repo(repo, revision or "main"))
    if resource.startswith("s3://"):
        files = await sources["s3"].prefetch(resource)
        return Fetched(resource, [(path, digest, await _size(cache, digest)) for path, digest in files])
    if resource.startswith("ipfs://"):
        cid_path = resource.removeprefix("ipfs://")
        digest = str(await sources["web"].fetch_ipfs(cid_path))
        return Fetched(resource, [(cid_path.rstrip("/").rsplit("/", 1)[-1], digest, await _size(cache, digest))])
    if resource.startswith(("https://", "http://")):
        digest = str(await sources["web"].fetch_url(resource))
        name = resource.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index"
        return Fetched(resource, [(name, digest, await _size(cache, digest))])
    if "://" in resource:
        raise ResourceError(f"{resource}: unknown scheme (use an image reference, hf://, s3://, ipfs:// or https://)")
    blobs = await sources["oci"].prefetch_image(resource, ["linux/amd64"])
    return Fetched(resource, [(f"blobs/sha256/{d.split(':', 1)[1]}", d, size) for d, size in blobs], layout="oci")


async def fetch_set(app: Starlette, name: str) -> dict[str, object]:
    sets = app.state.resource_sets
    if name not in sets.sets:
        raise ResourceError(f"no resource set named {name!r} in the configuration")
    return await sets.prefetch(name)


def materialize(settings: Settings, fetched: Fetched, destination: Path) -> list[Path]:
    """Lay the resource out under `destination`: hard links into the cache when it is on the same
    file system (blob files are read-only, so a job cannot change the cache through them), copies
    otherwise. An image becomes an OCI image layout."""
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for relative, digest, _ in fetched.files:
        target = (destination / relative).resolve()
        if destination.resolve() not in target.parents:
            raise ResourceError(f"{relative}: refusing a path outside {destination}")
        source = settings.cache_dir / "blobs" / "sha256" / digest.split(":", 1)[1][:2] / digest.split(":", 1)[1]
        _place(source, target)
        written.append(target)
    if fetched.layout == "oci":
        top_path, top_digest, top_size = fetched.files[0]
        top = json.loads((destination / top_path).read_bytes())
        media_type = top.get("mediaType", "application/vnd.oci.image.index.v1+json")
        index = {
            "schemaVersion": 2,
            "manifests": [{"mediaType": media_type, "digest": top_digest, "size": top_size,
                           "annotations": {"org.opencontainers.image.ref.name": fetched.resource}}],
        }
        (destination / "index.json").write_text(json.dumps(index, indent=2))
        (destination / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return written


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if os.path.samefile(source, target):
            return
        target.unlink()
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)


async def _size(cache: BlobCache, digest: str) -> int:
    blob = await cache.lookup(Digest.parse(digest))
    return blob.size if blob is not None else 0
