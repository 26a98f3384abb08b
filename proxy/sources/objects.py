"""Mirroring named objects whose bytes have no digest in their name: S3 keys, web URLs, IPFS paths.

A reference maps the name to the digest its bytes hashed to, with the upstream's validator (ETag,
Last-Modified, CID) and the headers to replay. Inside the TTL the cache answers alone; after it,
the source's cheap probe (HeadObject, HEAD) tells whether the version changed; a new version is
fetched once (single flight on name and validator) and streamed to every caller while it fills.
When the upstream is down, the last version is served stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.http.ranges import RangeNotSatisfiable
from proxy.http.responses import FileSource, blob_response
from proxy.stats import Traffic
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest
from proxy.store.fill import Fill, Opener, Origin
from proxy.store.index import Reference

log = logging.getLogger(__name__)

FOREVER = float(2**62)


class ObjectError(Exception):
    """An error for the caller: JSON `{"error": code, "message": …}` with a status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> Response:
        return JSONResponse({"error": self.code, "message": self.message}, status_code=self.status)


class Unreachable(ObjectError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "Unavailable", message)


@dataclass(frozen=True)
class Version:
    """What the upstream says of an object now, and how to fetch exactly that version."""

    tag: str  # ETag, Last-Modified or CID: equal tags mean equal bytes
    size: int | None
    opener: Opener
    headers: dict[str, str] = field(default_factory=dict)  # replayed to callers (ETag, Last-Modified)
    content_type: str = "application/octet-stream"


Probe = Callable[[], Awaitable[Version]]


@dataclass(frozen=True)
class Cached:
    blob_digest: Digest
    headers: dict[str, str]
    content_type: str


class ObjectMirror:
    """The flow above, for one kind of source."""

    def __init__(self, cache: BlobCache, traffic: Traffic, source: str) -> None:
        self._cache = cache
        self._traffic = traffic
        self._source = source
        self._remembering: set[asyncio.Task[None]] = set()

    async def serve(
        self, key: str, request: Request, *, origin: Origin, ttl: float | None, probe: Probe, repository: str | None = None
    ) -> Response:
        """Answer GET or HEAD for the object named `key`; `ttl` None means immutable."""
        ref = await self._cache.get_reference(self._source, key)
        if ref is not None and (ttl is None or ref.is_fresh()):
            served = await self._from_cache(ref, request, origin, repository)
            if served is not None:
                return served
        try:
            version = await probe()
        except Unreachable:
            stale = await self._from_cache(ref, request, origin, repository) if ref is not None else None
            if stale is None:
                raise
            log.warning("%s unreachable: serving %s from the cache", origin.upstream, key)
            return stale
        if ref is not None and ref.validators.get("tag") == version.tag:
            await self._remember(key, ref.digest, version, ttl)  # unchanged: trusted for another TTL
            served = await self._from_cache(ref, request, origin, repository)
            if served is not None:
                return served
        if request.method == "HEAD":
            self._traffic.miss(origin, repository)
            return self._respond(None, version.size or 0, request, version.headers, version.content_type)
        fill, joined = self._cache.fill_unnamed(
            f"{self._source}:{key}@{version.tag}", version.opener, origin=origin, expected_size=version.size
        )
        self._traffic.miss(origin, repository, joined=joined)
        size = await _opened(fill)
        if not joined:
            self._after(fill, key, version, ttl)
        if size is None:
            blob = await fill.finished()
            if blob is None:
                raise Unreachable(f"fetching {key} failed")
            return self._respond(FileSource(blob, self._cache.in_use), blob.size, request, version.headers, version.content_type)
        return self._respond(fill, size, request, version.headers, version.content_type)

    async def fetch(self, key: str, *, origin: Origin, ttl: float | None, probe: Probe) -> Digest:
        """Make sure the object is cached (prefetch); its digest."""
        ref = await self._cache.get_reference(self._source, key)
        if ref is not None and (ttl is None or ref.is_fresh()) and await self._cache.lookup(Digest.parse(ref.digest)):
            return Digest.parse(ref.digest)
        version = await probe()
        if ref is not None and ref.validators.get("tag") == version.tag and await self._cache.lookup(Digest.parse(ref.digest)):
            await self._remember(key, ref.digest, version, ttl)
            return Digest.parse(ref.digest)
        fill, _ = self._cache.fill_unnamed(f"{self._source}:{key}@{version.tag}", version.opener, origin=origin, expected_size=version.size)
        blob = await fill.finished()
        if blob is None:
            raise Unreachable(f"fetching {key} failed: {fill.error}")
        await self._remember(key, str(blob.digest), version, ttl)
        return blob.digest

    async def cached_digest(self, key: str) -> Digest | None:
        ref = await self._cache.get_reference(self._source, key)
        return Digest.parse(ref.digest) if ref is not None else None

    async def _from_cache(self, ref: Reference | None, request: Request, origin: Origin, repository: str | None) -> Response | None:
        if ref is None:
            return None
        blob = await self._cache.lookup(Digest.parse(ref.digest))
        if blob is None:
            return None
        self._traffic.hit(origin, blob.size if request.method == "GET" else 0, repository)
        headers = dict(ref.meta.get("headers") or {})
        return self._respond(FileSource(blob, self._cache.in_use), blob.size, request, headers, str(ref.meta.get("content_type") or "application/octet-stream"))

    def _after(self, fill: Fill, key: str, version: Version, ttl: float | None) -> None:
        """Once the fill is complete, name its digest under the key."""

        async def remember() -> None:
            blob = await fill.finished()
            if blob is not None:
                await self._remember(key, str(blob.digest), version, ttl)

        task = asyncio.create_task(remember(), name=f"remember {key}")
        self._remembering.add(task)
        task.add_done_callback(self._remembering.discard)

    async def _remember(self, key: str, digest: str, version: Version, ttl: float | None) -> None:
        now = time.time()
        await self._cache.put_reference(
            Reference(
                self._source, key, digest, now, FOREVER if ttl is None else now + ttl,
                validators={"tag": version.tag},
                meta={"headers": version.headers, "content_type": version.content_type},
            )
        )

    @staticmethod
    def _respond(source: FileSource | Fill | None, size: int, request: Request, headers: dict[str, str], content_type: str) -> Response:
        try:
            return blob_response(
                source, size, method=request.method, range_header=request.headers.get("range"), headers=headers, media_type=content_type
            )
        except RangeNotSatisfiable as exc:
            return JSONResponse(
                {"error": "InvalidRange", "message": str(exc)}, status_code=416, headers={"Content-Range": f"bytes */{exc.size}"}
            )


async def _opened(fill: Fill) -> int | None:
    try:
        return await fill.opened()
    except ObjectError:
        raise
    except Exception as exc:  # noqa: BLE001 - worded for the client, logged by the filler
        raise Unreachable(f"fetching failed: {exc}") from None
