"""Cache lifecycle: TTL from last access, size cap by LRU, pins, orphan sweep, verify, and the
counters, /stats and /metrics that operators read."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.store.blobs import BlobStore
from proxy.store.digest import Digest
from proxy.store.index import Index, make_engine
from proxy.store.janitor import Janitor, Policy, TtlRule

DAY = 86400.0


class Cache:
    """A store and index (SQLite, or PostgreSQL in CI's second pass), with blobs whose last access the test sets."""

    def __init__(self, root: Path, url: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.url = root, url
        self.store = BlobStore(root)
        self.store.prepare()
        self.index = Index(make_engine(url))

    def add(self, data: bytes, *, age: float, source: str = "oci", upstream: str = "docker.io") -> str:
        digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
        self.store.put_bytes(data, digest)
        self.index.blobs.add(str(digest), len(data), source=source, upstream=upstream)
        self.index.blobs.record_access({str(digest): (time.time() - age, 1)})
        return str(digest)

    def present(self, digest: str) -> bool:
        on_disk = self.store.stat(Digest.parse(digest)) is not None
        indexed = self.index.blobs.get(digest) is not None
        assert on_disk == indexed, f"{digest}: file {on_disk}, row {indexed}"
        return on_disk


@pytest.fixture
def cache(tmp_path: Path, index_url: str) -> Iterator[Cache]:
    cache = Cache(tmp_path / "cache", index_url)
    yield cache
    cache.index.dispose()


def test_an_entry_unused_for_its_ttl_goes_and_one_read_within_it_stays(cache: Cache) -> None:
    stale = cache.add(b"old layer", age=2 * DAY)
    fresh = cache.add(b"layer read an hour ago", age=3600)
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).purge()
    assert [d for d, _ in result.removed] == [stale]
    assert not cache.present(stale)
    assert cache.present(fresh)


def test_ttl_counts_from_the_last_access_not_from_the_fetch(cache: Cache) -> None:
    digest = cache.add(b"fetched long ago", age=10 * DAY)
    cache.index.blobs.record_access({digest: (time.time() - 60 * 5, 1)})  # but read five minutes ago
    Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).purge()
    assert cache.present(digest)


def test_per_source_ttl_overrides_the_default(cache: Cache) -> None:
    hub_layer = cache.add(b"docker hub layer", age=3 * 3600, upstream="docker.io")
    ghcr_layer = cache.add(b"ghcr layer", age=3 * 3600, upstream="ghcr.io")
    model = cache.add(b"model shard", age=3 * 3600, source="hf", upstream="huggingface.co")
    policy = Policy(default_ttl=DAY, rules=(TtlRule("oci", "docker.io", 3600), TtlRule("hf", None, 7 * DAY)))
    Janitor(cache.store, cache.index, policy).purge()
    assert not cache.present(hub_layer)
    assert cache.present(ghcr_layer)
    assert cache.present(model)


def test_size_cap_evicts_least_recently_used_first_and_never_a_pinned_entry(cache: Cache) -> None:
    oldest_pinned = cache.add(b"p" * 1000, age=5 * 3600)
    old = cache.add(b"o" * 1000, age=4 * 3600)
    middle = cache.add(b"m" * 1000, age=3 * 3600)
    recent = cache.add(b"r" * 1000, age=2 * 3600)
    cache.index.pins.add("market-a", [oldest_pinned])
    result = Janitor(cache.store, cache.index, Policy(default_ttl=30 * DAY, max_size=2500)).purge()
    assert [d for d, _ in result.removed] == [old, middle]
    assert cache.present(oldest_pinned) and cache.present(recent)
    assert not cache.present(old) and not cache.present(middle)


def test_pinned_entries_outlive_their_ttl(cache: Cache) -> None:
    pinned = cache.add(b"required resource", age=100 * DAY)
    cache.index.pins.add("market-a", [pinned])
    Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).purge(older_than=0)
    assert cache.present(pinned)


def test_below_min_free_the_least_recently_used_go_until_that_much_space_is_free(cache: Cache) -> None:
    blob = 4 * 1024 * 1024
    digests = [cache.add(os.urandom(blob), age=(10 - n) * 3600) for n in range(4)]  # oldest first
    pinned = cache.add(os.urandom(blob), age=20 * 3600)
    cache.index.pins.add("market-a", [pinned])
    free = shutil.disk_usage(cache.root).free
    # 6 MiB short of the floor: two 4 MiB blobs must go, the least recently used, never the pinned one
    # (the 2 MiB either side absorb what other processes write meanwhile).
    result = Janitor(cache.store, cache.index, Policy(default_ttl=30 * DAY, min_free=free + 6 * 1024 * 1024)).purge()
    assert [d for d, _ in result.removed] == digests[:2]
    assert [cache.present(d) for d in digests] == [False, False, True, True] and cache.present(pinned)


def test_nothing_read_within_the_grace_period_goes_even_to_meet_the_cap(cache: Cache) -> None:
    in_use = cache.add(b"being read", age=5)
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY, grace=120)).purge(to_size=0)
    assert result.removed == []
    assert cache.present(in_use)


def test_purge_during_a_read_neither_breaks_the_read_nor_leaves_an_orphan(cache: Cache) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = cache.add(data, age=2 * DAY)
    with open(cache.store.path_for(Digest.parse(digest)), "rb") as reader:
        first = reader.read(1024 * 1024)
        Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).purge()
        rest = reader.read()
    assert first + rest == data
    assert not cache.present(digest)
    assert Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).sweep() == (0, 0)


def test_dry_run_removes_nothing(cache: Cache) -> None:
    stale = cache.add(b"old", age=2 * DAY)
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).purge(dry_run=True)
    assert [d for d, _ in result.removed] == [stale]
    assert cache.present(stale)


def test_sweep_adopts_files_without_rows_and_drops_rows_without_files(cache: Cache) -> None:
    kept = cache.add(b"consistent", age=60)
    # A crash between rename and index insert: a verified file with no row.
    unindexed = Digest.from_hex(hashlib.sha256(b"committed, not indexed").hexdigest())
    cache.store.put_bytes(b"committed, not indexed", unindexed)
    # A file deleted by hand, or a crash between row and file removal: a row with no file.
    gone = cache.add(b"file lost", age=60)
    cache.store.path_for(Digest.parse(gone)).unlink()
    janitor = Janitor(cache.store, cache.index, Policy(default_ttl=DAY))
    assert janitor.sweep() == (0, 1)  # the file just renamed into place may be a commit whose row is on its way
    assert cache.index.blobs.get(str(unindexed)) is None
    janitor.adopt_after = 0  # once that is long past, the file is adopted
    assert janitor.sweep() == (1, 0)
    assert cache.present(kept)
    assert cache.present(str(unindexed))
    assert cache.index.blobs.get(gone) is None


def test_a_blob_another_node_commits_during_the_sweep_keeps_its_row(cache: Cache) -> None:
    """Another node commits (renames its file into place, then adds its row) between the sweep's
    two reads, whichever comes first: the sweep must neither drop that row nor adopt the file."""
    data = b"committed by another node mid-sweep"
    digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
    janitor = Janitor(cache.store, cache.index, Policy(default_ttl=DAY))
    first_read = []

    def commit_after(read):  # type: ignore[no-untyped-def]
        def wrapped():  # type: ignore[no-untyped-def]
            result = read()
            if not first_read:
                first_read.append(read)
                cache.store.put_bytes(data, digest)
                cache.index.blobs.add(str(digest), len(data), source="oci", upstream="ghcr.io")
            return result
        return wrapped

    janitor._digests_on_disk = commit_after(janitor._digests_on_disk)  # type: ignore[method-assign]
    cache.index.blobs.all_digests = commit_after(cache.index.blobs.all_digests)  # type: ignore[method-assign]
    janitor.sweep()
    assert first_read, "the sweep read neither the files nor the rows"
    record = cache.index.blobs.get(str(digest))
    assert record is not None and record.upstream == "ghcr.io"
    assert cache.present(str(digest))


def test_the_start_up_sweep_waits_its_turn_behind_another_janitor(cache: Cache) -> None:
    gone = cache.add(b"row without a file", age=60)
    cache.store.path_for(Digest.parse(gone)).unlink()
    janitor = Janitor(cache.store, cache.index, Policy(default_ttl=DAY))
    with janitor._only_janitor() as alone:
        assert alone
        assert Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).sweep_alone() is None
        assert cache.index.blobs.get(gone) is not None
    assert Janitor(cache.store, cache.index, Policy(default_ttl=DAY)).sweep_alone() == (0, 1)


def test_verify_finds_and_repairs_a_corrupted_blob(cache: Cache) -> None:
    good = cache.add(b"good bytes", age=60)
    bad = cache.add(b"bytes that rot", age=60)
    cache.store.path_for(Digest.parse(bad)).write_bytes(b"bytes that ROT")
    janitor = Janitor(cache.store, cache.index, Policy(default_ttl=DAY))
    assert janitor.verify() == [bad]
    assert cache.present(bad)
    assert janitor.verify(repair=True) == [bad]
    assert not cache.present(bad) and cache.present(good)


def test_cli_purge_and_verify(cache: Cache) -> None:
    stale = cache.add(b"stale layer", age=3 * DAY)
    run = [sys.executable, "-m", "proxy"]
    where = ["--cache-dir", str(cache.root), "--database-url", cache.url]
    dry = subprocess.run([*run, "purge", *where, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "would remove 1 blobs" in dry.stdout and stale in dry.stdout
    assert cache.present(stale)
    real = subprocess.run([*run, "purge", *where], capture_output=True, text=True, timeout=60)
    assert real.returncode == 0 and "removed 1 blobs" in real.stdout
    assert not cache.present(stale)
    bad = cache.add(b"will rot", age=60)
    cache.store.path_for(Digest.parse(bad)).write_bytes(b"has rotted")
    check = subprocess.run([*run, "verify", *where], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and f"corrupt: {bad}" in check.stdout
    bad_size = subprocess.run([*run, "purge", *where, "--to-size", "lots"], capture_output=True, text=True, timeout=60)
    assert bad_size.returncode == 2 and "lots" in bad_size.stderr


# -- through a running server ---------------------------------------------------------------------

def pull_blob(pt, upstream, ref: str = "library/single:1") -> int:  # type: ignore[no-untyped-def]
    """GET the image's first layer; returns once the blob is committed, so that the next pull is a
    hit (a client has every byte before the commit, which follows the verified last byte)."""
    layer = upstream.images[ref].layers[0]
    name = ref.split(":")[0]
    response = httpx.get(f"{pt.url}/v2/{name}/blobs/{layer.digest}", timeout=60)
    assert response.status_code == 200 and "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest
    deadline = time.monotonic() + 30
    while not pt.blob_path(layer.digest).exists():
        assert time.monotonic() < deadline, f"{layer.digest} was never committed"
        time.sleep(0.02)
    return layer.size


def test_counters_add_up_and_survive_a_restart(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    size = pull_blob(pt, upstream)  # miss
    pull_blob(pt, upstream)  # hit
    before = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert (before["hits"], before["misses"], before["coalesced"]) == (1, 1, 0)
    assert before["bytes_from_cache"] == size and before["bytes_from_upstream"] == size
    assert before["cache"]["entries"] == 1 and before["cache"]["bytes"] == size
    pt.restart()
    pull_blob(pt, upstream)  # a hit after the restart
    after = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert (after["hits"], after["misses"]) == (2, 1)
    assert after["bytes_from_cache"] == 2 * size
    upstreams = {(u["source"], u["upstream"]): u for u in after["per_upstream"]}
    assert upstreams[("oci", "docker.io")]["hits"] == 2


def test_metrics_speak_prometheus_and_agree_with_stats(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    pull_blob(pt, upstream)
    pull_blob(pt, upstream)
    text = httpx.get(f"{pt.url}/metrics", timeout=10).text
    assert 'pullthrough_requests_total{result="hit",source="oci",upstream="docker.io"} 1.0' in text
    assert 'pullthrough_requests_total{result="miss",source="oci",upstream="docker.io"} 1.0' in text
    assert "pullthrough_fill_seconds_bucket" in text
    stats = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert f"pullthrough_cache_bytes {float(stats['cache']['bytes'])}" in text


def test_admin_purge_dry_run_says_what_would_go_and_removes_nothing(pullthrough, tmp_path: Path, index_url: str) -> None:  # type: ignore[no-untyped-def]
    cache = Cache(tmp_path / "cache", index_url)
    stale = cache.add(b"unused for two days", age=2 * DAY)
    fresh = cache.add(b"read an hour ago", age=3600)
    pt = pullthrough(cache_dir=cache.root, database_url=index_url, admin_token="s3cret-admin")
    auth = {"Authorization": "Bearer s3cret-admin"}
    dry = httpx.post(f"{pt.url}/admin/purge", params={"dry_run": "1"}, headers=auth, timeout=30).json()
    assert (dry["dry_run"], dry["blobs_removed"], dry["bytes_removed"]) == (True, 1, len(b"unused for two days"))
    assert cache.present(stale) and cache.present(fresh)
    real = httpx.post(f"{pt.url}/admin/purge", headers=auth, timeout=30).json()
    assert (real["dry_run"], real["blobs_removed"]) == (False, 1)
    assert not cache.present(stale) and cache.present(fresh)


def test_admin_endpoints_are_off_without_a_token_and_need_it_when_set(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    open_pt = pullthrough()
    assert httpx.post(f"{open_pt.url}/admin/purge", timeout=10).status_code == 404
    closed = pullthrough(cache_dir=tmp_path / "closed", admin_token="s3cret-admin", public_stats=False)
    assert httpx.get(f"{closed.url}/stats", timeout=10).status_code == 401
    assert httpx.post(f"{closed.url}/admin/purge", timeout=10).status_code == 401
    auth = {"Authorization": "Bearer s3cret-admin"}
    assert httpx.get(f"{closed.url}/stats", headers=auth, timeout=10).status_code == 200
    purged = httpx.post(f"{closed.url}/admin/purge", headers=auth, timeout=30)
    assert purged.status_code == 200 and purged.json()["blobs_removed"] == 0
    assert httpx.get(f"{closed.url}/stats", headers=auth, timeout=10).json()["last_purge"]["reason"] == "admin"
    assert "s3cret-admin" not in closed.log_path.read_text()


def test_a_row_the_sweep_adopted_takes_the_committers_origin_when_it_arrives(cache: Cache) -> None:
    data = b"adopted before its committer's row (clocks that disagree)"
    digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
    cache.store.put_bytes(data, digest)
    assert Janitor(cache.store, cache.index, Policy(default_ttl=DAY), adopt_after=0).sweep() == (1, 0)
    assert cache.index.blobs.get(str(digest)).source == "unknown"  # type: ignore[union-attr]
    cache.index.blobs.add(str(digest), len(data), source="oci", upstream="ghcr.io")
    record = cache.index.blobs.get(str(digest))
    assert record is not None and (record.source, record.upstream) == ("oci", "ghcr.io")
    cache.index.blobs.add(str(digest), len(data), source="hf", upstream="huggingface.co")  # a known origin stays
    assert cache.index.blobs.get(str(digest)).upstream == "ghcr.io"  # type: ignore[union-attr]
