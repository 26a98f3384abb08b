"""The store on its own, through its one door: content-addressed files, atomic commits, single-flight
fills with followers, read scopes, and the accounting of every request."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from proxy.store.blobs import BlobStore, DigestMismatch
from proxy.store.digest import Digest, InvalidDigest, UnsupportedDigest
from proxy.store.events import Outcome
from proxy.store.fill import FillFailed
from proxy.store.records import ReadScope
from proxy.store.store import Store
from tests.door import SCOPE, Events, ScriptedUpstream, digest_of, get, new_store, receive_response, request_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path, index_url: str):  # type: ignore[no-untyped-def]
    store = new_store(tmp_path, index_url)
    await store.start()
    yield store
    await store.aclose()


class Refused(Exception):
    """The upstream's no."""


async def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


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


async def test_concurrent_misses_share_one_upstream_stream_and_are_counted_as_coalesced(tmp_path: Path, index_url: str) -> None:
    events = Events()
    store = new_store(tmp_path, index_url, events=events)
    await store.start()
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data)
    upstream.release.clear()
    clients = [asyncio.create_task(get(store, request_for(digest, upstream))) for _ in range(8)]
    # All eight overlap: the upstream sends nothing until seven requests have joined the first one's fill.
    await wait_for(lambda: (fill := store.fill_in_flight(str(digest))) is not None and fill.stats.followers == 7)
    fill = store.fill_in_flight(str(digest))
    upstream.release.set()
    bodies = await asyncio.gather(*clients)
    assert upstream.opens == 1
    assert all(b.status == 200 and b.body == data for b in bodies)
    assert sorted(joined for _, _, joined in events.requests) == [False] + [True] * 7
    assert {outcome for _, outcome, _ in events.requests} == {Outcome.MISS}
    assert await fill.finished() is not None  # the commit may follow the last byte
    again = await get(store, request_for(digest, upstream))
    assert again.body == data and events.requests[-1] == (str(SCOPE), Outcome.HIT, False) and events.sent == len(data)
    await store.aclose()


async def test_a_client_receives_bytes_before_the_fill_completes(store: Store) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data, chunk=512 * 1024)
    upstream.stall_at = 2 * 1024 * 1024
    upstream.release.clear()
    response = await store.serve(request_for(digest, upstream), method="GET", range_header=None, headers={}, media_type="x/y")
    first = asyncio.Event()
    client = asyncio.create_task(receive_response(response, first_chunk=first))
    await asyncio.wait_for(first.wait(), 10)  # bytes arrived while the upstream is stalled half way
    assert upstream.pos <= 2 * 1024 * 1024
    upstream.release.set()
    received = await asyncio.wait_for(client, 20)
    assert received.body == data and received.error is None


async def test_a_range_reaching_the_end_of_a_growing_blob_ends_only_after_verification(store: Store) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data, chunk=len(data))
    upstream.stall_at = len(data)  # every byte arrives, but not the end of the body: verification waits for it
    upstream.release.clear()
    response = await store.serve(request_for(digest, upstream), method="GET", range_header=f"bytes={len(data) - 5000}-", headers={}, media_type="x/y")
    client = asyncio.create_task(receive_response(response))
    fill = store.fill_in_flight(str(digest))
    assert fill is not None
    await wait_for(lambda: fill.written == len(data))
    await asyncio.sleep(0.2)
    assert not client.done() and not fill.verified  # all bytes on disk, the last one held back
    upstream.release.set()
    received = await asyncio.wait_for(client, 10)
    assert received.status == 206 and received.body == data[-5000:] and fill.verified


async def test_a_range_inside_a_growing_blob_is_served_before_the_fill_ends(store: Store) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data, chunk=512 * 1024)
    upstream.stall_at = 2 * 1024 * 1024
    upstream.release.clear()
    received = await asyncio.wait_for(get(store, request_for(digest, upstream), range_header="bytes=1000-4999"), 10)
    assert received.status == 206 and received.body == data[1000:5000]
    fill = store.fill_in_flight(str(digest))
    assert fill is not None and not fill.verified  # served while the upstream was still stalled
    upstream.release.set()
    await fill.finished()


async def test_upstream_sending_wrong_bytes_fails_every_reader_and_caches_nothing(store: Store) -> None:
    wanted = os.urandom(1024 * 1024)
    digest = digest_of(wanted)
    corrupt = bytearray(wanted)
    corrupt[-1] ^= 0xFF
    upstream = ScriptedUpstream(bytes(corrupt))
    received = await asyncio.gather(*(get(store, request_for(digest, upstream)) for _ in range(3)))
    assert all(isinstance(r.error, FillFailed) for r in received)
    assert all(len(r.body) < len(wanted) for r in received)  # never the whole (wrong) body
    assert store.files.stat(digest) is None
    assert list(store.files.tmp_dir.iterdir()) == []


async def test_short_upstream_body_is_not_committed(store: Store) -> None:
    data = os.urandom(100_000)
    upstream = ScriptedUpstream(data[:50_000], announce=len(data))
    received = await get(store, request_for(digest_of(data), upstream))
    assert received.error is not None and len(received.body) < len(data)
    assert store.files.stat(digest_of(data)) is None


async def test_a_committed_blob_is_indexed_and_access_is_batched(store: Store) -> None:
    data = b"layer bytes"
    digest = digest_of(data)
    await store.fetch(request_for(digest, ScriptedUpstream(data)))
    record = store.index.blobs.get(str(digest))
    assert record is not None and record.size == len(data) and record.hits == 0
    for _ in range(3):
        assert (await get(store, request_for(digest, ScriptedUpstream(b"")))).body == data
    assert store.index.blobs.get(str(digest)).hits == 0  # no write per hit
    await store.flush_access()
    assert store.index.blobs.get(str(digest)).hits == 3


# -- read scopes ------------------------------------------------------------------------------------

PRIVATE_A = ReadScope("oci:registry.test/private-a")
OTHER_B = ReadScope("oci:registry.test/other-b")


async def test_a_blob_admitted_to_one_scope_is_not_served_to_another_the_upstream_refuses(store: Store) -> None:
    data = os.urandom(200_000)
    digest = digest_of(data)
    await store.fetch(request_for(digest, ScriptedUpstream(data), scope=PRIVATE_A))
    second = ScriptedUpstream(data)

    async def refuse() -> int:
        raise Refused("not in repository b")

    for method, range_header in (("GET", None), ("HEAD", None), ("GET", "bytes=0-99")):
        with pytest.raises(Refused):
            await store.serve(
                request_for(digest, second, scope=OTHER_B, confirm=refuse),
                method=method, range_header=range_header, headers={}, media_type="x/y",
            )
    assert second.opens == 0
    assert not await store.admitted(OTHER_B, digest)
    assert (await get(store, request_for(digest, second, scope=PRIVATE_A))).body == data  # still there for A


async def test_a_scope_the_upstream_confirms_is_admitted_without_fetching_a_byte_again(store: Store) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    await store.fetch(request_for(digest, ScriptedUpstream(data), scope=PRIVATE_A))
    heads = []

    async def confirm() -> int:
        heads.append(1)
        return len(data)

    second = ScriptedUpstream(data)
    for _ in range(3):
        received = await get(store, request_for(digest, second, scope=OTHER_B, confirm=confirm))
        assert received.body == data
    assert len(heads) == 1 and second.opens == 0  # one confirmation, then admitted
    assert await store.admitted(OTHER_B, digest)


async def test_without_a_confirmation_the_upstream_decides_by_answering_and_nothing_is_read_twice(store: Store) -> None:
    data = os.urandom(5 * 1024 * 1024)
    digest = digest_of(data)
    await store.fetch(request_for(digest, ScriptedUpstream(data), scope=PRIVATE_A))
    second = ScriptedUpstream(data)
    assert (await get(store, request_for(digest, second, scope=OTHER_B))).body == data
    assert second.opens == 1 and second.aborted and second.pos == 0  # it answered; not a byte was read


async def test_a_request_may_join_a_fill_of_another_scope_only_once_the_upstream_confirms(tmp_path: Path, index_url: str) -> None:
    events = Events()
    store = new_store(tmp_path, index_url, events=events)
    await store.start()
    data = os.urandom(2 * 1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data)
    upstream.release.clear()
    owner = asyncio.create_task(get(store, request_for(digest, upstream, scope=PRIVATE_A)))
    await wait_for(lambda: store.fill_in_flight(str(digest)) is not None)

    async def refuse() -> int:
        raise Refused("not in repository b")

    async def confirm() -> int:
        return len(data)

    with pytest.raises(Refused):
        await store.serve(request_for(digest, upstream, scope=OTHER_B, confirm=refuse), method="GET", range_header=None, headers={}, media_type="x/y")
    joined = asyncio.create_task(get(store, request_for(digest, upstream, scope=OTHER_B, confirm=confirm)))
    fill = store.fill_in_flight(str(digest))
    await wait_for(lambda: fill.stats.followers == 1)
    upstream.release.set()
    assert (await owner).body == data and (await joined).body == data
    assert upstream.opens == 1
    assert await fill.finished() is not None  # committed: every scope that read it is admitted by now
    assert await store.admitted(PRIVATE_A, digest) and await store.admitted(OTHER_B, digest)
    await store.aclose()


async def test_a_head_never_starts_a_fill_and_is_counted_like_a_get(tmp_path: Path, index_url: str) -> None:
    events = Events()
    store = new_store(tmp_path, index_url, events=events)
    await store.start()
    data = os.urandom(1000)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data)

    async def confirm() -> int:
        return len(data)

    head = await get(store, request_for(digest, upstream, confirm=confirm), method="HEAD")
    assert head.status == 200 and head.headers["content-length"] == "1000" and head.body == b""
    assert upstream.opens == 0 and store.files.stat(digest) is None
    await get(store, request_for(digest, upstream, confirm=confirm))
    await store.fetch(request_for(digest, upstream, confirm=confirm))  # returns once committed
    await get(store, request_for(digest, upstream, confirm=confirm), method="HEAD")
    assert [outcome for _, outcome, _ in events.requests] == [Outcome.MISS, Outcome.MISS, Outcome.HIT]
    assert events.sent == 0  # a HEAD sends no bytes, a miss none from the cache
    await store.aclose()


async def test_with_the_index_unreachable_blobs_are_fetched_without_a_lease_and_still_served(tmp_path: Path) -> None:
    from proxy.store.index import Index, make_engine
    from tests.servers.ports import free_port

    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"
    store = Store(tmp_path / "cache", Index(make_engine(dead)), node="node", lease_seconds=15.0)
    await store.start()
    data = os.urandom(1024 * 1024)
    digest = digest_of(data)
    upstream = ScriptedUpstream(data)
    confirmations = []

    async def confirm() -> int:
        confirmations.append(1)
        return len(data)

    received = await get(store, request_for(digest, upstream, confirm=confirm))
    assert received.status == 200 and received.body == data  # no lease could be claimed: fetched anyway
    assert (await store.fetch(request_for(digest, upstream, confirm=confirm))).digest == digest
    assert (await get(store, request_for(digest, upstream, confirm=confirm))).body == data
    assert upstream.opens == 1  # served from the committed file afterwards
    await store.aclose()
    # A process that starts on this cache while the index is still down cannot read the blob's
    # scopes: it fails closed and lets the upstream confirm, then serves the file it has.
    again = Store(tmp_path / "cache", Index(make_engine(dead)), node="node", lease_seconds=15.0)
    await again.start()
    assert (await get(again, request_for(digest, upstream, confirm=confirm))).body == data
    assert confirmations == [1] and upstream.opens == 1
    await again.aclose()
