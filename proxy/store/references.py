"""Where references live: the index (with recent ones in memory), or memory alone for answers that
must never reach the disk (a caller's access to a gated repo is bound to its token)."""

from __future__ import annotations

from proxy.store.index import Index
from proxy.store.memo import Lru, ReferenceMemo
from proxy.store.pools import Pools
from proxy.store.records import Reference


class References:
    """References in the index, shared by every node; fresh ones are answered from memory."""

    def __init__(self, index: Index, pools: Pools) -> None:
        self._rows = index.refs
        self._pools = pools
        self._memo = ReferenceMemo()

    async def get(self, source: str, key: str) -> Reference | None:
        """A fresh reference from memory, else the index's (another node may have renewed it)."""
        ref = self._memo.get((source, key))
        if ref is not None and ref.is_fresh():
            return ref
        ref = await self._pools.index(self._rows.get, source, key)
        if ref is not None:
            self._memo.put((source, key), ref)
        return ref

    async def put(self, ref: Reference) -> None:
        await self._pools.index(self._rows.put, ref)
        self._memo.put((ref.source, ref.key), ref)


class MemoryReferences:
    """References kept in this process only, the least recently used forgotten beyond `max_items`."""

    def __init__(self, max_items: int = 10_000) -> None:
        self._items: Lru[tuple[str, str], Reference] = Lru(max_items)

    async def get(self, source: str, key: str) -> Reference | None:
        return self._items.get((source, key))

    async def put(self, ref: Reference) -> None:
        self._items.put((ref.source, ref.key), ref)
