"""Every source counts the same way, HEAD included: a request is a hit when the cache answered it
and a miss when the upstream had to, counted once by the store's door. One test drives each source
(a registry, the Hub, S3, a web origin and an IPFS gateway) and compares /stats with what it did."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from multiformats import CID, multihash

from tests.servers.fake_hub import FakeHub
from tests.servers.moto import MotoS3
from tests.test_hf_mirror import MODEL, populate

pytestmark = pytest.mark.real


def wait_until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def upstreams(tmp_path: Path, origin):  # type: ignore[no-untyped-def]
    hub = FakeHub.start(tmp_path / "hub")
    populate(hub)
    s3 = MotoS3.start()
    s3.client().create_bucket(Bucket="models")
    yield hub, *origin, s3
    s3.stop()
    hub.stop()


def test_stats_count_each_request_once_as_a_hit_or_a_miss_for_every_source_and_for_head(upstream, upstreams, pullthrough) -> None:  # type: ignore[no-untyped-def]
    hub, nginx, root, s3 = upstreams
    web_bytes, ipfs_bytes, s3_bytes = os.urandom(70_000), os.urandom(50_000), os.urandom(90_000)
    (root / "models" / "w.bin").write_bytes(web_bytes)
    cid = CID("base58btc", 0, "dag-pb", multihash.get("sha2-256").digest(ipfs_bytes)).set(version=1)
    (root / "ipfs" / str(cid.encode("base32"))).write_bytes(ipfs_bytes)
    s3.client().put_object(Bucket="models", Key="m/w.bin", Body=s3_bytes)
    pt = pullthrough(
        hf={"url": hub.url},
        web={"allow": [f"{nginx.url}/models/"], "ipfs_gateways": [nginx.url]},
        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing", "buckets": [{"name": "models"}]},
    )
    image = upstream.images["library/many:1"]
    layer, other_layer = image.layers[0].digest, image.layers[1].digest
    plan = [  # (source, method, path, expected outcome)
        ("oci", "GET", f"/v2/library/many/blobs/{layer}", "miss"),
        ("oci", "GET", f"/v2/library/many/blobs/{layer}", "hit"),
        ("oci", "HEAD", f"/v2/library/many/blobs/{layer}", "hit"),
        ("oci", "HEAD", f"/v2/library/many/blobs/{other_layer}", "miss"),
        ("oci", "GET", f"/v2/library/many/manifests/{image.manifest_digest}", "miss"),
        ("oci", "GET", f"/v2/library/many/manifests/{image.manifest_digest}", "hit"),
        ("oci", "HEAD", f"/v2/library/many/manifests/{image.manifest_digest}", "hit"),
        ("hf", "GET", f"/{MODEL}/resolve/main/model.safetensors", "miss"),
        ("hf", "GET", f"/{MODEL}/resolve/main/model.safetensors", "hit"),
        ("hf", "HEAD", f"/{MODEL}/resolve/main/model.safetensors", "hit"),
        ("hf", "HEAD", f"/{MODEL}/resolve/main/config.json", "miss"),
        ("hf", "GET", f"/{MODEL}/resolve/main/config.json", "miss"),
        ("hf", "GET", f"/{MODEL}/resolve/main/config.json", "hit"),
        ("hf", "GET", f"/api/models/{MODEL}", "miss"),
        ("hf", "GET", f"/api/models/{MODEL}", "hit"),
        ("s3", "GET", "/s3/models/m/w.bin", "miss"),
        ("s3", "GET", "/s3/models/m/w.bin", "hit"),
        ("s3", "HEAD", "/s3/models/m/w.bin", "hit"),
        ("s3", "GET", "/s3/models/m/", "miss"),
        ("s3", "GET", "/s3/models/m/", "hit"),
        ("web", "GET", f"/web/{nginx.url}/models/w.bin", "miss"),
        ("web", "GET", f"/web/{nginx.url}/models/w.bin", "hit"),
        ("web", "HEAD", f"/web/{nginx.url}/models/w.bin", "hit"),
        ("ipfs", "GET", f"/ipfs/{cid}", "miss"),
        ("ipfs", "GET", f"/ipfs/{cid}", "hit"),
        ("ipfs", "HEAD", f"/ipfs/{cid}", "hit"),
    ]
    expected: Counter[tuple[str, str]] = Counter()
    sent_from_cache = 0
    with httpx.Client(base_url=pt.url, timeout=60) as http:
        for source, method, path, outcome in plan:
            response = http.request(method, path)
            assert response.status_code == 200, (method, path, response.status_code, response.text[:300])
            expected[(source, outcome)] += 1
            if outcome == "hit" and method == "GET":
                sent_from_cache += len(response.content)
            if outcome == "miss" and method == "GET" and "/api/" not in path and not path.endswith("/"):
                # The client has every byte before the blob is committed (fsync and rename follow
                # the verified last byte): the next request is a hit only once the file is there.
                committed = pt.blob_path("sha256:" + hashlib.sha256(response.content).hexdigest())
                wait_until(committed.exists, f"{path} committed")
        stats = http.get("/stats").json()
    names = {"hit": "hits", "miss": "misses"}
    counted = {(source, outcome): stats["per_source"].get(source, {}).get(names[outcome], 0)
               for source in ("oci", "hf", "s3", "web", "ipfs") for outcome in ("hit", "miss")}
    assert counted == {key: expected[key] for key in counted}
    assert stats["requests"] == len(plan) == stats["hits"] + stats["misses"]
    assert stats["bytes_from_cache"] == sent_from_cache
