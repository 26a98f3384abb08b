"""Fill leases: one download per key for every process that shares the cache directory and index.

A process about to fetch a key claims its lease, a row naming the owner's temp file under tmp/.
The others follow that file as it grows instead of going upstream. A follower first marks the lease
`followed`; only then does the owner publish: it fdatasyncs and publishes a `synced` watermark
every PUBLISH_SECONDS, which followers read up to and no further, reopening the file before they
trust a new one (NFS may write a file's pages back out of order, and close-to-open consistency is
all it promises a reader on another host). A fill nobody follows costs no sync and no index write
until its commit. The followed owner renews the lease by bumping a heartbeat counter. A follower
that sees no heartbeat for `lease_seconds` of its own
monotonic clock takes the lease over with a compare-and-swap on (owner, heartbeat). Only one
follower can win the swap, so a dead owner costs at most one more upstream fetch. No wall clock
is compared, so nodes need not agree on the time.

If the index cannot be reached, the fill goes ahead without coordination: the fleet may then
fetch twice, which is better than failing a pull.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.store.index import Index
from proxy.store.pools import Pools
from proxy.store.records import FillLease

log = logging.getLogger(__name__)

LEASE_POLL_SECONDS = 0.25  # how often a follower re-reads the lease row
PUBLISH_SECONDS = 0.25  # how often a followed owner syncs its temp file and publishes how far it got
FOLLOWED_CHECK_SECONDS = 1.0  # how often an owner nobody follows yet asks the index whether that changed
# How often an owner nobody follows renews its lease anyway: well inside the janitor's STALE_SECONDS,
# so a long fill is never mistaken for a dead one.
IDLE_RENEW_SECONDS = 60.0
# node.pid.random, as BlobStore names temp files: checked before any lease owner becomes a path.
_OWNER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.[0-9]+\.[0-9a-f]{16}")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def valid_owner(owner: str) -> bool:
    """Whether a lease's owner can name a file in tmp/: the database is not trusted with paths."""
    return _OWNER.fullmatch(owner) is not None


def owner_is_dead_here(lease: FillLease, node: str) -> bool:
    """An owner on this very node whose process is gone: no need to wait for its heartbeat."""
    if lease.node != node:
        return False
    pid = lease.owner.rsplit(".", 2)[-2] if valid_owner(lease.owner) else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Liveness:
    """A follower's view of an owner: alive while its heartbeat keeps changing."""

    lease_seconds: float
    owner: str = ""
    heartbeat: int = -1
    seen_at: float = field(default_factory=time.monotonic)

    def observe(self, lease: FillLease) -> None:
        if lease.owner != self.owner or lease.heartbeat != self.heartbeat:
            self.owner, self.heartbeat, self.seen_at = lease.owner, lease.heartbeat, time.monotonic()

    def silent(self) -> bool:
        return time.monotonic() - self.seen_at > self.lease_seconds


class FillLeases:
    """The async face of the lease rows. Every method swallows database errors into "unknown"."""

    def __init__(self, index: Index, pools: Pools, node: str, lease_seconds: float = 15.0) -> None:
        self._rows = index.leases
        self._pools = pools
        self.node = node
        self.lease_seconds = lease_seconds

    async def acquire(self, key: str, owner: str, seen: FillLease | None = None) -> FillLease | None:
        """The lease holding `key` now: ours (owner == `owner`) if it was free, or if `seen` (a lease
        found dead or finished) was still in place and we swapped it; another's otherwise.
        None when the index could not be asked."""
        digest = key_hash(key)
        try:
            if seen is not None:
                if await self._pools.index(self._rows.take_over, seen, owner, self.node):
                    log.info("took over the fill of %s from %s on %s", key, seen.owner, seen.node)
                    return await self._pools.index(self._rows.get, digest)
                current = await self._pools.index(self._rows.get, digest)
                if current is not None:
                    return current
            return await self._pools.index(self._rows.claim, digest, key, owner, self.node)
        except Exception as exc:  # noqa: BLE001 - see the module's docstring
            log.warning("fill lease for %s unavailable, fetching without coordination: %s", key, exc)
            return None

    async def get(self, key: str) -> FillLease | None:
        """The lease row; raises when the index cannot be read (the caller decides what that means)."""
        return await self._pools.index(self._rows.get, key_hash(key))

    async def update(self, key: str, owner: str, *, live_only: bool = False, **values: object) -> bool:
        """Renew (and change) our lease; False if it was lost or the index is unreachable. With
        `live_only`, only while the fill is opening or streaming (see LeaseIndex.update)."""
        try:
            return await self._pools.index(self._rows.update, key_hash(key), owner, live_only=live_only, **values)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not renew the fill lease of %s: %s", key, exc)
            return False

    async def release(self, key: str, owner: str) -> None:
        try:
            await self._pools.index(self._rows.release, key_hash(key), owner)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release the fill lease of %s: %s", key, exc)

    async def follow(self, key: str, owner: str) -> bool:
        """Ask `owner` to publish its progress: this process follows its fill from now on. False
        when the index could not be told (the follower asks again on its next poll)."""
        try:
            await self._pools.index(self._rows.follow, key_hash(key), owner)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not ask the owner of %s to publish: %s", key, exc)
            return False
        return True

    async def followed(self, key: str, owner: str) -> bool:
        """Whether another process follows our fill of `key` (False if the index cannot say: the
        renewal that follows, once a minute, says so in the log)."""
        try:
            lease = await self._pools.index(self._rows.get, key_hash(key))
        except Exception as exc:  # noqa: BLE001
            log.debug("could not read the fill lease of %s: %s", key, exc)
            return False
        return lease is not None and lease.owner == owner and lease.followed

    async def keep_renewed(
        self, key: str, owner: str, sync: Callable[[], Awaitable[int | None]], stream: Callable[[], dict[str, object]]
    ) -> None:
        """Run beside an owner's fill. Nobody following, the fill costs the index one read a
        FOLLOWED_CHECK_SECONDS (is it followed yet?) and a renewal every IDLE_RENEW_SECONDS, and the temp
        file no sync before its commit. Once another process follows it, every PUBLISH_SECONDS (or
        third of the lease, if shorter) a heartbeat with what `stream` says of the body (state and
        size, once open), and the watermark of the last completed `sync` (which makes the bytes
        written so far durable and returns how many, or None before the temp file exists). Syncs
        run beside the heartbeats: the first one after a long unfollowed stretch may flush a lot,
        and followers must not take that for silence."""
        period = min(PUBLISH_SECONDS, self.lease_seconds / 3)
        followed, renewed_at = False, time.monotonic()
        syncing: asyncio.Task[int | None] | None = None
        try:
            while True:
                await asyncio.sleep(period if followed else min(FOLLOWED_CHECK_SECONDS, self.lease_seconds / 3))
                followed = followed or await self.followed(key, owner)
                if not followed and time.monotonic() - renewed_at < IDLE_RENEW_SECONDS:
                    continue
                values: dict[str, object] = stream() if followed else {}
                if followed and (syncing is None or syncing.done()):
                    if syncing is not None and syncing.exception() is None and (synced := syncing.result()) is not None:
                        values["synced"] = synced
                    syncing = asyncio.create_task(sync())
                renewed_at = time.monotonic()
                # live_only: this may reach the database after the owner's commit, and must not undo it.
                if not await self.update(key, owner, live_only=True, **values):
                    log.warning("fill lease of %s lost or finished: another node may be fetching it too", key)
        finally:
            if syncing is not None and not syncing.done():
                syncing.cancel()
                await asyncio.gather(syncing, return_exceptions=True)
