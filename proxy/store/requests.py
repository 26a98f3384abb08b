"""What a route hands the store's door: the key, the caller's read scope, how to fetch the bytes
upstream, how the upstream confirms a scope without sending bytes, and how to word a failure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.store.digest import Digest
from proxy.store.fill import AfterCommit, Opener
from proxy.store.records import Origin, ReadScope
from proxy.store.transfer import ContentCheck

# The upstream's cheap "yes, this scope may read it" (an OCI HEAD in the repository, or metadata the
# Hub gave for this repo): returns the size, or raises the upstream's refusal.
Confirm = Callable[[], Awaitable[int | None]]
# The source's error translation: any failure the store surfaces becomes the protocol's own error.
Translate = Callable[[BaseException], Exception]


class FetchFailed(Exception):
    """The store could not produce the bytes (a broken or mismatching transfer); never a client error."""


@dataclass(frozen=True)
class BlobRequest:
    """A read of blob bytes for one caller.

    `digest` names content-addressed bytes (OCI blobs, LFS files), or the digest a cached object's
    name pointed at last. `name` is the fill key of bytes whose digest is not known beforehand (an
    S3 object's version, a web URL's): when it is set, a miss fills by name and the digest is what
    the bytes hash to. A request by name with a known digest and a `confirm` (a Xet xorb, whose
    bytes are stored by sha256 and shared across repos) reads the committed blob under a new scope
    once `confirm` says yes; one without `confirm` lets the fill by name ask the upstream.
    """

    scope: ReadScope
    origin: Origin
    opener: Opener
    translate: Translate
    digest: Digest | None = None
    name: str | None = None
    size: int | None = None  # as the upstream announced it: a HEAD answers with it on a miss
    confirm: Confirm | None = None
    check: ContentCheck | None = None
    after_commit: AfterCommit | None = None
    # Served only once fetched whole and verified: bytes whose check holds only for the whole (a
    # xorb's Merkle hash), where a range could otherwise reach the client before the check has run.
    whole_first: bool = False

    def __post_init__(self) -> None:
        if self.digest is None and self.name is None:
            raise ValueError("a blob request names a digest or a fill key")

    @property
    def fill_key(self) -> str:
        return self.name if self.name is not None else str(self.digest)

    @property
    def fill_digest(self) -> Digest | None:
        """What the fill verifies against: nothing for a fill by name (the bytes decide)."""
        return None if self.name is not None else self.digest


Fetch = Callable[[], Awaitable[tuple[bytes, str | None]]]


@dataclass(frozen=True)
class SmallRequest:
    """A read of a small content-addressed object held whole in memory (a manifest).

    `fetch` returns the upstream's bytes and media type; the store checks them against `digest`."""

    scope: ReadScope
    origin: Origin
    digest: Digest
    fetch: Fetch
    translate: Translate
    confirm: Confirm | None = None
