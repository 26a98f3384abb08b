"""Resource sets, a market's "required resources": pinned (never purged) and prefetched.

A set lists images and remote resources (S3 objects or prefixes, HF repos at a revision, IPFS
content, HTTPS URLs). Prefetching fetches each through the same sources as any client, then pins
every blob it consists of under the set's name. `GET /api/markets/{name}/required-resources`
answers in the seed's shape with each resource's state; `POST` (admin token) prefetches again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.config import ResourceSet
from proxy.resources import parse_resource
from proxy.sources.source import Sources
from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest
from proxy.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class ResourceState:
    """What the last prefetch of one resource achieved."""

    blobs: int = 0
    bytes: int = 0
    cached: bool = False
    last_refreshed: float | None = None
    error: str | None = None
    digests: list[str] = field(default_factory=list)

    def as_json(self, missing: int = 0) -> dict[str, Any]:
        """`cached` only while every blob the resource consists of is on disk (a repair or a hand
        may have removed one since the prefetch); `missing` counts those that are not."""
        return {"cached": self.cached and missing == 0, "blobs": self.blobs, "bytes": self.bytes,
                "last_refreshed": self.last_refreshed, "error": self.error, "missing": missing}


@dataclass(frozen=True)
class PinnedSet:
    """What the index pins for one set, checked against the files actually in the store."""

    name: str
    configured: bool  # still in the settings (an unconfigured set's pins stay until a purge of them)
    digests: list[str]
    bytes: int  # of the pinned blobs on disk
    missing: list[str]  # pinned, but no file in the store

    @property
    def present(self) -> int:
        return len(self.digests) - len(self.missing)

    def as_json(self) -> dict[str, Any]:
        return {"configured": self.configured, "pinned": len(self.digests), "present": self.present,
                "bytes": self.bytes, "missing": self.missing, "digests": self.digests}


def pinned_sets(configured: list[ResourceSet], pins: dict[str, set[str]], files: BlobStore) -> list[PinnedSet]:
    """Blocking (one stat per pinned blob): every configured set, pinned or not, and every set the
    index still pins, in name order."""
    names = sorted({*(s.name for s in configured), *pins})
    configured_names = {s.name for s in configured}
    result = []
    for name in names:
        digests = sorted(pins.get(name, ()))
        sizes = {d: _size_on_disk(files, d) for d in digests}
        result.append(PinnedSet(
            name, name in configured_names, digests, sum(s for s in sizes.values() if s is not None),
            [d for d, s in sizes.items() if s is None],
        ))
    return result


def _size_on_disk(files: BlobStore, digest: str) -> int | None:
    try:
        found = files.stat(Digest.parse(digest))
    except ValueError:  # not a digest this store can hold: it cannot be on disk
        return None
    return found.size if found is not None else None


class ResourceSets:
    def __init__(self, sets: list[ResourceSet], store: Store, sources: Sources) -> None:
        self.sets = {s.name: s for s in sets}
        self._store = store
        self._sources = sources
        self._states: dict[tuple[str, str], ResourceState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- prefetch --------------------------------------------------------------------------------
    async def prefetch(self, name: str) -> dict[str, Any]:
        """Fetch every resource of the set and pin what it consists of; the listing afterwards."""
        resource_set = self.sets[name]
        async with self._locks.setdefault(name, asyncio.Lock()):
            digests: set[str] = set()
            failed = False
            for label in [*resource_set.images, *(r.display_url for r in resource_set.remote)]:
                state = await self._run(name, label, resource_set.platforms)
                digests.update(state.digests)
                failed = failed or state.error is not None
            if failed:  # a failed refresh unpins nothing: what an earlier prefetch (maybe another process's) pinned stays
                digests.update((await self._store.pinned()).get(name, ()))
            await self._store.pin(name, sorted(digests))
        return await self.listing(name)

    async def prefetch_all(self) -> None:
        for name in self.sets:
            try:
                await self.prefetch(name)
            except Exception:
                log.exception("prefetch of resource set %s failed", name)

    async def _run(self, name: str, label: str, platforms: list[str]) -> ResourceState:
        state = ResourceState(last_refreshed=time.time())
        try:
            fetched = await self._sources.prefetch(parse_resource(label), platforms)
            state.digests = [f.digest for f in fetched.files]
            state.blobs, state.bytes, state.cached = len(fetched.files), fetched.bytes, True
            log.info("resource set %s: %s cached (%d blobs, %d bytes)", name, label, state.blobs, state.bytes)
        except Exception as exc:  # noqa: BLE001 - the state says what went wrong; the other resources go on
            state.error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            previous = self._states.get((name, label))
            state.digests = previous.digests if previous else []  # keep what an earlier prefetch pinned
            log.warning("resource set %s: %s failed: %s", name, label, state.error)
        self._states[(name, label)] = state
        return state

    # -- the listing ---------------------------------------------------------------------------------
    async def listing(self, name: str) -> dict[str, Any]:
        """The seed's JSON shape (`required_images`, `required_remote_resources` with type and url)
        plus each resource's state, `cached` from the files on disk now."""
        resource_set = self.sets[name]
        labels = [*resource_set.images, *(r.display_url for r in resource_set.remote)]
        states = {label: self._states.get((name, label), ResourceState()) for label in labels}
        missing = await self._store.pools.files(self._missing, states)
        status = {label: state.as_json(missing[label]) for label, state in states.items()}
        return {
            "name": name,
            "required_images": list(resource_set.images),
            "required_remote_resources": [{"type": r.type, "url": r.display_url} for r in resource_set.remote],
            "status": {
                "images": {i: status[i] for i in resource_set.images},
                "remote": {r.display_url: status[r.display_url] for r in resource_set.remote},
            },
        }

    def _missing(self, states: dict[str, ResourceState]) -> dict[str, int]:
        """Blocking: how many of each resource's blobs have no file in the store."""
        return {label: sum(_size_on_disk(self._store.files, d) is None for d in state.digests) for label, state in states.items()}

    # -- HTTP --------------------------------------------------------------------------------------------
    def routes(self, admin_check: Any) -> list[BaseRoute]:
        async def required_resources(request: Request) -> Response:
            name = request.path_params["name"]
            if name not in self.sets:
                return JSONResponse({"error": f"no resource set named {name[:128]!r}"}, status_code=404)
            if request.method == "POST":
                if (refusal := admin_check(request)) is not None:
                    return refusal
                return JSONResponse(await self.prefetch(name))
            return JSONResponse(await self.listing(name))

        return [Route("/api/markets/{name}/required-resources", required_resources, methods=["GET", "POST"])]

