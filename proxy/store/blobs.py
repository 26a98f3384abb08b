"""Content-addressed files on local disk: blobs/sha256/ab/abcdef…, written through temp files.

A file exists under blobs/ only after its bytes were hashed, matched and fsynced; everything
in progress lives under tmp/ and is swept at start-up, so a crash never leaves a bad blob.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
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


class TempBlob:
    """A file being filled: bytes appended and hashed as they arrive. Not thread-safe; one writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._hash = hashlib.sha256()
        self.written = 0

    def append(self, data: bytes | memoryview) -> None:
        """Blocking: call from a worker thread."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._hash.update(data)
        self.written += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def discard(self) -> None:
        self.close()
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
        self.node_id = node_id or socket.gethostname().replace("/", "_")

    def prepare(self) -> None:
        """Blocking: create the folders and sweep this node's temp files left by a crash."""
        (self.blobs_dir / "sha256").mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in self.tmp_dir.iterdir():
            if entry.name.startswith(f"{self.node_id}."):
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

    def new_temp(self) -> TempBlob:
        """Blocking: a fresh temp file for a fill."""
        name = f"{self.node_id}.{os.getpid()}.{secrets.token_hex(8)}"
        return TempBlob(self.tmp_dir / name)

    def commit(self, temp: TempBlob, digest: Digest, expected_size: int | None) -> BlobFile:
        """Blocking: verify, fsync and rename into place; raise on any mismatch.

        The temp file stays open either way: its owner closes it (or discards it on error) once no
        reader can still be handed its descriptor.
        """
        if expected_size is not None and temp.written != expected_size:
            raise SizeMismatch(f"{digest}: expected {expected_size} bytes, received {temp.written}")
        actual = temp.hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(f"{digest}: received bytes hash to sha256:{actual}")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
