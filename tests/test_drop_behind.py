"""Drop-behind (proxy/store/dropbehind.py): a committed fill keeps only its tail in the page cache,
and every byte of it is still there, on disk, for the reads that follow.

Page-cache residency is read with util-linux's `fincore`, the tool an operator would use."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.store.blobs import BlobStore
from proxy.store.buffers import BufferPool
from proxy.store.digest import Digest
from proxy.store.dropbehind import WINDOW

MIB = 1024 * 1024
SIZE = 256 * MIB


def resident_bytes(path: Path) -> int:
    fincore = shutil.which("fincore")
    assert fincore, "util-linux's fincore is needed (Debian: util-linux)"
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def fill(files: BlobStore, size: int) -> tuple[Path, bytes]:
    """A pipelined fill of `size` bytes (distinct 1 MiB pieces), committed; its path and content hash."""
    pool = BufferPool(size=MIB, keep=8, per_fill=8)
    ring = pool.ring()
    temp = files.new_temp(pipelined=True)
    sha = hashlib.sha256()
    block = os.urandom(MIB)
    for index in range(size // MIB):
        buffer = ring.take()
        buffer[:] = block
        buffer[:8] = index.to_bytes(8, "big")
        sha.update(buffer)
        temp.append_buffer(buffer, MIB, ring)
    temp.flush()  # as the fill does once its body ends
    digest = Digest.parse(f"sha256:{sha.hexdigest()}")
    committed = files.commit(temp, digest, size)
    temp.close()
    return committed.path, sha.digest()


@pytest.mark.parametrize("drop_behind", [True, False])
def test_a_committed_fill_keeps_only_its_tail_in_the_page_cache(tmp_path: Path, drop_behind: bool) -> None:
    files = BlobStore(tmp_path, drop_behind=drop_behind)
    files.prepare()
    path, expected = fill(files, SIZE)
    resident = resident_bytes(path)
    if drop_behind:
        # Two windows at most stay: the one being written back and the one behind the head.
        assert resident <= 2 * WINDOW + 4 * MIB, f"{resident / MIB:.0f} MiB of {SIZE / MIB:.0f} MiB still cached"
    else:
        assert resident >= SIZE - 8 * MIB, f"only {resident / MIB:.0f} MiB cached without drop-behind"
    with open(path, "rb") as blob:  # every byte there, read back from the disk
        assert hashlib.sha256(blob.read()).digest() == expected


def test_a_blob_smaller_than_the_window_stays_cached_whole(tmp_path: Path) -> None:
    files = BlobStore(tmp_path, drop_behind=True)
    files.prepare()
    path, _ = fill(files, WINDOW + WINDOW // 2 - MIB)  # below the first range that is dropped
    assert resident_bytes(path) >= path.stat().st_size - 4 * MIB
