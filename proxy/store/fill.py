"""Single-flight filling: one upstream stream per digest, every reader following the temp file.

A fill runs as its own task, detached from the request that started it, so a client that hangs up
does not cancel the download others are following. A reader whose response reaches the end of the
blob gets its last byte only once the whole blob has been verified: a mismatching upstream leaves
such a client with a truncated body (an error), never a complete wrong one. A range that ends
earlier is served as soon as its bytes are on disk, as it would be from the upstream.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio

from proxy.store.blobs import BlobFile, BlobStore, TempBlob
from proxy.store.digest import Digest
from proxy.store.index import FillLease
from proxy.store.leases import LEASE_POLL_SECONDS, FillLeases, LeaseState, Liveness, owner_is_dead_here, valid_owner

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024
NOTIFY_BYTES = 1024 * 1024
NOTIFY_SECONDS = 0.05
FOLLOW_POLL_SECONDS = 0.05  # how often a follower looks at the size of another node's temp file
# Fills block a thread each for their whole transfer; the default executor has only cores + 4.
_FILL_THREADS = ThreadPoolExecutor(max_workers=128, thread_name_prefix="fill")


class UpstreamBody(Protocol):
    """An open upstream response: its announced size (None when unknown) and its bytes.

    Bodies are read in a worker thread: a blocking read straight from the socket moves a GiB
    in well under a second, where an async stream of small chunks took 2-3 s on the same machine.
    """

    size: int | None

    def read_some(self, limit: int) -> bytes:
        """Blocking: up to `limit` bytes as soon as any are available; b"" at the end."""
        ...

    def abort(self) -> None:
        """From any thread: make a blocked read_some return or fail at once."""
        ...

    def close(self) -> None:
        """Blocking: release the connection."""
        ...


@runtime_checkable
class AsyncUpstreamBody(Protocol):
    """An upstream response read by an async client."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


Opener = Callable[[], Awaitable[UpstreamBody | AsyncUpstreamBody]]
CommitHook = Callable[[BlobFile, "Origin"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where bytes come from: the source kind (oci, hf, …) and the upstream (docker.io, …)."""

    source: str
    upstream: str


class FillListener(Protocol):
    def fill_finished(self, origin: Origin, nbytes: int, seconds: float, ok: bool) -> None: ...

    def fill_followed(self, origin: Origin) -> None:
        """Another process of the fleet downloaded it; this one served it from the shared files."""

    def fill_taken_over(self, origin: Origin) -> None:
        """This process took the download over from another that went silent."""


@dataclass(frozen=True, slots=True)
class TakeOver:
    """A lease to replace: `seen` as last read (compare-and-swap), or None when the row vanished."""

    seen: FillLease | None


class FillFailed(Exception):
    """The fill a reader was following did not complete (upstream error, mismatch, crash)."""


class FillState(enum.Enum):
    OPENING = "opening"
    STREAMING = "streaming"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass
class FillStats:
    started_at: float
    followers: int = 0


class Fill:
    """One blob being fetched, by this process or (followed through its temp file) by another.

    Readers wait on it with `opened()` and read through `reader()`. `digest` is known up front for
    content-addressed upstreams (OCI, LFS) and verified at the end; for others (S3 objects, web
    files) it is what the bytes hash to, set when they are complete.

    The bytes come from one file per generation. A new generation starts when the process being
    followed died and another took over: readers move to the new file at the offset they reached.
    The prefixes earlier generations served are compared with the final bytes before any reader
    gets its last byte.
    """

    def __init__(self, key: str, digest: Digest | None) -> None:
        self.key = key
        self.digest = digest
        self.state = FillState.OPENING
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.blob: BlobFile | None = None
        self.stats = FillStats(started_at=time.monotonic())
        self.generation = 0
        self.node: str | None = None  # the node whose fill is followed; None when it is this process
        self._fd: int | None = None  # what readers dup: our temp file's, or one on another node's
        self._owns_fd = False
        self._earlier: list[tuple[int, int]] = []  # (descriptor, bytes it held) of past generations
        self._discarding = False  # set before the temp file is closed: no new reader may dup it
        self.verified = False  # every byte arrived and matched the digest
        self._changed = asyncio.Event()
        self._opened = asyncio.Event()

    # -- the filling task's side ------------------------------------------------------------
    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _set_open(self, fd: int, size: int | None, *, owned: bool = False) -> None:
        """Bytes start arriving in the file behind `fd` (closed by the fill if `owned`); a new
        generation if another file served some before."""
        if self._fd is not None:
            # An earlier generation's descriptor is always one we opened on another node's file.
            self._earlier.append((self._fd, self.written))
            self.generation += 1
            self.written = 0
        self._fd, self._owns_fd, self.size, self.state = fd, owned, size, FillState.STREAMING
        self._opened.set()
        self._notify()

    def _advance(self, written: int) -> None:
        self.written = written
        self._notify()

    def _verified(self) -> None:
        self.verified = True
        self._notify()

    def _commit(self, blob: BlobFile) -> None:
        self.blob, self.size, self.written, self.state = blob, blob.size, blob.size, FillState.COMMITTED
        self._opened.set()
        self._notify()

    def _fail(self, error: BaseException) -> None:
        self.error, self.state = error, FillState.FAILED
        self._opened.set()
        self._notify()

    def _check_earlier(self, final_fd: int) -> None:
        """Blocking: raise unless every earlier generation's bytes equal the final ones."""
        for fd, length in self._earlier:
            for offset in range(0, length, READ_CHUNK):
                want = min(READ_CHUNK, length - offset)
                if os.pread(fd, want, offset) != os.pread(final_fd, want, offset):
                    raise FillFailed(f"{self.key}: the bytes served before a takeover differ at offset {offset}")

    def _retire_current(self) -> None:
        """Make the file being followed an earlier generation, to be checked against the blob."""
        if self._fd is not None:
            self._earlier.append((self._fd, self.written))
            self._fd, self._owns_fd = None, False
            self.generation += 1  # readers move on when the commit (or a new file) wakes them

    def _release(self) -> None:
        """Close the descriptors the fill opened itself, once it has ended (readers hold dups)."""
        for fd, _ in self._earlier:
            os.close(fd)
        self._earlier.clear()
        if self._owns_fd and self._fd is not None:
            os.close(self._fd)
        self._fd, self._owns_fd = None, False

    # -- the readers' side -----------------------------------------------------------------
    async def opened(self) -> int | None:
        """Wait until the upstream answered; the size (None if unknown). Raises the upstream's error."""
        await self._opened.wait()
        if self.state is FillState.FAILED:
            assert self.error is not None
            raise self.error
        return self.size

    async def finished(self) -> BlobFile | None:
        """Wait for the end of the fill: the committed blob, or None if it failed."""
        while self.state in (FillState.OPENING, FillState.STREAMING):
            await self._changed.wait()
        return self.blob

    async def reader(self) -> FillReader:
        """A reader with a descriptor of its own on the bytes."""
        await self.opened()
        reader = FillReader(self)
        await reader.attach()
        return reader

    async def _limit(self, pos: int, end: int, generation: int) -> int | None:
        """How far [pos, end) may be read in `generation` now; None when the generation changed.

        A range reaching the end of the blob gets its last byte only after verification."""
        hold_back = 1 if self.size is None or end >= self.size else 0
        while True:
            if self.state is FillState.FAILED:
                raise FillFailed(f"fill of {self.key} failed: {self.error}")
            if generation != self.generation:
                return None
            done = self.state is FillState.COMMITTED or self.verified
            limit = end if done else min(self.written, end - hold_back)
            if limit > pos:
                return limit
            await self._changed.wait()


class FillReader:
    """One reader's descriptor on a fill, moved to the new file when the fill changes generation."""

    def __init__(self, fill: Fill) -> None:
        self._fill = fill
        self.fd = -1
        self._generation = -1

    async def attach(self) -> None:
        """Take a descriptor on the fill's current bytes (closing any earlier one)."""
        fill = self._fill
        self.close()
        while True:
            generation = fill.generation
            if fill.state is FillState.COMMITTED:
                assert fill.blob is not None
                self.fd = await anyio.to_thread.run_sync(os.open, fill.blob.path, os.O_RDONLY | os.O_CLOEXEC)
                break
            if fill.state is FillState.FAILED or fill._discarding:
                raise FillFailed(f"fill of {fill.key} failed: {fill.error}")
            if fill._fd is not None:
                # dup, not open by path: the temp file is renamed on commit, the inode stays.
                self.fd = os.dup(fill._fd)
                break
            await fill._changed.wait()  # between two generations
        self._generation = generation

    async def readable(self, pos: int, end: int) -> int:
        """Wait until bytes past `pos` are on disk; how far [pos, end) may be read through `fd` now."""
        while True:
            limit = await self._fill._limit(pos, end, self._generation)
            if limit is not None:
                return limit
            await self.attach()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        # False where a growing file written by another host cannot be read reliably (some
        # network file systems): followers then wait for the commit.
        self._follow_streams = follow_streams
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
            takeover = await self._follow(fill, lease)
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
        renewing = asyncio.create_task(leases.keep_renewed(fill.key, owner)) if leases else None
        temp: TempBlob | None = None
        body: UpstreamBody | AsyncUpstreamBody | None = None
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
            if renewing is not None:
                renewing.cancel()
            if isinstance(body, AsyncUpstreamBody):
                await body.aclose()
            elif body is not None:
                await anyio.to_thread.run_sync(body.close)

    async def _follow(self, fill: Fill, lease: FillLease) -> TakeOver | None:
        """Serve another process's fill from its temp file until it commits (None), or return the
        lease to take over: its owner went silent, failed before sending a byte, or vanished."""
        assert self._leases is not None
        leases = self._leases
        liveness = Liveness(leases.lease_seconds)
        liveness.observe(lease)
        following: str | None = None  # the owner whose file `fill` reads now
        polled_at = time.monotonic()
        while True:
            if lease.state == LeaseState.COMMITTED:
                if following is not None and following != lease.owner:
                    fill._retire_current()  # another process committed: what we followed is unchecked
                if await self._adopt(fill, lease):
                    return None
                return TakeOver(lease)  # committed, then purged: fetch it again
            if lease.state == LeaseState.FAILED:
                if fill.state is FillState.OPENING:
                    return TakeOver(lease)  # our clients get the upstream's answer from our own try
                raise FillFailed(f"the fill of {fill.key} on node {lease.node} failed")
            if liveness.silent() or owner_is_dead_here(lease, leases.node):
                log.warning("fill of %s on %s went silent; taking over", fill.key, lease.node)
                return TakeOver(lease)
            if self._follow_streams and lease.state == LeaseState.STREAMING and following != lease.owner:
                fd = await self._open_remote(lease)
                if fd is not None:
                    fill._set_open(fd, lease.size, owned=True)
                    fill.node, following = lease.node, lease.owner
            if following is not None and following == lease.owner:
                assert fill._fd is not None
                written = os.fstat(fill._fd).st_size
                if written != fill.written:
                    fill._advance(written)
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            if time.monotonic() - polled_at >= LEASE_POLL_SECONDS or (fill.size is not None and fill.written >= fill.size):
                polled_at = time.monotonic()
                try:
                    current = await leases.get(fill.key)
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
        return await anyio.to_thread.run_sync(self._store.open_temp, lease.owner)

    async def _adopt(self, fill: Fill, lease: FillLease) -> bool:
        """Take the blob another process committed; False if it is not (or no longer) there."""
        digest = fill.digest or (Digest.parse(lease.digest) if lease.digest else None)
        if digest is None:
            return False
        blob = await anyio.to_thread.run_sync(self._store.stat, digest)
        if blob is None:
            return False
        fill.digest = digest
        if fill._earlier:
            await anyio.to_thread.run_sync(self._check_against_blob, fill, blob)
        fill._commit(blob)
        return True

    @staticmethod
    def _check_against_blob(fill: Fill, blob: BlobFile) -> None:
        """Blocking: the generations readers were served from must hold the committed bytes.

        The file we followed last is the blob itself (renamed), so only earlier ones are read."""
        fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fill._check_earlier(fd)
        finally:
            os.close(fd)

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
