"""Manifests: stored byte-exact by digest, tags resolved through a cached reference.

Inside a tag's TTL a pull by tag costs no upstream request; after it, one HEAD (free on Docker
Hub) tells whether the digest moved. When the upstream is down or rate-limits, the last known
digest is served, stale, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import httpx

from proxy.sources.oci.errors import ManifestInvalid, translate
from proxy.sources.oci.names import Target
from proxy.sources.oci.upstream import RegistryClient
from proxy.store.digest import Digest, InvalidDigest, UnsupportedDigest
from proxy.store.freshness import Found
from proxy.store.memo import Lru, SmallObject
from proxy.store.records import Origin, ReadScope
from proxy.store.requests import SmallRequest
from proxy.store.store import Store

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# What the mirror asks for when it fetches for its own cache: every current type, so that the
# upstream answers with the representation it stores (never a down-conversion).
ALL_MANIFEST_TYPES = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
LINK_AGAIN_SECONDS = 3600.0
SOURCE = "oci"


def parse_accept(values: list[str]) -> list[str]:
    """Media types from one or several Accept header lines, without parameters."""
    types = []
    for value in values:
        for part in value.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type:
                types.append(media_type)
    return types


def accepts(accepted: list[str], media_type: str | None) -> bool:
    if not accepted or "*/*" in accepted or media_type is None:
        return True
    return media_type in accepted


def _media_type(response: httpx.Response, data: bytes) -> str | None:
    header = response.headers.get("content-type", "").split(";", 1)[0].strip()
    if header and header not in ("application/json", "application/octet-stream", "text/plain"):
        return header
    return declared_media_type(data) or header or None


def declared_media_type(data: bytes) -> str | None:
    """The `mediaType` a manifest declares in its own JSON, if any."""
    try:
        declared = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return None
    return declared if isinstance(declared, str) else None


class ManifestService:
    """Answers manifest requests for every configured registry."""

    def __init__(self, store: Store, clients: dict[str, RegistryClient]) -> None:
        self._store = store
        self._clients = clients
        self._linked: Lru[tuple[ReadScope, Digest], float] = Lru(100_000)

    async def get(self, target: Target, accept: list[str], method: str | None) -> SmallObject:
        """The manifest for this caller (counted by the store unless `method` is None: a prefetch).

        What a manifest of a repository lists (layers, config, child manifests) is linked to that
        repository, as distribution links blobs per repository: pulls of its blobs need no HEAD."""
        scope = target.scope
        if target.digest is not None:
            item = await self._by_digest(target, scope, target.digest, accept, method)
        else:
            item = await self._by_tag(target, scope, accept, method)
        await self._link_contents(scope, item)
        return item

    async def _by_digest(self, target: Target, scope: ReadScope, digest: Digest, accept: list[str], method: str | None) -> SmallObject:
        client = self._clients[target.registry.name]

        async def confirm() -> int | None:
            await client.head_manifest(target.repository, str(digest), _upstream_accept(accept))
            return None

        return await self._store.small_objects.read(
            SmallRequest(
                scope, self.origin(target), digest,
                fetch=lambda: self._fetch(target, str(digest), _upstream_accept(accept)),
                translate=translate, confirm=confirm,
            ),
            method=method,
        )

    async def _by_tag(self, target: Target, scope: ReadScope, accept: list[str], method: str | None) -> SmallObject:
        resolved = await self._store.freshness.resolve(
            SOURCE, target.tag_key, ttl=target.registry.tag_ttl, revalidate=lambda _previous: self._head_tag(target)
        )
        ref = resolved.ref
        if ref.digest and accepts(accept, ref.meta.get("media_type")):
            digest = Digest.parse(ref.digest)
            await self._store.admit(scope, [digest])  # the tag's HEAD in this repository named it
            return await self._by_digest(target, scope, digest, accept, method)
        # The registry named no digest, or the client wants another representation than the
        # registry's own (an old client that takes no index): ask with its Accept and keep the
        # answer by digest only, not as the tag.
        response = await self._clients[target.registry.name].get_manifest(target.repository, target.reference, accept)
        data = checked_size(response.content)
        digest = _header_digest(response) or Digest.from_hex(hashlib.sha256(data).hexdigest())

        async def fetched() -> tuple[bytes, str | None]:
            return data, _media_type(response, data)

        return await self._store.small_objects.read(
            SmallRequest(scope, self.origin(target), digest, fetch=fetched, translate=translate), method=method
        )

    async def _head_tag(self, target: Target) -> Found:
        head = await self._clients[target.registry.name].head_manifest(target.repository, target.reference, ALL_MANIFEST_TYPES)
        digest = _header_digest(head)
        validators = {k: head.headers[k] for k in ("docker-content-digest", "etag") if k in head.headers}
        media_type = head.headers.get("content-type", "").split(";", 1)[0].strip() or None
        return Found(str(digest) if digest else "", validators, {"media_type": media_type})

    async def _fetch(self, target: Target, reference: str, accept: list[str]) -> tuple[bytes, str | None]:
        response = await self._clients[target.registry.name].get_manifest(target.repository, reference, accept)
        data = checked_size(response.content)
        return data, _media_type(response, data)

    async def _link_contents(self, scope: ReadScope, item: SmallObject) -> None:
        # Once an hour per (repository, manifest) at most: the janitor forgets admissions of
        # layers nobody pulled within a day, and a pull after that links them again.
        linked_at = self._linked.get((scope, item.digest))
        if linked_at is not None and time.monotonic() - linked_at < LINK_AGAIN_SECONDS:
            return
        await self._store.admit(scope, referenced_digests(item.data))
        self._linked.put((scope, item.digest), time.monotonic())

    @staticmethod
    def origin(target: Target) -> Origin:
        return Origin(SOURCE, target.registry.name)


def referenced_digests(data: bytes) -> list[Digest]:
    """The sha256 digests a manifest or index lists: config, layers, blobs, child manifests, subject."""
    try:
        document = json.loads(data)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    descriptors: list[object] = [document.get("config"), document.get("subject")]
    for field in ("layers", "blobs", "manifests"):
        listed = document.get(field)
        if isinstance(listed, list):
            descriptors += listed
    found = []
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                found.append(Digest.parse(descriptor["digest"]))
            except (InvalidDigest, UnsupportedDigest):
                continue
    return found


def checked_size(data: bytes) -> bytes:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"upstream manifest or referrers list is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def _header_digest(response: httpx.Response) -> Digest | None:
    value = response.headers.get("docker-content-digest")
    if not value:
        return None
    try:
        return Digest.parse(value)
    except (InvalidDigest, UnsupportedDigest):
        return None


def _upstream_accept(accept: list[str]) -> list[str]:
    return list(dict.fromkeys([*accept, *ALL_MANIFEST_TYPES])) if accept and "*/*" not in accept else ALL_MANIFEST_TYPES

