"""A fill as its readers see it: a blob arriving in a file, read while it grows.

A reader whose response reaches the end of the blob gets its last byte only once the whole blob
has been verified: a mismatching upstream leaves such a client with a truncated body (an error),
never a complete wrong one. A range that ends earlier is served as soon as its bytes are on disk,
as it would be from the upstream. Who writes the file is filler.py's business (this process) or
follow.py's (another process sharing the cache).
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio

from proxy.store.blobs import BlobFile
from proxy.store.digest import Digest
from proxy.store.index import FillLease

COMPARE_CHUNK = 4 * 1024 * 1024


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
            for offset in range(0, length, COMPARE_CHUNK):
                want = min(COMPARE_CHUNK, length - offset)
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
