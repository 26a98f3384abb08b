"""The /v2/ endpoints: parse, dispatch to manifests, blobs, tags or referrers, and word every error as OCI JSON."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from proxy.config import Settings
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.sources.oci.blobs import BlobService
from proxy.http.paths import UnsafePath, decode_segments, raw_segments_after
from proxy.sources.oci.errors import API_VERSION_HEADER, NameInvalid, OciError, Unsupported
from proxy.sources.oci.hot import HotManifests
from proxy.sources.oci.manifests import ALL_MANIFEST_TYPES, DOCKER_LIST, OCI_INDEX, SOURCE, ManifestService, parse_accept
from proxy.sources.oci.names import Kind, Router, Target, split_image_reference
from proxy.sources.oci.referrers import ReferrersService, is_referrers_path, referrers_target
from proxy.sources.oci.upstream import BlobTransport, RegistryClient
from proxy.store.digest import Digest
from proxy.sources.source import ttl_rule
from proxy.store.janitor import TtlRule
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth

log = logging.getLogger(__name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class OciMirror:
    """A registry mirror over every configured upstream registry."""

    name = "oci"
    resource_kinds: tuple[ResourceKind, ...] = ("image",)
    expiring_references: tuple[str, ...] = ()

    def __init__(
        self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
    ) -> None:
        self.router = Router(settings.registries)
        self.clients = {r.name: RegistryClient(r, http, blobs, health) for r in settings.registries}
        self.manifests = ManifestService(store, self.clients)
        self.blobs = BlobService(store, self.clients)
        self.referrers = ReferrersService(store, self.clients)
        self.hot = HotManifests(store.small_objects)  # answers repeated manifest GETs before routing (hot.py)

    @staticmethod
    def purge_rules(settings: Settings) -> list[TtlRule]:
        return [rule for r in settings.registries for rule in ttl_rule(settings, SOURCE, r.name, r.ttl, r.ttl_from)]

    async def aclose(self) -> None:
        pass

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        """An image as an OCI layout's blobs: the manifests for `platforms`, their configs and layers."""
        blobs = await self.prefetch_image(resource.image, platforms)
        files = [FetchedFile(f"blobs/sha256/{d.split(':', 1)[1]}", d, size) for d, size in blobs]
        return Fetched(resource, files, layout="oci")

    async def prefetch_image(self, image: str, platforms: Sequence[str]) -> list[tuple[str, int]]:
        """Fetch an image (the manifests for `platforms` of a multi-arch one, their configs and
        layers) into the cache; (digest, size) of everything it consists of."""
        name, _ = split_image_reference(image)
        target = self.router.image(image)
        top = await self.manifests.get(target, ALL_MANIFEST_TYPES, method=None)
        fetched = [(str(top.digest), len(top.data))]
        manifests = [top]
        document = json.loads(top.data)
        if top.media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in document:
            manifests = []
            for entry in document.get("manifests", []):
                platform = entry.get("platform", {})
                label = "/".join(p for p in (platform.get("os"), platform.get("architecture"), platform.get("variant")) if p)
                if any(label == wanted or label.startswith(wanted + "/") for wanted in platforms):
                    child = self.router.image(f"{name}@{entry['digest']}")
                    item = await self.manifests.get(child, ALL_MANIFEST_TYPES, method=None)
                    fetched.append((str(item.digest), len(item.data)))
                    manifests.append(item)
        for item in manifests:
            document = json.loads(item.data)
            for descriptor in [document.get("config", {}), *document.get("layers", [])]:
                if descriptor.get("digest"):
                    digest = Digest.parse(descriptor["digest"])
                    blob = await self.blobs.fetch(target.registry.name, target.repository, digest)
                    fetched.append((str(digest), blob.size))
        return fetched

    def ratelimits(self) -> dict[str, str]:
        """Each upstream's last `ratelimit-remaining`, where it sent one."""
        return {name: c.ratelimit_remaining for name, c in self.clients.items() if c.ratelimit_remaining is not None}

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v2", self.ping, methods=ALL_METHODS),
            Route("/v2/", self.ping, methods=ALL_METHODS),
            Route("/v2/{rest:path}", self.dispatch, methods=ALL_METHODS),
        ]

    async def ping(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Unsupported("pullthrough is a read-only mirror").response()
        return Response(b"{}", media_type="application/json", headers=API_VERSION_HEADER)

    async def dispatch(self, request: Request) -> Response:
        try:
            if request.method not in ("GET", "HEAD"):
                raise Unsupported("pullthrough is a read-only mirror: pushes and deletes are not supported")
            path, ns = _checked_path(request), request.query_params.get("ns")
            if is_referrers_path(path):
                return await self.referrers.serve(referrers_target(self.router, path, ns), request)
            target = self.router.route(path, ns)
            if target.kind is Kind.BLOB:
                return await self.blobs.serve(target, request)
            if target.kind is Kind.MANIFEST:
                return await self._manifest(target, request)
            return await self._tags(target, request)
        except OciError as exc:
            return exc.response()
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return OciError("internal error in the mirror").response()

    async def _manifest(self, target: Target, request: Request) -> Response:
        item = await self.manifests.get(target, parse_accept(request.headers.getlist("accept")), method=request.method)
        etag = f'"{item.digest}"'
        headers = {
            **API_VERSION_HEADER,
            "Docker-Content-Digest": str(item.digest),
            "ETag": etag,
            "Content-Length": str(len(item.data)),
        }
        if_none_match = request.headers.get("if-none-match", "")
        if etag in if_none_match or str(item.digest) in if_none_match:
            return Response(status_code=304, headers={k: v for k, v in headers.items() if k != "Content-Length"})
        body = b"" if request.method == "HEAD" else item.data
        response = Response(body, headers=headers, media_type=item.media_type or "application/json")
        if target.digest is not None and request.method == "GET":
            self.hot.remember(request.scope, target.scope, ManifestService.origin(target), item.digest, response.raw_headers)
        return response

    async def _tags(self, target: Target, request: Request) -> Response:
        params = {k: v for k, v in request.query_params.items() if k in ("n", "last")}
        upstream = await self.clients[target.registry.name].get_tags(target.repository, params)
        headers = dict(API_VERSION_HEADER)
        link = upstream.headers.get("link")
        if link:
            # Keep pagination inside the mirror: the upstream's link names its own path.
            headers["Link"] = re.sub(r"<(?:https?://[^/>]+)?/v2/", f"<{_mirror_v2(target)}", link, count=1)
        body = b"" if request.method == "HEAD" else upstream.content
        return Response(body, headers=headers, media_type=upstream.headers.get("content-type", "application/json"))


def _checked_path(request: Request) -> str:
    """The path after /v2/, each segment decoded once and checked (proxy/http/paths.py)."""
    try:
        return "/".join(decode_segments(raw_segments_after(request.scope, "/v2/")))
    except UnsafePath as exc:
        raise NameInvalid(str(exc)) from None


def _mirror_v2(target: Target) -> str:
    return f"/v2/{target.prefix}"
