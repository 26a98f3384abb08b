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
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio

from proxy.store.blobs import BlobStore, TempBlob
from proxy.store.digest import Digest
from proxy.store.fill import (
    AsyncUpstreamBody,
    CommitHook,
    Fill,
    FillFailed,
    FillListener,
    FillState,
    Opener,
    Origin,
    UpstreamBody,
)
from proxy.store.follow import RemoteFollower
from proxy.store.leases import FillLeases, LeaseState

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024
NOTIFY_BYTES = 1024 * 1024
NOTIFY_SECONDS = 0.05
# Fills block a thread each for their whole transfer; the default executor has only cores + 4.
_FILL_THREADS = ThreadPoolExecutor(max_workers=128, thread_name_prefix="fill")


class Filler:
    """Starts at most one fill per key (a digest, or a source's name for a version of an object)
    and lets every other request follow it: in this process through the Fill, and in the other
    processes sharing the cache through a lease (see leases.py) and the owner's temp file."""

    def __init__(
        self,
        store: BlobStore,
        on_commit: CommitHook,
        listener: FillListener | None = None,
        leases: FillLeases | None = None,
        *,
        follow_streams: bool = True,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._listener = listener
        self._leases = leases
        self._follower = RemoteFollower(store, leases, follow_streams=follow_streams) if leases is not None else None
        self._inflight: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def inflight(self, key: str) -> Fill | None:
        return self._inflight.get(key)

    def start_or_follow(
        self, key: str, opener: Opener, *, origin: Origin, digest: Digest | None = None, expected_size: int | None = None
    ) -> tuple[Fill, bool]:
        """The fill for this key, and whether this call joined one already running in this process."""
        fill = self._inflight.get(key)
        if fill is not None:
            fill.stats.followers += 1
            return fill, True
        fill = Fill(key, digest)
        self._inflight[key] = fill
        task = asyncio.create_task(self._run(fill, opener, origin, expected_size), name=f"fill {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill, False

    async def _run(self, fill: Fill, opener: Opener, origin: Origin, expected_size: int | None) -> None:
        try:
            # A fill that committed between the caller's lookup and now must not fetch again.
            if fill.digest is not None:
                existing = await anyio.to_thread.run_sync(self._store.stat, fill.digest)
                if existing is not None:
                    fill._commit(existing)
                    return
            await self._coordinate(fill, opener, origin, expected_size)
        except BaseException as exc:  # noqa: BLE001 - the fill must never leave readers waiting
            if fill.state is not FillState.FAILED:
                fill._fail(exc)
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("fill of %s failed: %s", fill.key, exc)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._inflight.pop(fill.key, None)
            fill._release()

    async def _coordinate(self, fill: Fill, opener: Opener, origin: Origin, expected_size: int | None) -> None:
        """Fetch the key ourselves if we hold its lease, else follow the holder until it commits,
        taking the lease over when the holder dies."""
        owner = self._store.temp_name()
        lease = await self._leases.acquire(fill.key, owner) if self._leases is not None else None
        took_over = False
        while lease is not None and lease.owner != owner:
            assert self._follower is not None
            takeover = await self._follower.follow(fill, lease)
            if takeover is None:
                if self._listener is not None:
                    self._listener.fill_followed(origin)
                return
            owner = self._store.temp_name()
            lease = await self._leases.acquire(fill.key, owner, takeover.seen) if self._leases else None
            took_over = takeover.seen is not None and lease is not None and lease.owner == owner
        if took_over and self._listener is not None:
            self._listener.fill_taken_over(origin)
        await self._fetch(fill, opener, origin, expected_size, owner, leased=lease is not None)

    async def _fetch(
        self, fill: Fill, opener: Opener, origin: Origin, expected_size: int | None, owner: str, *, leased: bool
    ) -> None:
        """Download into our own temp file (named `owner`), verify and commit."""
        leases = self._leases if leased else None
        temp: TempBlob | None = None
        body: UpstreamBody | AsyncUpstreamBody | None = None

        async def sync() -> int | None:
            if temp is None or fill._discarding:
                return None
            written = temp.written  # appended before the sync starts, so durable once it returns
            await anyio.to_thread.run_sync(os.fdatasync, temp.fd)
            return written

        renewing = asyncio.create_task(leases.keep_renewed(fill.key, owner, sync)) if leases else None

        async def stop_renewing() -> None:
            """Before the temp file's descriptor closes: `sync` must not run on a reused number."""
            if renewing is not None and not renewing.done():
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)

        try:
            body = await opener()
            size = body.size if body.size is not None else expected_size
            if expected_size is not None and size != expected_size:
                raise FillFailed(f"{fill.key}: upstream announced {size} bytes, expected {expected_size}")
            temp = await anyio.to_thread.run_sync(lambda: self._store.new_temp(name=owner, hash_in_background=True))
            fill._set_open(temp.fd, size)
            fill.node = None
            if leases is not None:
                await leases.update(fill.key, owner, state=LeaseState.STREAMING, size=size)
            if isinstance(body, AsyncUpstreamBody):
                await self._copy_async(fill, body, temp)
            else:
                await self._copy(fill, body, temp)
            if fill.digest is None:
                fill.digest = Digest.from_hex(await anyio.to_thread.run_sync(temp.hexdigest))
            await anyio.to_thread.run_sync(self._store.verify, temp, fill.digest, size)
            if fill._earlier:
                await anyio.to_thread.run_sync(fill._check_earlier, temp.fd)
            fill._verified()  # readers may take the last byte now; fsync and rename need not hold them
            blob = await anyio.to_thread.run_sync(self._store.commit, temp, fill.digest, size)
            await self._on_commit(blob, origin)
            if leases is not None:
                await leases.update(fill.key, owner, state=LeaseState.COMMITTED, digest=str(blob.digest), size=blob.size)
            fill._commit(blob)
            await stop_renewing()
            temp.close()
            seconds = time.monotonic() - fill.stats.started_at
            if self._listener is not None:
                self._listener.fill_finished(origin, blob.size, seconds, True)
            log.info(
                "filled %s from %s (%d bytes in %.2fs, %d followers)", fill.key, origin.upstream, blob.size, seconds, fill.stats.followers
            )
        except BaseException as exc:
            if temp is not None:
                fill._discarding = True
                await stop_renewing()
                await anyio.to_thread.run_sync(temp.discard)
            fill._fail(exc)
            if leases is not None:
                if isinstance(exc, asyncio.CancelledError):
                    # Shutting down: free the key at once rather than make the fleet wait a lease.
                    await asyncio.shield(leases.release(fill.key, owner))
                else:
                    await leases.update(fill.key, owner, state=LeaseState.FAILED)
            if self._listener is not None and temp is not None:
                self._listener.fill_finished(origin, temp.written, time.monotonic() - fill.stats.started_at, False)
            raise
        finally:
            await stop_renewing()
            if isinstance(body, AsyncUpstreamBody):
                await body.aclose()
            elif body is not None:
                await anyio.to_thread.run_sync(body.close)

    @staticmethod
    async def _copy(fill: Fill, body: UpstreamBody, temp: TempBlob) -> None:
        """Receive, hash and write in one worker thread; readers are told after each write."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def copy() -> None:
            told, told_at = 0, 0.0
            while not stop.is_set():
                data = body.read_some(READ_CHUNK)
                if not data:
                    return
                temp.append(data)
                # Wake the readers per MiB or every 50 ms, not per socket read: each wake-up costs
                # every reader a round through the event loop and a send.
                now = time.monotonic()
                if temp.written - told >= NOTIFY_BYTES or now - told_at >= NOTIFY_SECONDS:
                    told, told_at = temp.written, now
                    loop.call_soon_threadsafe(fill._advance, told)
            raise FillFailed(f"fill of {fill.key} was cancelled")

        copying = loop.run_in_executor(_FILL_THREADS, copy)
        try:
            await asyncio.shield(copying)
        except asyncio.CancelledError:
            stop.set()
            body.abort()
            await asyncio.gather(copying, return_exceptions=True)
            raise
        fill._advance(temp.written)

    @staticmethod
    async def _copy_async(fill: Fill, body: AsyncUpstreamBody, temp: TempBlob) -> None:
        """For upstreams read by an async client (aioboto3): 4 MiB batches written in a thread."""
        batch = bytearray()
        async for chunk in body.chunks():
            batch += chunk
            if len(batch) >= READ_CHUNK:
                await anyio.to_thread.run_sync(temp.append, bytes(batch))
                batch.clear()
                fill._advance(temp.written)
        if batch:
            await anyio.to_thread.run_sync(temp.append, bytes(batch))
        fill._advance(temp.written)

    async def aclose(self) -> None:
        """Cancel fills still running (shutdown); their temp files are discarded."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
