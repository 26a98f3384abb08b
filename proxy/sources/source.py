"""What every source offers (its routes, how it prefetches a resource, its purge rules), and the
collection of the configured ones that the application, the CLI and the resource sets use.

A source is one folder under proxy/sources/ with one class that satisfies `Source`: adding a
source is a change in that folder and one line in `source_classes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import httpx
from starlette.routing import BaseRoute

from proxy.config import Settings, TtlFrom
from proxy.http.download import BlobTransport
from proxy.resources import Fetched, Resource, ResourceError, ResourceKind
from proxy.store.janitor import TtlRule
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth


class Source(Protocol):
    name: str
    resource_kinds: tuple[ResourceKind, ...]  # which resource strings it prefetches
    expiring_references: tuple[str, ...]  # reference namespaces the janitor removes once expired

    def __init__(
        self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
    ) -> None: ...

    def routes(self) -> list[BaseRoute]: ...

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        """The resource into the cache, as a client's request would fetch it."""
        ...

    @staticmethod
    def purge_rules(settings: Settings) -> list[TtlRule]:
        """How long this source's blobs stay unused before the janitor removes them."""
        ...

    async def aclose(self) -> None: ...


class Sources:
    """The configured sources, in route order: the Hub's routes live at the root, so it comes last."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self._sources = list(sources)

    def __iter__(self) -> Iterator[Source]:
        return iter(self._sources)

    def named(self, name: str) -> Source:
        return next(s for s in self._sources if s.name == name)

    def routes(self) -> list[BaseRoute]:
        return [route for source in self._sources for route in source.routes()]

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        for source in self._sources:
            if resource.kind in source.resource_kinds:
                return await source.prefetch(resource, platforms)
        raise ResourceError(f"{resource.text}: no configured source fetches {resource.kind} resources")

    async def aclose(self) -> None:
        for source in self._sources:
            await source.aclose()


def source_classes() -> list[type[Source]]:
    """Every kind of source, in route order (imported here, when first needed)."""
    from proxy.sources.hf.routes import HfMirror
    from proxy.sources.oci.routes import OciMirror
    from proxy.sources.s3.routes import S3Mirror
    from proxy.sources.web.routes import WebMirror

    return [OciMirror, S3Mirror, WebMirror, HfMirror]


def purge_rules(settings: Settings) -> list[TtlRule]:
    """Every source's purge rules, from the settings alone (`pullthrough purge` runs no source)."""
    return [rule for cls in source_classes() for rule in cls.purge_rules(settings)]


def ttl_rule(settings: Settings, source: str, upstream: str | None, ttl: float | None, ttl_from: TtlFrom | None) -> list[TtlRule]:
    """The rule for a source's (or registry's) own `ttl` or `ttl_from`, each defaulting to the
    top-level one; none when it sets neither (the default rule covers it)."""
    if ttl is None and ttl_from is None:
        return []
    return [TtlRule(source, upstream, settings.default_ttl if ttl is None else ttl, ttl_from or settings.ttl_from)]


def expiring_references() -> tuple[str, ...]:
    return tuple(name for cls in source_classes() for name in cls.expiring_references)


def build_sources(
    settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
) -> Sources:
    return Sources([cls(settings, store, http, blobs, health) for cls in source_classes()])
