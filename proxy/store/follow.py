"""Following a fill another process of the fleet is writing: its temp file on the shared mount.

The follower reads the owner's lease every LEASE_POLL_SECONDS and lets readers have the file up to
the `synced` watermark the owner published (never its mere length). It adopts the blob once the
lease says committed, and hands the key back to the Filler to fetch itself when the owner goes
silent, fails before a byte, or vanishes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from proxy.store.blobs import BlobFile, BlobStore
from proxy.store.digest import Digest
from proxy.store.fill import Fill, FillFailed, FillState
from proxy.store.leases import LEASE_POLL_SECONDS, FillLeases, Liveness, owner_is_dead_here, valid_owner
from proxy.store.pools import Pools
from proxy.store.records import FillLease, LeaseState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TakeOver:
    """A lease to replace: `seen` as last read (compare-and-swap), or None when the row vanished."""

    seen: FillLease | None


class RemoteFollower:
    """Serves fills of this process from downloads other processes own."""

    def __init__(self, store: BlobStore, pools: Pools, leases: FillLeases, *, follow_streams: bool = True) -> None:
        self._store = store
        self._pools = pools
        self._leases = leases
        # False where a growing file written by another host cannot be read reliably (some
        # network file systems): followers then wait for the commit.
        self._follow_streams = follow_streams

    async def follow(self, fill: Fill, lease: FillLease) -> TakeOver | None:
        """Serve another process's fill from its temp file until it commits (None), or return the
        lease to take over: its owner went silent, failed before sending a byte, or vanished.

        The fill may already be reading an earlier owner's file (this node lost a takeover race):
        whatever it reads is replaced by the new owner's file or by the committed blob, and what
        it served is compared with the final bytes."""
        liveness = Liveness(self._leases.lease_seconds)
        liveness.observe(lease)
        following: str | None = None  # the owner whose file `fill` reads now, when opened by this call
        asked: str | None = None  # the owner asked to publish its progress
        while True:
            if asked != lease.owner and lease.state in (LeaseState.OPENING, LeaseState.STREAMING):
                # Until the owner knows it is followed it does not beat its heart: ask again on the
                # next poll if the index could not be told, or its silence would look like death.
                if lease.followed or await self._leases.follow(fill.key, lease.owner):
                    asked = lease.owner
            if lease.state == LeaseState.COMMITTED:
                if await self._adopt(fill, lease):
                    return None
                return TakeOver(lease)  # committed, then purged: fetch it again
            if lease.state == LeaseState.FAILED:
                if fill.state is FillState.OPENING:
                    return TakeOver(lease)  # our clients get the upstream's answer from our own try
                raise FillFailed(f"the fill of {fill.key} on node {lease.node} failed")
            if liveness.silent() or owner_is_dead_here(lease, self._leases.node):
                log.warning("fill of %s on %s went silent; taking over", fill.key, lease.node)
                return TakeOver(lease)
            if self._follow_streams and lease.state == LeaseState.STREAMING and following != lease.owner:
                fd = await self._open_remote(lease)
                if fd is not None:
                    fill.writer.open(fd, lease.size, owned=True, node=lease.node)
                    following = lease.owner
                    fill.writer.advance(lease.synced)
            elif following is not None and following == lease.owner and lease.synced > fill.written:
                if await self._revalidate(lease):
                    fill.writer.advance(lease.synced)
            await asyncio.sleep(LEASE_POLL_SECONDS)
            try:
                current = await self._leases.get(fill.key)
            except Exception as exc:  # noqa: BLE001 - an index hiccup; silence decides
                log.warning("could not read the fill lease of %s: %s", fill.key, exc)
                continue
            if current is None:
                return TakeOver(None)
            lease = current
            liveness.observe(lease)

    async def _open_remote(self, lease: FillLease) -> int | None:
        if not valid_owner(lease.owner):
            raise FillFailed(f"fill lease names {lease.owner!r}, not a temp file")
        return await self._pools.files(self._store.open_temp, lease.owner)

    async def _revalidate(self, lease: FillLease) -> bool:
        """Open the owner's file again before trusting a new watermark: on NFS the open makes the
        client revalidate the file and drop pages it cached before the owner's sync (close-to-open
        consistency), which the descriptors readers hold share. False once the file is gone."""
        fd = await self._open_remote(lease)
        if fd is None:
            return False
        os.close(fd)
        return True

    async def _adopt(self, fill: Fill, lease: FillLease) -> bool:
        """Take the blob another process committed; False if it is not (or no longer) there."""
        digest = fill.digest or (Digest.parse(lease.digest) if lease.digest else None)
        if digest is None:
            return False
        blob = await self._pools.files(self._store.stat, digest)
        if blob is None:
            return False
        writer = fill.writer
        writer.set_digest(digest)
        # Whatever file readers follow now (another owner's, from before a lost takeover race)
        # becomes an earlier generation unless it is the committed blob itself.
        await self._pools.files(writer.retire_unless_same_file, blob)
        if writer.has_earlier:
            await self._pools.files(self._check_against_blob, fill, blob)
        writer.commit(blob)
        return True

    @staticmethod
    def _check_against_blob(fill: Fill, blob: BlobFile) -> None:
        """Blocking: the generations readers were served from must hold the committed bytes."""
        fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fill.writer.check_earlier(fd)
        finally:
            os.close(fd)
