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

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024
NOTIFY_BYTES = 1024 * 1024
NOTIFY_SECONDS = 0.05
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
    """One blob being fetched. Readers wait on it with `opened()` and `readable()`.

    `digest` is known up front for content-addressed upstreams (OCI, LFS) and verified at the end;
    for others (S3 objects, web files) it is what the bytes hash to, set when they are complete.
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
        self._temp: TempBlob | None = None
        self._discarding = False  # set before the temp file is closed: no new reader may dup it
        self.verified = False  # every byte arrived and matched the digest
        self._changed = asyncio.Event()
        self._opened = asyncio.Event()

    # -- the filling task's side ------------------------------------------------------------
    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _set_open(self, temp: TempBlob, size: int | None) -> None:
        self._temp, self.size, self.state = temp, size, FillState.STREAMING
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

    async def open_fd(self) -> int:
        """A descriptor of our own on the bytes: the temp file while filling, else the blob."""
        await self.opened()
        if self.state is FillState.COMMITTED:
            assert self.blob is not None
            return await anyio.to_thread.run_sync(os.open, self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        if self.state is FillState.STREAMING and self._temp is not None and not self._discarding:
            # dup, not open by path: the temp file is renamed on commit, the inode stays.
            return os.dup(self._temp.fd)
        raise FillFailed(f"fill of {self.key} failed: {self.error}")

    async def readable(self, pos: int, end: int) -> int:
        """Wait until bytes past `pos` are on disk; how far [pos, end) may be read now.

        A range reaching the end of the blob gets its last byte only after verification.
        """
        hold_back = 1 if self.size is None or end >= self.size else 0
        while True:
            if self.state is FillState.FAILED:
                raise FillFailed(f"fill of {self.key} failed: {self.error}")
            done = self.state is FillState.COMMITTED or self.verified
            limit = end if done else min(self.written, end - hold_back)
            if limit > pos:
                return limit
            await self._changed.wait()


class Filler:
    """Starts at most one fill per key (a digest, or a source's name for a version of an object) in
    this process and lets every other request follow it."""

    def __init__(self, store: BlobStore, on_commit: CommitHook, listener: FillListener | None = None) -> None:
        self._store = store
        self._on_commit = on_commit
        self._listener = listener
        self._inflight: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def inflight(self, key: str) -> Fill | None:
        return self._inflight.get(key)

    def start_or_follow(
        self, key: str, opener: Opener, *, origin: Origin, digest: Digest | None = None, expected_size: int | None = None
    ) -> tuple[Fill, bool]:
        """The fill for this key, and whether this call joined one already running."""
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
        temp: TempBlob | None = None
        body: UpstreamBody | AsyncUpstreamBody | None = None
        try:
            # A fill that committed between the caller's lookup and now must not fetch again.
            if fill.digest is not None:
                existing = await anyio.to_thread.run_sync(self._store.stat, fill.digest)
                if existing is not None:
                    fill._commit(existing)
                    return
            body = await opener()
            size = body.size if body.size is not None else expected_size
            if expected_size is not None and size != expected_size:
                raise FillFailed(f"{fill.key}: upstream announced {size} bytes, expected {expected_size}")
            temp = await anyio.to_thread.run_sync(lambda: self._store.new_temp(hash_in_background=True))
            fill._set_open(temp, size)
            if isinstance(body, AsyncUpstreamBody):
                await self._copy_async(fill, body, temp)
            else:
                await self._copy(fill, body, temp)
            if fill.digest is None:
                fill.digest = Digest.from_hex(await anyio.to_thread.run_sync(temp.hexdigest))
            await anyio.to_thread.run_sync(self._store.verify, temp, fill.digest, size)
            fill._verified()  # readers may take the last byte now; fsync and rename need not hold them
            blob = await anyio.to_thread.run_sync(self._store.commit, temp, fill.digest, size)
            await self._on_commit(blob, origin)
            fill._commit(blob)
            temp.close()
            seconds = time.monotonic() - fill.stats.started_at
            if self._listener is not None:
                self._listener.fill_finished(origin, blob.size, seconds, True)
            log.info(
                "filled %s from %s (%d bytes in %.2fs, %d followers)", fill.key, origin.upstream, blob.size, seconds, fill.stats.followers
            )
        except BaseException as exc:  # noqa: BLE001 - the fill must never leave readers waiting
            if temp is not None:
                fill._discarding = True
                await anyio.to_thread.run_sync(temp.discard)
            fill._fail(exc)
            if self._listener is not None and temp is not None:
                self._listener.fill_finished(origin, temp.written, time.monotonic() - fill.stats.started_at, False)
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("fill of %s failed: %s", fill.key, exc)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._inflight.pop(fill.key, None)
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
