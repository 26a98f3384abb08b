"""A xorb is fetched from the origin once, whatever moment a request for it arrives at.

The mirror names a fetched xorb's sha256 (its `hf-xorb` reference) just before the file is
committed. A request that reads that name while the commit is still under way must join the fill
already running (on this node, or another node's through the lease), not start one of its own
under the digest's key. The end-to-end fleet test is in test_xet_mirror.py; here, stores on one
directory and one index, the test holding the commit open, find that window every time.

And a xorb is checked only as a whole (its Merkle hash): no range of it is served before that.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from proxy.sources.hf.errors import HfError
from proxy.sources.hf.names import Repo
from proxy.sources.hf.xet import XORBS, xorb_request
from proxy.sources.hf.xetformat import chunk_hash, hash_hex, xorb_hash
from proxy.sources.hf.xettokens import XetGrant, XorbGrant
from proxy.store.digest import Digest
from proxy.store.events import Outcome
from proxy.store.records import LeaseState, ReadScope
from tests.door import ORIGIN, Events, ScriptedUpstream, digest_of, get, new_store
from tests.test_fleet_fills import Node, lease_of, wait_for

pytestmark = pytest.mark.anyio

MODEL = Repo("model", "org/model")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def nodes(tmp_path: Path, index_url: str):  # type: ignore[no-untyped-def]
    # Leases far longer than a busy machine's stall: these tests follow fills, never take one over.
    started = [Node(name, tmp_path / "cache", index_url, lease_seconds=30.0) for name in ("a", "b")]
    for node in started:
        await node.store.start()
    yield started
    for node in started:
        await node.store.aclose()


def a_xorb(chunks: int = 5, chunk_bytes: int = 100_000) -> tuple[bytes, str]:
    """A xorb as xet-core writes one with uncompressed chunks, and its hash."""
    body, entries = bytearray(), []
    for n in range(chunks):
        data = bytes([n + 1]) * 17 + time.time_ns().to_bytes(8, "little") * (chunk_bytes // 8)
        size = len(data).to_bytes(3, "little")
        body += bytes([0]) + size + bytes([0]) + size + data  # version, compressed size, scheme none, size
        entries.append((chunk_hash(data), len(data)))
    return bytes(body), hash_hex(xorb_hash(entries))


def signed_for(xorb: str, repo: Repo = MODEL) -> XorbGrant:
    grant = XetGrant(repo.type, repo.id, "main", "", time.time() + 600)
    return XorbGrant(grant, "f" * 64, "", xorb)


class HeldCommit:
    """Holds a store's commit (the rename into blobs/) until released: the fill has verified the
    xorb and named its digest, and its file is not there yet."""

    def __init__(self, node: Node) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        commit = node.store.files.commit

        def held(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.entered.set()
            if not self.release.wait(timeout=30):
                raise TimeoutError("the test never released the commit")
            return commit(*args, **kwargs)

        node.store.files.commit = held  # type: ignore[method-assign]


async def named_meanwhile(node: Node, xorb: str) -> Digest:
    """The digest the xorb's reference names while the first fill's commit is held."""
    known = await node.store.refs.get(XORBS, xorb)
    assert known is not None and known.digest, "the reference is written before the commit"
    digest = Digest.from_hex(known.digest)
    assert not await node.store.holds(ReadScope.hf(MODEL.key), digest), "the file is not committed yet"
    return digest


async def a_fill_held_at_its_commit(
    node: Node, reader: Node, xorb: str, upstream: ScriptedUpstream
) -> tuple[asyncio.Task, HeldCommit, Digest]:
    """A request's fill of the xorb on `node`, stopped at its commit, and the digest `reader` finds
    the xorb named by meanwhile."""
    held = HeldCommit(node)
    first = asyncio.create_task(get(node.store, xorb_request(node.store, ORIGIN, signed_for(xorb), upstream.open, None)))
    await asyncio.to_thread(held.entered.wait, 30)
    return first, held, await named_meanwhile(reader, xorb)


async def test_a_request_that_finds_the_xorb_named_mid_commit_on_the_same_node_joins_the_running_fill(nodes) -> None:  # type: ignore[no-untyped-def]
    a, _ = nodes
    data, xorb = a_xorb()
    upstream = ScriptedUpstream(data)
    first, held, digest = await a_fill_held_at_its_commit(a, a, xorb, upstream)
    second = asyncio.create_task(get(a.store, xorb_request(a.store, ORIGIN, signed_for(xorb), upstream.open, digest)))
    # The second request has decided once it follows a fill: the first one's, or one of its own.
    await wait_for(lambda: upstream.opens > 1 or a.store.fill_in_flight(f"{XORBS}:{xorb}").stats.followers > 0)
    held.release.set()
    assert [r.body for r in await asyncio.gather(first, second)] == [data, data]
    assert upstream.opens == 1
    assert digest == digest_of(data)


async def test_a_node_that_finds_the_xorb_named_while_another_commits_it_follows_that_fill(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = nodes
    data, xorb = a_xorb()
    upstream_a, upstream_b = ScriptedUpstream(data), ScriptedUpstream(data)
    first, held, digest = await a_fill_held_at_its_commit(a, b, xorb, upstream_a)
    second = asyncio.create_task(get(b.store, xorb_request(b.store, ORIGIN, signed_for(xorb), upstream_b.open, digest)))
    # Node b has decided once its fill exists: under the xorb's name it can only follow a's lease
    # (claimed first); under the digest's key it opens its own upstream.
    await wait_for(lambda: upstream_b.opens > 0 or b.store.fill_in_flight(f"{XORBS}:{xorb}") is not None)
    held.release.set()
    assert [r.body for r in await asyncio.gather(first, second)] == [data, data]
    assert (upstream_a.opens, upstream_b.opens) == (1, 0)


async def test_a_xorb_another_repo_stored_is_served_to_a_repo_whose_reconstruction_names_it_without_the_origin(nodes) -> None:  # type: ignore[no-untyped-def]
    a, _ = nodes
    data, xorb = a_xorb()
    upstream = ScriptedUpstream(data)
    stored = await a.store.fetch(xorb_request(a.store, ORIGIN, signed_for(xorb), upstream.open, None))
    assert stored.digest == digest_of(data)
    # Later than the janitor keeps a finished lease (FINISHED_LEASE_SECONDS): no fleet record of
    # the fill is left to adopt the blob from.
    await wait_for(lambda: (lease := lease_of(a, f"{XORBS}:{xorb}")) is not None and lease.state == LeaseState.COMMITTED)
    assert a.store.index.leases.drop_old(finished_before=time.time() + 1, renewed_before=0) == 1
    other = Repo("model", "org/fine-tune")
    digest = await a.store.refs.get(XORBS, xorb)
    assert digest is not None
    request = xorb_request(a.store, ORIGIN, signed_for(xorb, other), upstream.open, Digest.from_hex(digest.digest))
    assert not await a.store.holds(request.scope, digest_of(data))
    # The signed URL is the origin's yes (it named this xorb in that repo's reconstruction): the
    # stored bytes are admitted to the other repo's scope, and no byte is fetched again.
    assert (await get(a.store, request)).body == data
    assert upstream.opens == 1
    assert await a.store.holds(request.scope, digest_of(data))


async def test_a_range_of_a_xorb_waits_for_the_whole_xorb_and_the_first_request_is_counted_as_a_miss(tmp_path: Path, index_url: str) -> None:
    events = Events()
    store = new_store(tmp_path, index_url, events=events)
    await store.start()
    try:
        data, xorb = a_xorb()
        upstream = ScriptedUpstream(data)
        upstream.stall_at = 256 * 1024
        upstream.release.clear()
        first_request = xorb_request(store, ORIGIN, signed_for(xorb), upstream.open, None)
        first_task = asyncio.create_task(get(store, first_request, range_header="bytes=0-99"))
        await wait_for(lambda: (fill := store.fill_in_flight(first_request.fill_key)) is not None and fill.written >= upstream.stall_at)
        # The range's bytes are on disk, but the xorb is not whole: nothing is answered or counted yet.
        assert not first_task.done() and events.requests == []
        upstream.release.set()
        first = await first_task
        assert (first.status, first.body) == (206, data[:100])
        known = await store.refs.get(XORBS, xorb)
        assert known is not None
        again = await get(store, xorb_request(store, ORIGIN, signed_for(xorb), upstream.open, Digest.from_hex(known.digest)),
                          range_header="bytes=100-199")
        assert (again.status, again.body) == (206, data[100:200])
        assert [outcome for _, outcome, _ in events.requests] == [Outcome.MISS, Outcome.HIT]
        assert upstream.opens == 1
    finally:
        await store.aclose()


async def test_no_byte_of_a_xorb_whose_last_chunk_is_wrong_reaches_a_client(tmp_path: Path, index_url: str) -> None:
    store = new_store(tmp_path, index_url)
    await store.start()
    try:
        data, xorb = a_xorb()
        tampered = bytearray(data)
        tampered[-1] ^= 0x01  # inside the last chunk: every byte a range of the first chunk names is right
        upstream = ScriptedUpstream(bytes(tampered))
        with pytest.raises(HfError) as refused:
            await get(store, xorb_request(store, ORIGIN, signed_for(xorb), upstream.open, None), range_header="bytes=0-99")
        assert refused.value.status == 503 and "hashes to" in refused.value.message
        assert await store.refs.get(XORBS, xorb) is None
        assert store.files.stat(digest_of(bytes(tampered))) is None
    finally:
        await store.aclose()
