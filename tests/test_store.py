"""The store on its own: content-addressed files, atomic commits, single-flight fills with followers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from proxy.store.blobs import BlobStore, DigestMismatch
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest, InvalidDigest, UnsupportedDigest
from proxy.http.responses import iter_bytes
from proxy.store.fill import Fill, FillFailed, Origin
from proxy.store.index import Index, make_engine
from proxy.migrate import upgrade

pytestmark = pytest.mark.anyio

ORIGIN = Origin("test", "upstream.test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedUpstream:
    """An upstream body whose bytes the test can hold back, counting how often it was opened."""

    def __init__(self, data: bytes, *, chunk: int = 256 * 1024, announce: int | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.size = len(data) if announce is None else announce
        self.opens = 0
        self.pos = 0
        self.release = threading.Event()  # set: bytes flow; clear: the reader blocks at stall_at
        self.release.set()
        self.stall_at = 0  # offset from which bytes wait for release
        self.closed = False

    async def open(self) -> ScriptedUpstream:
        self.opens += 1
        return self

    def read_some(self, limit: int) -> bytes:
        if self.pos >= self.stall_at and not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the upstream")
        data = self.data[self.pos : self.pos + min(limit, self.chunk)]
        self.pos += len(data)
        return data

    def abort(self) -> None:
        self.release.set()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    return BlobCache(BlobStore(tmp_path / "cache"), Index(make_engine(url)))


def digest_of(data: bytes) -> Digest:
    return Digest.from_hex(hashlib.sha256(data).hexdigest())


async def collect(fill: Fill, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in iter_bytes(fill, start, end)])


def test_digest_parse_accepts_only_lowercase_sha256() -> None:
    assert str(Digest.parse("sha256:" + "a" * 64)) == "sha256:" + "a" * 64
    with pytest.raises(UnsupportedDigest):
        Digest.parse("sha512:" + "a" * 128)
    for bad in ["sha256:" + "A" * 64, "sha256:abc", "sha256:../../etc/passwd", "", "sha256:" + "a" * 63 + "/"]:
        with pytest.raises(InvalidDigest):
            Digest.parse(bad)


def test_blob_path_is_sharded_under_the_cache_root(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = Digest.parse("sha256:ab" + "0" * 62)
    assert store.path_for(digest) == tmp_path / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)


def test_commit_of_mismatching_bytes_raises_and_leaves_no_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.prepare()
    digest = digest_of(b"expected")
    temp = store.new_temp()
    temp.append(b"something else")
    with pytest.raises(DigestMismatch):
        store.commit(temp, digest, None)
    temp.discard()
    assert store.stat(digest) is None
    assert list(store.tmp_dir.iterdir()) == []


def test_prepare_sweeps_temp_files_of_dead_processes_of_this_node_only(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, node_id="node-a")
    store.prepare()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.tmp_dir / f"node-a.{dead.pid}.deadbeef").write_bytes(b"half a blob of a crashed process")
    (store.tmp_dir / f"node-a.{os.getppid()}.feedface").write_bytes(b"a fill of a process still running")
    (store.tmp_dir / "node-b.456.cafebabe").write_bytes(b"another node's fill")
    store.prepare()
    assert sorted(p.name for p in store.tmp_dir.iterdir()) == sorted([f"node-a.{os.getppid()}.feedface", "node-b.456.cafebabe"])


async def test_concurrent_misses_share_one_upstream_stream(cache: BlobCache) -> None:
    await cache.start()
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data)
    upstream.release.clear()
    fills = [cache.fill(digest, upstream.open, origin=ORIGIN) for _ in range(8)]
    assert [joined for _, joined in fills] == [False] + [True] * 7
    readers = [asyncio.create_task(collect(fill, 0, len(data))) for fill, _ in fills]
    upstream.release.set()
    bodies = await asyncio.gather(*readers)
    assert upstream.opens == 1
    assert all(body == data for body in bodies)
    assert await fills[0][0].finished() is not None  # readers may finish before the rename
    assert (await cache.lookup(digest)) is not None
    await cache.aclose()


async def test_follower_receives_bytes_before_the_fill_completes(cache: BlobCache) -> None:
    await cache.start()
    data = os.urandom(4 * 1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data, chunk=512 * 1024)
    upstream.stall_at = 2 * 1024 * 1024
    upstream.release.clear()
    fill, _ = cache.fill(digest, upstream.open, origin=ORIGIN)
    await fill.opened()
    for _ in range(500):
        if fill.written >= 1024 * 1024:
            break
        await asyncio.sleep(0.01)
    assert 0 < fill.written < len(data)
    reader = iter_bytes(fill, 0, len(data))
    first = await asyncio.wait_for(reader.__anext__(), timeout=5)
    assert len(first) >= 1024 * 1024 and first == data[: len(first)]
    upstream.release.set()
    rest = b"".join([chunk async for chunk in reader])
    assert first + rest == data
    await cache.aclose()


async def test_a_range_reaching_the_end_of_a_growing_blob_ends_only_after_verification(cache: BlobCache) -> None:
    await cache.start()
    data = os.urandom(2 * 1024 * 1024)
    upstream = ScriptedUpstream(data)
    fill, _ = cache.fill(digest_of(data), upstream.open, origin=ORIGIN)
    body = await collect(fill, len(data) - 5000, len(data))
    assert body == data[-5000:]
    assert fill.verified  # the last byte waited for the verification
    await cache.aclose()


async def test_a_range_inside_a_growing_blob_is_served_before_the_fill_ends(cache: BlobCache) -> None:
    await cache.start()
    data = os.urandom(4 * 1024 * 1024)
    upstream = ScriptedUpstream(data, chunk=512 * 1024)
    upstream.stall_at = 2 * 1024 * 1024
    upstream.release.clear()
    fill, _ = cache.fill(digest_of(data), upstream.open, origin=ORIGIN)
    body = await asyncio.wait_for(collect(fill, 1000, 5000), timeout=5)
    assert body == data[1000:5000]
    assert not fill.verified  # served while the upstream was still stalled
    upstream.release.set()
    await fill.finished()
    await cache.aclose()


async def test_upstream_sending_wrong_bytes_fails_every_reader_and_caches_nothing(cache: BlobCache) -> None:
    await cache.start()
    wanted = os.urandom(1024 * 1024)
    digest = digest_of(wanted)
    corrupt = bytearray(wanted)
    corrupt[-1] ^= 0xFF
    upstream = ScriptedUpstream(bytes(corrupt))
    fills = [cache.fill(digest, upstream.open, origin=ORIGIN) for _ in range(3)]
    received: list[bytes] = [b"", b"", b""]

    async def read(i: int) -> None:
        async for chunk in iter_bytes(fills[i][0], 0, len(wanted)):
            received[i] += chunk

    results = await asyncio.gather(*(read(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, FillFailed) for r in results)
    assert all(len(body) < len(wanted) for body in received)  # never the whole (wrong) body
    assert (await cache.lookup(digest)) is None
    assert list(cache.store.tmp_dir.iterdir()) == []
    await cache.aclose()


async def test_short_upstream_body_is_not_committed(cache: BlobCache) -> None:
    await cache.start()
    data = os.urandom(100_000)
    upstream = ScriptedUpstream(data[:50_000], announce=len(data))
    fill, _ = cache.fill(digest_of(data), upstream.open, origin=ORIGIN)
    assert await fill.finished() is None
    assert (await cache.lookup(digest_of(data))) is None
    await cache.aclose()


async def test_a_committed_blob_is_indexed_and_access_is_batched(cache: BlobCache) -> None:
    await cache.start()
    data = b"layer bytes"
    digest = digest_of(data)
    fill, _ = cache.fill(digest, ScriptedUpstream(data).open, origin=ORIGIN)
    await fill.finished()
    record = cache.index.get_blob(str(digest))
    assert record is not None and record.size == len(data) and record.hits == 0
    for _ in range(3):
        assert await cache.lookup(digest) is not None
    assert cache.index.get_blob(str(digest)).hits == 0  # no write per hit
    await cache.flush_access()
    assert cache.index.get_blob(str(digest)).hits == 3
    await cache.aclose()
