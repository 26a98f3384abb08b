"""`offline = true`: a cache filled online serves what it holds with no upstream asked at all, and
answers anything else with its protocol's error at once.

Each test fills a cache through a recording upstream (a front of the session's registry, the fake
Hub), restarts the same cache offline, and shows the recorder saw nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_module, require_tool
from tests.images import ACCEPT_ALL, skopeo
from tests.servers.fake_hub import FakeHub
from tests.servers.front import Front
from tests.servers.ports import free_port
from tests.servers.pullthrough import Pullthrough, render_config
from tests.test_hf_mirror import MODEL, Client, model_files, populate, sha256
from tests.test_oci_skopeo import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.real


@pytest.fixture
def front(upstream):  # type: ignore[no-untyped-def]
    server = Front(upstream.url)
    yield server
    server.close()


def test_an_offline_cache_pulls_what_it_holds_and_refuses_the_rest_without_asking_upstream(
    upstream, pullthrough, front, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    require_tool("skopeo")
    cached, never_cached = upstream.images["library/single:1"], upstream.images["library/many:1"]
    # tag_ttl 0s: online, every pull by tag asks the upstream; offline, the tag must answer from the cache.
    online = pullthrough([{"name": "docker.io", "url": front.url, "default": True, "tag_ttl": "0s"}])
    copy_to_dir(f"docker://{online.host}/library/single:1", tmp_path / "online", cached)
    assert front.seen, "the online pull went through the recording front"
    online.stop()

    front.seen.clear()
    closed = f"http://127.0.0.1:{free_port()}"
    pt = pullthrough(
        [{"name": "docker.io", "url": front.url, "default": True, "tag_ttl": "0s"},
         {"name": "closed.test", "url": closed, "tag_ttl": "0s"}],
        cache_dir=online.cache_dir, database_url=online.database_url, offline=True,
        resource_sets=[{"name": "market-a", "images": ["library/many:1"]}],  # not prefetched offline
    )
    copy_to_dir(f"docker://{pt.host}/library/single:1", tmp_path / "offline", cached)
    assert_dir_matches(tmp_path / "offline", cached)

    refused = skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{pt.host}/library/many:1",
                     f"dir:{tmp_path / 'never'}", check=False)
    assert refused.returncode != 0 and b"offline" in refused.stderr, refused.stderr
    with httpx.Client(base_url=pt.url, timeout=30, headers={"Accept": ACCEPT_ALL}) as http:
        for path, code in (
            ("/v2/library/many/manifests/1", "MANIFEST_UNKNOWN"),
            (f"/v2/library/many/manifests/{never_cached.manifest_digest}", "MANIFEST_UNKNOWN"),
            (f"/v2/library/many/blobs/{never_cached.layers[0].digest}", "BLOB_UNKNOWN"),
            ("/v2/library/single/tags/list", "MANIFEST_UNKNOWN"),
            ("/v2/closed.test/library/single/manifests/1", "MANIFEST_UNKNOWN"),
        ):
            response = http.get(path)
            error = response.json()["errors"][0]
            assert (response.status_code, error["code"]) == (404, code), (path, response.text)
            assert "offline" in error["message"], (path, error)
    assert front.seen == [], "an offline mirror asked its upstream"
    assert "not prefetched" in pt.log_text()


@pytest.fixture
def hub(tmp_path):  # type: ignore[no-untyped-def]
    server = FakeHub.start(tmp_path / "hub")
    populate(server)
    yield server
    server.stop()


def start_hf_mirror(tmp_path: Path, hub_url: str, port: int, *, offline: bool) -> Pullthrough:
    """pullthrough with an [hf] table (which Pullthrough.start cannot write) on one cache dir."""
    cache_dir = tmp_path / "hf-cache"
    top = {"listen": f"127.0.0.1:{port}", "cache_dir": str(cache_dir), "offline": offline}
    text = render_config(top, []) + f'\n[hf]\nurl = "{hub_url}"\nrevision_ttl = "0s"\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULLTHROUGH_", "HF_"))}
    server = Pullthrough(cache_dir, port, text, tmp_path / "hf-cache.run", env)
    server.workdir.mkdir(parents=True, exist_ok=True)
    server._launch(60.0)
    return server


def test_an_offline_cache_serves_cached_model_files_and_the_hubs_error_for_the_rest(hub: FakeHub, tmp_path: Path) -> None:
    require_module("huggingface_hub")
    files = model_files()
    port = free_port()
    online = start_hf_mirror(tmp_path, hub.url, port, offline=False)
    try:
        client = Client(online.url, tmp_path / "clients")
        for name in ("config.json", "model.safetensors"):  # a regular file and an LFS one
            assert client.ok("download", repo=MODEL, filename=name)["sha256"] == sha256(files[name])
    finally:
        online.stop()

    hub.reset_hits()
    pt = start_hf_mirror(tmp_path, hub.url, port, offline=True)
    try:
        for name in ("config.json", "model.safetensors"):  # each client has a fresh HF_HOME: the bytes come from pt
            assert client.ok("download", repo=MODEL, filename=name)["sha256"] == sha256(files[name])
        # What the cache never held gets the Hub's error shape at once (huggingface_hub itself would
        # retry a 503 for ~20 s before raising LocalEntryNotFoundError with this message inside).
        for path in (f"/{MODEL}/resolve/main/README.md", "/acme/tiny-dataset/resolve/main/README.md"):
            response = httpx.head(f"{pt.url}{path}", timeout=30)
            assert response.status_code == 503, (path, response.headers)
            assert "offline" in response.headers["x-error-message"], response.headers
        missing = httpx.get(f"{pt.url}/{MODEL}/resolve/main/README.md", timeout=30)
        assert missing.status_code == 503 and "offline" in json.loads(missing.content)["error"]
        assert hub.hits() == [], "an offline mirror asked the Hub"
    finally:
        pt.stop()


def test_an_offline_cache_serves_cached_web_and_s3_objects_and_unavailable_for_the_rest(
    origin, pullthrough, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tests.servers.moto import MotoS3
    from tests.test_sources import s3_config, wait_committed

    server, root = origin
    cached, never = os.urandom(100_000), os.urandom(1000)
    (root / "models" / "cached.bin").write_bytes(cached)
    (root / "models" / "never.bin").write_bytes(never)
    s3 = MotoS3.start()
    try:
        s3.client().create_bucket(Bucket="models")
        s3.client().put_object(Bucket="models", Key="cached.bin", Body=cached[:5000])
        s3.client().put_object(Bucket="models", Key="never.bin", Body=never)
        # ttl 0s: online, every GET revalidates; offline, the cached versions must answer alone.
        settings = {"web": {"allow": [f"{server.url}/models/"], "ttl": "0s"}, "s3": s3_config(s3, object_ttl="0s")}
        online = pullthrough(**settings)
        assert httpx.get(f"{online.url}/web/{server.url}/models/cached.bin", timeout=30).content == cached
        assert httpx.get(f"{online.url}/s3/models/cached.bin", timeout=30).content == cached[:5000]
        wait_committed(online, cached)
        wait_committed(online, cached[:5000])
        online.stop()
        seen = len(server.requests())

        pt = pullthrough(cache_dir=online.cache_dir, database_url=online.database_url, offline=True, **settings)
        assert httpx.get(f"{pt.url}/web/{server.url}/models/cached.bin", timeout=30).content == cached
        assert httpx.get(f"{pt.url}/s3/models/cached.bin", timeout=30).content == cached[:5000]
        for path in (f"/web/{server.url}/models/never.bin", "/s3/models/never.bin"):
            response = httpx.get(f"{pt.url}{path}", timeout=30)
            assert response.status_code == 503 and response.json()["error"] == "Unavailable", (path, response.text)
            assert "offline" in response.json()["message"], response.text
        assert len(server.requests()) == seen, "an offline mirror asked the web origin"
    finally:
        s3.stop()
