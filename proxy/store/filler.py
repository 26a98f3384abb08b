"""Single flight: one upstream stream per key for every process sharing the cache.

A fill runs as its own task, detached from the request that started it, so a client that hangs up
does not cancel the download others are following. In this process, requests for a key share one
Fill. Across processes, the key's lease (leases.py) says who downloads it. The others follow that
download (follow.py) and take it over if its owner goes silent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.store.blobs import BlobFile, BlobStore, TempBlob
from proxy.store.digest import Digest
from proxy.store.events import StoreEvents
from proxy.store.fill import AsyncUpstreamBody, Fill, FillFailed, Opener, UpstreamBody
from proxy.store.follow import RemoteFollower
from proxy.store.leases import FillLeases
from proxy.store.pools import Pools
from proxy.store.records import LeaseState, Origin, ReadScope
from proxy.store.transfer import ContentCheck, receive

log = logging.getLogger(__name__)

# Told of every commit, whether this process downloaded the blob (True) or adopted another's.
CommitHook = Callable[[Fill, BlobFile, Origin, bool], Awaitable[None]]
# Told when a download of this process is verified, before its file appears under blobs/.
VerifiedHook = Callable[[Fill, Digest], Awaitable[None]]


@dataclass(frozen=True)
class FillPlan:
    """How to fill one key: where the bytes come from and what they must be."""

    key: str
    opener: Opener
    origin: Origin
    scope: ReadScope
    digest: Digest | None = None
    expected_size: int | None = None
    check: ContentCheck | None = None


class Filler:
    """Starts at most one fill per key (a digest, or a source's name for a version of an object)
    and lets every other request follow it: in this process through the Fill, and in the other
    processes sharing the cache through a lease (see leases.py) and the owner's temp file."""

    def __init__(
        self,
        store: BlobStore,
        pools: Pools,
        on_verified: VerifiedHook,
        on_commit: CommitHook,
        events: StoreEvents,
        leases: FillLeases | None = None,
        *,
        follow_streams: bool = True,
    ) -> None:
        self._store = store
        self._pools = pools
        self._on_verified = on_verified
        self._on_commit = on_commit
        self._events = events
        self._leases = leases
        self._follower = RemoteFollower(store, pools, leases, follow_streams=follow_streams) if leases is not None else None
        self._inflight: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def inflight(self, key: str) -> Fill | None:
        return self._inflight.get(key)

    def start(self, plan: FillPlan) -> Fill:
        """A new fill for the key (the caller checked none is in flight), running in its own task."""
        assert plan.key not in self._inflight
        fill = Fill(plan.key, plan.digest, plan.scope, self._pools)
        self._inflight[plan.key] = fill
        task = asyncio.create_task(self._run(fill, plan), name=f"fill {plan.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _run(self, fill: Fill, plan: FillPlan) -> None:
        self._events.fill_began(plan.origin)
        try:
            # A blob committed (by another scope) between the caller's lookup and now is not fetched
            # again, but the upstream still decides whether this scope may read it.
            if fill.digest is not None:
                existing = await self._pools.files(self._store.stat, fill.digest)
                if existing is not None:
                    await confirm_by_opening(plan.opener, self._pools)
                    await self._on_commit(fill, existing, plan.origin, False)
                    fill.writer.commit(existing)
                    return
            await self._coordinate(fill, plan)
        except BaseException as exc:  # noqa: BLE001 - the fill must never leave readers waiting
            fill.writer.fail(exc)
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("fill of %s failed: %s", fill.key, exc)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._inflight.pop(fill.key, None)
            fill.writer.release()
            self._events.fill_ended(plan.origin)

    async def _coordinate(self, fill: Fill, plan: FillPlan) -> None:
        """Fetch the key ourselves if we hold its lease, else follow the holder until it commits,
        taking the lease over when the holder dies. A node that loses a takeover follows the winner."""
        owner = self._store.temp_name()
        lease = await self._leases.acquire(fill.key, owner) if self._leases is not None else None
        took_over = False
        while lease is not None and lease.owner != owner:
            assert self._follower is not None and self._leases is not None
            takeover = await self._follower.follow(fill, lease)
            if takeover is None:
                assert fill.blob is not None
                self._events.fill_followed(plan.origin)
                await self._on_commit(fill, fill.blob, plan.origin, False)
                return
            owner = self._store.temp_name()
            lease = await self._leases.acquire(fill.key, owner, takeover.seen)
            took_over = takeover.seen is not None and lease is not None and lease.owner == owner
        if took_over:
            self._events.fill_taken_over(plan.origin)
        await self._fetch(fill, plan, owner, leased=lease is not None)

    async def _fetch(self, fill: Fill, plan: FillPlan, owner: str, *, leased: bool) -> None:
        """Download into our own temp file (named `owner`), verify and commit."""
        leases = self._leases if leased else None
        writer = fill.writer
        temp: TempBlob | None = None
        body: UpstreamBody | AsyncUpstreamBody | None = None

        async def sync() -> int | None:
            if temp is None or writer.discarding:
                return None
            written = temp.written  # appended before the sync starts, so durable once it returns
            await self._pools.files(os.fdatasync, temp.fd)
            return written

        def stream() -> dict[str, object]:
            return {} if temp is None else {"state": LeaseState.STREAMING, "size": size}

        size: int | None = None
        renewing = asyncio.create_task(leases.keep_renewed(fill.key, owner, sync, stream)) if leases else None

        async def stop_renewing() -> None:
            """Before the temp file's descriptor closes: `sync` must not run on a reused number."""
            if renewing is not None and not renewing.done():
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)

        try:
            body = await plan.opener()
            size = body.size if body.size is not None else plan.expected_size
            if plan.expected_size is not None and size != plan.expected_size:
                raise FillFailed(f"{fill.key}: upstream announced {size} bytes, expected {plan.expected_size}")
            temp = await self._pools.files(self._store.new_temp, name=owner, pipelined=True)
            writer.open(temp.fd, size)
            await receive(writer, body, temp, self._pools, plan.check)
            blob = await self._verify_and_commit(fill, plan, temp, size)
            await stop_renewing()  # a renewal can still land after this; it never undoes the commit (live_only)
            if leases is not None:
                await leases.update(fill.key, owner, state=LeaseState.COMMITTED, digest=str(blob.digest), size=blob.size)
            temp.close()
            seconds = time.monotonic() - fill.stats.started_at
            self._events.fill_finished(plan.origin, blob.size, seconds, True)
            log.info(
                "filled %s from %s (%d bytes in %.2fs, %d followers)",
                fill.key, plan.origin.upstream, blob.size, seconds, fill.stats.followers,
            )
        except BaseException as exc:
            if temp is not None:
                writer.start_discarding()
                await stop_renewing()
                await self._pools.files(temp.discard)
            writer.fail(exc)
            if leases is not None:
                if isinstance(exc, asyncio.CancelledError):
                    # Shutting down: free the key at once rather than make the fleet wait a lease.
                    await asyncio.shield(leases.release(fill.key, owner))
                else:
                    await leases.update(fill.key, owner, state=LeaseState.FAILED)
            if temp is not None:
                self._events.fill_finished(plan.origin, temp.written, time.monotonic() - fill.stats.started_at, False)
            raise
        finally:
            await stop_renewing()
            if isinstance(body, AsyncUpstreamBody):
                await body.aclose()
            elif body is not None:
                await self._pools.files(body.close)

    async def _verify_and_commit(self, fill: Fill, plan: FillPlan, temp: TempBlob, size: int | None) -> BlobFile:
        writer = fill.writer
        if fill.digest is None:
            writer.set_digest(Digest.from_hex(await self._pools.files(temp.hexdigest)))
        assert fill.digest is not None
        await self._pools.files(self._store.verify, temp, fill.digest, size)
        if plan.check is not None:
            plan.check.verify(temp.written)
        if writer.has_earlier:
            await self._pools.files(writer.check_earlier, temp.fd)
        writer.mark_verified()  # readers may take the last byte now; fsync and rename need not hold them
        await self._on_verified(fill, fill.digest)
        blob = await self._pools.files(self._store.commit, temp, fill.digest, size)
        await self._on_commit(fill, blob, plan.origin, True)
        writer.commit(blob)
        return blob

    async def aclose(self) -> None:
        """Cancel fills still running (shutdown); their temp files are discarded."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def confirm_by_opening(opener: Opener, pools: Pools) -> None:
    """Ask the upstream for the bytes and hang up as soon as it says yes: its answer admits a scope
    to a blob the store already holds, without a byte fetched twice. Raises the upstream's refusal."""
    body = await opener()
    if isinstance(body, AsyncUpstreamBody):
        await body.aclose()
        return
    body.abort()  # the unread rest of the body must not go back to the connection pool
    await pools.files(body.close)
