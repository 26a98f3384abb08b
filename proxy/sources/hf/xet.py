"""Native Xet through the mirror ([hf] xet = "native"): the xet-read-token route that hands the
caller the mirror's own CAS, and that CAS: reconstructions and xorb ranges, served from the store.

A reconstruction (the file's terms over xorb chunk ranges) is fetched from the origin's CAS with an
upstream Xet token, kept as a small document under the repo's read scope (immutable per file hash
and range), and served with every fetch URL rewritten to a signed xorb URL of the mirror. A xorb
is fetched whole from the origin once (the store's fill: single flight, fleet-wide), verified
against its Merkle hash as it streams (xetformat.XorbCheck), stored once by its sha256 and named by
its xorb hash; only then are its ranges served, so no unverified byte reaches a client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
import urllib3
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.config import HfConfig
from proxy.http.download import BlobDownload, BlobTransport, TransferFailed
from proxy.sources.hf.access import PUBLIC, AccessGuard
from proxy.sources.hf.errors import HfError, HubUnavailable, NotFound, UpstreamHfError, translate
from proxy.sources.hf.files import hub_origin
from proxy.sources.hf.names import Repo, quote_revision
from proxy.sources.hf.upstream import HubClient
from proxy.sources.hf.xetformat import XET_HASH, XorbCheck
from proxy.sources.hf.xettokens import TOKEN_SECONDS, XORB_URL_SECONDS, XetGrant, XetTokens, XorbGrant
from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.freshness import FOREVER
from proxy.store.fill import Opener
from proxy.store.records import Origin, ReadScope, Reference
from proxy.store.requests import BlobRequest
from proxy.store.small import Document
from proxy.store.store import Store

log = logging.getLogger(__name__)

CAS_PREFIX = "/xet-cas"  # where the mirror's CAS lives, beside the Hub's routes
RECONSTRUCTIONS = "hf-xet-rec"  # small documents: the origin's reconstruction of (file hash, range; "" whole)
XORBS = "hf-xorb"  # references: xorb hash -> the sha256 its bytes are stored by
MARGIN = 30.0  # an upstream token this close to its expiry is fetched again
SERVICE_CALLER = "service"  # the mirror's own grants (prefetch): never handed out; no caller hash is spelled so
_RANGE = re.compile(r"^bytes=(\d{1,20})-(\d{0,20})$")


@dataclass(frozen=True, slots=True)
class _Upstream:
    """The origin CAS and a token of the Hub's for one repo."""

    cas_url: str
    token: str
    expires: float


def caller_hash(token: str | None) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


class XetService:
    def __init__(
        self, config: HfConfig, client: HubClient, store: Store, access: AccessGuard, http: httpx.AsyncClient,
        blobs: BlobTransport, tokens: XetTokens | None = None,
    ) -> None:
        self._config = config
        self._client = client
        self._store = store
        self._access = access
        self._http = http
        self._blobs = blobs
        self._tokens = tokens or XetTokens(config.xet_token_key())
        self._origin = hub_origin(config)
        # Upstream Xet tokens by (repo, caller hash): memory only, never the index (they are credentials).
        self._upstream: dict[tuple[str, str], _Upstream] = {}

    # -- the Hub's route ----------------------------------------------------------------------
    async def read_token(self, repo: Repo, revision: str, request: Request, token: str | None) -> Response:
        """The mirror's CAS URL (as this caller addressed the mirror) and a token bound to the repo,
        after the same access check as resolve."""
        await self._access.check(repo, token, files=True)
        caller = caller_hash(token)
        expires = time.time() + TOKEN_SECONDS
        if await self._access.visibility(repo) != PUBLIC:
            # Gated or private: the Hub's token must come with the caller's credentials, now.
            upstream = await self._fetch_upstream(repo, revision, token)
            self._upstream[(repo.key, caller)] = upstream
            # The access check is trusted for access_ttl, as on resolve: the client refreshes then.
            expires = min(expires, upstream.expires - MARGIN, time.time() + max(self._config.access_ttl, MARGIN))
        grant = XetGrant(repo.type, repo.id, revision, caller, expires)
        cas_url = f"{str(request.base_url).rstrip('/')}{CAS_PREFIX}"
        access = self._tokens.mint(grant)
        headers = {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": access, "X-Xet-Token-Expiration": str(int(expires))}
        return JSONResponse({"casUrl": cas_url, "accessToken": access, "exp": int(expires)}, headers=headers)

    # -- the mirror's CAS ---------------------------------------------------------------------
    async def cas(self, request: Request) -> Response:
        parts = request.url.path[len(CAS_PREFIX):].strip("/").split("/")
        if len(parts) == 3 and parts[1] == "reconstructions" and XET_HASH.match(parts[2]):
            if parts[0] == "v1":
                return await self._reconstruction(parts[2], request)
            if parts[0] == "v2":
                # hf_xet falls back to v1 on 404 and remembers it: one answer format to cache.
                raise NotFound("this mirror answers reconstructions at v1")
        if len(parts) == 2 and parts[0] == "xorbs" and XET_HASH.match(parts[1]):
            return await self._xorb(parts[1], request)
        raise NotFound(f"no route for {request.url.path[:200]}")

    async def _reconstruction(self, file_hash: str, request: Request) -> Response:
        grant = self._tokens.check(_bearer(request))
        file_range = _file_range(request.headers.get("range"))
        data = await self._whole_file(grant, file_hash, file_range, request.method)
        if data is not None:
            file_range = ""
        else:
            data = await self._cached_reconstruction(grant, file_hash, file_range, request.method)
        base = f"{str(request.base_url).rstrip('/')}{CAS_PREFIX}"
        return Response(self._rewrite(data, grant, file_hash, file_range, base), media_type="application/json")

    async def prefetch(self, repo: Repo, commit: str, file_hash: str) -> int:
        """A Xet file's reconstruction and every xorb it names into the cache, with the service
        token (a resource set); the xorbs' count."""
        # Asked of the origin only for what the cache lacks: a prefetch with the Hub away still succeeds.
        grant = XetGrant(repo.type, repo.id, commit, SERVICE_CALLER, time.time() + TOKEN_SECONDS)
        data = await self._cached_reconstruction(grant, file_hash, "", None)
        xorbs = list((json.loads(data).get("fetch_info") or {}))
        for xorb in xorbs:
            if not XET_HASH.match(xorb):
                raise HubUnavailable("the Xet CAS named a xorb by something that is not a Xet hash")
            signed = XorbGrant(grant, file_hash, "", xorb)
            await self._store.fetch(self._xorb_request(signed, await self._stored_as(xorb)))
        return len(xorbs)

    async def _whole_file(self, grant: XetGrant, file_hash: str, file_range: str, method: str | None) -> bytes | None:
        """The reconstruction of the whole file when the range asked starts at 0 and reaches its end
        (hf_xet names the whole file so): one cached answer per file, whatever range spelled it."""
        match = _RANGE.match(file_range)
        if match is None or match.group(1) != "0":
            return None
        data = await self._cached_reconstruction(grant, file_hash, "", method)
        terms = json.loads(data).get("terms") or []
        size = sum(int(t.get("unpacked_length", 0)) for t in terms if isinstance(t, dict))
        if match.group(2) and int(match.group(2)) < size - 1:
            return None
        return data

    async def _cached_reconstruction(self, grant: XetGrant, file_hash: str, file_range: str, method: str | None) -> bytes:
        repo = Repo(grant.repo_type, grant.repo_id)

        async def fetch() -> Document:
            return Document(await self._origin_reconstruction(grant, file_hash, file_range), "application/json")

        item, _ = await self._store.small_objects.document(
            ReadScope.hf(repo.key), self._origin, (RECONSTRUCTIONS, f"{file_hash} {file_range}"), ttl=None,
            fetch=fetch, method=method, translate=translate,
        )
        return item.data

    async def _origin_reconstruction(self, grant: XetGrant, file_hash: str, file_range: str) -> bytes:
        upstream = await self._upstream_for(grant)
        headers = {"Authorization": f"Bearer {upstream.token}"}
        if file_range:
            headers["Range"] = file_range
        try:
            response = await self._http.get(f"{upstream.cas_url.rstrip('/')}/v1/reconstructions/{file_hash}", headers=headers)
        except httpx.TransportError as exc:
            raise HubUnavailable(f"the Xet CAS is unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            if response.status_code >= 500:
                raise HubUnavailable(f"the Xet CAS answered {response.status_code}")
            raise HfError(response.status_code, f"the Xet CAS answered {response.status_code} for {file_hash}")
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("terms"), list):
            raise HubUnavailable("the Xet CAS answered a reconstruction that is not one")
        return response.content

    def _rewrite(self, data: bytes, grant: XetGrant, file_hash: str, file_range: str, base: str) -> bytes:
        """The origin's reconstruction with each fetch URL replaced by a signed xorb URL of the mirror."""
        parsed: dict[str, Any] = json.loads(data)
        expires = time.time() + XORB_URL_SECONDS
        fetch_info = {}
        for xorb, entries in (parsed.get("fetch_info") or {}).items():
            if not XET_HASH.match(xorb):
                raise HubUnavailable("the Xet CAS named a xorb by something that is not a Xet hash")
            signed = self._tokens.sign_xorb(XorbGrant(grant, file_hash, file_range, xorb), expires)
            fetch_info[xorb] = [{**entry, "url": f"{base}/xorbs/{xorb}?sig={signed}"} for entry in entries]
        parsed["fetch_info"] = fetch_info
        return json.dumps(parsed, separators=(",", ":")).encode()

    async def _xorb(self, xorb: str, request: Request) -> Response:
        signed = self._tokens.check_xorb(request.query_params.get("sig"), xorb)
        blob_request = self._xorb_request(signed, await self._stored_as(xorb))
        if request.method == "HEAD":
            # The store's door never fills for a HEAD, and only the whole xorb tells its size: fetch it
            # first (hf_xet never sends one; such a HEAD is counted as a hit).
            blob_request = self._xorb_request(signed, (await self._store.fetch(blob_request)).digest)
        return await self._store.serve(
            blob_request, method=request.method, range_header=request.headers.get("range"),
            headers={"Accept-Ranges": "bytes"}, media_type="application/octet-stream",
        )

    async def _stored_as(self, xorb: str) -> Digest | None:
        """The sha256 a xorb's bytes were stored by, once fetched and verified."""
        known = await self._store.refs.get(XORBS, xorb)
        return Digest.from_hex(known.digest) if known is not None and known.digest else None

    def _xorb_request(self, signed: XorbGrant, digest: Digest | None) -> BlobRequest:
        return xorb_request(self._store, self._origin, signed, lambda: self._open_xorb(signed), digest)

    async def _open_xorb(self, signed: XorbGrant) -> BlobDownload:
        """The whole xorb from the origin: at the URL of the cached reconstruction, or, once that
        URL has expired, at the one of a fresh reconstruction."""
        data = await self._cached_reconstruction(signed.grant, signed.file_hash, signed.file_range, None)
        response = await self._open_url(_xorb_url(data, signed.xorb))
        if 400 <= response.status < 500:
            await self._blobs.drain(response)
            fresh = await self._origin_reconstruction(signed.grant, signed.file_hash, signed.file_range)
            response = await self._open_url(_xorb_url(fresh, signed.xorb))
        if response.status != 200:
            await self._blobs.drain(response)
            raise HubUnavailable(f"the Xet CAS answered {response.status} for xorb {signed.xorb}")
        return BlobDownload(response)

    async def _open_url(self, url: str) -> urllib3.BaseHTTPResponse:
        try:
            return await self._blobs.open(url, None)
        except TransferFailed:
            raise HubUnavailable("the Xet CAS is unreachable") from None

    # -- upstream Xet tokens ----------------------------------------------------------------------
    async def _upstream_for(self, grant: XetGrant) -> _Upstream:
        repo = Repo(grant.repo_type, grant.repo_id)
        known = self._upstream.get((repo.key, grant.caller))
        if known is not None and known.expires - MARGIN > time.time():
            return known
        if grant.caller != SERVICE_CALLER and await self._access.visibility(repo) != PUBLIC:
            # The caller's credentials are not here to ask again: its client refreshes the mirror's token.
            raise HfError(401, "the Xet token expired: ask for a new one")
        upstream = await self._fetch_upstream(repo, grant.revision, self._config.service_token())
        self._upstream[(repo.key, grant.caller)] = upstream
        return upstream

    async def _fetch_upstream(self, repo: Repo, revision: str, token: str | None) -> _Upstream:
        path = f"/api/{repo.api_kind}/{repo.id}/xet-read-token/{quote_revision(revision)}"
        response = await self._client.api("GET", path, token=token)
        if response.status_code != 200:
            raise UpstreamHfError.from_response(response)
        headers = response.headers
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        cas_url = headers.get("x-xet-cas-url") or body.get("casUrl")
        access = headers.get("x-xet-access-token") or body.get("accessToken")
        expires = headers.get("x-xet-token-expiration") or body.get("exp")
        if not cas_url or not access or not str(expires).isdigit() or not str(cas_url).startswith(("http://", "https://")):
            raise HubUnavailable("the Hub's xet-read-token answer lacked the CAS URL, token or expiry")
        return _Upstream(str(cas_url), str(access), float(expires))


def xorb_request(store: Store, origin: Origin, signed: XorbGrant, opener: Opener, digest: Digest | None) -> BlobRequest:
    """A read of one xorb, named by its hash: `digest` is the sha256 its bytes were stored by, when
    the index knows it.

    A miss always fills by the xorb's name, never by that digest: the name is what every request
    for the xorb shares, on this node and on the others. The digest is named (the hf-xorb
    reference) just before the file is committed, so a request that reads the reference in between
    would otherwise start a second fill, under another key and another lease, and fetch the xorb
    from the origin again."""

    async def confirm() -> int | None:
        return None  # the signature is the origin's yes: it named this xorb in this repo's reconstruction

    async def remember(blob: BlobFile) -> None:
        await store.refs.put(Reference(XORBS, signed.xorb, blob.digest.hex, time.time(), FOREVER))

    return BlobRequest(
        scope=ReadScope.hf(Repo(signed.grant.repo_type, signed.grant.repo_id).key),
        origin=origin,
        opener=opener,
        translate=translate,
        digest=digest,
        name=f"{XORBS}:{signed.xorb}",
        confirm=confirm,
        check=XorbCheck(signed.xorb),
        after_commit=remember,
        whole_first=True,  # whole and verified before any range of it is served
    )


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _file_range(header: str | None) -> str:
    """The reconstruction's Range, normalised ("" for the whole file); anything else is refused."""
    if not header:
        return ""
    match = _RANGE.match(header.strip())
    if match is None:
        raise HfError(416, "only one bytes=start-end range is answered")
    return f"bytes={int(match.group(1))}-{match.group(2) and int(match.group(2))}"


def _xorb_url(reconstruction: bytes, xorb: str) -> str:
    entries = (json.loads(reconstruction).get("fetch_info") or {}).get(xorb) or []
    url = entries[0].get("url") if entries and isinstance(entries[0], dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise HubUnavailable(f"the Xet CAS gave no URL for xorb {xorb}")
    return url
