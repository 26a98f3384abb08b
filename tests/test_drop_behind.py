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
from proxy.store.dropbehind import WINDOW
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
        assert resident <= 2 * WINDOW + 4 * MIB, f"{resident / MIB:.0f} MiB of {layer.size / MIB:.0f} MiB cached"
    else:
        assert resident >= layer.size - 8 * MIB, f"only {resident / MIB:.0f} MiB cached"
