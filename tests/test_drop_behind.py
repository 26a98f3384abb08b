"""Drop-behind (proxy/store/dropbehind.py): a committed fill keeps only its tail in the page cache,
and every byte of it is still there, on disk, for the reads that follow.

Page-cache residency is read with util-linux's `fincore`, the tool an operator would use."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from proxy.store.blobs import BlobStore
from proxy.store.buffers import BufferPool
from proxy.store.digest import Digest
from proxy.store.dropbehind import WINDOW, DropBehind
from tests.images import ImageSpec, publish
from tests.servers.registry import Distribution

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


class RecordingDropBehind(DropBehind):
    """Drop-behind that records its advice (offset, length, the file's size then) instead of giving it."""

    def __init__(self) -> None:
        super().__init__(fd=-1)
        self.size = 0
        self.calls: list[tuple[int, int, int]] = []

    def written(self, size: int) -> None:
        self.size = size
        super().written(size)

    def _advise(self, offset: int, length: int) -> None:
        self.calls.append((offset, length, self.size))


def covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    position = start
    for offset, length in sorted(ranges):
        if offset <= position < offset + length:
            position = offset + length
    return position >= end


@pytest.mark.parametrize("size", [300 * MIB + 12345, 1024 * MIB, 3 * WINDOW // 2 - 1, WINDOW])
def test_drop_behind_starts_writeback_a_window_behind_the_head_and_drops_what_is_further(size: int) -> None:
    drop = RecordingDropBehind()
    for end in [*range(MIB, size, MIB), size]:  # appends of 1 MiB and a last odd piece
        drop.written(end)
    during = drop.calls
    for offset, length, head in during:  # never within a window of the write head
        assert offset >= 0 and offset + length <= head - WINDOW, (offset, length, head)
    if size < 3 * WINDOW // 2:
        assert during == []  # nothing to advise yet: a small blob stays cached as written
    else:
        # Every range more than two and a half windows behind the end was advised twice: once to
        # start its writeback, once (a window later) to drop it.
        first = [(o, n) for o, n, _ in during]
        twice = [(o, n) for o, n in first if sum(1 for p, m in first if p <= o and o + n <= p + m) >= 2]
        assert covered(twice, 0, size - 5 * WINDOW // 2)
    drop.calls = []
    drop.fsynced(size)
    assert drop.calls == ([(0, size - 2 * WINDOW, size)] if size > 2 * WINDOW else [])


@pytest.mark.parametrize("drop_behind", [True, False])
def test_a_committed_fill_keeps_only_its_tail_in_the_page_cache(tmp_path: Path, drop_behind: bool) -> None:
    files = BlobStore(tmp_path, drop_behind=drop_behind)
    files.prepare()
    path, expected = fill(files, SIZE)
    resident = resident_bytes(path)
    if drop_behind:
        # The last two windows stay, as followers of the fill read near its head; the rest goes.
        assert WINDOW <= resident <= 2 * WINDOW + 4 * MIB, f"{resident / MIB:.0f} MiB of {SIZE / MIB:.0f} MiB cached"
    else:
        assert resident >= SIZE - 8 * MIB, f"only {resident / MIB:.0f} MiB cached without drop-behind"
    with open(path, "rb") as blob:  # every byte there, read back from the disk
        assert hashlib.sha256(blob.read()).digest() == expected


@pytest.fixture(scope="module")
def big_layer_upstream(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A registry of its own holding one image with a 256 MiB layer; yields (registry, layer)."""
    workdir = tmp_path_factory.mktemp("big-upstream")
    registry = Distribution.start(workdir / "registry")
    try:
        image = publish([ImageSpec("library/huge", "1", seed=12, layers=[[SIZE // 2, SIZE // 2]])], workdir / "layouts",
                        registry.host)["library/huge:1"]
        yield registry, image.layers[0]
    finally:
        registry.stop()


@pytest.mark.parametrize("drop_behind", [True, False])
def test_a_cold_get_through_the_server_follows_the_setting(big_layer_upstream, pullthrough, drop_behind: bool) -> None:  # type: ignore[no-untyped-def]
    registry, layer = big_layer_upstream
    pt = pullthrough([{"name": "docker.io", "url": registry.url, "default": True}], drop_behind=drop_behind)
    sha = hashlib.sha256()
    with httpx.stream("GET", f"{pt.url}/v2/library/huge/blobs/{layer.digest}", timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(MIB):
            sha.update(chunk)
    assert f"sha256:{sha.hexdigest()}" == layer.digest
    path = pt.blob_path(layer.digest)
    for _ in range(600):  # the commit (fsync, rename) may land just after the last byte
        if path.exists() and not pt.tmp_files():
            break
        time.sleep(0.05)
    assert path.exists(), "the blob was not committed"
    resident = resident_bytes(path)
    if drop_behind:
        assert WINDOW <= resident <= 2 * WINDOW + 4 * MIB, f"{resident / MIB:.0f} MiB of {layer.size / MIB:.0f} MiB cached"
    else:
        assert resident >= layer.size - 8 * MIB, f"only {resident / MIB:.0f} MiB cached"
