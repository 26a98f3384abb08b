"""GET/HEAD /s3/{bucket}/{key}: an object through the cache; GET /s3/{bucket}/{prefix}/: a listing.

Only buckets named in the configuration are served; anything else is 403 before any request
leaves. Objects are revalidated with HeadObject after `object_ttl` and fetched with IfMatch on
the ETag, so the bytes cached are always one version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.config import S3Bucket, S3Config
from proxy.sources.objects import ObjectError, ObjectMirror, Unreachable, Version
from proxy.sources.s3.client import S3Clients
from proxy.stats import Traffic
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest
from proxy.store.fill import Origin
from proxy.store.index import Reference

log = logging.getLogger(__name__)

SOURCE = "s3"
LISTINGS = "s3-list"
MAX_KEY = 1024


class S3Mirror:
    def __init__(self, config: S3Config, cache: BlobCache, traffic: Traffic) -> None:
        self.config = config
        self.clients = S3Clients(config)
        self._cache = cache
        self._objects = ObjectMirror(cache, traffic, SOURCE)

    def routes(self) -> list[BaseRoute]:
        return [Route("/s3/{rest:path}", self.dispatch, methods=["GET", "HEAD"])]

    async def aclose(self) -> None:
        await self.clients.aclose()

    async def dispatch(self, request: Request) -> Response:
        try:
            bucket_name, _, key = request.path_params["rest"].partition("/")
            bucket = self.allowed(bucket_name, key)
            if key == "" or key.endswith("/"):
                return JSONResponse(await self.listing(bucket, key))
            return await self._objects.serve(
                f"{bucket.name}/{key}", request, origin=self.origin(bucket), ttl=self.config.object_ttl,
                probe=lambda: self.probe(bucket, key), repository=bucket.name,
            )
        except ObjectError as exc:
            return exc.response()

    def allowed(self, bucket_name: str, key: str) -> S3Bucket:
        bucket = self.config.bucket(bucket_name)
        if bucket is None:
            raise ObjectError(403, "BucketNotConfigured", f"bucket {bucket_name[:64]!r} is not served by this mirror: add it to [s3] buckets")
        if len(key) > MAX_KEY or "\x00" in key:
            raise ObjectError(400, "InvalidKey", "invalid object key")
        return bucket

    def origin(self, bucket: S3Bucket) -> Origin:
        endpoint = bucket.endpoint_url or self.config.endpoint_url
        return Origin(SOURCE, urlsplit(endpoint).netloc if endpoint else "s3.amazonaws.com")

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

    async def fetch(self, bucket: S3Bucket, key: str) -> Digest:
        """Prefetch one object into the cache."""
        return await self._objects.fetch(
            f"{bucket.name}/{key}", origin=self.origin(bucket), ttl=self.config.object_ttl, probe=lambda: self.probe(bucket, key)
        )

    async def prefetch(self, url: str) -> list[tuple[str, str]]:
        """s3://bucket/key (an object) or s3://bucket/prefix[/] (everything under it) into the
        cache; (path relative to the prefix, or the key's last part, and digest) of each object."""
        bucket_name, _, key = url.removeprefix("s3://").partition("/")
        bucket = self.allowed(bucket_name, key)
        if key and not key.endswith("/"):
            try:
                return [(key.rsplit("/", 1)[-1], str(await self.fetch(bucket, key)))]
            except ObjectError as exc:
                if exc.code != "NoSuchKey":
                    raise
                key += "/"  # not an object: a prefix (with the slash, so …/8 does not take …/80)
        listing = await self.listing(bucket, key)
        objects = [str(item["key"]) for item in listing["objects"]]  # type: ignore[union-attr]
        return [(k[len(key):], str(await self.fetch(bucket, k))) for k in objects if not k.endswith("/")]

    async def listing(self, bucket: S3Bucket, prefix: str) -> dict[str, object]:
        """The objects under a prefix, from upstream, or the last listing while it is unreachable."""
        key = f"{bucket.name}/{prefix}"
        try:
            objects = await self.clients.list(bucket, prefix)
        except Unreachable:
            ref = await self._cache.get_reference(LISTINGS, key)
            item = await self._cache.get_small(Digest.parse(ref.digest)) if ref is not None else None
            if item is None:
                raise
            log.warning("S3 unreachable: serving the listing of %s from the cache", key)
            return json.loads(item.data)
        listing = {"bucket": bucket.name, "prefix": prefix, "objects": objects}
        data = json.dumps(listing).encode()
        digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
        await self._cache.put_small(data, digest, "application/json", self.origin(bucket))
        now = time.time()
        await self._cache.put_reference(Reference(LISTINGS, key, str(digest), now, now + self.config.object_ttl))
        return listing
