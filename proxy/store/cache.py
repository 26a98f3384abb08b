"""The cache as sources see it: look up, fill and read blobs; read and write references.

It joins the files (BlobStore), single flight (Filler) and the index, keeps small objects
(manifests) in memory, and batches access times so that a hit costs no database write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import anyio

from proxy.store.blobs import BlobFile, BlobStore
from proxy.store.digest import Digest
from proxy.store.fill import Fill, FillListener, Opener, Origin
from proxy.store.filler import Filler
from proxy.store.index import Index, Reference
from proxy.store.leases import FillLeases

log = logging.getLogger(__name__)

ACCESS_FLUSH_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class SmallObject:
    """A small blob held in memory (a manifest) with the media type it was served with."""

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


class ReferenceMemo:
    """Recently used references in memory, so a pull by tag inside its TTL skips the index."""

    def __init__(self, max_items: int = 100_000) -> None:
        self._items: OrderedDict[tuple[str, str], Reference] = OrderedDict()
        self._max_items = max_items

    def get(self, source: str, key: str) -> Reference | None:
        ref = self._items.get((source, key))
        if ref is not None:
            self._items.move_to_end((source, key))
        return ref

    def put(self, ref: Reference) -> None:
        self._items[(ref.source, ref.key)] = ref
        self._items.move_to_end((ref.source, ref.key))
        if len(self._items) > self._max_items:
            self._items.popitem(last=False)


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


class BlobCache:
    """Everything a source needs from the store, async."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        *,
        listener: FillListener | None = None,
        leases: FillLeases | None = None,
        follow_streams: bool = True,
        small_object_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.index = index
        self.filler = Filler(store, self._record_commit, listener, leases, follow_streams=follow_streams)
        self.in_use = BlobsInUse()
        self.small = SmallObjectCache(small_object_bytes)
        self.references = ReferenceMemo()
        self.access = AccessLog()
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.store.prepare)
        self._flusher = asyncio.create_task(self._flush_periodically(), name="access flush")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.filler.aclose()
        await self.flush_access()

    # -- blobs -------------------------------------------------------------------------------
    async def lookup(self, digest: Digest) -> BlobFile | None:
        """The committed blob, counted as an access, or None."""
        blob = await anyio.to_thread.run_sync(self.store.stat, digest)
        if blob is not None:
            self.access.touch(digest)
        return blob

    def fill(
        self, digest: Digest, opener: Opener, *, origin: Origin, expected_size: int | None = None
    ) -> tuple[Fill, bool]:
        """Start fetching the digest, or follow the fetch already running; (fill, joined)."""
        return self.filler.start_or_follow(str(digest), opener, origin=origin, digest=digest, expected_size=expected_size)

    def fill_unnamed(
        self, key: str, opener: Opener, *, origin: Origin, expected_size: int | None = None
    ) -> tuple[Fill, bool]:
        """Fetch bytes whose digest is not known beforehand (an S3 object, a web file), once per
        `key`; the fill's digest is what they hash to, set when they are complete."""
        return self.filler.start_or_follow(key, opener, origin=origin, expected_size=expected_size)

    async def _record_commit(self, blob: BlobFile, origin: Origin) -> None:
        try:
            await anyio.to_thread.run_sync(
                lambda: self.index.add_blob(str(blob.digest), blob.size, source=origin.source, upstream=origin.upstream)
            )
        except Exception:  # the file is valid; the row is re-created on the next access flush
            log.exception("could not index %s", blob.digest)

    # -- small objects (manifests) -------------------------------------------------------------
    async def get_small(self, digest: Digest) -> SmallObject | None:
        item = self.small.get(digest)
        if item is None:
            item = await anyio.to_thread.run_sync(self._load_small, digest)
            if item is None:
                return None
            self.small.put(item)
        self.access.touch(digest)
        return item

    def _load_small(self, digest: Digest) -> SmallObject | None:
        data = self.store.read_bytes(digest)
        if data is None:
            return None
        record = self.index.get_blob(str(digest))
        if record is None or record.media_type is None:
            return None  # written by another process that has not indexed it yet: fetch it again
        return SmallObject(digest, data, record.media_type)

    async def put_small(self, data: bytes, digest: Digest, media_type: str | None, origin: Origin) -> SmallObject:
        """Store verified bytes (the caller checked the digest) with their media type.

        The object is in memory before its file appears, so a concurrent reader never finds the
        file without the media type that goes with it.
        """
        item = SmallObject(digest, data, media_type)
        self.small.put(item)

        def _write() -> None:
            self.store.put_bytes(data, digest)
            self.index.add_blob(str(digest), len(data), media_type, source=origin.source, upstream=origin.upstream)

        await anyio.to_thread.run_sync(_write)
        return item

    # -- references ----------------------------------------------------------------------------
    async def get_reference(self, source: str, key: str) -> Reference | None:
        """The reference; a fresh one from memory, else from the index (another node may have renewed it)."""
        ref = self.references.get(source, key)
        if ref is not None and ref.is_fresh():
            return ref
        ref = await anyio.to_thread.run_sync(self.index.get_reference, source, key)
        if ref is not None:
            self.references.put(ref)
        return ref

    async def put_reference(self, ref: Reference) -> None:
        await anyio.to_thread.run_sync(self.index.put_reference, ref)
        self.references.put(ref)

    # -- access times ----------------------------------------------------------------------------
    async def flush_access(self) -> None:
        for digest in self.in_use.digests():
            self.access.touch(digest, hit=False)
        batch = self.access.take()
        if batch:
            await anyio.to_thread.run_sync(self.index.record_access, batch)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_SECONDS)
            try:
                await self.flush_access()
            except Exception:
                log.exception("could not write access times")
