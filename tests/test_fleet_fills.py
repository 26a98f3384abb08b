"""Fleet-wide single flight, in one process: stores ("nodes") on one directory and one index.

The three-process tests against PostgreSQL and a real registry are in test_fleet.py; these pin
down each path of the lease protocol (follow, take over, adopt, fail) where the test controls
every byte and every heartbeat. Clients read through the store's door, as a route would.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from proxy.store.events import Outcome
from proxy.store.fill import Fill, FillFailed, FillState
from proxy.store.index import Index, make_engine
from proxy.store.janitor import Janitor, Policy
from proxy.store.leases import FillLeases, key_hash
from proxy.store.records import FillLease
from proxy.store.requests import BlobRequest
from proxy.store.store import Store
from tests.door import ORIGIN, SCOPE, ScriptedUpstream, as_is, digest_of, get, receive_response, request_for

pytestmark = pytest.mark.anyio

LEASE_SECONDS = 1.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Node:
    """One store as a pullthrough node builds it, sharing `root` and the index with the others."""

    def __init__(
        self, name: str, root: Path, url: str, *, follow_streams: bool = True, lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self.name = name
        self.store = Store(root, Index(make_engine(url)), node=name, lease_seconds=lease_seconds, follow_streams=follow_streams)
        assert self.store.leases is not None
        self.leases: FillLeases = self.store.leases

    def fill(self, key: str) -> Fill:
        fill = self.store.fill_in_flight(key)
        assert fill is not None, f"no fill of {key} on node {self.name}"
        return fill

    def go_silent(self) -> None:
        """Write no more to the leases, as a node that is killed or cut off (its fill goes on)."""

        async def lost(key: str, owner: str, **values: object) -> bool:
            return False

        self.leases.update = lost  # type: ignore[method-assign]

    def publish_no_progress(self) -> None:
        """Keep the heartbeat going but never publish a synced watermark."""

        async def heartbeat_only(key: str, owner: str, sync, stream) -> None:  # type: ignore[no-untyped-def]
            async def nothing_synced() -> None:
                return None

            await FillLeases.keep_renewed(self.leases, key, owner, nothing_synced, stream)

        self.leases.keep_renewed = heartbeat_only  # type: ignore[method-assign]


@pytest.fixture
def shared(tmp_path: Path, index_url: str) -> tuple[Path, str]:
    return tmp_path / "cache", index_url


@pytest.fixture
async def nodes(shared: tuple[Path, str]):  # type: ignore[no-untyped-def]
    started: list[Node] = []

    async def start(name: str, **options: bool) -> Node:
        node = Node(name, *shared, **options)
        await node.store.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.store.aclose()


async def wait_for(condition, timeout: float = 20.0, message: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message} not met in time"
        await asyncio.sleep(0.02)


def lease_of(node: Node, key: str) -> FillLease | None:
    return node.store.index.leases.get(key_hash(key))


def client(node: Node, request: BlobRequest, **options: object) -> asyncio.Task:
    return asyncio.create_task(get(node.store, request, **options))  # type: ignore[arg-type]


async def test_a_second_node_follows_the_first_nodes_temp_file_instead_of_going_upstream(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    data = os.urandom(6 * 1024 * 1024 + 5)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=512 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 3 * 1024 * 1024
    upstream_a.release.clear()
    filler = client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written > 0)
    # While node a is stalled half way, node b serves the first MiB from node a's file.
    first = await asyncio.wait_for(get(b.store, request_for(digest, upstream_b), range_header="bytes=0-1048575"), 10)
    assert first.status == 206 and first.body == data[: 1024 * 1024]
    assert b.fill(str(digest)).node == "a"
    whole = client(b, request_for(digest, upstream_b))
    upstream_a.release.set()
    assert (await asyncio.wait_for(whole, 20)).body == data
    assert (await filler).body == data
    assert upstream_a.opens == 1 and upstream_b.opens == 0


async def test_a_silent_filler_is_taken_over_and_followers_get_every_byte_with_one_more_fetch(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    data = os.urandom(5 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data, chunk=256 * 1024)
    upstream_a.stall_at = 2 * 1024 * 1024  # node a stops half way, then stops renewing its lease
    upstream_a.release.clear()
    filler = client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written > 0)
    readers = [client(b, request_for(digest, upstream_b)) for _ in range(3)]
    await wait_for(lambda: b.store.fill_in_flight(str(digest)) is not None and b.fill(str(digest)).written >= 2 * 1024 * 1024)
    fill_b = b.fill(str(digest))
    assert fill_b.node == "a" and fill_b.generation == 0  # served from node a's file so far
    a.go_silent()
    bodies = await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert all(r.body == data and r.error is None for r in bodies)
    assert upstream_a.opens == 1 and upstream_b.opens == 1
    assert fill_b.generation == 1 and fill_b.node is None  # node b fetched it itself
    upstream_a.release.set()  # node a wakes up: its late commit of the same bytes is harmless
    assert (await asyncio.wait_for(filler, 10)).body == data


async def test_bytes_served_before_a_takeover_that_differ_from_the_blob_fail_the_reader(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    data = os.urandom(4 * 1024 * 1024)
    corrupt = bytearray(data)
    corrupt[1000] ^= 0xFF  # node a's upstream sent a bad byte early on, then node a died
    upstream_a, upstream_b = ScriptedUpstream(bytes(corrupt), chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    client(a, request_for(digest_of(data), upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest_of(data))) is not None and a.fill(str(digest_of(data))).written > 0)
    response = await b.store.serve(request_for(digest_of(data), upstream_b), method="GET", range_header=None, headers={}, media_type="x/y")
    first = asyncio.Event()
    reader = asyncio.create_task(receive_response(response, first_chunk=first))
    await wait_for(lambda: b.fill(str(digest_of(data))).written >= 2 * 1024 * 1024)
    await first.wait()  # the client holds bytes of node a's corrupt prefix
    a.go_silent()
    received = await asyncio.wait_for(reader, 20)
    assert isinstance(received.error, FillFailed)
    assert len(received.body) < len(data)  # a truncated body, never a complete wrong one
    upstream_a.abort()


async def test_a_follower_reads_no_further_than_the_owner_has_synced_and_published(nodes) -> None:  # type: ignore[no-untyped-def]
    a = await nodes("a")
    a.publish_no_progress()
    b = await nodes("b")
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written > 0)
    body = client(b, request_for(digest, upstream_b))
    # Node b following makes node a publish its stream (no watermark: publish_no_progress).
    await wait_for(lambda: (lease := lease_of(a, str(digest))) is not None and lease.state == "streaming")
    await wait_for(lambda: b.store.fill_in_flight(str(digest)) is not None)
    fill_b = b.fill(str(digest))
    assert await asyncio.wait_for(fill_b.opened(), 5) == len(data)  # following node a's file
    await wait_for(lambda: any(f.stat().st_size >= 2 * 1024 * 1024 for f in a.store.files.tmp_dir.iterdir()))
    seen = lease_of(a, str(digest))
    assert seen is not None
    await wait_for(lambda: lease_of(a, str(digest)).heartbeat >= seen.heartbeat + 3)  # type: ignore[union-attr]
    assert fill_b.written == 0  # three heartbeats, none with a watermark: the file's length alone is not trusted
    upstream_a.release.set()
    assert (await asyncio.wait_for(body, 10)).body == data  # the commit releases everything
    assert upstream_b.opens == 0


async def test_followers_wait_for_the_commit_when_streams_are_not_followed(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b", follow_streams=False)
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 1024 * 1024
    upstream_a.release.clear()
    client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written > 0)
    body = client(b, request_for(digest, upstream_b))
    await wait_for(lambda: (lease := lease_of(a, str(digest))) is not None and lease.state == "streaming" and lease.synced > 0)
    await wait_for(lambda: b.store.fill_in_flight(str(digest)) is not None)
    seen = lease_of(a, str(digest))
    await wait_for(lambda: lease_of(a, str(digest)).heartbeat >= seen.heartbeat + 2)  # type: ignore[union-attr]
    assert b.fill(str(digest)).state is FillState.OPENING  # nothing is read from node a's growing file
    upstream_a.release.set()
    assert (await asyncio.wait_for(body, 10)).body == data
    assert upstream_b.opens == 0


async def test_an_object_whose_digest_is_unknown_is_adopted_by_the_digest_the_filler_found(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    data = os.urandom(2 * 1024 * 1024)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 1024 * 1024
    upstream_a.release.clear()
    key = "s3:bucket/weights.bin@etag1"

    def named(upstream: ScriptedUpstream) -> BlobRequest:
        return BlobRequest(scope=SCOPE, origin=ORIGIN, opener=upstream.open, translate=as_is, name=key)

    client(a, named(upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(key) is not None and a.fill(key).written > 0)
    body = client(b, named(upstream_b))
    await wait_for(lambda: b.store.fill_in_flight(key) is not None and b.fill(key).node == "a")
    fill_b = b.fill(key)
    upstream_a.release.set()
    assert (await asyncio.wait_for(body, 10)).body == data
    blob = await fill_b.finished()
    assert blob is not None and blob.digest == digest_of(data) and upstream_b.opens == 0


async def test_when_the_filler_fails_before_any_byte_the_follower_asks_the_upstream_itself(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    data = os.urandom(1024 * 1024)
    digest = digest_of(data)
    gate = asyncio.Event()

    class NotFound(Exception):
        pass

    async def refuse() -> ScriptedUpstream:
        await gate.wait()
        raise NotFound("404 from node a's view of the upstream")

    upstream_b = ScriptedUpstream(data)
    refused = asyncio.create_task(a.store.serve(
        BlobRequest(scope=SCOPE, origin=ORIGIN, opener=refuse, translate=as_is, digest=digest),
        method="GET", range_header=None, headers={}, media_type="x/y",
    ))
    await wait_for(lambda: lease_of(a, str(digest)) is not None)
    body = client(b, request_for(digest, upstream_b))
    await wait_for(lambda: b.store.fill_in_flight(str(digest)) is not None)
    gate.set()
    with pytest.raises(NotFound):
        await refused
    assert (await asyncio.wait_for(body, 10)).body == data  # its own try answered
    assert upstream_b.opens == 1


async def test_two_nodes_racing_for_a_takeover_one_wins_and_the_loser_follows_it(nodes) -> None:  # type: ignore[no-untyped-def]
    await check_takeover_race(nodes, loser_waits_for_the_commit=False)


async def test_a_node_that_loses_a_takeover_and_first_sees_the_winner_committed_rechecks_what_it_served(nodes) -> None:  # type: ignore[no-untyped-def]
    # The race found with three processes: the loser's first look at the winner's lease found it
    # committed, and its clients went on reading the dead node's file past what that file held.
    await check_takeover_race(nodes, loser_waits_for_the_commit=True)


async def check_takeover_race(nodes, *, loser_waits_for_the_commit: bool) -> None:  # type: ignore[no-untyped-def]
    a, b, c = await nodes("a"), await nodes("b"), await nodes("c")
    data = os.urandom(4 * 1024 * 1024)
    digest, key = digest_of(data), str(digest_of(data))
    upstream_a = ScriptedUpstream(data, chunk=256 * 1024)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    fresh = {name: ScriptedUpstream(data) for name in ("b", "c")}
    client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(key) is not None and a.fill(key).written >= 1024 * 1024)
    readers = [client(node, request_for(digest, fresh[node.name])) for node in (b, c) for _ in range(2)]
    await wait_for(lambda: (lease := lease_of(a, key)) is not None and lease.synced >= 1024 * 1024)
    await wait_for(lambda: all(n.store.fill_in_flight(key) is not None and n.fill(key).written > 0 for n in (b, c)))
    if loser_waits_for_the_commit:
        take_over = c.leases.acquire

        async def after_b_committed(key_: str, owner: str, seen: FillLease | None = None) -> FillLease | None:
            if seen is not None:
                await wait_for(lambda: lease_of(b, key_) is not None and lease_of(b, key_).state == "committed")  # type: ignore[union-attr]
            return await take_over(key_, owner, seen)

        c.leases.acquire = after_b_committed  # type: ignore[method-assign]
    a.go_silent()
    bodies = await asyncio.wait_for(asyncio.gather(*readers), 30)
    assert [(len(r.body), r.error) for r in bodies] == [(len(data), None)] * 4
    assert all(r.body == data for r in bodies)
    assert fresh["b"].opens + fresh["c"].opens == 1  # exactly one node won the takeover
    upstream_a.abort()


async def test_blobs_being_read_stay_recent_for_every_nodes_janitor(nodes) -> None:  # type: ignore[no-untyped-def]
    a = await nodes("a")
    data = os.urandom(64 * 1024)
    digest = digest_of(data)
    blob = await a.store.fetch(request_for(digest, ScriptedUpstream(data)))
    await a.store.flush_access()
    index = a.store.index
    index.blobs.record_access({str(digest): (time.time() - 7200, 0)})  # last read two hours ago
    hold = asyncio.Event()
    response = await a.store.serve(request_for(digest, ScriptedUpstream(b"")), method="GET", range_header=None, headers={}, media_type="x/y")
    reading = asyncio.create_task(receive_response(response, hold=hold))  # ... but a response is reading it now
    await wait_for(lambda: index.blobs.get(str(digest)).hits == 0 and str(digest) in map(str, a.store._in_use.digests()))
    await a.store.flush_access()
    record = index.blobs.get(str(digest))
    assert record is not None and time.time() - record.last_access < 60
    janitor = Janitor(a.store.files, index, Policy(default_ttl=3600))
    assert janitor.purge().removed == []
    hold.set()
    assert (await reading).body == data
    index.blobs.record_access({str(blob.digest): (time.time() - 7200, 0)})
    await a.store.flush_access()  # no reader left: nothing refreshes it
    assert [d for d, _ in janitor.purge().removed] == [str(blob.digest)]


async def test_the_janitor_forgets_finished_leases_and_temp_files_left_by_dead_nodes(nodes) -> None:  # type: ignore[no-untyped-def]
    a = await nodes("a")
    data = os.urandom(1024)
    digest = digest_of(data)
    await a.store.fetch(request_for(digest, ScriptedUpstream(data)))
    index, files = a.store.index, a.store.files
    assert index.leases.get(key_hash(str(digest))) is not None
    leftover = files.tmp_dir / "gone-node.4242.0123456789abcdef"
    leftover.write_bytes(b"half a fill")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    live = files.tmp_dir / "other-node.4243.0123456789abcdef"
    live.write_bytes(b"a fill in progress")
    janitor = Janitor(files, index, Policy(default_ttl=86400))
    janitor.purge(now=time.time() + 3600)  # an hour later: the committed lease is long finished
    assert index.leases.get(key_hash(str(digest))) is None
    assert not leftover.exists() and live.exists()


async def test_stats_of_any_node_add_up_the_counters_every_node_saved(shared: tuple[Path, str]) -> None:
    from proxy.stats import Traffic

    index = Index(make_engine(shared[1]))
    one, two = Traffic(index, node="one"), Traffic(index, node="two")
    await one.start(), await two.start()  # both read the (empty) totals at start
    for traffic, nbytes in ((one, 1000), (two, 500)):
        traffic.request(ORIGIN, SCOPE, Outcome.HIT, joined=False)
        traffic.sent_from_cache(ORIGIN, SCOPE, nbytes)
    await one.flush()
    await two.flush()  # saves its own and reads node one's back
    totals = {key.name: value for key, value in two.totals().items()}
    assert totals["hits"] == 2 and totals["bytes_from_cache"] == 1500
    await one.aclose(), await two.aclose()


async def test_a_fill_nobody_follows_neither_syncs_nor_writes_its_lease_until_a_follower_asks(nodes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    syncs: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real_fdatasync(fd))[1])
    a = await nodes("a")
    checks: list[bool] = []
    real_followed = a.leases.followed

    async def counted(key: str, owner: str) -> bool:
        checks.append(answer := await real_followed(key, owner))
        return answer

    a.leases.followed = counted  # type: ignore[method-assign]
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 2 * 1024 * 1024
    upstream_a.release.clear()
    filler = client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written >= 1024 * 1024)
    await wait_for(lambda: len(checks) >= 3, message="three publishing periods")
    lease = lease_of(a, str(digest))
    assert lease is not None and lease.heartbeat == 0 and lease.synced == 0 and lease.state == "opening"
    assert syncs == []  # no fdatasync on the request's path while nobody follows
    b = await nodes("b")
    follower = client(b, request_for(digest, upstream_b))
    await wait_for(lambda: (seen := lease_of(a, str(digest))) is not None and seen.followed and seen.synced >= 2 * 1024 * 1024,
                   message="node a publishing once node b follows")
    assert syncs and lease_of(a, str(digest)).state == "streaming"  # type: ignore[union-attr]
    upstream_a.release.set()
    assert (await asyncio.wait_for(follower, 20)).body == data
    assert (await asyncio.wait_for(filler, 20)).body == data
    assert upstream_a.opens == 1 and upstream_b.opens == 0


async def test_a_heartbeat_that_reaches_the_database_after_the_commit_does_not_undo_it(nodes) -> None:  # type: ignore[no-untyped-def]
    # Found in bench.fleet: a renewal (state streaming) issued just before the owner's commit landed
    # after it, the lease went back to streaming and stopped changing, and a follower took it over.
    a = await nodes("a")
    rows, key = a.store.index.leases, "sha256:" + "ab" * 32
    lease = rows.claim(key_hash(key), key, "a.1.0123456789abcdef", "a")
    assert rows.update(lease.key_hash, lease.owner, state="committed", digest=key)
    assert not rows.update(lease.key_hash, lease.owner, live_only=True, state="streaming", synced=5)
    after = rows.get(lease.key_hash)
    assert after is not None and after.state == "committed" and after.synced == 0
    # ... and the owner's heartbeats are sent that way.
    calls: list[dict] = []
    real_update = a.leases.update

    async def recorded(key_: str, owner: str, **values: object) -> bool:
        calls.append(values)
        return await real_update(key_, owner, **values)

    a.leases.update = recorded  # type: ignore[method-assign]
    a.leases.followed = lambda key_, owner: asyncio.sleep(0, result=True)  # type: ignore[method-assign]

    async def synced() -> int:
        return 0

    renewing = asyncio.create_task(a.leases.keep_renewed(key, lease.owner, synced, dict))
    await wait_for(lambda: len(calls) >= 2, message="two heartbeats")
    renewing.cancel()
    await asyncio.gather(renewing, return_exceptions=True)
    assert all(call.get("live_only") is True for call in calls)


async def test_a_follower_that_could_not_tell_the_owner_asks_again_rather_than_take_a_live_fill_over(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = await nodes("a"), await nodes("b")
    real_follow, refused = b.leases.follow, []

    async def index_hiccup_once(key: str, owner: str) -> bool:
        if not refused:
            refused.append(owner)
            return False  # as FillLeases.follow answers when the index could not be written
        return await real_follow(key, owner)

    b.leases.follow = index_hiccup_once  # type: ignore[method-assign]
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    upstream_a, upstream_b = ScriptedUpstream(data, chunk=256 * 1024), ScriptedUpstream(data)
    upstream_a.stall_at = 1024 * 1024
    upstream_a.release.clear()
    filler = client(a, request_for(digest, upstream_a))
    await wait_for(lambda: a.store.fill_in_flight(str(digest)) is not None and a.fill(str(digest)).written > 0)
    follower = client(b, request_for(digest, upstream_b))
    await wait_for(lambda: (lease := lease_of(a, str(digest))) is not None and lease.followed, message="node a told it is followed")
    seen = lease_of(a, str(digest))
    # Several lease periods of node a's heartbeats while its upstream is stalled: node b stays a follower.
    await wait_for(lambda: lease_of(a, str(digest)).heartbeat >= seen.heartbeat + 4 * LEASE_SECONDS / 0.25)  # type: ignore[union-attr]
    upstream_a.release.set()
    assert (await asyncio.wait_for(follower, 20)).body == data
    assert (await asyncio.wait_for(filler, 20)).body == data
    assert refused and upstream_b.opens == 0  # no second fetch


async def test_a_report_while_the_counters_are_being_saved_still_counts_them(shared: tuple[Path, str]) -> None:
    # Found by CI on PostgreSQL: /stats answered while a flush was writing showed coalesced = 0.
    import threading

    from proxy.stats import Traffic

    index = Index(make_engine(shared[1]))
    traffic = Traffic(index, node="one")
    await traffic.start()
    traffic.request(ORIGIN, SCOPE, Outcome.MISS, joined=True)
    writing, finish = threading.Event(), threading.Event()
    real_add = index.counters.add

    def slow_add(node: str, counts: dict) -> None:  # type: ignore[type-arg]
        writing.set()
        finish.wait(10)
        real_add(node, counts)

    index.counters.add = slow_add  # type: ignore[method-assign]
    flushing = asyncio.create_task(traffic.flush())
    await wait_for(writing.is_set, message="the flush writing")
    assert {key.name: value for key, value in traffic.totals().items()}.get("coalesced") == 1
    finish.set()
    await flushing
    assert {key.name: value for key, value in traffic.totals().items()}.get("coalesced") == 1
    index.counters.add = real_add  # type: ignore[method-assign]
    await traffic.aclose()
