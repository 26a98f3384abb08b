"""GET/HEAD /s3/{bucket}/{key}: an object through the cache; GET /s3/{bucket}/{prefix}/: a listing.

Only buckets named in the configuration are served, and the `s3://` URLs a subscribed resource set
lists (a market's public bucket needs no entry of its own); anything else is 403 before any request
leaves. A listed URL's objects are read with unsigned requests (a public bucket), or, when the
endpoint refuses those, with the section's default credentials; they are admitted under a scope of
that URL alone (`s3:bucket/prefix`), never the bucket's, so the listing lends no wider access.
Objects are revalidated with HeadObject after `object_ttl` and fetched with IfMatch on
the ETag, so the bytes cached are always one version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

import httpx

from proxy.config import S3Bucket, Settings
from proxy.http.download import BlobTransport
from proxy.http.paths import UnsafePath, decode_segment, raw_segments_after
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.sources.objects import ObjectError, ObjectMirror, ObjectName, Unreachable, Version, translate
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
T = TypeVar("T")


@dataclass(frozen=True)
class Grant:
    """What a request for one key may do: read `bucket` (its endpoint and credentials) under `scope`."""

    bucket: S3Bucket
    scope: ReadScope
    listed: bool = False  # only a resource set's listing allows it (the bucket has no entry)


def _split_url(url: str) -> tuple[str, str]:
    """s3://bucket/rest -> (bucket, rest): a key, a prefix, or "" for the whole bucket."""
    bucket, _, rest = url.removeprefix("s3://").partition("/")
    return bucket, rest


def _listed_scope(bucket: str, prefix: str) -> ReadScope:
    """The read scope of a listed s3://bucket/prefix: that URL alone, never the bucket's."""
    return ReadScope(f"s3:{bucket}/{prefix.rstrip('/')}")


def _covers(prefix: str, key: str) -> bool:
    """Whether a listed s3://bucket/PREFIX (an object or a folder) covers KEY: the key itself, or
    anything below it as a folder (…/8 covers …/8/a but not …/80)."""
    stem = prefix.rstrip("/")
    return not stem or key == prefix or key == stem or key.startswith(stem + "/")


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
        self._health = health
        self._offline = settings.offline
        self._store = store
        self._objects = ObjectMirror(store, SOURCE)
        self._listed: dict[str, frozenset[str]] = {}  # resource set -> the s3:// URLs its subscription lists
        self._signed: set[str] = set()  # scopes of listed URLs whose bucket reads only with the default credentials

    def routes(self) -> list[BaseRoute]:
        return [Route("/s3/{rest:path}", self.dispatch, methods=["GET", "HEAD"])]

    @property
    def clients(self) -> S3Clients:
        """The bucket clients, made at the first request that needs one: aioboto3 and botocore
        weigh about 25 MiB, loaded only when a bucket is configured or listed and then asked."""
        if self._clients is None:
            from proxy.sources.s3.client import S3Clients

            self._clients = S3Clients(self.config, self._health, offline=self._offline)
        return self._clients

    def subscribe(self, resource_set: str, urls: Iterable[str]) -> None:
        """The s3:// URLs a resource set's listing names now (replacing what it named before): their
        objects are served, under their own scopes, while some listing names them."""
        listed = frozenset(u for u in urls if u.startswith("s3://"))
        if listed:
            self._listed[resource_set] = listed
        else:
            self._listed.pop(resource_set, None)
        live = {str(_listed_scope(*_split_url(url))) for urls in self._listed.values() for url in urls}
        self._signed &= live  # a URL that left every listing starts unsigned again if it comes back

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
            grant = self.allowed(bucket_name, key)
            if key == "" or key.endswith("/"):
                listing = await self._listing(grant, key, method=request.method)
                return Response(listing.data, media_type=listing.media_type)
            return await self._objects.serve(self._name(grant, key), request)
        except ObjectError as exc:
            return exc.response()

    def allowed(self, bucket_name: str, key: str) -> Grant:
        """The configured bucket, or else the widest URL a subscribed listing names that covers the
        key, for a key that cannot climb out of it (also for keys of resource sets and the CLI,
        which do not come through a request path)."""
        _check_key(key)
        bucket = self.config.bucket(bucket_name)
        if bucket is not None:
            return Grant(bucket, ReadScope.s3(bucket.name))
        covering = sorted(prefix.rstrip("/") for prefix in self._listed_prefixes(bucket_name) if _covers(prefix, key))
        if not covering:
            raise ObjectError(403, "BucketNotConfigured", f"bucket {bucket_name[:64]!r} is not served by this mirror: add it to [s3] buckets")
        scope = _listed_scope(bucket_name, covering[0])
        return Grant(S3Bucket(name=bucket_name, anonymous=str(scope) not in self._signed), scope, listed=True)

    def _listed_prefixes(self, bucket_name: str) -> list[str]:
        """The keys and prefixes of the bucket that subscribed listings name now."""
        found = []
        for urls in self._listed.values():
            for url in urls:
                bucket, prefix = _split_url(url)
                if bucket == bucket_name:
                    found.append(prefix)
        return found

    def origin(self, bucket: S3Bucket) -> Origin:
        endpoint = bucket.endpoint_url or self.config.endpoint_url
        return Origin(SOURCE, urlsplit(endpoint).netloc if endpoint else "s3.amazonaws.com")

    def _name(self, grant: Grant, key: str) -> ObjectName:
        return ObjectName(
            f"{grant.bucket.name}/{key}", grant.scope, self.origin(grant.bucket), self.config.object_ttl,
            probe=lambda: self.probe(grant, key),
        )

    async def _asking(self, grant: Grant, call: Callable[[S3Bucket], Awaitable[T]]) -> tuple[T, S3Bucket]:
        """`call` on the grant's bucket, and the bucket (the way of asking) that answered. A listed
        URL whose bucket refuses an unsigned request is asked again with the section's default
        credentials ("public, or covered by the default credentials"), and asked signed from then
        on only once that succeeded: a public bucket also refuses unsigned requests for keys it
        does not have, and a caller asking for one must not turn its reads signed."""
        try:
            return await call(grant.bucket), grant.bucket
        except ObjectError as exc:
            if not (grant.listed and grant.bucket.anonymous and exc.status == 403):
                raise
            refused = exc
        signed = S3Bucket(name=grant.bucket.name)
        try:
            answer = await call(signed)
        except ObjectError:
            raise refused from None
        if str(grant.scope) not in self._signed:
            log.info("s3://%s refused unsigned requests under %s: read with the default credentials", grant.bucket.name, grant.scope)
            self._signed.add(str(grant.scope))
        return answer, signed

    async def probe(self, grant: Grant, key: str) -> Version:
        head, bucket = await self._asking(grant, lambda bucket: self.clients.head(bucket, key))
        etag = head["ETag"]
        headers = {"ETag": etag}
        if head.get("LastModified") is not None:
            headers["Last-Modified"] = head["LastModified"].strftime("%a, %d %b %Y %H:%M:%S GMT")
        return Version(
            tag=etag, size=head.get("ContentLength"), opener=lambda: self.clients.get(bucket, key, etag),
            headers=headers, content_type=head.get("ContentType") or "application/octet-stream",
        )

    async def prefetch_url(self, url: str) -> list[tuple[str, BlobFile]]:
        """s3://bucket/key (an object) or s3://bucket/prefix[/] (everything under it) into the
        cache; (path relative to the prefix, or the key's last part, and blob) of each object."""
        bucket_name, key = _split_url(url)
        if key and not key.endswith("/"):
            try:
                return [(key.rsplit("/", 1)[-1], await self._fetch(bucket_name, key))]
            except ObjectError as exc:
                # Not an object: a prefix (with the slash, so …/8 does not take …/80). A public
                # bucket refuses (403) a key it does not have; with the endpoint unreachable (or
                # offline) the prefix's cached listing may still answer.
                if exc.code not in ("NoSuchKey", "AccessDenied") and not isinstance(exc, Unreachable):
                    raise
                key += "/"
        listing = json.loads((await self._listing(self.allowed(bucket_name, key), key, method=None)).data)
        objects = [str(item["key"]) for item in listing["objects"]]
        return [(k[len(key):], await self._fetch(bucket_name, k)) for k in objects if not k.endswith("/")]

    async def _fetch(self, bucket_name: str, key: str) -> BlobFile:
        """One object into the cache, under the scope a client's request for it would have."""
        return await self._objects.fetch(self._name(self.allowed(bucket_name, key), key))

    async def _listing(self, grant: Grant, prefix: str, *, method: str | None) -> SmallObject:
        """The objects under a prefix as JSON: kept for `object_ttl`, the last one while S3 is unreachable."""
        name = grant.bucket.name

        async def fetch() -> Document:
            objects, _ = await self._asking(grant, lambda bucket: self.clients.list(bucket, prefix))
            if not objects:  # not remembered: prefixes a client makes up add no rows
                raise ObjectError(404, "NoSuchPrefix", f"nothing under s3://{name}/{prefix}")
            listing = {"bucket": name, "prefix": prefix, "objects": objects}
            return Document(json.dumps(listing).encode(), "application/json")

        item, _ = await self._store.small_objects.document(
            grant.scope, self.origin(grant.bucket), (LISTINGS, f"{name}/{prefix}"),
            ttl=self.config.object_ttl, fetch=fetch, method=method, translate=translate,
        )
        return item


def _check_key(key: str) -> None:
    """A key that cannot climb out of its bucket or prefix: no dot or empty segments, no control characters."""
    parts = key.split("/")
    if (
        len(key) > MAX_KEY
        or any(part in (".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part) or "\\" in part for part in parts)
        or "" in parts[:-1]
    ):
        raise ObjectError(400, "InvalidKey", "invalid object key: no dot segments, empty segments or control characters")


def _bucket_and_key(request: Request) -> tuple[str, str]:
    """The bucket and the key, each segment of the raw path decoded once and checked."""
    try:
        segments = raw_segments_after(request.scope, "/s3/")
        bucket = decode_segment(segments[0])
        return bucket, "/".join(decode_segment(s) for s in segments[1:])
    except UnsafePath as exc:
        raise ObjectError(400, "InvalidKey", str(exc)) from None
