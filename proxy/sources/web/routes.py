"""GET/HEAD /web/{url} for URLs under an allowed prefix, and /ipfs/{cid}[/{path}] through gateways.

/web/ is never an open proxy: a URL outside `[web] allow` is 403 before anything is fetched, and
every redirect hop must be under an allowed prefix too. Web answers are revalidated after `ttl` by
ETag or Last-Modified, and answers the origin marks private or no-store are refused; a URL's query
string (a signed URL's signature) goes to the origin but never into a cache key or a log line.
IPFS content is immutable: CIDv0 and CIDv1 of the same content name one cache entry, gateways are
tried in order, and their redirects must stay under a configured gateway's /ipfs/.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from proxy.config import Settings
from proxy.http.download import Admit, BlobDownload, BlobTransport, RedirectRefused, TransferFailed
from proxy.http.offline import MESSAGE as OFFLINE
from proxy.http.offline import Offline
from proxy.http.paths import UnsafePath, decode_segment, quote_segments, raw_path
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.sources.objects import ObjectError, ObjectMirror, ObjectName, Unreachable, Version
from proxy.store.blobs import BlobFile
from proxy.store.janitor import TtlRule
from proxy.store.records import Origin, ReadScope
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth, classify

log = logging.getLogger(__name__)

MAX_URL = 4096
MAX_REDIRECTS = 5
IMMUTABLE_TTL = float(2**40)
_URL = re.compile(r"^(https?):/+([^/?#]+)(/[^?#]*)?$")
_AUTHORITY = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class WebMirror:
    name = "web"
    resource_kinds: tuple[ResourceKind, ...] = ("https", "ipfs")
    expiring_references: tuple[str, ...] = ()

    def __init__(
        self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
    ) -> None:
        self.config = settings.web
        self._http = http
        self._blobs = blobs
        self._health = health
        for gateway in self.config.ipfs_gateways:
            self._health.watch(f"ipfs:{_host(gateway)}")
        self._web = ObjectMirror(store, "web")
        self._ipfs = ObjectMirror(store, "ipfs")

    @staticmethod
    def purge_rules(settings: Settings) -> list[TtlRule]:
        return [TtlRule("ipfs", None, IMMUTABLE_TTL)]  # IPFS content never changes: only the size cap evicts it

    async def aclose(self) -> None:
        pass

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        if resource.kind == "ipfs":
            blob = await self.fetch_ipfs(resource.url)
        else:
            blob = await self.fetch_url(resource.url)
        return Fetched(resource, [FetchedFile(resource.file_name, str(blob.digest), blob.size)])

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/web/{rest:path}", self.web, methods=["GET", "HEAD"]),
            Route("/ipfs/{rest:path}", self.ipfs, methods=["GET", "HEAD"]),
        ]

    # -- /web/ ---------------------------------------------------------------------------------------
    async def web(self, request: Request) -> Response:
        try:
            path = raw_path(request.scope)
            if not path.startswith("/web/"):
                raise ObjectError(400, "InvalidURL", "expected /web/http(s)://host/path")
            query = request.scope.get("query_string", b"").decode("latin-1")
            url, key = self.allowed_url(path[len("/web/"):], query)
            return await self._web.serve(self._web_name(url, key), request)
        except ObjectError as exc:
            return exc.response()

    def _web_name(self, url: str, key: str) -> ObjectName:
        # The longest allowed prefix: one URL always belongs to the same scope.
        prefix = max((p for p in self.config.allow if _under(key, p)), key=len)
        return ObjectName(key, ReadScope.web(prefix), Origin("web", urlsplit(key).netloc), self.config.ttl, lambda: self.probe_url(url))

    def allowed_url(self, text: str, query: str = "") -> tuple[str, str]:
        """(the URL to fetch, the cache's key for it: the URL without its query). The URL stays as
        the client encoded it; each path segment is decoded once to check it cannot climb."""
        match = _URL.match(text)
        if len(text) + len(query) > MAX_URL or match is None:
            raise ObjectError(400, "InvalidURL", "expected /web/http(s)://host/path")
        scheme, authority, path = match.group(1), match.group(2), match.group(3) or "/"
        if not _AUTHORITY.match(authority):
            raise ObjectError(400, "InvalidURL", "URLs with credentials or an unusual host are refused")
        try:
            for segment in path.split("/")[1:]:
                decode_segment(segment)
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in query):
                raise UnsafePath("control characters in the query")
        except UnsafePath as exc:
            raise ObjectError(400, "InvalidURL", f"refused: {exc}") from None
        key = f"{scheme}://{authority.lower()}{path}"
        if not self._admits(key):
            raise ObjectError(403, "NotAllowed", f"{key[:200]} is not under any prefix in [web] allow: this mirror is not an open proxy")
        return key + (f"?{query}" if query else ""), key

    def _admits(self, url: str) -> bool:
        """Whether a URL (without its query) is one /web/ may fetch: the rule every redirect hop passes too."""
        parts = urlsplit(url)
        if parts.username or parts.password or parts.scheme not in ("http", "https"):
            return False
        try:
            for segment in parts.path.split("/")[1:]:
                decode_segment(segment)
        except UnsafePath:
            return False
        return any(_under(f"{parts.scheme}://{parts.netloc}{parts.path}", prefix) for prefix in self.config.allow)

    def _admits_hop(self, url: str) -> bool:
        return self._admits(url.split("?", 1)[0])

    async def probe_url(self, url: str) -> Version:
        host = _host(url)
        response = await self._head(url, self._admits_hop, host, f"web:{host}")
        if response.status_code == 404:
            raise ObjectError(404, "NotFound", f"{url.split('?', 1)[0][:200]} does not exist upstream")
        if response.status_code >= 500:
            raise Unreachable(f"{host} answered {response.status_code}")
        if not response.is_success:
            raise ObjectError(502, "UpstreamError", f"{host} answered {response.status_code}")
        cache_control = response.headers.get("cache-control", "").lower()
        if "private" in cache_control or "no-store" in cache_control:
            raise ObjectError(502, "NotCacheable", f"{url.split('?', 1)[0][:200]} is marked {cache_control}: not cached for others")
        etag, modified = response.headers.get("etag"), response.headers.get("last-modified")
        headers = {k: v for k, v in (("ETag", etag), ("Last-Modified", modified)) if v}
        length = response.headers.get("content-length")
        return Version(
            tag=etag or modified or f"unvalidated@{time.time()}",  # no validator: fetched again after the TTL
            size=int(length) if length and length.isdigit() else None,
            opener=lambda: self._open(url, self._admits_hop, f"web:{host}"),
            headers=headers,
            content_type=response.headers.get("content-type", "application/octet-stream"),
        )

    async def _head(self, url: str, admit: Admit, host: str, upstream: str) -> httpx.Response:
        """HEAD, following redirects by hand: every hop must pass `admit`. Not retried: a cached
        version is served while the origin is down, and an IPFS gateway has others after it."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await self._http.head(url, follow_redirects=False, headers={"Accept-Encoding": "identity"})
            except httpx.TransportError as exc:
                failure = self._health.gave_up(upstream, classify(exc))
                raise Unreachable(f"{host} is unreachable: {failure.summary}") from None
            except Offline:
                raise _offline(url) from None
            location = response.headers.get("location")
            if not response.is_redirect or not location:
                self._health.status(upstream, response.status_code)
                return response
            target = urljoin(url, location)
            if not admit(target):
                raise ObjectError(502, "RedirectRefused", f"{host} redirected outside what this mirror fetches")
            url = target
        raise Unreachable(f"{host} redirected too many times")

    async def _open(self, url: str, admit: Admit, upstream: str) -> BlobDownload:
        host = _host(url)
        try:
            response = await self._blobs.open(url, None, admit=admit)
        except TransferFailed as exc:
            failure = self._health.gave_up(upstream, classify(exc))
            raise Unreachable(f"{host} is unreachable: {failure.summary}") from None
        except Offline:
            raise _offline(url) from None
        except RedirectRefused:
            raise ObjectError(502, "RedirectRefused", f"{host} redirected outside what this mirror fetches") from None
        self._health.status(upstream, response.status)
        if not 200 <= response.status < 300:
            await self._blobs.drain(response)
            raise Unreachable(f"{host} answered {response.status}")
        return BlobDownload(response)

    async def fetch_url(self, text: str) -> BlobFile:
        base, _, query = text.partition("?")
        return await self._web.fetch(self._web_name(*self.allowed_url(base, query)))

    # -- /ipfs/ --------------------------------------------------------------------------------------
    async def ipfs(self, request: Request) -> Response:
        try:
            path = raw_path(request.scope)
            if not path.startswith("/ipfs/"):
                raise ObjectError(400, "InvalidPath", "expected /ipfs/{cid}[/{path}]")
            key = self.ipfs_key(path[len("/ipfs/"):])
            return await self._ipfs.serve(self._ipfs_name(key), request)
        except ObjectError as exc:
            return exc.response()

    def ipfs_key(self, raw: str) -> str:
        """The cache's name for {cid}/{path} (as the request encoded it): CIDv1 in base32, so v0 and
        v1 are one entry, and the path's segments decoded once and checked."""
        if not self.config.ipfs_gateways:  # checked first: without gateways the ipfs extra may be absent
            raise ObjectError(503, "NoGateway", "no IPFS gateways are configured ([web] ipfs_gateways)")
        from multiformats import CID  # loaded with the first IPFS request, not by every server

        raw_cid, *raw_path_segments = raw.split("/")
        try:
            cid = CID.decode(decode_segment(raw_cid))
        except Exception:  # noqa: BLE001 - multiformats raises several kinds for bad input
            raise ObjectError(400, "InvalidCID", f"{raw_cid[:100]!r} is not a CID") from None
        try:
            segments = [decode_segment(s) for s in raw_path_segments]
        except UnsafePath as exc:
            raise ObjectError(400, "InvalidPath", f"invalid path inside the CID: {exc}") from None
        if "" in segments[:-1] or len(raw) > MAX_URL:
            raise ObjectError(400, "InvalidPath", "invalid path inside the CID")
        return "/".join([str(cid.set(version=1).encode("base32")), *segments])

    async def probe_ipfs(self, key: str) -> Version:
        if not self.config.ipfs_gateways:
            raise ObjectError(503, "NoGateway", "no IPFS gateways are configured ([web] ipfs_gateways)")
        failures = []
        for gateway in self.config.ipfs_gateways:
            url = f"{gateway.rstrip('/')}/ipfs/{quote_segments(key.split('/'))}"
            upstream = f"ipfs:{_host(gateway)}"
            try:
                response = await self._head(url, self._under_a_gateway, _host(gateway), upstream)
            except Unreachable as exc:
                failures.append(f"{gateway}: {exc.message}")
                continue
            if response.is_success:
                length = response.headers.get("content-length")
                return Version(
                    tag=key, size=int(length) if length and length.isdigit() else None,
                    opener=lambda url=url, upstream=upstream: self._open(url, self._under_a_gateway, upstream),
                    headers={"ETag": f'"{key}"', "Cache-Control": "public, max-age=31536000, immutable"},
                    content_type=response.headers.get("content-type", "application/octet-stream"),
                )
            failures.append(f"{gateway}: {response.status_code}")
        if failures and all(f.endswith(": 404") for f in failures):
            raise ObjectError(404, "NotFound", f"no gateway has /ipfs/{key}")
        raise Unreachable("no IPFS gateway answered: " + "; ".join(failures))

    def _under_a_gateway(self, url: str) -> bool:
        """A redirect from a gateway stays under a configured gateway's /ipfs/, its path unable to climb."""
        parts = urlsplit(url)
        try:
            for segment in parts.path.split("/")[1:]:
                decode_segment(segment)
        except UnsafePath:
            return False
        plain = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return not parts.username and any(plain.startswith(f"{g.rstrip('/')}/ipfs/") for g in self.config.ipfs_gateways)

    async def fetch_ipfs(self, cid_and_path: str) -> BlobFile:
        return await self._ipfs.fetch(self._ipfs_name(self.ipfs_key(cid_and_path)))

    def _ipfs_name(self, key: str) -> ObjectName:
        return ObjectName(key, ReadScope.ipfs(), Origin("ipfs", "gateways"), None, lambda: self.probe_ipfs(key))


def _offline(url: str) -> Unreachable:
    """The transports refused (offline = true): the cache did not hold the URL's answer."""
    return Unreachable(f"{OFFLINE}; {url.split('?', 1)[0][:200]} is not in it")


def _under(url: str, prefix: str) -> bool:
    """Whether the URL is under the prefix, on a path boundary (…/models does not allow …/models-x)."""
    if not url.startswith(prefix):
        return False
    return prefix.endswith("/") or len(url) == len(prefix) or url[len(prefix)] in "/?"


def _host(url: str) -> str:
    """host[:port] of a URL, never its user information."""
    return urlsplit(url).netloc.rpartition("@")[2].lower()
