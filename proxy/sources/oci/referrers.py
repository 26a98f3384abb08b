"""OCI 1.1 referrers: `GET /v2/<name>/referrers/<digest>`, the artifacts (signatures, SBOMs, model
weights) whose `subject` is a manifest, as an image index cached per repository for `referrers_ttl`.

The cached answer is the whole, unfiltered list (every page the upstream sent, merged): one upstream
request per subject and TTL answers every `artifactType` filter, and the mirror applies the filter
itself, so `OCI-Filters-Applied: artifactType` is always true. An upstream without the referrers API
(distribution 2.8 answers 404) is read through the spec's fallback, the tag `sha256-<hex>` whose
index lists the referrers that clients pushed there; no such tag is an empty list, as a registry
with the API answers for a subject nobody refers to.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response

from proxy.sources.oci.errors import API_VERSION_HEADER, DigestInvalid, ManifestInvalid, ManifestUnknown, OciError, translate
from proxy.sources.oci.manifests import OCI_INDEX, ManifestService, checked_size, declared_media_type
from proxy.sources.oci.names import Router, Target
from proxy.sources.oci.upstream import RegistryClient
from proxy.store.small import Document
from proxy.store.store import Store

REFERRERS = "oci-referrers"  # the references' source: keys are <registry>/<repository>@<digest>
FILTERS_APPLIED = "OCI-Filters-Applied"
MAX_PAGES = 64
_PATH = re.compile(r"^(?P<name>.+)/referrers/(?P<digest>[^/]+)$")
# What an upstream without the API may answer instead of a list: crane falls back on 400, 404 and
# 406 as well; 405 and UNSUPPORTED are what registries that route the path but refuse it send.
_NO_API_STATUSES = frozenset({400, 404, 405, 406})


class NoReferrersApi(Exception):
    """The upstream does not implement GET /v2/<name>/referrers/<digest>."""


def is_referrers_path(rest: str) -> bool:
    return _PATH.match(rest) is not None


def referrers_target(router: Router, rest: str, ns: str | None) -> Target:
    """The repository and subject digest of `<name>/referrers/<digest>`, checked as a manifest by
    digest is (the router owns the name grammar and the registry prefixes)."""
    match = _PATH.match(rest)
    if match is None or ":" not in match.group("digest"):
        raise DigestInvalid("invalid digest")
    return router.route(f"{match.group('name')}/manifests/{match.group('digest')}", ns)


class ReferrersService:
    """Answers referrers requests for every configured registry."""

    def __init__(self, store: Store, clients: dict[str, RegistryClient]) -> None:
        self._store = store
        self._clients = clients

    async def serve(self, target: Target, request: Request) -> Response:
        assert target.digest is not None
        item, _ = await self._store.small_objects.document(
            target.scope, ManifestService.origin(target), (REFERRERS, f"{target.registry.name}/{target.repository}@{target.digest}"),
            ttl=target.registry.referrers_ttl, fetch=lambda: self._fetch(target), method=request.method, translate=translate,
        )
        data, headers = item.data, dict(API_VERSION_HEADER)
        wanted = request.query_params.getlist("artifactType")
        if wanted:
            data = filtered(data, wanted)
            headers[FILTERS_APPLIED] = "artifactType"
        headers["Content-Length"] = str(len(data))
        return Response(b"" if request.method == "HEAD" else data, headers=headers, media_type=OCI_INDEX)

    async def _fetch(self, target: Target) -> Document:
        client = self._clients[target.registry.name]
        try:
            return Document(await self._from_api(client, target), OCI_INDEX)
        except NoReferrersApi:
            return Document(await self._from_tag_schema(client, target), OCI_INDEX)

    async def _from_api(self, client: RegistryClient, target: Target) -> bytes:
        """The upstream's list, byte-exact when it came in one page; pages merged otherwise."""
        pages: list[bytes] = []
        params: dict[str, str] = {}
        while True:
            response = await self._page(client, target, params)
            pages.append(response.content)
            following = response.links.get("next", {}).get("url")
            if not following:
                break
            if len(pages) >= MAX_PAGES:
                raise ManifestInvalid(f"{target.registry.name} lists referrers on more than {MAX_PAGES} pages")
            params = _next_page(following, target)
        if len(pages) == 1:
            _entries(pages[0], target)  # checked: only an index is cached
            return checked_size(pages[0])
        document = json.loads(pages[0])
        document["manifests"] = [entry for page in pages for entry in _entries(page, target)]
        return checked_size(json.dumps(document, separators=(",", ":")).encode())

    async def _page(self, client: RegistryClient, target: Target, params: dict[str, str]) -> httpx.Response:
        try:
            response = await client.get_referrers(target.repository, str(target.digest), [OCI_INDEX], params)
        except OciError as exc:
            if self._store.freshness.offline or exc.code == "NAME_UNKNOWN":
                raise  # the refusal to ask, or an unknown repository, is the answer
            if exc.status in _NO_API_STATUSES or exc.code == "UNSUPPORTED":
                raise NoReferrersApi() from None
            raise
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip()
        if OCI_INDEX not in (content_type, declared_media_type(response.content)):
            raise NoReferrersApi()  # a catch-all page, not a referrers list (crane falls back too)
        return response

    async def _from_tag_schema(self, client: RegistryClient, target: Target) -> bytes:
        """The index clients keep at the tag `<alg>-<hex>` for a registry without the API."""
        assert target.digest is not None
        tag = f"{target.digest.algorithm}-{target.digest.hex}"  # sha256 only: no truncation applies
        try:
            response = await client.get_manifest(target.repository, tag, [OCI_INDEX])
            listed = _entries(checked_size(response.content), target)
        except ManifestUnknown:
            listed = []
        return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}, separators=(",", ":")).encode()


def filtered(data: bytes, artifact_types: list[str]) -> bytes:
    """The index with only the referrers of these artifact types (the cached list is whole)."""
    document = json.loads(data)
    document["manifests"] = [e for e in document["manifests"] if isinstance(e, dict) and e.get("artifactType") in artifact_types]
    return json.dumps(document, separators=(",", ":")).encode()


def _entries(data: bytes, target: Target) -> list[object]:
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    listed = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise ManifestInvalid(f"{target.registry.name} sent a referrers list that is not an image index")
    return listed


def _next_page(link: str, target: Target) -> dict[str, str]:
    """The query of the upstream's next page, which must be this subject's list again: a Link never
    sends the mirror (and the registry's credentials) elsewhere."""
    parts = urlsplit(link)
    if unquote(parts.path) != f"/v2/{target.repository}/referrers/{target.digest}" or (
        parts.netloc and parts.netloc != urlsplit(target.registry.base_url).netloc
    ):
        raise ManifestInvalid(f"{target.registry.name} links the next page of referrers elsewhere")
    return dict(parse_qsl(parts.query))

