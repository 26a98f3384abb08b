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

    def as_json(self) -> dict[str, Any]:
        return {"cached": self.cached, "blobs": self.blobs, "bytes": self.bytes, "last_refreshed": self.last_refreshed, "error": self.error}


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
            for label in [*resource_set.images, *(r.display_url for r in resource_set.remote)]:
                state = await self._run(name, label, resource_set.platforms)
                digests.update(state.digests)
            await self._store.pin(name, sorted(digests))
        return self.listing(name)

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
    def listing(self, name: str) -> dict[str, Any]:
        """The seed's JSON shape (`required_images`, `required_remote_resources` with type and url)
        plus each resource's state."""
        resource_set = self.sets[name]
        never = ResourceState().as_json()
        return {
            "name": name,
            "required_images": list(resource_set.images),
            "required_remote_resources": [{"type": r.type, "url": r.display_url} for r in resource_set.remote],
            "status": {
                "images": {i: self._state_json(name, i, never) for i in resource_set.images},
                "remote": {r.display_url: self._state_json(name, r.display_url, never) for r in resource_set.remote},
            },
        }

    def _state_json(self, name: str, label: str, default: dict[str, Any]) -> dict[str, Any]:
        state = self._states.get((name, label))
        return state.as_json() if state is not None else default

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
            return JSONResponse(self.listing(name))

        return [Route("/api/markets/{name}/required-resources", required_resources, methods=["GET", "POST"])]

