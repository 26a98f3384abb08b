"""Subscribed resource sets: a market's published listing followed end to end.

A listing server of the test's own (changed while the test runs), distribution as the image
upstream (images named as the seed names them, through Docker's aliases), moto S3 with a public
bucket that has no `[s3]` entry: the set is prefetched and pinned on start; with every upstream
stopped the images pull (skopeo, ctr) and the objects download; a change of the listing unpins what
left within two refresh periods, and a purge then removes only that.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.subscriptions import ListingError, parse_listing
from tests.conftest import require_tool
from tests.images import KIB, ImageSpec, publish, skopeo
from tests.servers.containerd import Containerd, write_hosts_dir
from tests.servers.forwarder import Forwarder
from tests.servers.listing import ListingServer
from tests.servers.moto import MotoS3
from tests.servers.registry import Distribution

BUCKET = "nos-ai-models-qllsn32u"  # the seed's public bucket
PREFIX = "stable-diffusion/dreamshaper/8"
SET = "market-a"
REFRESH = 1.0


# -- the listing's entries --------------------------------------------------------------------------------

def test_a_listing_in_the_seeds_shape_is_read_entry_by_entry() -> None:
    listing = parse_listing(json.dumps({
        "required_images": ["registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/vllm/vllm-openai:v0.5.4",
                            "docker.io/vllm/vllm-openai:v0.5.4", 42],
        "required_remote_resources": [
            {"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}", "target": "/models/dreamshaper"},  # a field of the market's own
            {"type": "HF", "url": "hf://datasets/acme/corpus@v2"},
            {"type": "IPFS", "url": "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"},
            {"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"},
            {"type": "GCS", "url": "gs://bucket/x"},
            {"type": "S3"},
            {"type": "S3", "url": "https://not-s3.example/x"},
            "s3://just-a-string",
            {"type": "S3", "url": f"s3://{BUCKET}"}, {"type": "S3", "url": f"s3://{BUCKET}//"},
            {"type": "S3", "url": f"s3://{BUCKET}/a/../b"},
        ],
    }).encode())
    assert listing.images == ("registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/vllm/vllm-openai:v0.5.4")
    assert [r.display_url for r in listing.remote] == [
        f"s3://{BUCKET}/{PREFIX}", "hf://datasets/acme/corpus@v2",
        "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
    ]
    errors = {e.entry: e.error for e in listing.errors}
    whole_bucket = {json.dumps({"type": "S3", "url": url}) for url in (f"s3://{BUCKET}", f"s3://{BUCKET}//", f"s3://{BUCKET}/a/../b")}
    assert set(errors) == {"42", '{"type": "GCS", "url": "gs://bucket/x"}', '{"type": "S3"}',
                           '{"type": "S3", "url": "https://not-s3.example/x"}', "s3://just-a-string", *whole_bucket}
    assert all("not a whole bucket" in errors[e] for e in whole_bucket)
    assert "unknown type 'GCS'" in errors['{"type": "GCS", "url": "gs://bucket/x"}']
    assert "needs url" in errors['{"type": "S3"}']
    assert "starts with s3://" in errors['{"type": "S3", "url": "https://not-s3.example/x"}']


@pytest.mark.parametrize("body", [b"<html>maintenance</html>", b"[]", b'{"images": []}', b'{"required_images": "x"}'])
def test_a_document_that_is_not_a_listing_is_refused_whole(body: bytes) -> None:
    with pytest.raises(ListingError):
        parse_listing(body)


# -- end to end --------------------------------------------------------------------------------------------

@pytest.fixture
def market(tmp_path):  # type: ignore[no-untyped-def]
    """Distribution with the seed's images, moto with the seed's public bucket (and a private one),
    and the market's listing naming them as the seed does."""
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Distribution.start(tmp_path / "registry")
    s3 = MotoS3.start()
    try:
        registry.images = publish([
            ImageSpec("nosana/frpc", "0.1.0", seed=51, layers=[[48 * KIB]]),
            ImageSpec("vllm/vllm-openai", "v0.5.4", seed=52, layers=[[40 * KIB], [24 * KIB]]),
        ], tmp_path / "layouts", registry.host)
        client = s3.client()
        client.create_bucket(Bucket=BUCKET, ACL="public-read")  # moto refuses unsigned reads otherwise
        client.create_bucket(Bucket="private-models")
        objects = {f"{PREFIX}/unet.bin": os.urandom(200_000), f"{PREFIX}/vae/config.json": b'{"scale": 8}',
                   "stable-diffusion/dreamshaper/80/other.bin": b"next to the listed prefix, not in it"}
        for key, body in objects.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=body, ACL="public-read")
        client.put_object(Bucket="private-models", Key="llama/weights.bin", Body=b"private weights " * 1000)
        listing = ListingServer({
            "required_images": ["registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/vllm/vllm-openai:v0.5.4"],
            "required_remote_resources": [{"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"}],
        })
        yield registry, s3, listing, objects
        listing.stop()
    finally:
        s3.stop()
        registry.stop()


def start_subscribed(pullthrough, registry, s3_url: str, listing: ListingServer, **settings):  # type: ignore[no-untyped-def]
    """No [s3] buckets: the listing alone lets the mirror read the public bucket."""
    return pullthrough(
        [{"name": "docker.io", "url": registry.url, "default": True, "tag_ttl": "1s"}],
        s3={"endpoint_url": s3_url, "object_ttl": "1s", "access_key_id": "testing", "secret_access_key": "testing"},
        resource_sets=[{"name": SET, "url": listing.url, "refresh": f"{REFRESH}s"}],
        **settings,
    )


def wait_for(condition: Callable[[], object], what: str, timeout: float = 90.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def listed(pt) -> dict:  # type: ignore[no-untyped-def]
    return httpx.get(f"{pt.url}/api/markets/{SET}/required-resources", timeout=10).json()


def all_cached(pt) -> dict | None:  # type: ignore[no-untyped-def]
    listing = listed(pt)
    states = [*listing["status"]["images"].values(), *listing["status"]["remote"].values()]
    return listing if states and all(s["cached"] for s in states) else None


def pinned(pt) -> set[str]:  # type: ignore[no-untyped-def]
    pins = subprocess.run([sys.executable, "-m", "proxy", "pins", "--config", str(pt.config_path), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert pins.returncode == 0, pins.stderr
    return set(json.loads(pins.stdout).get(SET, {}).get("digests", []))


def pins_counted(pt) -> int:  # type: ignore[no-untyped-def]
    """The set's pins as the server counts them in /stats (cheaper to poll than the `pins` command)."""
    return int(httpx.get(f"{pt.url}/stats", timeout=10).json()["pins"].get(SET, {}).get("blobs", -1))


def blob_on_disk(pt, digest: str) -> bool:  # type: ignore[no-untyped-def]
    hex_ = digest.removeprefix("sha256:")
    return (Path(pt.cache_dir) / "blobs" / "sha256" / hex_[:2] / hex_).exists()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_subscribed_set_is_pinned_served_with_upstreams_down_and_follows_its_listing(market, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, s3, listing, objects = market
    pt = start_subscribed(pullthrough, registry, s3.url, listing)
    state = wait_for(lambda: all_cached(pt), "the subscribed set to be prefetched")
    assert state["required_images"] == ["registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/vllm/vllm-openai:v0.5.4"]
    assert state["required_remote_resources"] == [{"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"}]
    assert state["status"]["remote"][f"s3://{BUCKET}/{PREFIX}"]["blobs"] == 2  # …/8/ only, not …/80/
    assert state["subscription"]["error"] is None and state["subscription"]["stale"] is False
    frpc, vllm = registry.images["nosana/frpc:0.1.0"], registry.images["vllm/vllm-openai:v0.5.4"]
    frpc_digests = {frpc.manifest_digest, *(b.digest for b in frpc.all_blobs())}
    vllm_digests = {vllm.manifest_digest, *(b.digest for b in vllm.all_blobs())}
    object_digests = {sha(objects[f"{PREFIX}/unet.bin"]), sha(objects[f"{PREFIX}/vae/config.json"])}
    assert pinned(pt) == frpc_digests | vllm_digests | object_digests
    # Read again every refresh, conditionally: the dashboard answers 304 while nothing changed.
    wait_for(lambda: any(status == 304 and sent == listing.etag for sent, status in listing.answered), "a 304")

    # The listed prefix is served without a bucket entry; the rest of the bucket is not.
    outside = httpx.get(f"{pt.url}/s3/{BUCKET}/stable-diffusion/dreamshaper/80/other.bin", timeout=30)
    assert outside.status_code == 403 and outside.json()["error"] == "BucketNotConfigured"
    assert not any("/80/" in path for method, path, _ in s3.requests() if method != "PUT")  # refused before any request left

    # Every upstream stopped: the images pull (skopeo, ctr) and the objects download.
    registry.stop()
    s3.stop()
    out = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{pt.host}/nosana/frpc:0.1.0", f"dir:{out}")
    assert sha((out / "manifest.json").read_bytes()) == frpc.manifest_digest
    unet = httpx.get(f"{pt.url}/s3/{BUCKET}/{PREFIX}/unet.bin", timeout=30)
    assert unet.status_code == 200 and unet.content == objects[f"{PREFIX}/unet.bin"]
    require_tool("containerd")
    containerd = Containerd.start(tmp_path / "containerd")
    try:
        hosts = write_hosts_dir(tmp_path / "hosts", "docker.io", pt.url)
        containerd.pull("docker.io/vllm/vllm-openai:v0.5.4", hosts)
        assert vllm_digests <= containerd.content_digests()
    finally:
        containerd.stop()

    # The dashboard fails: the last good listing stays in use, and the endpoint says so.
    listing.status = 502
    stale = wait_for(lambda: (s := listed(pt))["subscription"]["stale"] and s, "the listing endpoint to say it is stale")
    assert "answered 502" in stale["subscription"]["error"]
    assert stale["required_images"] == state["required_images"] and pinned(pt) == frpc_digests | vllm_digests | object_digests

    # vllm leaves the listing: unpinned at the next good read, with every upstream still down.
    listing.set({"required_images": ["registry.hub.docker.com/nosana/frpc:0.1.0"],
                 "required_remote_resources": [{"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"}]})
    listing.status = 200
    changed_at = time.monotonic()
    wait_for(lambda: "docker.io/vllm/vllm-openai:v0.5.4" not in listed(pt)["required_images"]
             and pins_counted(pt) == len(frpc_digests | object_digests), "vllm to leave the listing and its pins")
    assert time.monotonic() - changed_at < 2 * REFRESH + 2  # two refresh periods (and a poll)
    assert pinned(pt) == frpc_digests | object_digests
    assert listed(pt)["subscription"]["error"] is None

    # A purge to size 0 removes exactly what left: the set's other blobs stay.
    purge = subprocess.run([sys.executable, "-m", "proxy", "purge", "--config", str(pt.config_path), "--to-size", "0", "--grace", "0s"],
                           capture_output=True, text=True, timeout=60)
    assert purge.returncode == 0, purge.stderr
    assert all(blob_on_disk(pt, d) for d in frpc_digests | object_digests)
    assert not any(blob_on_disk(pt, d) for d in vllm_digests - frpc_digests)
    still = httpx.get(f"{pt.url}/s3/{BUCKET}/{PREFIX}/vae/config.json", timeout=30)
    assert still.status_code == 200 and still.content == objects[f"{PREFIX}/vae/config.json"]


def test_a_listed_url_lends_no_access_beyond_itself_and_ends_when_it_leaves(market, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, s3, listing, objects = market
    key = f"{PREFIX}/unet.bin"
    # The same bytes in a bucket of the configuration: its readers are not the listing's readers.
    s3.client().put_object(Bucket="private-models", Key="copy/unet.bin", Body=objects[key])
    listing.set({"required_images": [], "required_remote_resources": [{"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"}]})
    pt = start_subscribed(pullthrough, registry, s3.url, listing)
    wait_for(lambda: all_cached(pt), "the listed prefix to be prefetched")
    reads_before = len([r for r in s3.requests() if r[0] == "GET" and r[1].startswith("/private-models/")])
    # No bucket entry for private-models: the listing does not name it, so it is refused.
    refused = httpx.get(f"{pt.url}/s3/private-models/copy/unet.bin", timeout=30)
    assert refused.status_code == 403 and refused.json()["error"] == "BucketNotConfigured"
    assert len([r for r in s3.requests() if r[0] == "GET" and r[1].startswith("/private-models/")]) == reads_before
    # The prefix leaves the listing: its objects are no longer served, although their bytes are cached.
    listing.set({"required_images": [], "required_remote_resources": []})
    wait_for(lambda: not listed(pt)["required_remote_resources"], "the prefix to leave the listing")
    gone = httpx.get(f"{pt.url}/s3/{BUCKET}/{key}", timeout=30)
    assert gone.status_code == 403 and gone.json()["error"] == "BucketNotConfigured"


def test_a_listed_private_bucket_is_read_with_the_default_credentials(market, pullthrough) -> None:  # type: ignore[no-untyped-def]
    """"Public or covered by the default credentials": unsigned first (no key shown to a public
    bucket), and signed with the section's keys when the bucket refuses that."""
    registry, s3, listing, _ = market
    front = Forwarder(s3.url)
    try:
        listing.set({"required_images": [], "required_remote_resources": [
            {"type": "S3", "url": "s3://private-models/llama/weights.bin"}, {"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}/unet.bin"}]})
        pt = start_subscribed(pullthrough, registry, front.url, listing)
        state = wait_for(lambda: all_cached(pt), "both listed objects to be prefetched")
        assert state["status"]["remote"]["s3://private-models/llama/weights.bin"]["bytes"] == len(b"private weights " * 1000)
        got = httpx.get(f"{pt.url}/s3/private-models/llama/weights.bin", timeout=30)
        assert got.status_code == 200 and got.content == b"private weights " * 1000
        private = [(m, h) for m, p, h in front.seen if p.startswith("/private-models/")]
        public = [(m, h) for m, p, h in front.seen if p.startswith(f"/{BUCKET}/")]
        assert any("authorization" not in h for _, h in private)  # asked unsigned first, refused
        assert any("Credential=testing/" in h.get("authorization", "") for _, h in private)
        assert public and all("authorization" not in h for _, h in public)  # the public bucket never sees a key
    finally:
        front.shutdown()


def test_a_caller_asking_for_a_missing_key_does_not_turn_a_public_buckets_reads_signed(market, pullthrough) -> None:  # type: ignore[no-untyped-def]
    """Real S3 refuses an unsigned request for a key it does not have (403, not 404, without
    ListBucket): that refusal must not make the mirror show its key to the public bucket."""
    registry, s3, listing, objects = market
    unsigned_missing_is_403 = lambda method, path, headers, status: (  # noqa: E731 - as AWS answers
        403 if status == 404 and "authorization" not in headers else status)
    front = Forwarder(s3.url, status_for=unsigned_missing_is_403)
    try:
        listing.set({"required_images": [], "required_remote_resources": [{"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}"}]})
        pt = start_subscribed(pullthrough, registry, front.url, listing)
        wait_for(lambda: all_cached(pt), "the listed prefix to be prefetched")
        missing = httpx.get(f"{pt.url}/s3/{BUCKET}/{PREFIX}/no-such-file.bin", timeout=30)
        assert missing.status_code in (403, 404)  # S3's refusal, or what the default credentials learned
        seen = len(front.seen)
        s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/later.bin", Body=b"added later", ACL="public-read")
        later = httpx.get(f"{pt.url}/s3/{BUCKET}/{PREFIX}/later.bin", timeout=30)
        assert later.status_code == 200 and later.content == b"added later"
        after = [h for _, p, h in front.seen[seen:] if p.startswith(f"/{BUCKET}/")]
        assert after and all("authorization" not in h for h in after)  # still unsigned
    finally:
        front.shutdown()


def test_the_last_good_listing_outlives_a_restart_while_the_dashboard_is_down(market, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, s3, listing, objects = market
    pt = start_subscribed(pullthrough, registry, s3.url, listing)
    wait_for(lambda: all_cached(pt), "the subscribed set to be prefetched")
    before = pinned(pt)
    pt.stop()
    listing.status = 500
    registry.stop()
    s3.stop()
    lost = sha(objects[f"{PREFIX}/unet.bin"])  # a hand removed it: that entry's prefetch cannot succeed now
    (Path(pt.cache_dir) / "blobs" / "sha256" / lost[7:9] / lost[7:]).unlink()
    again = start_subscribed(pullthrough, registry, s3.url, listing, cache_dir=Path(pt.cache_dir), database_url=pt.database_url)
    state = wait_for(lambda: (s := listed(again))["subscription"]["checked_at"] and s, "a first read of the listing")
    assert state["subscription"]["stale"] and "answered 500" in state["subscription"]["error"]
    assert state["required_images"] == ["registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/vllm/vllm-openai:v0.5.4"]
    # The images prefetch from the cache (their tags are served stale); the prefix cannot: it keeps its pins.
    s3_state = wait_for(lambda: (s := listed(again)["status"]["remote"][f"s3://{BUCKET}/{PREFIX}"])["error"] and s, "the prefix's prefetch to fail")
    assert "unreachable" in s3_state["error"]
    assert all(s["cached"] for s in listed(again)["status"]["images"].values())
    assert pinned(again) == before
    config = httpx.get(f"{again.url}/s3/{BUCKET}/{PREFIX}/vae/config.json", timeout=30)
    assert config.status_code == 200 and config.content == objects[f"{PREFIX}/vae/config.json"]


def test_bad_entries_are_reported_one_by_one_and_a_bad_document_keeps_the_static_entries(market, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, s3, listing, _ = market
    listing.set({"required_images": ["docker.io/nosana/frpc:0.1.0", "Not A Name!", "example.com/not/configured:1"],
                 "required_remote_resources": [{"type": "FTP", "url": "ftp://x/y"}, {"type": "S3", "url": f"s3://{BUCKET}/{PREFIX}/unet.bin"}]})
    pt = start_subscribed(pullthrough, registry, s3.url, listing)
    state = wait_for(lambda: (s := listed(pt))["status"]["images"].get("Not A Name!", {}).get("error")
                     and s["status"]["images"]["docker.io/nosana/frpc:0.1.0"]["cached"]
                     and s["status"]["remote"][f"s3://{BUCKET}/{PREFIX}/unet.bin"]["cached"] and s, "the good entries to be cached")
    assert state["status"]["images"]["example.com/not/configured:1"]["error"]
    assert [e["entry"] for e in state["subscription"]["entry_errors"]] == ['{"type": "FTP", "url": "ftp://x/y"}']
    # A document that is not a listing: refused whole, the last good listing stays.
    listing.set(b"<html>maintenance</html>")
    wait_for(lambda: (listed(pt)["subscription"]["error"] or "").endswith("not JSON: Expecting value: line 1 column 1 (char 0)"),
             "the bad document to be reported")
    assert "docker.io/nosana/frpc:0.1.0" in listed(pt)["required_images"]


def test_a_static_set_beside_a_subscription_keeps_its_entries(market, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, s3, listing, _ = market
    listing.set(b"not json at all")
    pt = pullthrough(
        [{"name": "docker.io", "url": registry.url, "default": True}],
        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing"},
        resource_sets=[{"name": SET, "url": listing.url, "refresh": "1s", "images": ["docker.io/nosana/frpc:0.1.0"]},
                       {"name": "static", "images": ["docker.io/vllm/vllm-openai:v0.5.4"]}],
    )
    state = wait_for(lambda: all_cached(pt), "the set's own entry to be prefetched")
    assert state["required_images"] == ["docker.io/nosana/frpc:0.1.0"] and "not JSON" in state["subscription"]["error"]
    static = httpx.get(f"{pt.url}/api/markets/static/required-resources", timeout=10).json()
    wait_for(lambda: httpx.get(f"{pt.url}/api/markets/static/required-resources", timeout=10).json()["status"]["images"]
             ["docker.io/vllm/vllm-openai:v0.5.4"]["cached"], "the static set")
    assert "subscription" not in static
