"""What a resource string names, parsed once for the CLI and the resource sets alike:
`docker.io/library/alpine:3.20` (an image), `hf://[datasets/]org/name[@revision]`,
`s3://bucket/key-or-prefix[/]`, `ipfs://cid[/path]`, `https://…` (a URL under `[web] allow`).
An image keeps its name as written (`registry.hub.docker.com/nosana/frpc:0.1.0`); the OCI source
reads the registry and its aliases out of it (proxy/sources/oci/names.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ResourceKind = Literal["image", "hf", "s3", "ipfs", "https"]
_HF_KINDS = {"datasets": "dataset", "spaces": "space", "models": "model"}


class ResourceError(ValueError):
    """A resource string that names nothing pullthrough can fetch, worded for one line."""


@dataclass(frozen=True)
class Resource:
    kind: ResourceKind
    text: str  # as the listing shows it
    image: str = ""  # image: the reference as written (registry/name:tag or @digest)
    repo_type: str = "model"  # hf
    repo_id: str = ""  # hf
    revision: str = "main"  # hf
    url: str = ""  # s3 and https: the URL; ipfs: cid[/path]

    @property
    def file_name(self) -> str:
        """The last part of the URL, for a resource that is a single file."""
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "index"


@dataclass(frozen=True)
class FetchedFile:
    """One file of a resource in the cache: its path inside the resource, digest and size."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class Fetched:
    """A resource in the cache: its files; an image lays out as an OCI image layout."""

    resource: Resource
    files: list[FetchedFile]
    layout: Literal["files", "oci"] = "files"

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def parse_resource(text: str) -> Resource:
    """The resource a string names; ResourceError for anything else."""
    text = text.strip()
    if not text or len(text) > 4096 or any(ord(c) < 0x20 for c in text):
        raise ResourceError(f"{text[:80]!r} is not a resource")
    if text.startswith("hf://"):
        return _hf(text)
    if text.startswith("s3://"):
        bucket = text.removeprefix("s3://").split("/", 1)[0]
        if not bucket:
            raise ResourceError(f"{text}: no bucket (s3://bucket/key or s3://bucket/prefix/)")
        return Resource("s3", text, url=text)
    if text.startswith("ipfs://"):
        cid_path = text.removeprefix("ipfs://")
        if not cid_path.split("/", 1)[0]:
            raise ResourceError(f"{text}: no CID (ipfs://cid[/path])")
        return Resource("ipfs", text, url=cid_path)
    if text.startswith(("https://", "http://")):
        return Resource("https", text, url=text)
    if "://" in text:
        raise ResourceError(f"{text}: unknown scheme (use an image reference, hf://, s3://, ipfs:// or https://)")
    return Resource("image", text, image=text)


def _hf(text: str) -> Resource:
    spec = text.removeprefix("hf://")
    repo_type = "model"
    first, _, rest = spec.partition("/")
    if first in _HF_KINDS and rest:
        repo_type, spec = _HF_KINDS[first], rest
    repo_id, _, revision = spec.partition("@")
    if not repo_id:
        raise ResourceError(f"{text}: no repository (hf://org/name[@revision])")
    return Resource("hf", text, repo_type=repo_type, repo_id=repo_id, revision=revision or "main")
