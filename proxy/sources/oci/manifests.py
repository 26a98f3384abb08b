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

from proxy.sources.oci.errors import ManifestInvalid, TooManyRequests, UpstreamUnavailable
from proxy.sources.oci.names import Target
from proxy.singleflight import SingleFlight
from proxy.sources.oci.upstream import RegistryClient
from proxy.stats import Traffic
from proxy.store.cache import BlobCache, SmallObject
from proxy.store.fill import Origin
from proxy.store.digest import Digest, InvalidDigest, UnsupportedDigest
from proxy.store.index import Reference

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# What the mirror asks for when it fetches for its own cache: every current type, so that the
# upstream answers with the representation it stores (never a down-conversion).
ALL_MANIFEST_TYPES = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
SOURCE = "oci"
Answer = tuple[SmallObject, bool]  # the manifest, and whether it had to be fetched from upstream


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

    def __init__(self, cache: BlobCache, clients: dict[str, RegistryClient], traffic: Traffic) -> None:
        self._cache = cache
        self._clients = clients
        self._traffic = traffic
        # Concurrent cold pulls of one tag or digest cost one upstream round, not one per client.
        self._flights: SingleFlight[Answer] = SingleFlight()

    async def get(self, target: Target, accept: list[str]) -> SmallObject:
        """The manifest, counted as a hit when its bytes came from the cache."""
        if target.digest is not None:
            item, fetched = await self._by_digest(target, target.digest, accept)
        else:
            item, fetched = await self._by_tag(target, accept)
        origin = Origin(SOURCE, target.registry.name)
        if fetched:
            self._traffic.miss(origin, target.repository)
        else:
            self._traffic.hit(origin, len(item.data), target.repository)
        return item

    async def _by_digest(self, target: Target, digest: Digest, accept: list[str]) -> Answer:
        item = await self._cache.get_small(digest)
        if item is not None:
            return item, False
        return await self._flights.run(("digest", str(digest)), lambda: self._fetch_digest(target, digest, accept))

    async def _fetch_digest(self, target: Target, digest: Digest, accept: list[str]) -> Answer:
        client = self._clients[target.registry.name]
        response = await client.get_manifest(target.repository, str(digest), _upstream_accept(accept))
        return await self._store_verified(response, digest, target.registry.name), True

    async def _by_tag(self, target: Target, accept: list[str]) -> Answer:
        ref = await self._cache.get_reference(SOURCE, target.tag_key)
        cached = await self._cached(ref, accept)
        if cached is not None and ref is not None and ref.is_fresh():
            return cached, False
        try:
            return await self._flights.run(
                ("tag", target.tag_key, tuple(accept)), lambda: self._revalidate(target, accept)
            )
        except (UpstreamUnavailable, TooManyRequests) as exc:
            if cached is None:
                raise
            log.warning("serving %s stale at %s: %s", target.tag_key, cached.digest, exc.message)
            return cached, False

    async def _cached(self, ref: Reference | None, accept: list[str]) -> SmallObject | None:
        if ref is None:
            return None
        item = await self._cache.get_small(Digest.parse(ref.digest))
        return item if item is not None and accepts(accept, item.media_type) else None

    async def _revalidate(self, target: Target, accept: list[str]) -> Answer:
        client = self._clients[target.registry.name]
        head = await client.head_manifest(target.repository, target.reference, ALL_MANIFEST_TYPES)
        digest = _header_digest(head)
        media_type = head.headers.get("content-type", "").split(";", 1)[0].strip() or None
        if digest is not None and accepts(accept, media_type):
            item = await self._cache.get_small(digest)
            fetched = item is None
            if item is None:
                response = await client.get_manifest(target.repository, str(digest), ALL_MANIFEST_TYPES)
                item = await self._store_verified(response, digest, target.registry.name)
            await self._remember_tag(target, item, head)
            return item, fetched
        # The client wants another representation than the registry's own (an old client that
        # takes no index): ask with its Accept and keep the answer by digest only, not as the tag.
        response = await client.get_manifest(target.repository, target.reference, accept)
        digest = _header_digest(response) or Digest.from_hex(hashlib.sha256(response.content).hexdigest())
        return await self._store_verified(response, digest, target.registry.name), True

    async def _store_verified(self, response: httpx.Response, digest: Digest, upstream: str) -> SmallObject:
        data = response.content
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestInvalid(f"upstream manifest {digest} is larger than {MAX_MANIFEST_BYTES} bytes")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hex:
            log.warning("upstream sent a manifest for %s that hashes to sha256:%s", digest, actual)
            raise ManifestInvalid(f"upstream sent bytes that do not match {digest}")
        origin = Origin(SOURCE, upstream)
        self._traffic.fetched(origin, len(data))
        return await self._cache.put_small(data, digest, _media_type(response, data), origin)

    async def _remember_tag(self, target: Target, item: SmallObject, head: httpx.Response) -> None:
        now = time.time()
        validators = {k: head.headers[k] for k in ("docker-content-digest", "etag") if k in head.headers}
        await self._cache.put_reference(
            Reference(
                source=SOURCE,
                key=target.tag_key,
                digest=str(item.digest),
                fetched_at=now,
                expires_at=now + target.registry.tag_ttl,
                validators=validators,
                meta={"media_type": item.media_type},
            )
        )


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

