"""Resource sets ("required resources" of a market): prefetched, pinned, served with the upstreams
down, kept by a purge with a tiny cap; and the prefetch and materialize commands."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from multiformats import CID, multihash

from tests.conftest import require_tool
from tests.images import KIB, ImageSpec, publish, skopeo
from tests.servers.fake_hub import FakeHub
from tests.servers.moto import MotoS3
from tests.servers.registry import Distribution

MARKET = "97G9NnvBDQ2WpKu6fasoMsAKmfj63C9rhysJnkeWodAf"


@pytest.fixture
def upstreams(tmp_path):  # type: ignore[no-untyped-def]
    """An image registry, an S3 endpoint and a Hub that the tests may stop."""
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Distribution.start(tmp_path / "registry")
    s3 = MotoS3.start()
    hub = FakeHub.start(tmp_path / "hub")
    try:
        registry.images = publish([ImageSpec("nosana/stats", "v1.0.4", seed=41, layers=[[64 * KIB], [32 * KIB]])],
                                  tmp_path / "layouts", registry.host)
        client = s3.client()
        client.create_bucket(Bucket="models")
        shard = os.urandom(300_000)
        for key, body in (("stable-diffusion/dreamshaper/8/unet.bin", shard), ("stable-diffusion/dreamshaper/8/vae/c.json", b"{}"),
                          ("stable-diffusion/dreamshaper/80/other.bin", b"not in the set")):
            client.put_object(Bucket="models", Key=key, Body=body)
        hub.add_repo("acme/tiny-model", files={"config.json": b'{"hidden": 8}', "model.safetensors": os.urandom(200_000)})
        yield registry, s3, hub
    finally:
        hub.stop()
        s3.stop()
        registry.stop()


def start_with_set(pullthrough, registry, s3, hub, **settings):  # type: ignore[no-untyped-def]
    resource_set = {
        "name": MARKET,
        "images": ["docker.io/nosana/stats:v1.0.4"],
        "remote": [
            {"type": "S3", "url": "s3://models/stable-diffusion/dreamshaper/8"},
            {"type": "HF", "repo": "acme/tiny-model", "revision": "main"},
        ],
    }
    return pullthrough(
        [{"name": "docker.io", "url": registry.url, "default": True, "tag_ttl": "1s"}],
        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing", "object_ttl": "1s",
            "buckets": [{"name": "models"}]},
        hf={"url": hub.url, "revision_ttl": "1s"},
        resource_sets=[resource_set],
        **settings,
    )


def wait_for_prefetch(pt) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        listing = httpx.get(f"{pt.url}/api/markets/{MARKET}/required-resources", timeout=10).json()
        states = [*listing["status"]["images"].values(), *listing["status"]["remote"].values()]
        if all(s["cached"] or s["error"] for s in states):
            return listing
        time.sleep(0.3)
    raise AssertionError(f"prefetch did not finish: {listing}")


def test_a_set_is_prefetched_on_start_and_listed_in_the_seeds_shape(upstreams, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, s3, hub = upstreams
    pt = start_with_set(pullthrough, registry, s3, hub)
    listing = wait_for_prefetch(pt)
    assert listing["required_images"] == ["docker.io/nosana/stats:v1.0.4"]
    assert listing["required_remote_resources"] == [
        {"type": "S3", "url": "s3://models/stable-diffusion/dreamshaper/8"},
        {"type": "HF", "url": "hf://acme/tiny-model@main"},
    ]
    image = listing["status"]["images"]["docker.io/nosana/stats:v1.0.4"]
    assert image["cached"] and image["error"] is None and image["blobs"] == 4  # manifest, config, two layers
    s3_state = listing["status"]["remote"]["s3://models/stable-diffusion/dreamshaper/8"]
    assert s3_state["cached"] and s3_state["blobs"] == 2  # …/8/ only, not …/80/
    assert s3_state["bytes"] == 300_000 + 2
    assert listing["status"]["remote"]["hf://acme/tiny-model@main"]["blobs"] == 2
    assert httpx.get(f"{pt.url}/stats", timeout=10).json()["pins"][MARKET]["blobs"] == 8
    missing = httpx.get(f"{pt.url}/api/markets/no-such-market/required-resources", timeout=10)
    assert missing.status_code == 404


def test_pinned_resources_are_served_with_every_upstream_down_and_survive_a_tiny_cap(upstreams, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, s3, hub = upstreams
    pt = start_with_set(pullthrough, registry, s3, hub)
    wait_for_prefetch(pt)
    # Something outside the set, which the cap may take.
    hub.add_repo("acme/unpinned", files={"weights.bin": os.urandom(100_000)})
    outside = httpx.get(f"{pt.url}/acme/unpinned/resolve/main/weights.bin", timeout=30)
    assert outside.status_code == 200
    purge = subprocess.run(
        [sys.executable, "-m", "proxy", "purge", "--config", str(pt.config_path), "--to-size", "0", "--grace", "0s"],
        capture_output=True, text=True, timeout=60,
    )
    assert purge.returncode == 0, purge.stderr
    assert "removed" in purge.stdout and "removed 0 blobs" not in purge.stdout
    registry.stop()
    s3.stop()
    hub.stop()
    time.sleep(1.2)  # every tag, object and revision TTL has passed: revalidation fails, stale is served

    image = registry.images["nosana/stats:v1.0.4"]
    out = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{pt.host}/nosana/stats:v1.0.4", f"dir:{out}")
    assert "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == image.manifest_digest
    unet = httpx.get(f"{pt.url}/s3/models/stable-diffusion/dreamshaper/8/unet.bin", timeout=30)
    assert unet.status_code == 200 and len(unet.content) == 300_000
    config = httpx.get(f"{pt.url}/acme/tiny-model/resolve/main/config.json", timeout=30)
    assert config.status_code == 200 and config.content == b'{"hidden": 8}'
    gone = httpx.get(f"{pt.url}/acme/unpinned/resolve/main/weights.bin", timeout=30)
    assert gone.status_code >= 500  # purged, and its upstream is down


def test_prefetch_and_materialize_commands(upstreams, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, s3, hub = upstreams
    config = tmp_path / "pullthrough.toml"
    config.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'[[registries]]\nname = "docker.io"\nurl = "{registry.url}"\ndefault = true\n'
        f'[hf]\nurl = "{hub.url}"\n'
        f'[s3]\nendpoint_url = "{s3.url}"\naccess_key_id = "testing"\nsecret_access_key = "testing"\nbuckets = [{{ name = "models" }}]\n'
    )
    run = [sys.executable, "-m", "proxy"]
    fetched = subprocess.run(
        [*run, "prefetch", "--config", str(config), "docker.io/nosana/stats:v1.0.4", "hf://acme/tiny-model@main",
         "s3://models/stable-diffusion/dreamshaper/8/", "ftp://nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert fetched.returncode == 1  # the ftp:// one failed; the others were fetched
    assert "docker.io/nosana/stats:v1.0.4: 4 files" in fetched.stdout
    assert "hf://acme/tiny-model@main: 2 files" in fetched.stdout
    assert "s3://models/stable-diffusion/dreamshaper/8/: 2 files" in fetched.stdout
    assert "ftp://nope: failed: ftp://nope: unknown scheme" in fetched.stdout

    hub.stop()  # materialize works from the cache alone
    s3.stop()
    models = tmp_path / "job" / "model"
    done = subprocess.run([*run, "materialize", "--config", str(config), "hf://acme/tiny-model@main", "--to", str(models)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = hub.repo("acme/tiny-model").files("main")
    assert (models / "config.json").read_bytes() == files["config.json"]
    assert (models / "model.safetensors").read_bytes() == files["model.safetensors"]
    # A copy: a job writing to it (as root, which ignores modes) leaves the cache's bytes alone.
    weights = models / "model.safetensors"
    assert weights.stat().st_nlink == 1
    with open(weights, "r+b") as job:
        job.write(b"overwritten by a job")
    cached = tmp_path / "cache" / "blobs" / "sha256" / hashlib.sha256(files["model.safetensors"]).hexdigest()[:2]
    blob = cached / hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert blob.read_bytes() == files["model.safetensors"]
    linked = tmp_path / "job" / "linked"
    done = subprocess.run([*run, "materialize", "--config", str(config), "hf://acme/tiny-model@main", "--to", str(linked), "--link"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.path.samefile(linked / "model.safetensors", blob)  # --link: the cache's own inode, read-only
    assert oct(blob.stat().st_mode & 0o777) == "0o444"

    layout = tmp_path / "job" / "image"
    done = subprocess.run([*run, "materialize", "--config", str(config), "docker.io/nosana/stats:v1.0.4", "--to", str(layout)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    inspected = skopeo("inspect", "--raw", f"oci:{layout}")
    raw = inspected.stdout if isinstance(inspected.stdout, bytes) else inspected.stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == registry.images["nosana/stats:v1.0.4"].manifest_digest


def test_ipfs_and_https_entries_and_the_platforms_of_a_multi_arch_image_are_prefetched_and_pinned(
    upstreams, origin, pullthrough, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    registry, _, _ = upstreams
    nginx, root = origin
    index = publish([ImageSpec("multi/app", "1", seed=42, layers=[[8 * KIB]], arches=("amd64", "arm64"))],
                    tmp_path / "more-layouts", registry.host)["multi/app:1"]
    web_bytes, ipfs_bytes = os.urandom(40_000), os.urandom(30_000)
    (root / "models" / "w.bin").write_bytes(web_bytes)
    cid = str(CID("base58btc", 0, "dag-pb", multihash.get("sha2-256").digest(ipfs_bytes)).set(version=1).encode("base32"))
    (root / "ipfs" / cid).write_bytes(ipfs_bytes)
    resource_set = {
        "name": MARKET,
        "images": ["docker.io/multi/app:1"],
        "platforms": ["linux/arm64"],
        "remote": [{"type": "IPFS", "cid": cid}, {"type": "HTTPS", "url": f"{nginx.url}/models/w.bin"}],
    }
    pt = pullthrough(
        [{"name": "docker.io", "url": registry.url, "default": True}],
        web={"allow": [f"{nginx.url}/models/"], "ipfs_gateways": [nginx.url]}, resource_sets=[resource_set],
    )
    listing = wait_for_prefetch(pt)
    assert all(s["cached"] and s["error"] is None for s in [*listing["status"]["images"].values(), *listing["status"]["remote"].values()])
    pins = subprocess.run([sys.executable, "-m", "proxy", "pins", "--config", str(pt.config_path), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert pins.returncode == 0, pins.stderr
    arm64 = next(c for c in index.children if '"arm64"' in httpx.get(f"{registry.url}/v2/multi/app/blobs/{c.config.digest}").text)
    amd64 = next(c for c in index.children if c is not arm64)
    sha = lambda data: "sha256:" + hashlib.sha256(data).hexdigest()  # noqa: E731
    expected = {index.manifest_digest, arm64.manifest_digest, *(b.digest for b in arm64.all_blobs()), sha(web_bytes), sha(ipfs_bytes)}
    assert set(json.loads(pins.stdout)[MARKET]["digests"]) == expected
    assert not {amd64.manifest_digest, *(b.digest for b in amd64.all_blobs())} & expected  # the other platform stays out


def test_post_to_the_listing_prefetches_again_with_the_admin_token_only(upstreams, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, s3, hub = upstreams
    closed = start_with_set(pullthrough, registry, s3, hub, admin_token="s3cret-admin")
    first = wait_for_prefetch(closed)
    url = f"{closed.url}/api/markets/{MARKET}/required-resources"
    assert httpx.post(url, timeout=30).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    again = httpx.post(url, headers={"Authorization": "Bearer s3cret-admin"}, timeout=120)
    assert again.status_code == 200
    before = first["status"]["images"]["docker.io/nosana/stats:v1.0.4"]["last_refreshed"]
    after = again.json()["status"]["images"]["docker.io/nosana/stats:v1.0.4"]
    assert after["cached"] and after["last_refreshed"] > before
    open_server = start_with_set(pullthrough, registry, s3, hub)  # no admin token configured: admin is off
    assert httpx.post(f"{open_server.url}/api/markets/{MARKET}/required-resources", timeout=30).status_code == 404


def test_prefetch_set_then_the_pins_and_stats_commands_report_it(upstreams, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry, s3, hub = upstreams
    pt = start_with_set(pullthrough, registry, s3, hub, prefetch_on_start=False)
    pt.stop()  # the commands below work on the configured cache, with no server
    run = [sys.executable, "-m", "proxy"]
    fetched = subprocess.run([*run, "prefetch", "--config", str(pt.config_path), "--set", MARKET],
                             capture_output=True, text=True, timeout=180)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert f"{MARKET}: docker.io/nosana/stats:v1.0.4: 4 blobs" in fetched.stdout
    pins = subprocess.run([*run, "pins", "--config", str(pt.config_path), "--json"], capture_output=True, text=True, timeout=60)
    assert pins.returncode == 0 and json.loads(pins.stdout)[MARKET]["pinned"] == json.loads(pins.stdout)[MARKET]["present"] == 8
    table = subprocess.run([*run, "pins", "--config", str(pt.config_path)], capture_output=True, text=True, timeout=60)
    assert table.stdout.strip().startswith(f"{MARKET}: 8 blobs pinned, 8 on disk (")
    offline = subprocess.run([*run, "stats", "--config", str(pt.config_path), "--offline", "--json"], capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stderr
    report = json.loads(offline.stdout)  # from the index: what the prefetch fetched, saved by its counters
    assert report["cache"]["entries"] >= 8 and report["bytes_from_upstream"] >= 300_000 and report["pins"][MARKET] == {"blobs": 8}
    pt.restart()
    layer = registry.images["nosana/stats:v1.0.4"].layers[0].digest
    assert httpx.get(f"{pt.url}/v2/nosana/stats/blobs/{layer}", timeout=30).status_code == 200
    live = subprocess.run([*run, "stats", "--config", str(pt.config_path), "--url", pt.url, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(live.stdout)["hits"] == httpx.get(f"{pt.url}/stats", timeout=10).json()["hits"] == 1
    text = subprocess.run([*run, "stats", "--config", str(pt.config_path), "--url", pt.url], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and any(line.split() == ["hits", "1"] for line in text.stdout.splitlines())
