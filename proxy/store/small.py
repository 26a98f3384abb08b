"""Small objects held whole (manifests, API answers, listings): the store's second door.

`read` serves one by digest, `document` one named by a key and fetched whole; both only under a
read scope that admitted it, each request counted once (a hit when its bytes came from the cache).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.singleflight import SingleFlight
from proxy.store.blobs import BlobStore, DigestMismatch
from proxy.store.digest import Digest
from proxy.store.events import Outcome, StoreEvents
from proxy.store.freshness import Found, Freshness
from proxy.store.index import Index
from proxy.store.memo import AccessLog, SmallObject, SmallObjectCache
from proxy.store.pools import Pools
from proxy.store.records import Origin, ReadScope, Reference
from proxy.store.requests import FetchFailed, SmallRequest, Translate
from proxy.store.scopes import Scopes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """An answer fetched whole (an API response, a listing) and what to remember beside it."""

    data: bytes
    media_type: str
    meta: Mapping[str, Any] = field(default_factory=dict)


class SmallObjects:
    def __init__(
        self, files: BlobStore, index: Index, pools: Pools, scopes: Scopes, freshness: Freshness, events: StoreEvents,
        access: AccessLog, max_bytes: int,
    ) -> None:
        self._files = files
        self._rows = index.blobs
        self._pools = pools
        self._scopes = scopes
        self._freshness = freshness
        self._events = events
        self._access = access
        self._memory = SmallObjectCache(max_bytes)
        self._fetches: SingleFlight[SmallObject] = SingleFlight()

    async def read(self, request: SmallRequest, *, method: str | None) -> SmallObject:
        """A small object for one caller, counted once (a hit when its bytes came from the cache),
        or for a prefetch (`method` None), uncounted."""
        try:
            item = await self._readable(request)
            outcome = Outcome.HIT
            if item is None:
                outcome = Outcome.MISS
                item = await self._fetches.run((request.scope, request.digest), lambda: self._fetch(request))
        except Exception as exc:  # noqa: BLE001 - the source words every failure in its protocol
            raise request.translate(exc) from None
        self._count(request.origin, request.scope, outcome, method, len(item.data))
        return item

    async def _readable(self, request: SmallRequest) -> SmallObject | None:
        item = await self._cached(request.digest)
        if item is None:
            return None
        if not await self._scopes.admitted(request.scope, request.digest):
            if request.confirm is None:
                return None
            await request.confirm()
            await self._scopes.admit(request.scope, [request.digest])
        self._access.touch(request.digest)
        return item

    async def _fetch(self, request: SmallRequest) -> SmallObject:
        data, media_type = await request.fetch()
        actual = hashlib.sha256(data).hexdigest()
        if actual != request.digest.hex:
            log.warning("upstream sent bytes for %s that hash to sha256:%s", request.digest, actual)
            raise DigestMismatch(f"upstream sent bytes that do not match {request.digest}")
        self._events.fetched(request.origin, len(data))
        return await self.put(request.scope, request.origin, data, request.digest, media_type)

    async def document(
        self,
        scope: ReadScope,
        origin: Origin,
        name: tuple[str, str],
        *,
        ttl: float | None,
        fetch: Callable[[], Awaitable[Document]],
        method: str | None,
        translate: Translate,
    ) -> tuple[SmallObject, Reference]:
        """An answer named by (source, key), fetched whole: fresh from the cache, else fetched again,
        else the last one while the upstream is unreachable. Counted once."""

        async def usable(ref: Reference) -> bool:
            return bool(ref.digest) and await self.get(scope, Digest.parse(ref.digest)) is not None

        async def revalidate(_previous: Reference | None) -> Found:
            document = await fetch()
            digest = Digest.from_hex(hashlib.sha256(document.data).hexdigest())
            self._events.fetched(origin, len(document.data))
            await self.put(scope, origin, document.data, digest, document.media_type)
            return Found(str(digest), meta=document.meta)

        try:
            resolved = await self._freshness.resolve(*name, ttl=ttl, revalidate=revalidate, usable=usable)
            item = await self.get(scope, Digest.parse(resolved.ref.digest))
            if item is None:
                raise FetchFailed(f"{name[1][:200]} was purged while it was read")
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from None
        self._count(origin, scope, Outcome.HIT if resolved.from_cache else Outcome.MISS, method, len(item.data))
        return item, resolved.ref

    def read_from_memory(self, scope: ReadScope, origin: Origin, digest: Digest, method: str) -> SmallObject | None:
        """A hit answered without a thread hop or an await: the object is in memory and this process
        already knows `scope` may read it (else None, and the caller takes the full path). Counted
        as `read` counts a hit."""
        item = self._memory.get(digest)
        if item is None or not self._scopes.known(scope, digest):
            return None
        self._access.touch(digest)
        self._count(origin, scope, Outcome.HIT, method, len(item.data))
        return item

    async def get(self, scope: ReadScope, digest: Digest) -> SmallObject | None:
        """A small object this scope may read, uncounted (for a source's own bookkeeping)."""
        item = await self._cached(digest)
        if item is None or not await self._scopes.admitted(scope, digest):
            return None
        self._access.touch(digest)
        return item

    async def put(self, scope: ReadScope, origin: Origin, data: bytes, digest: Digest, media_type: str | None) -> SmallObject:
        """Store verified bytes (checked against `digest`) with their media type, admitted to `scope`.

        The object is in memory before its file appears, so a concurrent reader never finds the
        file without the media type that goes with it."""
        item = SmallObject(digest, data, media_type)
        self._memory.put(item)
        await self._pools.files(self._files.put_bytes, data, digest)
        await self._pools.index(self._rows.add, str(digest), len(data), media_type, source=origin.source, upstream=origin.upstream)
        await self._scopes.admit(scope, [digest])
        return item

    async def _cached(self, digest: Digest) -> SmallObject | None:
        item = self._memory.get(digest)
        if item is None:
            item = await self._pools.files(self._load, digest)
            if item is not None:
                self._memory.put(item)
        return item

    def _load(self, digest: Digest) -> SmallObject | None:
        data = self._files.read_bytes(digest)
        if data is None:
            return None
        record = self._rows.get(str(digest))
        if record is None or record.media_type is None:
            return None  # written by another process that has not indexed it yet, or not a small object
        return SmallObject(digest, data, record.media_type)

    def _count(self, origin: Origin, scope: ReadScope, outcome: Outcome, method: str | None, nbytes: int) -> None:
        if method is None:
            return  # a prefetch, not a client's request
        self._events.request(origin, scope, outcome, joined=False)
        if outcome is Outcome.HIT and method == "GET":
            self._events.sent_from_cache(origin, scope, nbytes)
