"""Mirroring named objects whose bytes have no digest in their name: S3 keys, web URLs, IPFS paths.

A reference maps the name to the digest its bytes hashed to, with the upstream's validator (ETag,
Last-Modified, CID) and the headers to replay. The store's revalidation policy keeps it: inside the
TTL the cache answers alone; after it, the source's cheap probe (HeadObject, HEAD) tells whether the
version changed; a new version is fetched once (single flight on name and validator) and streamed to
every caller while it fills. When the upstream is down, the last version is served stale.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.http.ranges import RangeNotSatisfiable
from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.fill import AsyncUpstreamBody, Opener, UpstreamBody
from proxy.store.freshness import Found, UpstreamUnreachable
from proxy.store.records import Origin, ReadScope, Reference
from proxy.store.requests import BlobRequest
from proxy.store.store import Store

log = logging.getLogger(__name__)


class ObjectError(Exception):
    """An error for the caller: JSON `{"error": code, "message": …}` with a status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> Response:
        return JSONResponse({"error": self.code, "message": self.message}, status_code=self.status, headers=self.headers)


class Unreachable(ObjectError, UpstreamUnreachable):
    def __init__(self, message: str) -> None:
        super().__init__(503, "Unavailable", message)


def translate(exc: BaseException) -> ObjectError:
    """Any failure the store surfaces, worded as the object routes word errors."""
    if isinstance(exc, ObjectError):
        return exc
    if isinstance(exc, RangeNotSatisfiable):
        return ObjectError(416, "InvalidRange", str(exc), headers={"Content-Range": f"bytes */{exc.size}"})
    return Unreachable(f"fetching failed: {exc}")


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
class ObjectName:
    """One object as a source names it: its key, who may read it, where it comes from."""

    key: str
    scope: ReadScope
    origin: Origin
    ttl: float | None  # None: immutable (IPFS)
    probe: Probe


class ObjectMirror:
    """The flow above, for one kind of source."""

    def __init__(self, store: Store, source: str) -> None:
        self._store = store
        self._source = source

    async def serve(self, name: ObjectName, request: Request) -> Response:
        """Answer GET or HEAD for the object."""
        blob_request, ref = await self._request(name)
        meta = ref.meta
        return await self._store.serve(
            blob_request, method=request.method, range_header=request.headers.get("range"),
            headers=dict(meta.get("headers") or {}), media_type=str(meta.get("content_type") or "application/octet-stream"),
        )

    async def fetch(self, name: ObjectName) -> BlobFile:
        """Make sure the object is cached (prefetch)."""
        blob_request, _ = await self._request(name)
        return await self._store.fetch(blob_request)

    async def _request(self, name: ObjectName) -> tuple[BlobRequest, Reference]:
        probed: list[Version] = []  # the probe this request made, if it made one

        async def revalidate(previous: Reference | None) -> Found:
            version = await name.probe()
            probed.append(version)
            same = previous is not None and previous.validators.get("tag") == version.tag
            return Found(
                previous.digest if same and previous is not None else "",
                {"tag": version.tag},
                {"headers": version.headers, "content_type": version.content_type, "size": version.size},
            )

        async def usable(ref: Reference) -> bool:
            return bool(ref.digest) and await self._store.holds(name.scope, Digest.parse(ref.digest))

        try:
            resolved = await self._store.freshness.resolve(self._source, name.key, ttl=name.ttl, revalidate=revalidate, usable=usable)
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from None
        ref = resolved.ref
        tag = str(ref.validators.get("tag"))

        async def opener() -> UpstreamBody | AsyncUpstreamBody:
            version = probed[-1] if probed else await name.probe()
            if version.tag != tag:
                raise ObjectError(409, "VersionChanged", f"{name.key[:200]} changed while it was being fetched")
            return await version.opener()

        async def remember(blob: BlobFile) -> None:
            current = await self._store.refs.get(self._source, name.key)
            if current is None or current.validators.get("tag") == tag:
                await self._store.refs.put(
                    Reference(self._source, name.key, str(blob.digest), ref.fetched_at, ref.expires_at, ref.validators, ref.meta)
                )

        size = ref.meta.get("size")
        return BlobRequest(
            scope=name.scope, origin=name.origin, opener=opener, translate=translate,
            digest=Digest.parse(ref.digest) if ref.digest else None, name=f"{self._source}:{name.key}@{tag}",
            size=int(size) if isinstance(size, int) else None, after_commit=remember,
        ), ref
