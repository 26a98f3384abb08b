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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from proxy.store.blobs import BlobFile, BlobStore, TempBlob
from proxy.store.digest import Digest

log = logging.getLogger(__name__)

WRITE_BATCH = 1024 * 1024
READ_CHUNK = 4 * 1024 * 1024


class UpstreamBody(Protocol):
    """An open upstream response: its announced size (None when unknown) and its bytes."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


Opener = Callable[[], Awaitable[UpstreamBody]]
CommitHook = Callable[[BlobFile], Awaitable[None]]


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
    """One digest being fetched. Readers wait on it with `opened()` and `read()`."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.state = FillState.OPENING
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.blob: BlobFile | None = None
        self.stats = FillStats(started_at=time.monotonic())
        self._temp: TempBlob | None = None
        self._discarding = False  # set before the temp file is closed: no new reader may dup it
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

    def _open_fd(self) -> int:
        """A descriptor of our own on the bytes: the temp file while filling, else the blob."""
        if self.state is FillState.COMMITTED:
            assert self.blob is not None
            return os.open(self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        if self.state is FillState.STREAMING and self._temp is not None and not self._discarding:
            # dup, not open by path: the temp file is renamed on commit, the inode stays.
            return os.dup(self._temp.fd)
        raise FillFailed(f"fill of {self.digest} failed: {self.error}")

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) as they arrive; the blob's final byte only once the blob is verified."""
        size = await self.opened()
        hold_back = 1 if size is None or end >= size else 0
        fd = self._open_fd()
        try:
            pos = start
            while pos < end:
                if self.state is FillState.FAILED:
                    raise FillFailed(f"fill of {self.digest} failed: {self.error}")
                readable = end if self.state is FillState.COMMITTED else min(self.written, end - hold_back)
                if readable > pos:
                    length = min(readable - pos, READ_CHUNK)
                    data = await anyio.to_thread.run_sync(os.pread, fd, length, pos)
                    if not data:
                        raise FillFailed(f"{self.digest}: file ended at {pos}, expected {end}")
                    pos += len(data)
                    yield data
                else:
                    await self._changed.wait()
        finally:
            os.close(fd)


class Filler:
    """Starts at most one fill per digest in this process and lets every other request follow it."""

    def __init__(self, store: BlobStore, on_commit: CommitHook) -> None:
        self._store = store
        self._on_commit = on_commit
        self._inflight: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def inflight(self, digest: Digest) -> Fill | None:
        return self._inflight.get(digest)

    def start_or_follow(self, digest: Digest, opener: Opener, *, expected_size: int | None = None) -> tuple[Fill, bool]:
        """The fill for this digest, and whether this call joined one already running."""
        fill = self._inflight.get(digest)
        if fill is not None:
            fill.stats.followers += 1
            return fill, True
        fill = Fill(digest)
        self._inflight[digest] = fill
        task = asyncio.create_task(self._run(fill, opener, expected_size), name=f"fill {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill, False

    async def _run(self, fill: Fill, opener: Opener, expected_size: int | None) -> None:
        temp: TempBlob | None = None
        body: UpstreamBody | None = None
        try:
            # A fill that committed between the caller's lookup and now must not fetch again.
            existing = await anyio.to_thread.run_sync(self._store.stat, fill.digest)
            if existing is not None:
                fill._commit(existing)
                return
            body = await opener()
            size = body.size if body.size is not None else expected_size
            if expected_size is not None and size != expected_size:
                raise FillFailed(f"{fill.digest}: upstream announced {size} bytes, expected {expected_size}")
            temp = await anyio.to_thread.run_sync(self._store.new_temp)
            fill._set_open(temp, size)
            await self._copy(fill, body, temp)
            blob = await anyio.to_thread.run_sync(self._store.commit, temp, fill.digest, size)
            await self._on_commit(blob)
            fill._commit(blob)
            temp.close()
            log.info("filled %s (%d bytes, %d followers)", fill.digest, blob.size, fill.stats.followers)
        except BaseException as exc:  # noqa: BLE001 - the fill must never leave readers waiting
            if temp is not None:
                fill._discarding = True
                await anyio.to_thread.run_sync(temp.discard)
            fill._fail(exc)
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("fill of %s failed: %s", fill.digest, exc)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._inflight.pop(fill.digest, None)
            if body is not None:
                await body.aclose()

    @staticmethod
    async def _copy(fill: Fill, body: UpstreamBody, temp: TempBlob) -> None:
        batch = bytearray()
        async for chunk in body.chunks():
            batch += chunk
            if len(batch) >= WRITE_BATCH:
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
