"""Content-addressed files on local disk: blobs/sha256/ab/abcdef…, written through temp files.

A file exists under blobs/ only after its bytes were hashed, matched and fsynced; everything
in progress lives under tmp/ and is swept at start-up, so a crash never leaves a bad blob.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from proxy.store.digest import Digest

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


class _BackgroundHasher:
    """sha256 in a thread of its own, so that hashing overlaps receiving and writing.

    hashlib releases the GIL on large buffers: on two cores this takes the hash off the
    critical path of a fill. At most `depth` chunks wait, which bounds the memory it holds.
    """

    def __init__(self, depth: int = 8) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()


class TempBlob:
    """A file being filled: bytes appended and hashed as they arrive. One writer thread at a time."""

    def __init__(self, path: Path, *, hash_in_background: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._hash: _BackgroundHasher | hashlib._Hash = _BackgroundHasher() if hash_in_background else hashlib.sha256()
        self._hexdigest: str | None = None
        self.written = 0

    def append(self, data: bytes) -> None:
        """Blocking: call from a worker thread."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._hash.update(data)
        self.written += len(data)

    def hexdigest(self) -> str:
        """Blocking: the sha256 of everything appended (no more appends after this)."""
        if self._hexdigest is None:
            self._hexdigest = self._hash.hexdigest()
        return self._hexdigest

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def discard(self) -> None:
        self.close()
        if isinstance(self._hash, _BackgroundHasher) and self._hexdigest is None:
            self.hexdigest()  # let the hashing thread end
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class BlobStore:
    """The cache's files. Knows nothing of registries or hubs, only digests and bytes."""

    def __init__(self, root: Path, *, node_id: str | None = None) -> None:
        self.root = root
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

    def new_temp(self, *, name: str | None = None, hash_in_background: bool = False) -> TempBlob:
        """Blocking: a fresh temp file for a fill."""
        return TempBlob(self.tmp_dir / (name or self.temp_name()), hash_in_background=hash_in_background)

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
        os.fsync(temp.fd)
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(temp.path, final)
        _fsync_dir(final.parent)
        return BlobFile(digest, final, temp.written)

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
