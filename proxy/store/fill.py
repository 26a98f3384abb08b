"""A fill: one blob arriving in a file, read while it grows. Readers see a Fill; whoever brings the
bytes (this process's filler, or the follower of another node's download) drives its FillWriter.

A reader whose response reaches the end of the blob gets its last byte only once the whole blob
has been verified: a mismatching upstream leaves such a client with a truncated body (an error),
never a complete wrong one. A range that ends earlier is served as soon as its bytes are on disk,
as it would be from the upstream.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.pools import Pools
from proxy.store.records import ReadScope

COMPARE_CHUNK = 4 * 1024 * 1024


class UpstreamBody(Protocol):
    """An open upstream response: its announced size (None when unknown) and its bytes.

    Bodies are read in a worker thread: a blocking read straight from the socket into a reused
    buffer moves a GiB in a fraction of a second, where an async stream of small chunks took 2-3 s
    on the same machine.
    """

    size: int | None

    def read_into(self, buffer: bytearray) -> int:
        """Blocking: fill the start of `buffer` with the next bytes as soon as any are available;
        how many (0 at the end)."""
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
AfterCommit = Callable[[BlobFile], Awaitable[None]]


class FillFailed(Exception):
    """The fill a reader was following did not complete (upstream error, mismatch, crash)."""


class FillState(enum.Enum):
    OPENING = "opening"
    STREAMING = "streaming"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass
class FillStats:
    started_at: float = field(default_factory=time.monotonic)
    followers: int = 0


class Fill:
    """One blob being fetched, by this process or (followed through its temp file) by another.

    Readers wait with `opened()` and read through `reader()`. `digest` is known up front for
    content-addressed upstreams (OCI, LFS) and verified at the end; for others (S3 objects, web
    files) it is what the bytes hash to, set when they are complete. `scopes` are the read scopes
    of the requests allowed to read it: each is admitted to the blob when it commits.

    The bytes come from one file per generation. A new generation starts when the process being
    followed died and another took over: readers move to the new file at the offset they reached,
    and the prefixes earlier generations served are compared with the final bytes before any
    reader gets its last byte.
    """

    def __init__(self, key: str, digest: Digest | None, scope: ReadScope, pools: Pools) -> None:
        self.key = key
        self.pools = pools
        self.digest = digest
        self.scopes: set[ReadScope] = {scope}
        self.after_commit: list[AfterCommit] = []
        self.state = FillState.OPENING
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.blob: BlobFile | None = None
        self.stats = FillStats()
        self.generation = 0
        self.node: str | None = None  # the node whose fill is followed; None when it is this process
        self.verified = False  # every byte arrived and matched the digest
        self._fd: int | None = None  # what readers dup: our temp file's, or one on another node's
        self._owns_fd = False
        self._earlier: list[tuple[int, int]] = []  # (descriptor, bytes it held) of past generations
        self._discarding = False  # set before the temp file is closed: no new reader may dup it
        self._changed = asyncio.Event()
        self._opened = asyncio.Event()
        self.writer = FillWriter(self)

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


class FillWriter:
    """The side of a Fill that brings its bytes: opened on a file, advanced, verified, committed or
    failed. Driven by the filler for downloads of this process and by the remote follower for
    downloads of another node; nothing else changes a Fill."""

    def __init__(self, fill: Fill) -> None:
        self._fill = fill

    def _notify(self) -> None:
        fill = self._fill
        changed, fill._changed = fill._changed, asyncio.Event()
        changed.set()

    @property
    def discarding(self) -> bool:
        return self._fill._discarding

    @property
    def has_earlier(self) -> bool:
        return bool(self._fill._earlier)

    def open(self, fd: int, size: int | None, *, owned: bool = False, node: str | None = None) -> None:
        """Bytes start arriving in the file behind `fd` (closed by the fill if `owned`), written by
        `node` (None: this process); a new generation if another file served some before."""
        fill = self._fill
        if fill._fd is not None:
            self._retire(fill._fd, fill._owns_fd)
        fill._fd, fill._owns_fd, fill.size, fill.state, fill.node = fd, owned, size, FillState.STREAMING, node
        fill._opened.set()
        self._notify()

    def _retire(self, fd: int, owned: bool) -> None:
        fill = self._fill
        # An earlier generation is compared with the final bytes: keep a descriptor on it.
        fill._earlier.append((fd if owned else os.dup(fd), fill.written))
        fill._fd, fill._owns_fd = None, False
        fill.generation += 1
        fill.written = 0

    def advance(self, written: int) -> None:
        self._fill.written = written
        self._notify()

    def mark_verified(self) -> None:
        """Every byte arrived and matched: readers may take the last byte now."""
        self._fill.verified = True
        self._notify()

    def set_digest(self, digest: Digest) -> None:
        self._fill.digest = digest

    def start_discarding(self) -> None:
        """The temp file is about to close: no new reader may take a descriptor on it."""
        self._fill._discarding = True

    def retire_unless_same_file(self, blob: BlobFile) -> None:
        """Blocking. Another node committed `blob`: if the file readers follow now is not that very
        file (renamed into place), make it an earlier generation, so that what it served is checked
        against the blob and readers move to the blob itself."""
        fill = self._fill
        if fill._fd is None:
            return
        current, final = os.fstat(fill._fd), os.stat(blob.path)
        if (current.st_dev, current.st_ino) != (final.st_dev, final.st_ino):
            self._retire(fill._fd, fill._owns_fd)

    def check_earlier(self, final_fd: int) -> None:
        """Blocking: raise unless every earlier generation's bytes equal the final ones."""
        for fd, length in self._fill._earlier:
            for offset in range(0, length, COMPARE_CHUNK):
                want = min(COMPARE_CHUNK, length - offset)
                if os.pread(fd, want, offset) != os.pread(final_fd, want, offset):
                    raise FillFailed(f"{self._fill.key}: the bytes served before a takeover differ at offset {offset}")

    def commit(self, blob: BlobFile) -> None:
        fill = self._fill
        fill.blob, fill.digest, fill.size, fill.written, fill.state = blob, blob.digest, blob.size, blob.size, FillState.COMMITTED
        fill._opened.set()
        self._notify()

    def fail(self, error: BaseException) -> None:
        fill = self._fill
        if fill.state is FillState.FAILED:
            return
        fill.error, fill.state = error, FillState.FAILED
        fill._opened.set()
        self._notify()

    def release(self) -> None:
        """Close the descriptors the fill opened itself, once it has ended (readers hold dups)."""
        fill = self._fill
        for fd, _ in fill._earlier:
            os.close(fd)
        fill._earlier.clear()
        if fill._owns_fd and fill._fd is not None:
            os.close(fill._fd)
        fill._fd, fill._owns_fd = None, False


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
                self.fd = await fill.pools.files(os.open, fill.blob.path, os.O_RDONLY | os.O_CLOEXEC)
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
