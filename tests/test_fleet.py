"""A fleet: three `pullthrough serve` processes on one cache directory and one PostgreSQL database.

Counted from the upstream's (distribution's) access log: 3 x 4 concurrent cold GETs fetch the blob
once; killing the filling node mid-transfer costs at most one more fetch and every other client
still gets the right bytes. The janitors of the three nodes never run at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from proxy.store.index import Index, make_engine
from proxy.store.index.models import PurgeRow
from tests.conftest import drop_postgres_database, fresh_postgres_database, require_tool
from tests.servers.pullthrough import Pullthrough
from tests.servers.registry import Distribution, ThrottledRelay

NODES = 3
FILL_LEASE = "2s"


def blob_get(digest: str) -> Callable[..., bool]:
    return lambda entry: entry.method == "GET" and entry.path.endswith(f"/blobs/{digest}")


@pytest.fixture
def database() -> Iterator[str]:
    require_tool("pg_isready")
    url = fresh_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def start_fleet(database: str, pullthrough, tmp_path: Path) -> Callable[..., list[Pullthrough]]:
    """Start NODES servers sharing tmp_path/shared and `database`, named node1, node2, ..."""

    def start(upstream_url: str, **settings: object) -> list[Pullthrough]:
        registries = [{"name": "docker.io", "url": upstream_url, "default": True, "tag_ttl": "1h"}]
        return [
            pullthrough(registries, cache_dir=tmp_path / "shared", workdir=tmp_path / f"node{n}.run",
                        database_url=database, node=f"node{n}", fill_lease=FILL_LEASE, **settings)
            for n in range(1, NODES + 1)
        ]

    return start


@dataclass
class Download:
    """One client's GET: status, digest and size of the body, and whether its first bytes arrived
    while the blob was not yet committed (served from the filling node's temp file)."""

    status: int | None = None
    digest: str = ""
    size: int = 0
    first_byte_before_commit: bool | None = None
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)


def download(url: str, committed: Path, result: Download, barrier: threading.Barrier | None = None) -> None:
    try:
        with httpx.Client(timeout=180) as client:
            if barrier is not None:
                barrier.wait(timeout=30)
            with client.stream("GET", url) as response:
                result.status = response.status_code
                digest = hashlib.sha256()
                for chunk in response.iter_bytes():
                    if result.first_byte_before_commit is None:
                        result.first_byte_before_commit = not committed.exists()
                        result.started.set()
                    digest.update(chunk)
                    result.size += len(chunk)
                result.digest = "sha256:" + digest.hexdigest()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        result.error = exc
    finally:
        result.started.set()


def fleet_events(node: Pullthrough, event: str) -> float:
    """The node's pullthrough_fleet_fills_total for `event`, from its /metrics."""
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pullthrough_fleet_fills_total{") and f'event="{event}"' in line)


def run_all(targets: list[tuple[str, Download]], committed: Path) -> list[threading.Thread]:
    barrier = threading.Barrier(len(targets))
    threads = [threading.Thread(target=download, args=(url, committed, result, barrier)) for url, result in targets]
    for thread in threads:
        thread.start()
    return threads


def test_twelve_concurrent_cold_gets_over_three_nodes_fetch_the_blob_once(upstream: Distribution, start_fleet) -> None:
    layer = upstream.images["library/big:1"].layers[0]
    relay = ThrottledRelay(upstream.port, rate=8 << 20)  # about 4 s of fill: every GET overlaps it
    try:
        nodes = start_fleet(relay.url)
        committed = nodes[0].blob_path(layer.digest)
        targets = [(f"{node.url}/v2/library/big/blobs/{layer.digest}", Download()) for node in nodes for _ in range(4)]
        mark = upstream.mark()
        for thread in run_all(targets, committed):
            thread.join(timeout=180)
        results = [result for _, result in targets]
        assert [(r.error, r.status, r.digest, r.size) for r in results] == [(None, 200, layer.digest, layer.size)] * 12
        gets = upstream.wait_requests(mark, blob_get(layer.digest), count=1, settle=1.5)
        assert len(gets) == 1, gets
        # Bytes flowed to clients of all three nodes while the blob was still a temp file of one.
        streamed = {n for n, (_, r) in enumerate(targets) if r.first_byte_before_commit}
        assert {n // 4 for n in streamed} == {0, 1, 2}, [r.first_byte_before_commit for r in results]
        assert sorted(fleet_events(node, "followed") for node in nodes) == [0, 1, 1]  # one node fetched
        assert [p.name for p in nodes[0].tmp_files()] == []
    finally:
        relay.close()


def test_killing_the_filling_node_mid_transfer_costs_at_most_one_more_fetch(upstream: Distribution, start_fleet) -> None:
    layer = upstream.images["library/big:1"].layers[0]
    relay = ThrottledRelay(upstream.port, rate=3 << 20)
    try:
        filler, *others = start_fleet(relay.url)
        committed = filler.blob_path(layer.digest)
        path = f"/v2/library/big/blobs/{layer.digest}"
        mark = upstream.mark()
        doomed = Download()
        threading.Thread(target=download, args=(filler.url + path, committed, doomed)).start()
        deadline = time.monotonic() + 30
        while filler.largest_tmp_file() < 2 << 20:
            assert time.monotonic() < deadline, "no fill started on the first node"
            time.sleep(0.05)
        followers = [(node.url + path, Download()) for node in others for _ in range(2)]
        threads = [threading.Thread(target=download, args=(url, committed, result)) for url, result in followers]
        for thread in threads:
            thread.start()
        for _, result in followers:
            assert result.started.wait(timeout=30) and result.first_byte_before_commit, result

        filler.kill()  # SIGKILL: its lease is neither renewed nor released
        relay.rate = 32 << 20
        for thread in threads:
            thread.join(timeout=180)

        assert doomed.error is not None or doomed.size < layer.size
        assert [(r.error, r.status, r.digest, r.size) for _, r in followers] == [(None, 200, layer.digest, layer.size)] * 4
        gets = upstream.wait_requests(mark, blob_get(layer.digest), count=2, timeout=10, settle=1.5)
        # distribution logs a GET when it ends; the killed node's one may be logged or not.
        assert 1 <= len(gets) <= 2, gets
        assert hashlib.sha256(committed.read_bytes()).hexdigest() == layer.digest.split(":", 1)[1]
        logs = "".join(node.log_text() for node in others)
        assert logs.count("went silent; taking over") >= 1 and logs.count("took over the fill") == 1, logs[-3000:]
        assert sorted(fleet_events(node, "taken_over") for node in others) == [0, 1]
        assert sorted(fleet_events(node, "followed") for node in others) == [0, 1]  # the other followed the taker
    finally:
        relay.close()


def test_the_janitors_of_three_nodes_never_run_at_the_same_time(upstream: Distribution, start_fleet, database: str) -> None:
    layer = upstream.images["library/big:1"].layers[0]
    nodes = start_fleet(upstream.url, purge_interval="0.2s")
    for node in nodes:  # something for the janitors to look at
        assert httpx.get(f"{node.url}/v2/library/big/blobs/{layer.digest}", timeout=60).status_code == 200
    engine = create_engine(database)

    def passes() -> list[tuple[float, float]]:
        with Session(engine) as session:
            return [(row.started_at, row.finished_at) for row in session.scalars(select(PurgeRow).order_by(PurgeRow.started_at))]

    def stood_aside() -> int:
        return sum(node.log_text().count("another janitor is running") for node in nodes)

    wait_until(lambda: len(passes()) >= 10, "ten periodic passes")
    index = Index(make_engine(database))
    # A fourth janitor, in this process: it takes the lock when no node holds it (a node may at
    # any instant), and holds it until every node has tried meanwhile and stood aside.
    with contextlib.ExitStack() as stack:
        deadline = time.monotonic() + 30
        while not stack.enter_context(index.exclusive("janitor")):
            stack.close()
            assert time.monotonic() < deadline, "the janitor lock was never free"
            time.sleep(0.01)
        held_from = time.time()
        before, asides = len(passes()), stood_aside()
        wait_until(lambda: stood_aside() >= asides + 3, "three passes standing aside")
        held_until = time.time()
        assert len(passes()) == before  # no pass ran while this one held the lock
    index.engine.dispose()
    wait_until(lambda: len(passes()) >= before + 3, "passes again once the lock is free")
    recorded = passes()
    engine.dispose()
    overlaps = [(a, b) for a, b in zip(recorded, recorded[1:]) if b[0] < a[1]]
    assert overlaps == []
    assert [p for p in recorded if held_from < p[0] < held_until] == []


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
