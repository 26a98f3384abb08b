"""What the store keeps in memory so that a hit costs no I/O: small objects, recent references,
known admissions, batched access times and the blobs responses are reading now. All bounded."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.records import ReadScope, Reference

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A dict that forgets its least recently used entries beyond `max_items`."""

    def __init__(self, max_items: int) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max_items = max_items

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self._max_items:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class SmallObject:
    """A small blob held in memory (a manifest, an API answer) with its media type."""

    digest: Digest
    data: bytes
    media_type: str | None


class SmallObjectCache:
    """Bounded LRU of small objects by digest, so hot manifests skip the disk and the index."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[Digest, SmallObject] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def get(self, digest: Digest) -> SmallObject | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def put(self, item: SmallObject) -> None:
        if item.digest in self._items or len(item.data) > self._max_bytes:
            return
        self._items[item.digest] = item
        self._bytes += len(item.data)
        while self._bytes > self._max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted.data)

    def forget(self, digest: Digest) -> None:
        item = self._items.pop(digest, None)
        if item is not None:
            self._bytes -= len(item.data)


class ReferenceMemo(Lru[tuple[str, str], Reference]):
    """Recently used references, so a pull by tag inside its TTL skips the index."""

    def __init__(self, max_items: int = 100_000) -> None:
        super().__init__(max_items)


class AdmissionMemo(Lru[tuple[ReadScope, Digest], bool]):
    """(scope, digest) pairs known to be admitted. Only positive answers are kept: an admission is
    never revoked while its blob exists, and the index is asked again about anything else."""

    def __init__(self, max_items: int = 200_000) -> None:
        super().__init__(max_items)

    def known(self, scope: ReadScope, digest: Digest) -> bool:
        return self.get((scope, digest)) is not None

    def remember(self, scope: ReadScope, digest: Digest) -> None:
        self.put((scope, digest), True)


class AccessLog:
    """Last-access times and hit counts, gathered in memory and written in batches."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[float, int]] = {}

    def touch(self, digest: Digest, *, hit: bool = True) -> None:
        key = str(digest)
        _, hits = self._pending.get(key, (0.0, 0))
        self._pending[key] = (time.time(), hits + hit)

    def take(self) -> dict[str, tuple[float, int]]:
        pending, self._pending = self._pending, {}
        return pending


class BlobsInUse:
    """Committed blobs some response is reading now. Each access flush marks them as just used, so
    a janitor on any node, which spares what was read within its grace period, leaves them alone
    for as long as they are read (unlinking a file another NFS client has open breaks its reads)."""

    def __init__(self) -> None:
        self._readers: Counter[Digest] = Counter()

    def opened(self, blob: BlobFile) -> None:
        self._readers[blob.digest] += 1

    def closed(self, blob: BlobFile) -> None:
        self._readers[blob.digest] -= 1
        if self._readers[blob.digest] <= 0:
            del self._readers[blob.digest]

    def digests(self) -> list[Digest]:
        return list(self._readers)
