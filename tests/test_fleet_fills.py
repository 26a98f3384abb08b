"""Fleet-wide single flight, in one process: two caches ("nodes") on one directory and one index.

The three-process tests against PostgreSQL and a real registry are in test_fleet.py; these pin
down each path of the lease protocol (follow, take over, adopt, fail) where the test controls
every byte and every heartbeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from proxy.http.responses import FileSource, iter_bytes
from proxy.migrate import upgrade
from proxy.store.blobs import BlobStore
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest
from proxy.store.fill import Fill, FillFailed, Origin
from proxy.store.index import Index, make_engine
from proxy.store.janitor import Janitor, Policy
from proxy.store.leases import FillLeases, key_hash
from tests.test_store import ScriptedUpstream

pytestmark = pytest.mark.anyio

ORIGIN = Origin("test", "upstream.test")
LEASE_SECONDS = 1.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Node:
    """One cache as a pullthrough node builds it, sharing `root` and the index with the others."""

    def __init__(self, name: str, root: Path, url: str, *, follow_streams: bool = True) -> None:
        index = Index(make_engine(url))
        self.leases = FillLeases(index, name, LEASE_SECONDS)
        self.cache = BlobCache(BlobStore(root, node_id=name), index, leases=self.leases, follow_streams=follow_streams)

    def go_silent(self) -> None:
        """Write no more to the leases, as a node that is killed or cut off (its fill goes on)."""

        async def lost(key: str, owner: str, **values: object) -> bool:
            return False

        self.leases.update = lost  # type: ignore[method-assign]

    def publish_no_progress(self) -> None:
        """Keep the heartbeat going but never publish a synced watermark."""

        async def heartbeat_only(key: str, owner: str, sync) -> None:  # type: ignore[no-untyped-def]
            async def nothing_synced() -> None:
                return None

            await FillLeases.keep_renewed(self.leases, key, owner, nothing_synced)

        self.leases.keep_renewed = heartbeat_only  # type: ignore[method-assign]


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    return tmp_path / "cache", url


def digest_of(data: bytes) -> Digest:
    return Digest.from_hex(hashlib.sha256(data).hexdigest())


async def collect(fill: Fill, start: int = 0, end: int | None = None) -> bytes:
    end = end if end is not None else await fill.opened()
    assert end is not None
    return b"".join([chunk async for chunk in iter_bytes(fill, start, end)])


async def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_second_node_follows_the_first_nodes_temp_file_instead_of_going_upstream(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(6 * 1024 * 1024 + 5)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=512 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 3 * 1024 * 1024
    upstream_a.release.clear()
    fill_a, _ = a.cache.fill(digest, upstream_a.open, origin=ORIGIN)
    await wait_for(lambda: fill_a.written > 0)
    fill_b, joined = b.cache.fill(digest, upstream_b.open, origin=ORIGIN)
    assert not joined  # a fill of its own in node b's process, which follows node a's
    assert await asyncio.wait_for(fill_b.opened(), 5) == len(data)
    assert fill_b.node == "a"
    first = await asyncio.wait_for(collect(fill_b, 0, 1024 * 1024), 5)  # while node a is stalled
    assert first == data[: 1024 * 1024]
    whole = asyncio.create_task(collect(fill_b))
    upstream_a.release.set()
    assert await asyncio.wait_for(whole, 20) == data
    assert upstream_a.opens == 1 and upstream_b.opens == 0
    blob = await fill_b.finished()
    assert blob is not None and blob.digest == digest
    await a.cache.aclose(), await b.cache.aclose()


async def test_a_silent_filler_is_taken_over_and_followers_get_every_byte_with_one_more_fetch(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(5 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data, chunk=256 * 1024)
    upstream_a.stall_at = 2 * 1024 * 1024  # node a stops half way, then stops renewing its lease
    upstream_a.release.clear()
    fill_a, _ = a.cache.fill(digest, upstream_a.open, origin=ORIGIN)
    await wait_for(lambda: fill_a.written > 0)
    fill_b, _ = b.cache.fill(digest, upstream_b.open, origin=ORIGIN)
    readers = [asyncio.create_task(collect(fill_b)) for _ in range(3)]
    await wait_for(lambda: fill_b.written >= 2 * 1024 * 1024)  # served from node a's file so far
    a.go_silent()
    assert fill_b.node == "a" and fill_b.generation == 0
    bodies = await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert all(body == data for body in bodies)
    assert upstream_a.opens == 1 and upstream_b.opens == 1
    assert fill_b.generation == 1 and fill_b.node is None  # node b fetched it itself
    upstream_a.release.set()  # node a wakes up: its late commit of the same bytes is harmless
    assert await asyncio.wait_for(fill_a.finished(), 10) is not None
    await a.cache.aclose(), await b.cache.aclose()


async def test_bytes_served_before_a_takeover_that_differ_from_the_blob_fail_the_reader(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(4 * 1024 * 1024)
    corrupt = bytearray(data)
    corrupt[1000] ^= 0xFF  # node a's upstream sent a bad byte early on, then node a died
    upstream_a, upstream_b = ScriptedUpstream(bytes(corrupt), chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    fill_a, _ = a.cache.fill(digest_of(data), upstream_a.open, origin=ORIGIN)
    await wait_for(lambda: fill_a.written > 0)
    fill_b, _ = b.cache.fill(digest_of(data), upstream_b.open, origin=ORIGIN)
    received = bytearray()
    with pytest.raises(FillFailed):
        async for chunk in iter_bytes(fill_b, 0, len(data)):
            received += chunk
            if len(received) >= 2 * 1024 * 1024:
                a.go_silent()
    assert len(received) < len(data)  # a truncated body, never a complete wrong one
    upstream_a.abort()
    await a.cache.aclose(), await b.cache.aclose()


async def test_a_follower_reads_no_further_than_the_owner_has_synced_and_published(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    a.publish_no_progress()
    await a.cache.start(), await b.cache.start()
    data = os.urandom(3 * 1024 * 1024)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    fill_a, _ = a.cache.fill(digest_of(data), upstream_a.open, origin=ORIGIN)
    await asyncio.wait_for(fill_a.opened(), 5)  # node a holds the lease before node b asks
    fill_b, _ = b.cache.fill(digest_of(data), upstream_b.open, origin=ORIGIN)
    assert await asyncio.wait_for(fill_b.opened(), 5) == len(data)  # following node a's file
    await wait_for(lambda: any(f.stat().st_size >= 2 * 1024 * 1024 for f in a.cache.store.tmp_dir.iterdir()))
    await asyncio.sleep(1.0)  # three heartbeats, none with a watermark
    assert fill_b.written == 0  # the file's length alone is not trusted
    body = asyncio.create_task(collect(fill_b))
    upstream_a.release.set()
    assert await asyncio.wait_for(body, 10) == data  # the commit releases everything
    assert upstream_b.opens == 0
    await a.cache.aclose(), await b.cache.aclose()


async def test_followers_wait_for_the_commit_when_streams_are_not_followed(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared, follow_streams=False)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(3 * 1024 * 1024)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 1024 * 1024
    upstream_a.release.clear()
    fill_a, _ = a.cache.fill(digest_of(data), upstream_a.open, origin=ORIGIN)
    await wait_for(lambda: fill_a.written > 0)
    fill_b, _ = b.cache.fill(digest_of(data), upstream_b.open, origin=ORIGIN)
    opened = asyncio.create_task(fill_b.opened())
    await asyncio.sleep(0.5)
    assert not opened.done()  # nothing is read from node a's growing file
    upstream_a.release.set()
    assert await asyncio.wait_for(opened, 10) == len(data)
    assert await collect(fill_b) == data
    assert upstream_b.opens == 0
    await a.cache.aclose(), await b.cache.aclose()


async def test_an_object_whose_digest_is_unknown_is_adopted_by_the_digest_the_filler_found(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(2 * 1024 * 1024)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 1024 * 1024
    upstream_a.release.clear()
    key = "s3:bucket/weights.bin@etag1"
    fill_a, _ = a.cache.fill_unnamed(key, upstream_a.open, origin=ORIGIN)
    await wait_for(lambda: fill_a.written > 0)
    fill_b, _ = b.cache.fill_unnamed(key, upstream_b.open, origin=ORIGIN)
    body = asyncio.create_task(collect(fill_b))
    await asyncio.sleep(0.3)
    upstream_a.release.set()
    assert await asyncio.wait_for(body, 10) == data
    blob = await fill_b.finished()
    assert blob is not None and blob.digest == digest_of(data) and upstream_b.opens == 0
    await a.cache.aclose(), await b.cache.aclose()


async def test_when_the_filler_fails_before_any_byte_the_follower_asks_the_upstream_itself(shared: tuple[Path, str]) -> None:
    a, b = Node("a", *shared), Node("b", *shared)
    await a.cache.start(), await b.cache.start()
    data = os.urandom(1024 * 1024)
    gate = asyncio.Event()

    class NotFound(Exception):
        pass

    async def refuse() -> ScriptedUpstream:
        await gate.wait()
        raise NotFound("404 from node a's view of the upstream")

    upstream_b = ScriptedUpstream(data)
    fill_a, _ = a.cache.fill(digest_of(data), refuse, origin=ORIGIN)
    await asyncio.sleep(0.1)
    fill_b, _ = b.cache.fill(digest_of(data), upstream_b.open, origin=ORIGIN)
    await asyncio.sleep(0.3)
    gate.set()
    with pytest.raises(NotFound):
        await fill_a.opened()
    assert await asyncio.wait_for(collect(fill_b), 10) == data  # its own try answered
    assert upstream_b.opens == 1
    await a.cache.aclose(), await b.cache.aclose()


async def test_blobs_being_read_stay_recent_for_every_nodes_janitor(shared: tuple[Path, str]) -> None:
    a = Node("a", *shared)
    await a.cache.start()
    data = os.urandom(64 * 1024)
    upstream = ScriptedUpstream(data)
    fill, _ = a.cache.fill(digest_of(data), upstream.open, origin=ORIGIN)
    blob = await fill.finished()
    assert blob is not None
    await a.cache.flush_access()
    a.cache.index.record_access({str(blob.digest): (time.time() - 7200, 0)})  # last read two hours ago
    reader = await FileSource(blob, a.cache.in_use).reader()  # ... but a response is reading it now
    await a.cache.flush_access()
    record = a.cache.index.get_blob(str(blob.digest))
    assert record is not None and time.time() - record.last_access < 60
    janitor = Janitor(a.cache.store, a.cache.index, Policy(default_ttl=3600))
    assert janitor.purge().removed == []
    reader.close()
    a.cache.index.record_access({str(blob.digest): (time.time() - 7200, 0)})
    await a.cache.flush_access()  # no reader left: nothing refreshes it
    assert [digest for digest, _ in janitor.purge().removed] == [str(blob.digest)]
    await a.cache.aclose()


async def test_the_janitor_forgets_finished_leases_and_temp_files_left_by_dead_nodes(shared: tuple[Path, str]) -> None:
    a = Node("a", *shared)
    await a.cache.start()
    data = os.urandom(1024)
    fill, _ = a.cache.fill(digest_of(data), ScriptedUpstream(data).open, origin=ORIGIN)
    await fill.finished()
    index, store = a.cache.index, a.cache.store
    leftover = store.tmp_dir / "gone-node.4242.0123456789abcdef"
    leftover.write_bytes(b"half a fill")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    live = store.tmp_dir / "other-node.4243.0123456789abcdef"
    live.write_bytes(b"a fill in progress")
    janitor = Janitor(store, index, Policy(default_ttl=86400))
    janitor.purge(now=time.time() + 3600)  # an hour later: the committed lease is long finished
    assert index.get_fill(key_hash(fill.key)) is None
    assert not leftover.exists() and live.exists()
    await a.cache.aclose()


async def test_stats_of_any_node_add_up_the_counters_every_node_saved(shared: tuple[Path, str]) -> None:
    from proxy.stats import Traffic

    index = Index(make_engine(shared[1]))
    one, two = Traffic(index, node="one"), Traffic(index, node="two")
    await one.start(), await two.start()  # both read the (empty) totals at start
    one.hit(ORIGIN, 1000)
    two.hit(ORIGIN, 500)
    await one.flush()
    await two.flush()  # saves its own and reads node one's back
    totals = {key.name: value for key, value in two.totals().items()}
    assert totals["hits"] == 2 and totals["bytes_from_cache"] == 1500
    await one.aclose(), await two.aclose()
