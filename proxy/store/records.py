"""Values that cross the store's boundary: who fetched bytes, who may read them, and the rows the
index hands back. Plain frozen dataclasses; nothing here does I/O.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_SCOPE = 512


@dataclass(frozen=True, slots=True)
class Origin:
    """Where bytes come from: the source kind (oci, hf, …) and the upstream (docker.io, …)."""

    source: str
    upstream: str


@dataclass(frozen=True, slots=True)
class ReadScope:
    """Who may read a cached blob: `oci:<registry>/<repository>`, `hf:<repo>`, `s3:<bucket>`,
    `web:<allowed prefix>` or `ipfs`.

    A blob is stored once, and beside it the scopes that admitted it. It is served from the cache
    only under one of those; under any other scope the request is cold and the upstream decides.
    """

    value: str

    def __post_init__(self) -> None:
        if not self.value or len(self.value) > MAX_SCOPE or ":" not in self.value and self.value != "ipfs":
            raise ValueError(f"not a read scope: {self.value[:80]!r}")

    @staticmethod
    @functools.lru_cache(maxsize=4096)  # asked on every request of a hot repository
    def oci(registry: str, repository: str) -> ReadScope:
        return ReadScope(f"oci:{registry}/{repository}")

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def hf(repo_key: str) -> ReadScope:
        return ReadScope(f"hf:{repo_key}")

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def s3(bucket: str) -> ReadScope:
        return ReadScope(f"s3:{bucket}")

    @classmethod
    def web(cls, prefix: str) -> ReadScope:
        # Allowed prefixes are URLs of any length: long ones are named by their hash.
        if len(prefix) + 4 > MAX_SCOPE:
            return cls("web:#" + hashlib.sha256(prefix.encode()).hexdigest())
        return cls(f"web:{prefix}")

    @classmethod
    def ipfs(cls) -> ReadScope:
        return cls("ipfs")

    @property
    def kind(self) -> str:
        return self.value.split(":", 1)[0]

    @property
    def name(self) -> str:
        """What the scope names within its kind: a repository, a repo, a bucket, a prefix."""
        return self.value.partition(":")[2]

    def __str__(self) -> str:
        return self.value


class LeaseState:
    OPENING = "opening"
    STREAMING = "streaming"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass(frozen=True)
class Reference:
    """A mutable or source-specific name (a tag, a revision, an object key) and what it points at."""

    source: str
    key: str
    digest: str
    fetched_at: float
    expires_at: float
    validators: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def is_fresh(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.expires_at


@dataclass(frozen=True)
class BlobRecord:
    digest: str
    size: int
    media_type: str | None
    created_at: float
    last_access: float
    hits: int
    source: str | None = None
    upstream: str | None = None


@dataclass(frozen=True)
class SetContents:
    """A pinned resource set as the index holds it: the pinned digests, their blob rows (a pinned
    digest may have none), the read scopes that admitted each, and the references naming them."""

    name: str
    digests: list[str]
    records: Mapping[str, BlobRecord]
    scopes: Mapping[str, list[str]]
    references: list[Reference]


@dataclass(frozen=True)
class FillLease:
    """Which process of the fleet downloads a key now, and how far its bytes are durable."""

    key_hash: str
    key: str
    owner: str
    node: str
    state: str
    size: int | None
    synced: int
    digest: str | None
    heartbeat: int
    started_at: float
    renewed_at: float
    followed: bool = False


@dataclass(frozen=True)
class CounterKey:
    source: str
    upstream: str
    name: str


@dataclass(frozen=True)
class PurgeRecord:
    started_at: float
    finished_at: float
    reason: str
    blobs_removed: int
    bytes_removed: int
    orphan_files: int
    orphan_rows: int


@dataclass(frozen=True)
class UsageRow:
    source: str | None
    upstream: str | None
    entries: int
    bytes: int
