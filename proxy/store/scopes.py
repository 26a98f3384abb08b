"""Read scopes beside the blobs: which scopes admitted each digest, in the index and (for what is
known to be admitted) in memory, so that a hit under a known scope costs no query."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from proxy.store.digest import Digest
from proxy.store.index import Index
from proxy.store.memo import AdmissionMemo
from proxy.store.pools import Pools
from proxy.store.records import ReadScope

log = logging.getLogger(__name__)


class Scopes:
    def __init__(self, index: Index, pools: Pools) -> None:
        self._rows = index.blobs
        self._pools = pools
        self._known = AdmissionMemo()

    def known(self, scope: ReadScope, digest: Digest) -> bool:
        """Admitted, as this process already knows without asking the index."""
        return self._known.known(scope, digest)

    def ask_index(self, scope: ReadScope, digest: Digest) -> bool:
        """Blocking (an index thread): the index's answer. Fails closed: while the index cannot be
        asked, the upstream decides again."""
        try:
            return self._rows.admitted(str(scope), str(digest))
        except Exception as exc:  # noqa: BLE001 - an unreachable index must not stop pulls
            log.warning("cannot read the scopes of %s (%s): asking the upstream", digest, exc)
            return False

    def learned(self, scope: ReadScope, digest: Digest) -> None:
        """Remember an admission the index confirmed (in the event loop's thread: the memo is not shared)."""
        self._known.remember(scope, digest)

    async def admitted(self, scope: ReadScope, digest: Digest) -> bool:
        """Whether `scope` may read the digest from the cache."""
        if self.known(scope, digest):
            return True
        if await self._pools.index(self.ask_index, scope, digest):
            self.learned(scope, digest)
            return True
        return False

    async def admit(self, scope: ReadScope, digests: Iterable[Digest]) -> None:
        """Record that `scope` may read these digests: the upstream confirmed it (a fill from that
        scope, a manifest of that repository listing them, an upstream HEAD). Remembered in this
        process even when the index cannot be written (it is asked again after a restart)."""
        new = [d for d in dict.fromkeys(digests) if not self._known.known(scope, d)]
        if not new:
            return
        try:
            await self._pools.index(self._rows.admit, str(scope), [str(d) for d in new])
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot record the scope %s of %d blobs: %s", scope, len(new), exc)
        for digest in new:
            self._known.remember(scope, digest)
