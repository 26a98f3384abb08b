"""Lifetimes that count from the download (`ttl_from = "download"`, the seed's "24 hours from the
moment it is downloaded") beside those that count from the last read (`"access"`, the default)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
from sqlalchemy import update

from proxy.app import purge_policy
from proxy.config import load_settings
from proxy.store.digest import Digest
from proxy.store.index import make_engine
from proxy.store.index.models import BlobRow
from proxy.store.janitor import Janitor, Policy, TtlRule
from tests.test_lifecycle import DAY, Cache, cache, pull_blob  # noqa: F401 - `cache` is a fixture

__all__ = ["cache"]


def downloaded(index_engine, digest: str, ago: float) -> None:  # type: ignore[no-untyped-def]
    """Back-date the blob's download (its row's created_at, set when the fill committed)."""
    with index_engine.begin() as connection:
        connection.execute(update(BlobRow).where(BlobRow.digest == digest).values(created_at=time.time() - ago))


def read_just_now(cache: Cache, data: bytes, *, downloaded_ago: float, upstream: str = "docker.io") -> str:
    """A blob downloaded `downloaded_ago` seconds ago and read a second ago (as one read constantly is)."""
    digest = cache.add(data, age=1, upstream=upstream)
    downloaded(cache.index.engine, digest, downloaded_ago)
    return digest


def test_a_blob_read_constantly_is_purged_once_its_lifetime_from_the_download_is_over(cache: Cache) -> None:
    old = read_just_now(cache, b"downloaded two days ago", downloaded_ago=2 * DAY)
    young = read_just_now(cache, b"downloaded an hour ago", downloaded_ago=3600)
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY, default_ttl_from="download")).purge()
    assert [d for d, _ in result.removed] == [old]
    assert not cache.present(old) and cache.present(young)


def test_the_same_blob_stays_while_it_is_read_when_the_lifetime_counts_from_the_last_access(cache: Cache) -> None:
    old = read_just_now(cache, b"downloaded two days ago", downloaded_ago=2 * DAY)
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY, default_ttl_from="access")).purge()
    assert result.removed == [] and cache.present(old)


def test_a_pinned_blob_outlives_its_lifetime_from_the_download(cache: Cache) -> None:
    pinned = read_just_now(cache, b"a market's required layer", downloaded_ago=30 * DAY)
    unread_pinned = cache.add(b"a required layer nobody read", age=30 * DAY)
    downloaded(cache.index.engine, unread_pinned, 30 * DAY)
    cache.index.pins.add("market-a", [pinned, unread_pinned])
    result = Janitor(cache.store, cache.index, Policy(default_ttl=DAY, default_ttl_from="download")).purge()
    assert result.removed == []
    assert cache.present(pinned) and cache.present(unread_pinned)


def test_a_registrys_ttl_from_overrides_the_default(cache: Cache) -> None:
    hub = read_just_now(cache, b"docker hub layer", downloaded_ago=2 * DAY, upstream="docker.io")
    ghcr = read_just_now(cache, b"ghcr layer", downloaded_ago=2 * DAY, upstream="ghcr.io")
    policy = Policy(default_ttl=DAY, rules=(TtlRule("oci", "docker.io", DAY, "download"),))
    Janitor(cache.store, cache.index, policy).purge()
    assert not cache.present(hub)
    assert cache.present(ghcr)  # the default rule counts from the last read


def test_a_file_the_sweep_adopts_keeps_its_download_time(cache: Cache) -> None:
    data = b"committed two days ago; its row was lost in a crash"
    digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
    cache.store.put_bytes(data, digest)
    two_days_ago = time.time() - 2 * DAY
    os.utime(cache.store.path_for(digest), (two_days_ago, two_days_ago))
    janitor = Janitor(cache.store, cache.index, Policy(default_ttl=DAY, default_ttl_from="download"), adopt_after=0)
    result = janitor.purge()
    assert result.orphan_files == 1 and [d for d, _ in result.removed] == [str(digest)]
    assert not cache.present(str(digest))


def test_settings_make_one_rule_per_source_that_sets_ttl_or_ttl_from(tmp_path: Path) -> None:
    config = tmp_path / "pullthrough.toml"
    config.write_text(
        'default_ttl = "24h"\nttl_from = "download"\n'
        '[[registries]]\nname = "docker.io"\nurl = "https://registry-1.docker.io"\nttl = "7d"\n'  # inherits download
        '[[registries]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\nttl_from = "access"\n'  # default_ttl, from access
        '[[registries]]\nname = "quay.io"\nurl = "https://quay.io"\n'  # the default rule
        '[hf]\nttl = "30d"\nttl_from = "access"\n'
        '[s3]\nttl_from = "download"\n'
    )
    policy = purge_policy(load_settings(config))
    assert policy.default_ttl_from == "download" and policy.default_ttl == DAY
    rules = {(r.source, r.upstream): (r.ttl, r.ttl_from) for r in policy.rules}
    assert rules[("oci", "docker.io")] == (7 * DAY, "download")
    assert rules[("oci", "ghcr.io")] == (DAY, "access")
    assert ("oci", "quay.io") not in rules
    assert rules[("hf", "huggingface.co")] == (30 * DAY, "access")
    assert rules[("s3", None)] == (DAY, "download")


def test_a_server_purges_a_layer_it_serves_constantly_once_a_day_from_its_download(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registries = [{"name": "docker.io", "url": upstream.url, "default": True, "tag_ttl": "1h", "ttl": "24h",
                   "ttl_from": "download"}]
    pt = pullthrough(registries, admin_token="s3cret-admin")
    layer = upstream.images["library/single:1"].layers[0]
    pull_blob(pt, upstream)
    engine = make_engine(pt.database_url)
    downloaded(engine, layer.digest, 2 * DAY)
    engine.dispose()
    pull_blob(pt, upstream)  # read again just now: its last access is now
    auth = {"Authorization": "Bearer s3cret-admin"}
    purged = httpx.post(f"{pt.url}/admin/purge", headers=auth, timeout=30).json()
    assert purged["blobs_removed"] == 1
    assert not pt.blob_path(layer.digest).exists()
