"""Which upstream and repository a /v2/ request or an image name means: containerd's ?ns=, a path
prefix, or the default; a registry's aliases (index.docker.io) mean the registry itself.

Every part of the path is checked against the distribution grammar here, before anything else
sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from proxy.config import RegistryConfig
from proxy.sources.oci.errors import DigestInvalid, NameInvalid, NameUnknown, TagInvalid, Unsupported
from proxy.store.digest import Digest, InvalidDigest, UnsupportedDigest
from proxy.store.records import ReadScope

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_NAME = 255
_PATH = re.compile(r"^(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")
_TAGS_LIST = re.compile(r"^(?P<name>.+)/tags/list$")
_UPLOADS = re.compile(r"^.+/blobs/uploads(?:/.*)?$")


class Kind(Enum):
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request: the upstream, the repository as the upstream names it, and what is asked for."""

    registry: RegistryConfig
    repository: str
    kind: Kind
    reference: str  # a tag or a digest string; "" for tags/list
    digest: Digest | None  # set when reference is a digest
    prefix: str  # the path prefix the client used ("" or "ghcr.io/")

    @property
    def scope(self) -> ReadScope:
        """Who may read what this request names: the repository at its upstream."""
        return ReadScope.oci(self.registry.name, self.repository)

    @property
    def tag_key(self) -> str:
        """How the index names this tag: docker.io/library/alpine:3.20."""
        return f"{self.registry.name}/{self.repository}:{self.reference}"


class Router:
    """Maps request paths to targets over the configured registries."""

    def __init__(self, registries: list[RegistryConfig]) -> None:
        # Aliases map to the registry itself, so that scopes, tags and upstream health are keyed by
        # its own name however a client wrote it (settings refuse a name that two registries claim).
        self._by_name = {name: r for r in registries for name in r.names}
        self._default = next((r for r in registries if r.default), None)

    def image(self, text: str) -> Target:
        """An image name as people write it (resource sets, the CLI):
        `[registry/]repository[:tag][@digest]`; a first part that looks like a host (has '.' or ':',
        or is localhost, as Docker reads it) must name a configured registry."""
        name, reference = split_image_reference(text.strip())
        first, sep, _ = name.partition("/")
        if sep and first not in self._by_name and ("." in first or ":" in first or first == "localhost"):
            raise NameUnknown(f"registry {first[:100]!r} is not configured on this mirror")
        return self.route(f"{name}/manifests/{reference}", None)

    def route(self, rest: str, ns: str | None) -> Target:
        """`rest` is the path after /v2/; raises an OciError for anything not a valid pull."""
        if _UPLOADS.match(rest):
            raise Unsupported("pullthrough is a read-only mirror: pushes are not supported")
        if len(rest) > 2 * _MAX_NAME + 200:
            raise NameInvalid("request path too long")
        kind, name, reference = _split(rest)
        registry, repository, prefix = self._registry_for(name, ns)
        digest = None
        if kind is Kind.BLOB or (kind is Kind.MANIFEST and ":" in reference):
            digest = _parse_digest(reference)
        elif kind is Kind.MANIFEST and not _TAG.match(reference):
            raise TagInvalid("invalid tag")
        return Target(registry, repository, kind, reference, digest, prefix)

    def _registry_for(self, name: str, ns: str | None) -> tuple[RegistryConfig, str, str]:
        prefix = ""
        if ns is not None:
            registry = self._by_name.get(ns)
            if registry is None:
                raise NameUnknown(f"registry {ns[:100]!r} is not configured on this mirror")
        else:
            first, sep, remainder = name.partition("/")
            registry = self._by_name.get(first) if sep else None
            if registry is not None:
                name, prefix = remainder, f"{first}/"
            elif self._default is not None:
                registry = self._default
            else:
                raise NameUnknown("no registry named in the path and no default registry configured")
        if len(name) > _MAX_NAME or not _REPOSITORY.match(name):
            raise NameInvalid("invalid repository name")
        if registry.is_docker_hub and "/" not in name:
            name = f"library/{name}"
        return registry, name, prefix


def split_image_reference(image: str) -> tuple[str, str]:
    """docker.io/library/alpine:3.20 -> ("docker.io/library/alpine", "3.20"); a digest is the
    reference when there is one (alpine:3.20@sha256:… -> ("alpine", "sha256:…")); no tag: latest."""
    if "@" in image:
        name, _, digest = image.partition("@")
        if name.rfind(":") > name.rfind("/"):
            name = name[: name.rfind(":")]  # the tag beside a digest only describes it
        return name, digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, "latest"


def _split(rest: str) -> tuple[Kind, str, str]:
    match = _TAGS_LIST.match(rest)
    if match:
        return Kind.TAGS, match.group("name"), ""
    match = _PATH.match(rest)
    if not match:
        raise NameInvalid("not an OCI distribution path: expected <name>/manifests/<ref> or <name>/blobs/<digest>")
    return Kind(match.group("kind")), match.group("name"), match.group("reference")


def _parse_digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except UnsupportedDigest as exc:
        raise DigestInvalid(str(exc)) from None
    except InvalidDigest:
        raise DigestInvalid("invalid digest") from None
