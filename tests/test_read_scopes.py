"""Who may read a cached blob: bytes are stored once, but served only under a read scope that
admitted them. A gated or private model file cached for an authorized token reaches nobody else
through any route; a layer of one repository is served under another only once its upstream
confirms it there; and a second repository sharing a base layer fetches no byte of it again."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from multiformats import CID, multihash

from tests.conftest import require_tool
from tests.images import KIB, ImageSpec, build_layout, publish, push, skopeo
from tests.servers.fake_hub import FakeHub
from tests.servers.moto import MotoS3
from tests.servers.registry import Distribution
from tests.test_hf_mirror import ALICE, BOB, GATED, PRIVATE, populate

pytestmark = pytest.mark.real


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = FakeHub.start(tmp_path / "hub")
    populate(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3():  # type: ignore[no-untyped-def]
    server = MotoS3.start()
    server.client().create_bucket(Bucket="models")
    yield server
    server.stop()


def raw_cid(data: bytes) -> str:
    """The CIDv1 of one raw block: it names exactly the sha256 of the bytes."""
    return str(CID("base32", 1, "raw", multihash.wrap(hashlib.sha256(data).digest(), "sha2-256")))


def test_gated_and_private_files_cached_for_an_authorized_token_reach_nobody_else_through_any_route(
    hub, upstream, origin, s3, pullthrough, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    origin, _ = origin
    pt = pullthrough(
        hf={"url": hub.url},
        web={"allow": [f"{origin.url}/models/"], "ipfs_gateways": [origin.url]},
        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing", "buckets": [{"name": "models"}]},
    )
    secrets = {
        "gated weights (LFS)": hub.repo(GATED).files()["model.safetensors"],
        "private config (a regular file)": hub.repo(PRIVATE).files()["config.json"],
        "private weights (LFS)": hub.repo(PRIVATE).files()["model.safetensors"],
    }
    alice = {"Authorization": f"Bearer {ALICE}"}
    with httpx.Client(base_url=pt.url, timeout=60) as http:
        for repo, path in ((GATED, "model.safetensors"), (PRIVATE, "config.json"), (PRIVATE, "model.safetensors")):
            cached = http.get(f"/{repo}/resolve/main/{path}", headers=alice)
            assert cached.status_code == 200 and cached.content == hub.repo(repo).files()[path]
        upstream_mark = upstream.mark()
        for label, data in secrets.items():
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            hex_digest = digest.split(":", 1)[1]
            attempts = [
                (method, target, headers)
                for target in (
                    f"/v2/library/x/blobs/{digest}", f"/v2/library/x/blobs/{digest}?ns=docker.io",
                    f"/v2/upstream.test/library/x/blobs/{digest}", f"/v2/library/x/manifests/{digest}",
                    f"/v2/upstream.test/library/x/manifests/{digest}?ns=upstream.test",
                    f"/ipfs/{raw_cid(data)}", f"/s3/models/{hex_digest}", f"/web/{origin.url}/models/{hex_digest}",
                )
                for method, headers in (("GET", {}), ("GET", {"Range": "bytes=0-99"}), ("HEAD", {}))
            ]
            for caller in ({}, {"Authorization": f"Bearer {BOB}"}):
                for repo, path in ((GATED, "model.safetensors"), (PRIVATE, "config.json"), (PRIVATE, "model.safetensors")):
                    attempts.append(("GET", f"/{repo}/resolve/main/{path}", caller))
            for method, target, headers in attempts:
                response = http.request(method, target, headers=headers)
                assert response.status_code >= 400, (label, method, target, headers, response.status_code)
                assert data[:64] not in response.content, (label, target)
    # The upstream registry was asked (and said no) for every digest under library/x: it decided.
    asked = [e for e in upstream.requests_since(upstream_mark) if "/library/x/" in e.path]
    assert asked and all(e.status == 404 for e in asked)
    # Nor does `materialize` of another resource lay the bytes out from the same cache.
    for data in secrets.values():
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        destination = tmp_path / f"materialized-{digest[7:15]}"
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "materialize", "--config", str(pt.config_path), f"docker.io/library/x@{digest}",
             "--to", str(destination)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode != 0, result.stdout
        laid_out = [p.read_bytes() for p in destination.rglob("*") if p.is_file()] if destination.exists() else []
        assert data not in laid_out


@pytest.fixture
def teams(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An upstream of its own: team-a's private image, team-b's unrelated one, and team-c's image
    built on the same layers as team-a's (pushed from the same layout)."""
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Distribution.start(tmp_path / "teams")
    try:
        a = ImageSpec("team-a/private", "1", seed=31, layers=[[64 * KIB], [8 * KIB]])
        registry.images = publish([a, ImageSpec("team-b/app", "1", seed=32, layers=[[16 * KIB]])], tmp_path / "layouts", registry.host)
        layout = tmp_path / "layouts" / "team-c"
        build_layout(a, layout)
        push(layout, "team-c/shared:1", registry.host, tag="1")
    except BaseException:
        registry.stop()
        raise
    yield registry
    registry.stop()


def test_a_layer_of_one_repository_is_served_under_another_only_where_the_upstream_confirms_it(teams, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough([{"name": "docker.io", "url": teams.url, "default": True, "tag_ttl": "1h"}])
    image = teams.images["team-a/private:1"]
    layer = image.layers[0]
    with httpx.Client(base_url=pt.url, timeout=60) as http:
        assert http.get(f"/v2/team-a/private/blobs/{layer.digest}").status_code == 200
        mark = teams.mark()
        for method, headers in (("GET", {}), ("GET", {"Range": "bytes=0-99"}), ("HEAD", {})):
            refused = http.request(method, f"/v2/team-b/app/blobs/{layer.digest}", headers=headers)
            assert refused.status_code == 404, (method, headers)
            if method == "GET":
                assert refused.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    under_b = [e for e in teams.requests_since(mark) if e.path == f"/v2/team-b/app/blobs/{layer.digest}"]
    assert under_b and {(e.method, e.status) for e in under_b} == {("HEAD", 404)}  # asked, never fetched

    # team-c's image shares team-a's layers: once team-a's image is cached, team-c's manifest lists
    # them, so they are linked to team-c with no HEAD, and not one byte of them is fetched again.
    skopeo("copy", "--src-tls-verify=false", f"docker://{pt.host}/team-a/private:1", f"dir:{tmp_path / 'team-a'}")
    mark = teams.mark()
    destination = tmp_path / "team-c"
    skopeo("copy", "--src-tls-verify=false", f"docker://{pt.host}/team-c/shared:1", f"dir:{destination}")
    for blob in image.all_blobs():
        assert hashlib.sha256((destination / blob.digest.split(":", 1)[1]).read_bytes()).hexdigest() == blob.digest[7:]
    blob_requests = [e for e in teams.requests_since(mark) if e.is_blob]
    assert [e for e in blob_requests if e.method == "GET"] == []
    for blob in image.all_blobs():
        assert len([e for e in blob_requests if e.method == "HEAD" and e.targets(blob.digest)]) <= 1
