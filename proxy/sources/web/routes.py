"""GET/HEAD /web/{url} for URLs under an allowed prefix, and /ipfs/{cid}[/{path}] through gateways.

/web/ is never an open proxy: a URL outside `[web] allow` is 403 before anything is fetched.
Web answers are revalidated after `ttl` by ETag or Last-Modified, and answers the origin marks
private or no-store are refused. IPFS content is immutable: CIDv0 and CIDv1 of the same content
name one cache entry, and gateways are tried in order.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import anyio
import httpx
from multiformats import CID
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from proxy.config import Settings
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.http.download import BlobDownload, BlobTransport, TransferFailed, small_body
from proxy.sources.objects import ObjectError, ObjectMirror, ObjectName, Unreachable, Version
from proxy.store.blobs import BlobFile
from proxy.store.janitor import TtlRule
from proxy.store.records import Origin, ReadScope
from proxy.store.store import Store

log = logging.getLogger(__name__)

MAX_URL = 4096
IMMUTABLE_TTL = float(2**40)


class WebMirror:
    name = "web"
    resource_kinds: tuple[ResourceKind, ...] = ("https", "ipfs")

    def __init__(self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport) -> None:
        config = settings.web
        self.config = config
        self._http = http
        self._blobs = blobs
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
            url = self.allowed_url(request.path_params["rest"], request.url.query)
            return await self._web.serve(self._web_name(url), request)
        except ObjectError as exc:
            return exc.response()

    def _web_name(self, url: str) -> ObjectName:
        # The longest allowed prefix: one URL always belongs to the same scope.
        prefix = max((p for p in self.config.allow if _under(url, p)), key=len)
        return ObjectName(url, ReadScope.web(prefix), Origin("web", urlsplit(url).netloc), self.config.ttl, lambda: self.probe_url(url))

    def allowed_url(self, rest: str, query: str = "") -> str:
        url = re.sub(r"^(https?):/+", r"\1://", rest) + (f"?{query}" if query else "")
        parts = urlsplit(url)
        if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ObjectError(400, "InvalidURL", "expected /web/http(s)://host/path")
        if parts.username or parts.password or any(seg in ("..", ".") for seg in unquote(parts.path).split("/")):
            raise ObjectError(400, "InvalidURL", "URLs with credentials or dot segments are refused")
        if not any(_under(url, prefix) for prefix in self.config.allow):
            raise ObjectError(403, "NotAllowed", f"{url[:200]} is not under any prefix in [web] allow: this mirror is not an open proxy")
        return url

    async def probe_url(self, url: str) -> Version:
        try:
            response = await self._http.head(url, follow_redirects=True, headers={"Accept-Encoding": "identity"})
        except httpx.TransportError as exc:
            raise Unreachable(f"{urlsplit(url).netloc} is unreachable: {type(exc).__name__}") from None
        if response.status_code == 404:
            raise ObjectError(404, "NotFound", f"{url[:200]} does not exist upstream")
        if response.status_code >= 500:
            raise Unreachable(f"{urlsplit(url).netloc} answered {response.status_code}")
        if not response.is_success:
            raise ObjectError(502, "UpstreamError", f"{urlsplit(url).netloc} answered {response.status_code}")
        cache_control = response.headers.get("cache-control", "").lower()
        if "private" in cache_control or "no-store" in cache_control:
            raise ObjectError(502, "NotCacheable", f"{url[:200]} is marked {cache_control}: not cached for others")
        etag, modified = response.headers.get("etag"), response.headers.get("last-modified")
        headers = {k: v for k, v in (("ETag", etag), ("Last-Modified", modified)) if v}
        length = response.headers.get("content-length")
        return Version(
            tag=etag or modified or f"unvalidated@{time.time()}",  # no validator: fetched again after the TTL
            size=int(length) if length and length.isdigit() else None,
            opener=lambda: self._open(url),
            headers=headers,
            content_type=response.headers.get("content-type", "application/octet-stream"),
        )

    async def _open(self, url: str) -> BlobDownload:
        try:
            response = await anyio.to_thread.run_sync(self._blobs.get, url, None)
        except TransferFailed as exc:
            raise Unreachable(f"{urlsplit(url).netloc} is unreachable: {exc}") from None
        if not 200 <= response.status < 300:
            await anyio.to_thread.run_sync(small_body, response)
            raise Unreachable(f"{urlsplit(url).netloc} answered {response.status}")
        return BlobDownload(response)

    async def fetch_url(self, url: str) -> BlobFile:
        return await self._web.fetch(self._web_name(self.allowed_url(url)))

    # -- /ipfs/ --------------------------------------------------------------------------------------
    async def ipfs(self, request: Request) -> Response:
        try:
            key, _ = self.ipfs_key(request.path_params["rest"])
            return await self._ipfs.serve(self._ipfs_name(key), request)
        except ObjectError as exc:
            return exc.response()

    def ipfs_key(self, rest: str) -> tuple[str, str]:
        """The cache's name for /ipfs/{cid}/{path}: CIDv1 in base32, so v0 and v1 are one entry."""
        cid_text, _, path = rest.partition("/")
        try:
            cid = CID.decode(cid_text)
        except Exception:  # noqa: BLE001 - multiformats raises several kinds for bad input
            raise ObjectError(400, "InvalidCID", f"{cid_text[:100]!r} is not a CID") from None
        if any(seg in ("..", ".") for seg in path.split("/")) or "\x00" in path or len(path) > MAX_URL:
            raise ObjectError(400, "InvalidPath", "invalid path inside the CID")
        canonical = str(cid.set(version=1).encode("base32"))
        return (f"{canonical}/{path}" if path else canonical), path

    async def probe_ipfs(self, key: str) -> Version:
        if not self.config.ipfs_gateways:
            raise ObjectError(503, "NoGateway", "no IPFS gateways are configured ([web] ipfs_gateways)")
        failures = []
        for gateway in self.config.ipfs_gateways:
            url = f"{gateway.rstrip('/')}/ipfs/{key}"
            try:
                response = await self._http.head(url, follow_redirects=True)
            except httpx.TransportError as exc:
                failures.append(f"{gateway}: {type(exc).__name__}")
                continue
            if response.is_success:
                length = response.headers.get("content-length")
                return Version(
                    tag=key, size=int(length) if length and length.isdigit() else None, opener=lambda url=url: self._open(url),
                    headers={"ETag": f'"{key}"', "Cache-Control": "public, max-age=31536000, immutable"},
                    content_type=response.headers.get("content-type", "application/octet-stream"),
                )
            failures.append(f"{gateway}: {response.status_code}")
        if failures and all(f.endswith(": 404") for f in failures):
            raise ObjectError(404, "NotFound", f"no gateway has /ipfs/{key}")
        raise Unreachable("no IPFS gateway answered: " + "; ".join(failures))

    async def fetch_ipfs(self, cid_and_path: str) -> BlobFile:
        key, _ = self.ipfs_key(cid_and_path)
        return await self._ipfs.fetch(self._ipfs_name(key))

    def _ipfs_name(self, key: str) -> ObjectName:
        return ObjectName(key, ReadScope.ipfs(), Origin("ipfs", "gateways"), None, lambda: self.probe_ipfs(key))


def _under(url: str, prefix: str) -> bool:
    """Whether the URL is under the prefix, on a path boundary (…/models does not allow …/models-x)."""
    if not url.startswith(prefix):
        return False
    return prefix.endswith("/") or len(url) == len(prefix) or url[len(prefix)] in "/?"
