"""S3 (moto's real S3 endpoint), plain web URLs and IPFS gateways (nginx as the origin) through
pullthrough: mirrored, revalidated, counted, and refused outside the configuration."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest
from multiformats import CID, multihash

from tests.conftest import require_tool
from tests.servers.moto import MotoS3
from tests.servers.nginx import Nginx


@pytest.fixture(scope="module")
def s3():  # type: ignore[no-untyped-def]
    server = MotoS3.start()
    client = server.client()
    client.create_bucket(Bucket="models")
    client.create_bucket(Bucket="secret")
    yield server
    server.stop()


def s3_config(s3: MotoS3, object_ttl: str = "1h") -> dict:
    return {
        "endpoint_url": s3.url, "region": "us-east-1", "access_key_id": "testing",
        "secret_access_key": "testing", "object_ttl": object_ttl, "buckets": [{"name": "models"}],
    }


TTL = 4.0  # seconds: long enough for two requests on a busy machine, short enough to wait out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def wait_committed(pt, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Until the bytes are a committed blob: the client may have them all before the commit."""
    wait_until(pt.blob_path(sha256_digest(data)).exists, "the blob's commit")


def gets_of(server, path: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for method, p, _ in server.requests() if method == "GET" and p.split("?")[0] == path)


def test_s3_object_is_mirrored_and_the_second_get_is_served_from_the_cache(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3 * 1024 * 1024 + 5)
    s3.client().put_object(Bucket="models", Key="sd/dreamshaper/8/unet.bin", Body=data)
    etag = s3.client().head_object(Bucket="models", Key="sd/dreamshaper/8/unet.bin")["ETag"]
    pt = pullthrough(s3=s3_config(s3))
    url = f"{pt.url}/s3/models/sd/dreamshaper/8/unet.bin"
    before = len(s3.requests())
    first = httpx.get(url, timeout=60)
    assert first.status_code == 200 and first.content == data
    assert first.headers["etag"] == etag
    assert gets_of(s3, "/models/sd/dreamshaper/8/unet.bin") == 1
    wait_committed(pt, data)  # the key's reference is written just after the last byte: a GET before it probes again
    after_first = len(s3.requests())
    second = httpx.get(url, timeout=60)
    assert second.content == data
    assert len(s3.requests()) == after_first, "a GET inside the object TTL reached S3"
    assert after_first - before == 2  # one HeadObject, one GetObject
    ranged = httpx.get(url, headers={"Range": "bytes=100-199"}, timeout=60)
    assert ranged.status_code == 206 and ranged.content == data[100:200]
    assert ranged.headers["content-range"] == f"bytes 100-199/{len(data)}"


def test_a_changed_s3_object_is_picked_up_after_its_ttl(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    s3.client().put_object(Bucket="models", Key="cfg.json", Body=b'{"v": 1}')
    pt = pullthrough(s3=s3_config(s3, object_ttl=f"{TTL}s"))
    url = f"{pt.url}/s3/models/cfg.json"
    assert httpx.get(url, timeout=30).content == b'{"v": 1}'
    cached_at = time.monotonic()
    wait_committed(pt, b'{"v": 1}')
    s3.client().put_object(Bucket="models", Key="cfg.json", Body=b'{"v": 2, "longer": true}')
    requests = len(s3.requests())
    assert httpx.get(url, timeout=30).content == b'{"v": 1}'  # inside the TTL: the cached version
    assert time.monotonic() - cached_at < TTL, "the machine was too slow to ask inside the TTL"
    assert len(s3.requests()) == requests  # and not a question to S3
    wait_until(lambda: time.monotonic() - cached_at > TTL, "the object's TTL to run out", timeout=TTL + 5)
    assert httpx.get(url, timeout=30).content == b'{"v": 2, "longer": true}'
    wait_committed(pt, b'{"v": 2, "longer": true}')
    gets = gets_of(s3, "/models/cfg.json")
    assert httpx.get(url, timeout=30).content == b'{"v": 2, "longer": true}'
    assert gets_of(s3, "/models/cfg.json") == gets  # the new version is cached too


def test_an_s3_prefix_is_listed_as_json(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    client = s3.client()
    for key in ("sets/8/a.bin", "sets/8/b/c.bin", "sets/80/other.bin"):
        client.put_object(Bucket="models", Key=key, Body=key.encode())
    pt = pullthrough(s3=s3_config(s3))
    listing = httpx.get(f"{pt.url}/s3/models/sets/8/", timeout=30).json()
    assert listing["bucket"] == "models" and listing["prefix"] == "sets/8/"
    assert sorted(o["key"] for o in listing["objects"]) == ["sets/8/a.bin", "sets/8/b/c.bin"]
    assert all(o["size"] == len(o["key"]) for o in listing["objects"])


def test_a_bucket_outside_the_configuration_is_refused_and_nothing_is_fetched(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    s3.client().put_object(Bucket="secret", Key="k", Body=b"not for you")
    pt = pullthrough(s3=s3_config(s3))
    before = len(s3.requests())
    for path in ("/s3/secret/k", "/s3/secret/", "/s3/other-bucket/x"):
        response = httpx.get(f"{pt.url}{path}", timeout=30)
        assert response.status_code == 403, path
        assert "not served by this mirror" in response.json()["message"]
    assert len(s3.requests()) == before


def test_a_missing_s3_key_is_404(s3, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(s3=s3_config(s3))
    response = httpx.get(f"{pt.url}/s3/models/no/such/key", timeout=30)
    assert response.status_code == 404 and response.json()["error"] == "NoSuchKey"


# -- plain web URLs -----------------------------------------------------------------------------------

def test_an_allowed_url_is_mirrored_and_revalidated(origin, pullthrough) -> None:  # type: ignore[no-untyped-def]
    server, root = origin
    data = os.urandom(2 * 1024 * 1024)
    (root / "models" / "w.bin").write_bytes(data)
    pt = pullthrough(web={"allow": [f"{server.url}/models/"], "ttl": f"{TTL}s"})
    url = f"{pt.url}/web/{server.url}/models/w.bin"
    assert httpx.get(url, timeout=30).content == data
    cached_at = time.monotonic()
    wait_committed(pt, data)
    assert httpx.get(url, timeout=30).content == data
    assert time.monotonic() - cached_at < TTL, "the machine was too slow to ask inside the TTL"
    assert [m for m, u, _ in server.requests() if u == "/models/w.bin"] == ["HEAD", "GET"]
    wait_until(lambda: time.monotonic() - cached_at > TTL, "the URL's TTL to run out", timeout=TTL + 5)
    assert httpx.get(url, timeout=30).content == data  # revalidated: same ETag, not fetched again
    revalidated_at = time.monotonic()  # after the answer: the renewed TTL starts before it
    assert [m for m, u, _ in server.requests() if u == "/models/w.bin"] == ["HEAD", "GET", "HEAD"]
    new = os.urandom(1000)
    (root / "models" / "w.bin").write_bytes(new)
    os.utime(root / "models" / "w.bin", (time.time() + 5, time.time() + 5))
    wait_until(lambda: time.monotonic() - revalidated_at > TTL, "the URL's TTL to run out again", timeout=TTL + 5)
    assert httpx.get(url, timeout=30).content == new


def test_a_url_outside_the_allow_list_is_refused_and_nothing_is_fetched(origin, pullthrough) -> None:  # type: ignore[no-untyped-def]
    server, root = origin
    (root / "private" / "key").write_bytes(b"secret")
    pt = pullthrough(web={"allow": [f"{server.url}/models/"]})
    for target in (
        f"{server.url}/private/key",
        f"{server.url}/models-evil/x",
        f"{server.url}/models/../private/key",
        "http://169.254.169.254/latest/meta-data/",
    ):
        response = httpx.get(f"{pt.url}/web/{target}", timeout=30)
        assert response.status_code in (400, 403), (target, response.status_code)
        assert response.json()["error"] in ("NotAllowed", "InvalidURL")
    assert [r for r in server.requests() if r[1] != "/"] == []  # "/" is the start-up probe


# -- IPFS --------------------------------------------------------------------------------------------

def test_cid_v0_and_v1_of_one_content_are_one_cache_entry(tmp_path, pullthrough) -> None:  # type: ignore[no-untyped-def]
    require_tool("nginx")
    data = os.urandom(100_000)
    digest = multihash.get("sha2-256").digest(data)
    v0 = CID("base58btc", 0, "dag-pb", digest)
    v1 = v0.set(version=1)
    root = tmp_path / "gateway"
    (root / "ipfs").mkdir(parents=True)
    (root / "ipfs" / str(v1.encode("base32"))).write_bytes(data)  # the gateway serves the canonical name
    gateway = Nginx.start(tmp_path / "nginx", root, access_log=True)
    try:
        pt = pullthrough(web={"ipfs_gateways": ["http://127.0.0.1:1", gateway.url]})  # the first one is down
        for cid in (str(v0), str(v1.encode("base32")), str(v0)):
            response = httpx.get(f"{pt.url}/ipfs/{cid}", timeout=30)
            assert response.status_code == 200 and response.content == data
            wait_committed(pt, data)  # the next request finds it cached, not a fill still committing
        assert sum(1 for m, uri, _ in gateway.requests() if m == "GET" and uri.startswith("/ipfs/")) == 1
        bad = httpx.get(f"{pt.url}/ipfs/not-a-cid", timeout=30)
        assert bad.status_code == 400 and bad.json()["error"] == "InvalidCID"
    finally:
        gateway.stop()
    stats = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert stats["per_source"]["ipfs"]["hits"] == 2 and stats["per_source"]["ipfs"]["misses"] == 1
    assert pt.blob_path(sha256_digest(data)).read_bytes() == data  # stored by its own sha256, as every blob


def test_s3_bytes_are_asked_for_only_as_the_version_that_was_probed(s3) -> None:  # type: ignore[no-untyped-def]
    """GetObject carries IfMatch with the ETag the HeadObject saw: a newer upload in between is
    refused by S3 itself (409 VersionChanged to the caller), never mixed into the old one's bytes."""
    import asyncio

    from proxy.config import S3Config
    from proxy.sources.objects import ObjectError
    from proxy.sources.s3.client import S3Clients

    client = s3.client()
    client.put_object(Bucket="models", Key="mixed.bin", Body=b"version one")
    config = S3Config(**s3_config(s3))
    bucket = config.buckets[0]

    async def run() -> None:
        clients = S3Clients(config)
        try:
            old = (await clients.head(bucket, "mixed.bin"))["ETag"]
            client.put_object(Bucket="models", Key="mixed.bin", Body=b"version two, longer")
            with pytest.raises(ObjectError) as refused:
                await clients.get(bucket, "mixed.bin", old)
            assert (refused.value.status, refused.value.code) == (409, "VersionChanged")
            new = (await clients.head(bucket, "mixed.bin"))["ETag"]
            body = await clients.get(bucket, "mixed.bin", new)
            assert b"".join([chunk async for chunk in body.chunks()]) == b"version two, longer"
            await body.aclose()
        finally:
            await clients.aclose()

    asyncio.run(run())


@pytest.fixture
def marked_origin(tmp_path):  # type: ignore[no-untyped-def]
    """An origin that marks some answers private or no-store, as an origin does for per-user content."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    marks = {"/models/private.bin": "private, max-age=60", "/models/nostore.bin": "no-store", "/models/ok.bin": "public, max-age=60"}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.path not in marks:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = f"bytes of {self.path}".encode()
            self.send_response(200)
            self.send_header("Cache-Control", marks[self.path])
            self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_web_answers_marked_private_or_no_store_are_refused_and_not_cached(marked_origin, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(web={"allow": [f"{marked_origin}/models/"]})
    for name in ("private.bin", "nostore.bin"):
        refused = httpx.get(f"{pt.url}/web/{marked_origin}/models/{name}", timeout=30)
        assert refused.status_code == 502 and refused.json()["error"] == "NotCacheable", name
    ok = httpx.get(f"{pt.url}/web/{marked_origin}/models/ok.bin", timeout=30)
    assert ok.status_code == 200 and ok.content == b"bytes of /models/ok.bin"
    wait_committed(pt, ok.content)
    assert [p.name for p in pt.committed_blobs()] == [hashlib.sha256(ok.content).hexdigest()]
