"""Content-addressed files on local disk: blobs/sha256/ab/abcdef…, written through temp files.

A file exists under blobs/ only after its bytes were hashed, matched and fsynced; everything
in progress lives under tmp/ and is swept at start-up, so a crash never leaves a bad blob.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.store.buffers import BufferRing
from proxy.store.digest import Digest
from proxy.store.dropbehind import DropBehind

log = logging.getLogger(__name__)


class DigestMismatch(Exception):
    """The bytes that arrived do not hash to the digest they were fetched for."""


class SizeMismatch(Exception):
    """The upstream sent more or fewer bytes than it announced."""


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A committed blob: its path and size."""

    digest: Digest
    path: Path
    size: int


class _Stage:
    """One step of a fill's pipeline in a thread of its own: the disk write, or the sha256.

    os.write and hashlib release the GIL, so on two cores the socket read, the write and the hash
    of one fill overlap instead of taking turns. Each queued piece comes with what to do once this
    step is done with it (hand it to the next step, give a receive buffer back to its ring); the
    ring's size is what bounds the memory waiting here. A failure (a full disk) is kept and raised
    to the producer; later pieces are passed on unprocessed so that their buffers still go back.
    """

    def __init__(self, name: str, work: Callable[[memoryview | bytes], object]) -> None:
        self._work = work
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[tuple[memoryview | bytes, Callable[[], None] | None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._finished = False
        self._finishing = threading.Lock()  # `flush` (the fill's thread) and `discard` may both finish

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, then = item
            if self.error is None:
                try:
                    self._work(data)
                except BaseException as exc:  # noqa: BLE001 - raised to the producer by `finish`
                    self.error = exc
            if then is not None:
                then()  # never raises: it hands on with `put(..., passing=True)` or gives a buffer back

    def idle(self) -> bool:
        """Nothing queued behind the piece being worked on (a hint: the producer may add more)."""
        return self._queue.empty()

    def put(self, data: memoryview | bytes, then: Callable[[], None] | None = None, *, passing: bool = False) -> None:
        """Queue a piece. After a failure the producer gets the error; a piece `passing` through
        from an earlier step is queued anyway (unprocessed), so that its `then` still runs."""
        if self.error is not None and not passing:
            raise self.error
        self._queue.put((data, then))

    def finish(self) -> None:
        """Blocking: wait until every queued piece is done; raise the step's failure."""
        with self._finishing:
            if not self._finished:
                self._finished = True
                self._queue.put(None)
                self._thread.join()
        if self.error is not None:
            raise self.error


class TempBlob:
    """A file being filled: bytes appended and hashed as they arrive. One producer thread at a time.

    With `pipelined`, `append_buffer` hands each piece to a writer thread and then to a hashing
    thread (see _Stage): `written` counts the bytes on disk, which lags the bytes appended until
    `flush`. Without it, everything happens in the caller's thread. `append` always writes in the
    caller's thread; a fill uses one of the two ways, never both.
    """

    def __init__(self, path: Path, *, pipelined: bool = False, drop_behind: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._drop_behind = DropBehind(self.fd) if drop_behind else None
        self._sha256 = hashlib.sha256()
        self._writer = _Stage("fill-write", self._write) if pipelined else None
        self._hasher = _Stage("sha256", self._sha256.update) if pipelined else None
        self._hexdigest: str | None = None
        self.written = 0
        # Told how many bytes are on disk after each write (in the writing thread), with whether
        # the writer has caught up with everything appended: readers are woken from here.
        self.on_written: Callable[[int, bool], None] | None = None

    def append(self, data: bytes) -> None:
        """Blocking: write and hash `data` (hashed in the background when pipelined)."""
        self._write(memoryview(data))
        if self._hasher is not None:
            self._hasher.put(data)
        else:
            self._sha256.update(data)

    def append_buffer(self, buffer: bytearray, length: int, ring: BufferRing) -> None:
        """Blocking: append the first `length` bytes of a receive buffer, which goes back to `ring`
        once it is written and hashed."""
        view = memoryview(buffer)[:length]
        if self._writer is None or self._hasher is None:
            self._write(view)
            self._sha256.update(view)
            ring.give(buffer)
            return
        hasher, give = self._hasher, functools.partial(ring.give, buffer)
        self._writer.put(view, lambda: hasher.put(view, give, passing=True))

    def flush(self) -> None:
        """Blocking: every appended byte is written (`written` is final); raises a failed write."""
        if self._writer is not None:
            self._writer.finish()

    def _write(self, view: memoryview | bytes) -> None:
        view = memoryview(view)
        length = len(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += length
        if self.on_written is not None:
            self.on_written(self.written, self._writer is not None and self._writer.idle())
        if self._drop_behind is not None:  # after the readers are told: advice is not on their path
            self._drop_behind.written(self.written)

    def fsync(self) -> None:
        """Blocking: fsync the file (every byte written first), then let drop-behind finish."""
        self.flush()
        os.fsync(self.fd)
        if self._drop_behind is not None:
            self._drop_behind.fsynced(self.written)

    def hexdigest(self) -> str:
        """Blocking: the sha256 of everything appended (no more appends after this)."""
        if self._hexdigest is None:
            self.flush()
            if self._hasher is not None:
                self._hasher.finish()
            self._hexdigest = self._sha256.hexdigest()
        return self._hexdigest

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def discard(self) -> None:
        for stage in (self._writer, self._hasher):  # no thread may still write to the descriptor's number
            if stage is not None:
                try:
                    stage.finish()
                except BaseException:  # noqa: BLE001 - the file is going anyway
                    pass
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class BlobStore:
    """The cache's files. Knows nothing of registries or hubs, only digests and bytes."""

    def __init__(self, root: Path, *, node_id: str | None = None, drop_behind: bool = False) -> None:
        self.root = root
        self.drop_behind = drop_behind  # fills and imports keep only their tail in the page cache (dropbehind.py)
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        # Temp names carry the node so that nodes sharing one mount never sweep each other's fills.
        self.node_id = node_id or re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())

    def prepare(self) -> None:
        """Blocking: create the folders and sweep temp files that crashed processes of this node left.

        Temp files are named node.pid.random: a file whose process still runs (a server and a
        `pullthrough prefetch` sharing one cache) is left alone.
        """
        (self.blobs_dir / "sha256").mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in self.tmp_dir.iterdir():
            node, pid, _ = (entry.name.rsplit(".", 2) + ["", ""])[:3]  # node names may hold dots
            if node == self.node_id and pid.isdigit() and not _process_alive(int(pid)):
                entry.unlink(missing_ok=True)
                swept += 1
        if swept:
            log.info("swept %d temp files left by an earlier run", swept)

    def path_for(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def stat(self, digest: Digest) -> BlobFile | None:
        """Blocking: the committed blob, or None."""
        path = self.path_for(digest)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        return BlobFile(digest, path, size)

    def temp_name(self) -> str:
        """A fresh temp file name: node.pid.random (the owner of a fill lease is this name)."""
        return f"{self.node_id}.{os.getpid()}.{secrets.token_hex(8)}"

    def new_temp(self, *, name: str | None = None, pipelined: bool = False) -> TempBlob:
        """Blocking: a fresh temp file for a fill."""
        return TempBlob(self.tmp_dir / (name or self.temp_name()), pipelined=pipelined, drop_behind=self.drop_behind)

    def open_temp(self, name: str) -> int | None:
        """Blocking: a read-only descriptor on another process's temp file, or None if it is gone.

        The name comes from the index, and is checked by the caller (leases.valid_owner)."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a temp file name: {name!r}")
        try:
            return os.open(self.tmp_dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    def sweep_stale_temps(self, older_than: float) -> int:
        """Blocking: remove temp files nobody wrote to for `older_than` seconds, whatever their node.

        A live fill appends continuously, so only the leftovers of a node that died and was never
        started again under the same name get this old."""
        cutoff = time.time() - older_than
        removed = 0
        if not self.tmp_dir.is_dir():
            return 0  # a cache no server has started on yet
        for entry in self.tmp_dir.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    @staticmethod
    def verify(temp: TempBlob, digest: Digest, expected_size: int | None) -> None:
        """Blocking: raise unless the temp file holds exactly the bytes of the digest."""
        if expected_size is not None and temp.written != expected_size:
            raise SizeMismatch(f"{digest}: expected {expected_size} bytes, received {temp.written}")
        actual = temp.hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(f"{digest}: received bytes hash to sha256:{actual}")

    def commit(self, temp: TempBlob, digest: Digest, expected_size: int | None) -> BlobFile:
        """Blocking: verify, fsync and rename into place; raise on any mismatch.

        The temp file stays open either way: its owner closes it (or discards it on error) once no
        reader can still be handed its descriptor.
        """
        self.verify(temp, digest, expected_size)
        # Read-only: `materialize` hands out hard links, and a job writing to one must not
        # change the cache's copy.
        os.fchmod(temp.fd, 0o444)
        temp.fsync()
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp.path, final)
        _fsync_dir(final.parent)
        return BlobFile(digest, final, temp.written)

    def stage(self, temp: TempBlob, digest: Digest, expected_size: int) -> Path:
        """Blocking: verify, make read-only, fsync and close a temp file, which stays under tmp/
        until `place` renames it into blobs/: for a writer that verifies many blobs before it
        commits any (an import). Raises on a mismatch, leaving the file to its owner's discard."""
        self.verify(temp, digest, expected_size)
        os.fchmod(temp.fd, 0o444)
        temp.fsync()
        temp.close()
        return temp.path

    def place(self, staged: Path, digest: Digest) -> BlobFile:
        """Blocking: rename a staged file into place (over an existing copy of the same bytes: the
        rename is atomic, and readers of the old file keep reading it)."""
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        _fsync_dir(final.parent)
        return BlobFile(digest, final, final.stat().st_size)

    def put_bytes(self, data: bytes, digest: Digest) -> BlobFile:
        """Blocking: store a small verified object (a manifest) in one go."""
        existing = self.stat(digest)
        if existing is not None:
            return existing
        temp = self.new_temp()
        try:
            temp.append(data)
            blob = self.commit(temp, digest, len(data))
        except BaseException:
            temp.discard()
            raise
        temp.close()
        return blob

    def read_bytes(self, digest: Digest) -> bytes | None:
        """Blocking: a small blob's bytes (manifests), or None."""
        try:
            return self.path_for(digest).read_bytes()
        except FileNotFoundError:
            return None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from before a fork or reuse: nothing of this process is in flight yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
