"""skopeo pulls through pullthrough, and what the upstream sees while it does.

The upstream is the session's docker-registry; every count below comes from its access log.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_tool
from tests.images import ACCEPT_ALL, ImageInfo, sha256_digest, skopeo
from tests.servers.registry import AccessEntry, ThrottledRelay

pytestmark = pytest.mark.real

PULLED_IMAGES = ["library/single:1", "library/many:1", "multi/index:1", "multi/list:1"]


@pytest.fixture(autouse=True)
def _skopeo_installed():
    require_tool("skopeo")


def copy_to_dir(source: str, dest: Path, image: ImageInfo, *, registries_conf: Path | None = None) -> None:
    args = ["copy", "--quiet", "--src-tls-verify=false"]
    if image.is_index:
        args.append("--all")
    skopeo(*args, source, f"dir:{dest}", registries_conf=registries_conf)


def assert_dir_matches(dest: Path, image: ImageInfo) -> None:
    """The copied manifest (and an index's child manifests and every blob) are the upstream's bytes."""
    assert sha256_digest((dest / "manifest.json").read_bytes()) == image.manifest_digest
    for child in image.children:
        hexpart = child.manifest_digest.split(":", 1)[1]
        assert sha256_digest((dest / f"{hexpart}.manifest.json").read_bytes()) == child.manifest_digest
    for blob in image.all_blobs():
        path = dest / blob.digest.split(":", 1)[1]
        assert path.stat().st_size == blob.size
        assert sha256_digest(path.read_bytes()) == blob.digest


def write_registries_conf(path: Path, mirror_location: str) -> Path:
    path.write_text(
        'unqualified-search-registries = []\n'
        'short-name-mode = "disabled"\n\n'
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
        f'[[registry.mirror]]\nlocation = "{mirror_location}"\ninsecure = true\n'
    )
    return path


def manifest_or_blob(entry: AccessEntry) -> bool:
    return entry.is_manifest or entry.is_blob


def blob_get(digest: str):
    return lambda entry: entry.method == "GET" and entry.path.endswith(f"/blobs/{digest}")


def no_requests_after(upstream, mark: int, predicate, quiet: float = 0.5) -> list[AccessEntry]:
    """What matches `predicate` since `mark`, after watching the log for `quiet` seconds."""
    return upstream.wait_requests(mark, predicate, count=1, timeout=quiet, settle=0)


# -- digests stay the upstream's ------------------------------------------------------------------

@pytest.mark.parametrize("ref", PULLED_IMAGES)
def test_skopeo_copy_by_path_prefix_gives_upstream_digests(ref, upstream, pullthrough, tmp_path):
    pt = pullthrough()
    image = upstream.images[ref]
    copy_to_dir(f"docker://{pt.host}/upstream.test/{ref}", tmp_path / "out", image)
    assert_dir_matches(tmp_path / "out", image)
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{pt.host}/upstream.test/{ref}").stdout
    assert sha256_digest(raw) == image.manifest_digest


@pytest.mark.parametrize("mirror_suffix", ["", "/upstream.test"], ids=["host-root", "path-prefix"])
@pytest.mark.parametrize("ref", PULLED_IMAGES)
def test_skopeo_copy_through_registries_conf_mirror_gives_upstream_digests(ref, mirror_suffix, upstream,
                                                                           pullthrough, tmp_path):
    pt = pullthrough()
    image = upstream.images[ref]
    conf = write_registries_conf(tmp_path / "registries.conf", pt.host + mirror_suffix)
    mark = upstream.mark()
    copy_to_dir(f"docker://docker.io/{ref}", tmp_path / "out", image, registries_conf=conf)
    assert_dir_matches(tmp_path / "out", image)
    # The bytes came through pullthrough from our upstream, not from anywhere else.
    fetched = {e.path.rsplit("/", 1)[-1] for e in upstream.requests_since(mark) if e.is_blob and e.method == "GET"}
    assert {b.digest for b in image.all_blobs()} <= fetched


def test_skopeo_inspect_by_digest_through_mirror_returns_exact_manifest(upstream, pullthrough, tmp_path):
    pt = pullthrough()
    image = upstream.images["multi/list:1"]
    conf = write_registries_conf(tmp_path / "registries.conf", pt.host)
    child = image.children[1]
    raw = skopeo("inspect", "--raw", f"docker://docker.io/multi/list@{child.manifest_digest}",
                 registries_conf=conf).stdout
    assert sha256_digest(raw) == child.manifest_digest


# -- warm pulls stay local ------------------------------------------------------------------------

@pytest.mark.parametrize("ref", PULLED_IMAGES)
def test_warm_pull_sends_no_blob_or_manifest_request_upstream(ref, upstream, pullthrough, tmp_path):
    pt = pullthrough()
    image = upstream.images[ref]
    source = f"docker://{pt.host}/upstream.test/{ref}"
    copy_to_dir(source, tmp_path / "cold", image)

    mark = upstream.mark()
    copy_to_dir(source, tmp_path / "warm", image)

    assert_dir_matches(tmp_path / "warm", image)
    # tag_ttl is long: not even a HEAD to revalidate the tag.
    assert no_requests_after(upstream, mark, manifest_or_blob) == []


def test_warm_pull_through_mirror_sends_no_request_upstream(upstream, pullthrough, tmp_path):
    pt = pullthrough()
    image = upstream.images["library/many:1"]
    conf = write_registries_conf(tmp_path / "registries.conf", pt.host)
    copy_to_dir("docker://docker.io/library/many:1", tmp_path / "cold", image, registries_conf=conf)

    mark = upstream.mark()
    copy_to_dir("docker://docker.io/library/many:1", tmp_path / "warm", image, registries_conf=conf)

    assert_dir_matches(tmp_path / "warm", image)
    assert no_requests_after(upstream, mark, manifest_or_blob) == []


@pytest.mark.parametrize("ref", ["library/single:1", "multi/list:1"])
def test_warm_pull_with_zero_tag_ttl_revalidates_the_tag_with_head_only(ref, upstream, pullthrough, tmp_path):
    pt = pullthrough([{"name": "docker.io", "url": upstream.url, "default": True, "tag_ttl": "0s"}])
    image = upstream.images[ref]
    name, tag = ref.split(":")
    source = f"docker://{pt.host}/{ref}"
    copy_to_dir(source, tmp_path / "cold", image)

    mark = upstream.mark()
    copy_to_dir(source, tmp_path / "warm", image)

    assert_dir_matches(tmp_path / "warm", image)
    seen = upstream.wait_requests(mark, manifest_or_blob, count=1, settle=0.5)
    assert [e for e in seen if e.method != "HEAD"] == [], "a warm pull sent a GET upstream"
    assert seen and all(e.path == f"/v2/{name}/manifests/{tag}" for e in seen), seen


def test_manifest_by_digest_is_served_from_cache_after_first_get(upstream, pullthrough):
    pt = pullthrough()
    image = upstream.images["library/single:1"]
    url = f"{pt.url}/v2/library/single/manifests/{image.manifest_digest}"
    headers = {"Accept": ACCEPT_ALL}
    first = httpx.get(url, headers=headers, timeout=30)
    assert first.status_code == 200

    mark = upstream.mark()
    for method in ("GET", "HEAD"):
        response = httpx.request(method, url, headers=headers, timeout=30)
        assert response.status_code == 200
        assert response.headers["docker-content-digest"] == image.manifest_digest
        assert int(response.headers["content-length"]) == image.manifest_size
        assert response.headers["content-type"].split(";")[0] == image.media_type
    assert sha256_digest(first.content) == image.manifest_digest
    assert no_requests_after(upstream, mark, manifest_or_blob) == []


# -- one upstream transfer per blob ---------------------------------------------------------------

def big_layer(upstream):
    return upstream.images["library/big:1"].layers[0]


def test_eight_concurrent_cold_gets_of_one_blob_cause_one_upstream_get(upstream, pullthrough):
    # A slow link keeps the fill in flight for seconds, so the eight requests overlap for certain;
    # the coalesced count says they did: seven joined the first one's fill.
    relay = ThrottledRelay(upstream.port, rate=4 << 20)
    try:
        pt = pullthrough([{"name": "docker.io", "url": relay.url, "default": True, "tag_ttl": "1h"}])
        layer = big_layer(upstream)
        url = f"{pt.url}/v2/library/big/blobs/{layer.digest}"
        clients = 8
        barrier = threading.Barrier(clients)
        results: list[tuple[int, str, int] | BaseException] = [None] * clients  # type: ignore[list-item]

        def fetch(number: int) -> None:
            try:
                with httpx.Client(timeout=120) as client:
                    barrier.wait(timeout=30)
                    with client.stream("GET", url) as response:
                        digest, size = hashlib.sha256(), 0
                        for chunk in response.iter_bytes():
                            digest.update(chunk)
                            size += len(chunk)
                    results[number] = (response.status_code, "sha256:" + digest.hexdigest(), size)
            except BaseException as exc:  # reported below, with the others
                results[number] = exc

        mark = upstream.mark()
        threads = [threading.Thread(target=fetch, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)

        assert results == [(200, layer.digest, layer.size)] * clients
        gets = upstream.wait_requests(mark, blob_get(layer.digest), count=1, settle=1.0)
        assert len(gets) == 1, gets
        stats = httpx.get(f"{pt.url}/stats", timeout=10).json()
        assert (stats["misses"], stats["coalesced"]) == (clients, clients - 1)
    finally:
        relay.close()


def test_cold_get_moves_blob_size_from_upstream_once(upstream, pullthrough):
    pt = pullthrough()
    layer = big_layer(upstream)
    url = f"{pt.url}/v2/library/big/blobs/{layer.digest}"
    mark = upstream.mark()

    cold = httpx.get(url, timeout=120)
    assert cold.status_code == 200
    assert sha256_digest(cold.content) == layer.digest
    gets = upstream.wait_requests(mark, blob_get(layer.digest), count=1, settle=1.0)
    assert len(gets) == 1, gets
    assert sum(entry.bytes_sent for entry in gets) == layer.size

    warm = httpx.get(url, timeout=120)
    assert warm.status_code == 200
    assert sha256_digest(warm.content) == layer.digest
    assert len(upstream.wait_requests(mark, blob_get(layer.digest), count=2, timeout=1.0, settle=0)) == 1


# -- ranges -----------------------------------------------------------------------------------------

def upstream_blob(upstream, name: str, digest: str) -> bytes:
    body = httpx.get(f"{upstream.url}/v2/{name}/blobs/{digest}", timeout=60).content
    assert sha256_digest(body) == digest
    return body


def assert_range(response: httpx.Response, data: bytes, first: int, last: int) -> None:
    assert response.status_code == 206, (response.status_code, response.text[:300])
    assert response.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
    assert int(response.headers["content-length"]) == last - first + 1
    assert response.content == data[first:last + 1]


def test_range_request_on_cached_blob_returns_206_with_exact_bytes(upstream, pullthrough):
    pt = pullthrough()
    layer = upstream.images["library/single:1"].layers[0]
    data = upstream_blob(upstream, "library/single", layer.digest)
    url = f"{pt.url}/v2/library/single/blobs/{layer.digest}"
    assert httpx.get(url, timeout=30).content == data

    mark = upstream.mark()
    size = len(data)
    assert_range(httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30), data, 1000, 1999)
    assert_range(httpx.get(url, headers={"Range": f"bytes={size - 10}-"}, timeout=30), data, size - 10, size - 1)
    assert_range(httpx.get(url, headers={"Range": "bytes=-100"}, timeout=30), data, size - 100, size - 1)
    assert_range(httpx.get(url, headers={"Range": f"bytes=0-{size + 5000}"}, timeout=30), data, 0, size - 1)
    head = httpx.head(url, timeout=30)
    assert head.headers["accept-ranges"] == "bytes"
    assert no_requests_after(upstream, mark, manifest_or_blob) == []


def test_range_request_on_blob_still_filling_is_served_from_the_fill(upstream, pullthrough):
    layer = big_layer(upstream)
    data = upstream_blob(upstream, "library/big", layer.digest)
    relay = ThrottledRelay(upstream.port, rate=2 << 20)  # 32 MiB at 2 MiB/s: about 16 s to fill
    try:
        pt = pullthrough([{"name": "docker.io", "url": relay.url, "default": True, "tag_ttl": "1h"}])
        url = f"{pt.url}/v2/library/big/blobs/{layer.digest}"
        mark = upstream.mark()
        full: dict = {}

        def read_all() -> None:
            with httpx.Client(timeout=120) as client:
                response = client.get(url)
                full["status"], full["digest"] = response.status_code, sha256_digest(response.content)

        reader = threading.Thread(target=read_all)
        reader.start()
        deadline = time.monotonic() + 30
        while pt.largest_tmp_file() <= 256 << 10:
            assert time.monotonic() < deadline, "no temp file under cache_dir/tmp/ grew past 256 KiB"
            time.sleep(0.02)

        head_part = httpx.get(url, headers={"Range": "bytes=4096-69631"}, timeout=60)
        assert not pt.blob_path(layer.digest).exists(), "the range was not served while the blob was filling"
        assert_range(head_part, data, 4096, 69631)

        # A range beyond what has arrived so far waits for those bytes instead of failing.
        filled = pt.largest_tmp_file()
        first = min(((filled >> 20) + 3) << 20, len(data) - (1 << 20))
        ahead = httpx.get(url, headers={"Range": f"bytes={first}-{first + 65535}"}, timeout=60)
        assert not pt.blob_path(layer.digest).exists(), "the range was not served while the blob was filling"
        assert_range(ahead, data, first, first + 65535)

        relay.rate = None
        reader.join(timeout=120)
        tail = httpx.get(url, headers={"Range": f"bytes={len(data) - 65536}-"}, timeout=60)
        assert_range(tail, data, len(data) - 65536, len(data) - 1)
        assert full == {"status": 200, "digest": layer.digest}
        gets = upstream.wait_requests(mark, blob_get(layer.digest), count=1, settle=1.0)
        assert len(gets) == 1, gets
    finally:
        relay.close()
