"""Blobs: read through the store's door under the repository's scope; the upstream confirms a blob
for a repository with a HEAD before bytes another repository brought are served under it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.singleflight import SingleFlight
from proxy.sources.oci.errors import API_VERSION_HEADER, translate
from proxy.sources.oci.names import Target
from proxy.sources.oci.upstream import RegistryClient
from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.records import Origin, ReadScope
from proxy.store.requests import BlobRequest
from proxy.store.store import Store

IMMUTABLE = "public, max-age=31536000, immutable"
SOURCE = "oci"


class BlobService:
    """Answers blob GET and HEAD for every configured registry."""

    def __init__(self, store: Store, clients: dict[str, RegistryClient]) -> None:
        self._store = store
        self._clients = clients
        self._confirmations: SingleFlight[int | None] = SingleFlight()

    async def serve(self, target: Target, request: Request) -> Response:
        digest = target.digest
        assert digest is not None
        headers = {**API_VERSION_HEADER, "Docker-Content-Digest": str(digest), "ETag": f'"{digest}"', "Cache-Control": IMMUTABLE}
        return await self._store.serve(
            self._request(target.registry.name, target.repository, digest),
            method=request.method, range_header=request.headers.get("range"), headers=headers,
            media_type="application/octet-stream",
        )

    async def fetch(self, registry: str, repository: str, digest: Digest) -> BlobFile:
        """Make sure the blob is in the cache, readable under the repository (prefetch)."""
        return await self._store.fetch(self._request(registry, repository, digest))

    def _request(self, registry: str, repository: str, digest: Digest) -> BlobRequest:
        client = self._clients[registry]
        return BlobRequest(
            scope=ReadScope.oci(registry, repository),
            origin=Origin(SOURCE, registry),
            opener=lambda: client.open_blob(repository, str(digest)),
            translate=translate,
            digest=digest,
            confirm=lambda: self._confirm(client, repository, digest),
        )

    async def _confirm(self, client: RegistryClient, repository: str, digest: Digest) -> int | None:
        """The upstream's HEAD of the blob in this repository (as distribution links blobs per
        repository): its size, or the upstream's refusal raised. One HEAD for concurrent asks."""

        async def head() -> int | None:
            response = await client.head_blob(repository, str(digest))
            length = response.headers.get("content-length", "")
            return int(length) if length.isdigit() else None

        return await self._confirmations.run((client.registry.name, repository, str(digest)), head)
