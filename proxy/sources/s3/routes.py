"""GET/HEAD /s3/{bucket}/{key}: an object through the cache; GET /s3/{bucket}/{prefix}/: a listing.

Only buckets named in the configuration are served; anything else is 403 before any request
leaves. Objects are revalidated with HeadObject after `object_ttl` and fetched with IfMatch on
the ETag, so the bytes cached are always one version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

import httpx

from proxy.config import S3Bucket, Settings
from proxy.http.download import BlobTransport
from proxy.http.paths import UnsafePath, decode_segment, raw_segments_after
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.sources.objects import ObjectError, ObjectMirror, ObjectName, Version, translate
from proxy.store.blobs import BlobFile
from proxy.sources.source import ttl_rule
from proxy.store.janitor import TtlRule
from proxy.store.memo import SmallObject
from proxy.store.records import Origin, ReadScope
from proxy.store.small import Document
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth

if TYPE_CHECKING:
    from proxy.sources.s3.client import S3Clients

log = logging.getLogger(__name__)

SOURCE = "s3"
LISTINGS = "s3-list"
MAX_KEY = 1024


class S3Mirror:
    name = SOURCE
    resource_kinds: tuple[ResourceKind, ...] = ("s3",)
    expiring_references: tuple[str, ...] = ()

    def __init__(
        self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
    ) -> None:
        config = settings.s3
        self.config = config
        self._clients: S3Clients | None = None
        if config.buckets:  # aioboto3 and botocore weigh about 25 MiB: loaded only for a configured [s3]
            from proxy.sources.s3.client import S3Clients

            self._clients = S3Clients(config, health, offline=settings.offline)
        self._store = store
        self._objects = ObjectMirror(store, SOURCE)

    def routes(self) -> list[BaseRoute]:
        return [Route("/s3/{rest:path}", self.dispatch, methods=["GET", "HEAD"])]

    @property
    def clients(self) -> S3Clients:
        """The bucket clients; only reached for a configured bucket (others are refused first)."""
        assert self._clients is not None, "no [s3] buckets are configured"
        return self._clients

    async def aclose(self) -> None:
        if self._clients is not None:
            await self._clients.aclose()

    @staticmethod
    def purge_rules(settings: Settings) -> list[TtlRule]:
        return ttl_rule(settings, SOURCE, None, settings.s3.ttl, settings.s3.ttl_from)

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        objects = await self.prefetch_url(resource.url)
        return Fetched(resource, [FetchedFile(path, str(blob.digest), blob.size) for path, blob in objects])

    async def dispatch(self, request: Request) -> Response:
        try:
            bucket_name, key = _bucket_and_key(request)
            bucket = self.allowed(bucket_name, key)
            if key == "" or key.endswith("/"):
                listing = await self._listing(bucket, key, method=request.method)
                return Response(listing.data, media_type=listing.media_type)
            return await self._objects.serve(self._name(bucket, key), request)
        except ObjectError as exc:
            return exc.response()

    def allowed(self, bucket_name: str, key: str) -> S3Bucket:
        """The configured bucket, for a key that cannot climb out of it (also for keys of resource
        sets and the CLI, which do not come through a request path)."""
        bucket = self.config.bucket(bucket_name)
        if bucket is None:
            raise ObjectError(403, "BucketNotConfigured", f"bucket {bucket_name[:64]!r} is not served by this mirror: add it to [s3] buckets")
        parts = key.split("/")
        if (
            len(key) > MAX_KEY
            or any(part in (".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part) or "\\" in part for part in parts)
            or "" in parts[:-1]
        ):
            raise ObjectError(400, "InvalidKey", "invalid object key: no dot segments, empty segments or control characters")
        return bucket

    def origin(self, bucket: S3Bucket) -> Origin:
        endpoint = bucket.endpoint_url or self.config.endpoint_url
        return Origin(SOURCE, urlsplit(endpoint).netloc if endpoint else "s3.amazonaws.com")

    def _name(self, bucket: S3Bucket, key: str) -> ObjectName:
        return ObjectName(
            f"{bucket.name}/{key}", ReadScope.s3(bucket.name), self.origin(bucket), self.config.object_ttl,
            probe=lambda: self.probe(bucket, key),
        )

    async def probe(self, bucket: S3Bucket, key: str) -> Version:
        head = await self.clients.head(bucket, key)
        etag = head["ETag"]
        headers = {"ETag": etag}
        if head.get("LastModified") is not None:
            headers["Last-Modified"] = head["LastModified"].strftime("%a, %d %b %Y %H:%M:%S GMT")
        return Version(
            tag=etag, size=head.get("ContentLength"), opener=lambda: self.clients.get(bucket, key, etag),
            headers=headers, content_type=head.get("ContentType") or "application/octet-stream",
        )

    async def fetch(self, bucket: S3Bucket, key: str) -> BlobFile:
        """Prefetch one object into the cache."""
        return await self._objects.fetch(self._name(bucket, key))

    async def prefetch_url(self, url: str) -> list[tuple[str, BlobFile]]:
        """s3://bucket/key (an object) or s3://bucket/prefix[/] (everything under it) into the
        cache; (path relative to the prefix, or the key's last part, and blob) of each object."""
        bucket_name, _, key = url.removeprefix("s3://").partition("/")
        bucket = self.allowed(bucket_name, key)
        if key and not key.endswith("/"):
            try:
                return [(key.rsplit("/", 1)[-1], await self.fetch(bucket, key))]
            except ObjectError as exc:
                if exc.code != "NoSuchKey":
                    raise
                key += "/"  # not an object: a prefix (with the slash, so …/8 does not take …/80)
        listing = await self.listing(bucket, key)
        objects = [str(item["key"]) for item in listing["objects"]]  # type: ignore[union-attr]
        return [(k[len(key):], await self.fetch(bucket, k)) for k in objects if not k.endswith("/")]

    async def listing(self, bucket: S3Bucket, prefix: str) -> dict[str, object]:
        """The objects under a prefix (for a prefetch)."""
        return json.loads((await self._listing(bucket, prefix, method=None)).data)

    async def _listing(self, bucket: S3Bucket, prefix: str, *, method: str | None) -> SmallObject:
        """The objects under a prefix as JSON: kept for `object_ttl`, the last one while S3 is unreachable."""

        async def fetch() -> Document:
            objects = await self.clients.list(bucket, prefix)
            if not objects:  # not remembered: prefixes a client makes up add no rows
                raise ObjectError(404, "NoSuchPrefix", f"nothing under s3://{bucket.name}/{prefix}")
            listing = {"bucket": bucket.name, "prefix": prefix, "objects": objects}
            return Document(json.dumps(listing).encode(), "application/json")

        item, _ = await self._store.small_objects.document(
            ReadScope.s3(bucket.name), self.origin(bucket), (LISTINGS, f"{bucket.name}/{prefix}"),
            ttl=self.config.object_ttl, fetch=fetch, method=method, translate=translate,
        )
        return item


def _bucket_and_key(request: Request) -> tuple[str, str]:
    """The bucket and the key, each segment of the raw path decoded once and checked."""
    try:
        segments = raw_segments_after(request.scope, "/s3/")
        bucket = decode_segment(segments[0])
        return bucket, "/".join(decode_segment(s) for s in segments[1:])
    except UnsafePath as exc:
        raise ObjectError(400, "InvalidKey", str(exc)) from None
