"""Faults: a crash in the middle of a fill, an upstream that sends wrong bytes, an upstream that is gone.

Tests that break an upstream start their own docker-registry; the session upstream stays intact.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import require_tool
from tests.images import ImageSpec, KIB, MIB, publish, sha256_digest, skopeo
from tests.servers.registry import Distribution, ThrottledRelay

pytestmark = pytest.mark.real


@pytest.fixture
def own_upstream(tmp_path):
    """A docker-registry this test may break, holding a one-layer image and a multi-arch index."""
    require_tool("docker-registry")
    require_tool("skopeo")
    registry = Distribution.start(tmp_path / "upstream")
    try:
        registry.images = publish(
            [ImageSpec("library/victim", "1", seed=21, layers=[[2 * MIB]]),
             ImageSpec("library/small", "1", seed=22, layers=[[48 * KIB]]),
             ImageSpec("multi/fleet", "1", seed=23, layers=[[8 * KIB]], arches=("amd64", "arm64"))],
            tmp_path / "layouts", registry.host)
    except BaseException:
        registry.stop()
        raise
    yield registry
    registry.stop()


def only_registry(url: str, tag_ttl: str = "1h") -> list[dict]:
    return [{"name": "docker.io", "url": url, "default": True, "tag_ttl": tag_ttl}]


def blob_get(digest: str):
    return lambda entry: entry.method == "GET" and entry.path.endswith(f"/blobs/{digest}")


def safe(ref: str) -> str:
    return ref.replace("/", "_").replace(":", "_")


def wait_until(condition, timeout: float = 30.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.02)


# -- kill -9 during a fill --------------------------------------------------------------------------

def test_kill_during_fill_then_restart_serves_correct_blob_and_sweeps_tmp(upstream, pullthrough):
    layer = upstream.images["library/big:1"].layers[0]
    relay = ThrottledRelay(upstream.port, rate=2 << 20)
    try:
        pt = pullthrough(only_registry(relay.url))
        url = f"{pt.url}/v2/library/big/blobs/{layer.digest}"
        outcome: dict = {}

        def read_all() -> None:
            try:
                with httpx.Client(timeout=60) as client:
                    outcome["status"] = client.get(url).status_code
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        reader = threading.Thread(target=read_all)
        reader.start()
        wait_until(lambda: pt.largest_tmp_file() > 1 << 20, message="a fill under tmp/")

        pt.kill()
        reader.join(timeout=60)
        assert "error" in outcome, "the client of a killed server saw a complete response"
        assert not pt.blob_path(layer.digest).exists()

        relay.rate = None
        pt.restart()
        assert pt.tmp_files() == [], "start-up did not sweep the temp file the crash left"

        response = httpx.get(url, timeout=120)
        assert response.status_code == 200
        assert len(response.content) == layer.size
        assert sha256_digest(response.content) == layer.digest
        committed = pt.blob_path(layer.digest)
        # The commit (fsync and rename) follows the verified last byte the client already has.
        wait_until(committed.exists, timeout=30, message="the blob's commit")
        assert hashlib.sha256(committed.read_bytes()).hexdigest() == layer.digest.split(":", 1)[1]
        wait_until(lambda: pt.tmp_files() == [], timeout=10, message="tmp/ to be empty after the fill")
    finally:
        relay.close()


# -- wrong bytes from upstream ----------------------------------------------------------------------

def corrupt(path, offset: int) -> None:
    """Flip bytes in the middle of a stored blob: same size, same name, different content."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(64)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))


def get_outcome(url: str) -> tuple[str, int | None, bytes]:
    """("complete", status, body), or ("broken", status, partial body) when the transfer was cut off."""
    status = None
    body = b""
    try:
        with httpx.Client(timeout=60) as client, client.stream("GET", url) as response:
            status = response.status_code
            for chunk in response.iter_raw():
                body += chunk
        return "complete", status, body
    except httpx.TransportError:
        return "broken", status, body


def assert_client_got_an_error(outcome: tuple[str, int | None, bytes], digest: str) -> None:
    kind, status, body = outcome
    if kind == "broken":
        return
    assert status is not None and status >= 400, (
        f"status {status} with a complete body of {len(body)} bytes "
        f"(sha256 {'matches' if sha256_digest(body) == digest else 'does not match'} the digest)")
    assert isinstance(httpx.Response(status, content=body).json()["errors"][0]["code"], str)


@pytest.mark.parametrize("ref", ["library/victim:1", "library/small:1"], ids=["2MiB", "48KiB"])
def test_upstream_sending_wrong_bytes_gives_client_an_error_and_caches_nothing(ref, own_upstream, pullthrough):
    layer = own_upstream.images[ref].layers[0]
    name = ref.split(":")[0]
    corrupt(own_upstream.blob_data_path(layer.digest), layer.size // 2)
    pt = pullthrough(only_registry(own_upstream.url))
    url = f"{pt.url}/v2/{name}/blobs/{layer.digest}"
    mark = own_upstream.mark()

    assert_client_got_an_error(get_outcome(url), layer.digest)
    wait_until(lambda: pt.tmp_files() == [], timeout=10, message="the failed fill's temp file to go")
    assert not pt.blob_path(layer.digest).exists()
    assert pt.committed_blobs() == []

    # Nothing was remembered as good: the next request goes upstream again, and fails again.
    assert_client_got_an_error(get_outcome(url), layer.digest)
    gets = own_upstream.wait_requests(mark, blob_get(layer.digest), count=2, settle=0.5)
    assert len(gets) == 2, gets
    assert pt.committed_blobs() == []


# -- upstream down ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tag_ttl", ["0s", "1h"])
def test_upstream_down_cached_tags_and_digests_still_pull(tag_ttl, own_upstream, pullthrough, tmp_path):
    pt = pullthrough(only_registry(own_upstream.url, tag_ttl=tag_ttl))
    refs = {
        "library/small:1": [],
        "multi/fleet:1": ["--all"],
    }
    for ref, extra in refs.items():
        skopeo("copy", "--quiet", "--src-tls-verify=false", *extra, f"docker://{pt.host}/{ref}",
               f"dir:{tmp_path / ('cold-' + safe(ref))}")

    own_upstream.stop()

    for ref, extra in refs.items():
        image = own_upstream.images[ref]
        name = ref.split(":")[0]
        for source in (f"docker://{pt.host}/{ref}", f"docker://{pt.host}/{name}@{image.manifest_digest}"):
            dest = tmp_path / f"offline-{safe(ref)}{'-digest' if '@' in source else ''}"
            skopeo("copy", "--quiet", "--src-tls-verify=false", *extra, source, f"dir:{dest}", timeout=120)
            assert sha256_digest((dest / "manifest.json").read_bytes()) == image.manifest_digest
            for blob in image.all_blobs():
                assert sha256_digest((dest / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest


class FailingUpstream:
    """An HTTP server on a given port that answers every request with `status` and an OCI error."""

    def __init__(self, port: int, status: int) -> None:
        body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE",
                                       "message": "failing on purpose"}]}).encode()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_upstream_answering_errors_cached_tags_still_pull(status, own_upstream, pullthrough, tmp_path):
    pt = pullthrough(only_registry(own_upstream.url, tag_ttl="0s"))
    image = own_upstream.images["library/small:1"]
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{pt.host}/library/small:1",
           f"dir:{tmp_path / 'cold'}")

    own_upstream.stop()
    failing = FailingUpstream(own_upstream.port, status)
    try:
        skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{pt.host}/library/small:1",
               f"dir:{tmp_path / 'stale'}", timeout=120)
        assert failing.requests >= 1, "the tag was not revalidated although tag_ttl is 0s"
    finally:
        failing.close()
    assert sha256_digest((tmp_path / "stale" / "manifest.json").read_bytes()) == image.manifest_digest


def test_upstream_down_uncached_image_fails_fast_with_error_json(own_upstream, pullthrough):
    pt = pullthrough(only_registry(own_upstream.url))
    own_upstream.stop()
    started = time.monotonic()
    response = httpx.get(f"{pt.url}/v2/library/victim/manifests/1", timeout=60)
    assert time.monotonic() - started < 30
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    layer = own_upstream.images["library/victim:1"].layers[0].digest
    blob = httpx.get(f"{pt.url}/v2/library/victim/blobs/{layer}", timeout=60)
    assert (blob.status_code, blob.json()["errors"][0]["code"]) == (503, "UNAVAILABLE")
