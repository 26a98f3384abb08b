"""Blobs: served from the store, or filled once from upstream while every client follows the fill."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.http.ranges import RangeNotSatisfiable
from proxy.http.responses import ByteSource, FileSource, blob_response
from proxy.sources.oci.errors import API_VERSION_HEADER, OciError, RangeInvalid, UpstreamUnavailable
from proxy.sources.oci.names import Target
from proxy.sources.oci.upstream import RegistryClient
from proxy.store.blobs import BlobFile
from proxy.stats import Traffic
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest
from proxy.store.fill import Fill, Origin

IMMUTABLE = "public, max-age=31536000, immutable"
SOURCE = "oci"


class BlobService:
    """Answers blob GET and HEAD for every configured registry."""

    def __init__(self, cache: BlobCache, clients: dict[str, RegistryClient], traffic: Traffic) -> None:
        self._cache = cache
        self._clients = clients
        self._traffic = traffic

    async def serve(self, target: Target, request: Request) -> Response:
        digest = target.digest
        assert digest is not None
        headers = {**API_VERSION_HEADER, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"', "Cache-Control": IMMUTABLE}
        origin = Origin(SOURCE, target.registry.name)
        blob = await self._cache.lookup(digest)
        if blob is not None:
            self._traffic.hit(origin, blob.size if request.method == "GET" else 0, target.repository)
            return self._respond(FileSource(blob, self._cache.in_use), blob.size, request, headers)
        client = self._clients[target.registry.name]
        if request.method == "HEAD" and self._cache.filler.inflight(str(digest)) is None:
            upstream = await client.head_blob(target.repository, str(digest))
            size = int(upstream.headers.get("content-length", "0"))
            self._traffic.miss(origin, target.repository)
            return self._respond(None, size, request, headers)  # HEAD sends no body
        fill, joined = self._cache.fill(digest, lambda: client.open_blob(target.repository, str(digest)), origin=origin)
        self._traffic.miss(origin, target.repository, joined=joined)
        size = await _opened_size(fill)
        if size is None:
            # The upstream announced no length: the client gets the blob once it is whole.
            blob = await _finished(fill)
            return self._respond(FileSource(blob, self._cache.in_use), blob.size, request, headers)
        return self._respond(fill, size, request, headers)

    async def fetch(self, registry: str, repository: str, digest: Digest) -> int:
        """Make sure the blob is in the cache (prefetch); its size."""
        blob = await self._cache.lookup(digest)
        if blob is not None:
            return blob.size
        client = self._clients[registry]
        fill, _ = self._cache.fill(digest, lambda: client.open_blob(repository, str(digest)), origin=Origin(SOURCE, registry))
        await _opened_size(fill)
        return (await _finished(fill)).size

    @staticmethod
    def _respond(source: ByteSource | None, size: int, request: Request, headers: dict[str, str]) -> Response:
        try:
            return blob_response(
                source, size, method=request.method, range_header=request.headers.get("range"), headers=headers
            )
        except RangeNotSatisfiable as exc:
            raise RangeInvalid(str(exc), headers={"Content-Range": f"bytes */{exc.size}"}) from None


async def _opened_size(fill: Fill) -> int | None:
    try:
        return await fill.opened()
    except OciError:
        raise
    except Exception as exc:  # noqa: BLE001 - worded for the client, logged by the filler
        raise UpstreamUnavailable(f"fetching {fill.digest} failed: {exc}") from None


async def _finished(fill: Fill) -> BlobFile:
    blob = await fill.finished()
    if blob is None:
        raise UpstreamUnavailable(f"fetching {fill.digest} failed")
    return blob
