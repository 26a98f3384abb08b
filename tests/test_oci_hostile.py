"""Hostile requests: traversal, bad digests, overlong names, pushes, unknown `ns`, impossible ranges.

Whatever arrives, pullthrough answers with a 4xx and OCI error JSON (never a 5xx or a traceback),
never writes outside its cache dir, and never reaches an upstream it was not configured with.
Request targets are sent verbatim (httpx's `target` extension), so `..` is not normalised away.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import default_registries, drop_postgres_database, fresh_postgres_database
from tests.images import sha256_digest
from tests.servers.pullthrough import Pullthrough

pytestmark = pytest.mark.real

ABSENT = "sha256:" + hashlib.sha256(b"pullthrough: a blob nobody has").hexdigest()
HEX64 = ABSENT.split(":", 1)[1]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    target: str
    statuses: tuple[int, ...]
    codes: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()


def case(id: str, method: str, target: str, status: int | tuple[int, ...], code: str | tuple[str, ...],
         **headers: str) -> Case:
    statuses = status if isinstance(status, tuple) else (status,)
    codes = code if isinstance(code, tuple) else (code,)
    return Case(id, method, target, statuses, codes, tuple(headers.items()))


NAME_INVALID = (400, "NAME_INVALID")
DIGEST_INVALID = (400, "DIGEST_INVALID")
UNSUPPORTED = (405, "UNSUPPORTED")

TRAVERSAL = [
    case("dotdot-blob", "GET", f"/v2/../../etc/passwd/blobs/{ABSENT}", *NAME_INVALID),
    case("dotdot-manifest", "GET", "/v2/library/../../../etc/passwd/manifests/latest", *NAME_INVALID),
    case("encoded-dotdot", "GET", f"/v2/%2e%2e/%2e%2e/etc/passwd/blobs/{ABSENT}", *NAME_INVALID),
    case("encoded-slash-dotdot", "GET", f"/v2/library%2f..%2f..%2fetc/blobs/{ABSENT}", *NAME_INVALID),
    case("mixed-dotdot", "GET", "/v2/library/..%2fsingle/manifests/1", *NAME_INVALID),
    case("prefix-then-dotdot", "GET", "/v2/upstream.test/../library/single/manifests/1", *NAME_INVALID),
    case("double-dot-in-component", "GET", "/v2/foo..bar/manifests/1", *NAME_INVALID),
    case("empty-component", "GET", "/v2//etc/passwd/manifests/1", *NAME_INVALID),
    case("backslashes", "GET", "/v2/..%5c..%5cetc/manifests/1", *NAME_INVALID),
    case("nul-byte", "GET", "/v2/library/sin%00gle/manifests/1", *NAME_INVALID),
    case("uppercase", "GET", "/v2/Library/Single/manifests/1", *NAME_INVALID),
    # ASGI hands the app the decoded path, where %2f is a "/": these may fail as names instead.
    case("digest-dotdot", "GET", "/v2/library/single/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 400,
         ("DIGEST_INVALID", "NAME_INVALID")),
    case("digest-dotdot-plain", "GET", "/v2/library/single/blobs/sha256:..", *DIGEST_INVALID),
    case("tag-dotdot", "GET", "/v2/library/single/manifests/..%2f..%2fetc%2fpasswd",
         (400, 404), ("TAG_INVALID", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "DIGEST_INVALID", "NAME_INVALID")),
    # A dot segment is refused by the path decoder before the grammar sees a tag: NAME_INVALID.
    case("tag-dotdot-plain", "GET", "/v2/library/single/manifests/..",
         (400,), ("NAME_INVALID", "TAG_INVALID")),
]

DIGESTS = [
    case("not-hex", "GET", "/v2/library/single/blobs/sha256:xyz", *DIGEST_INVALID),
    case("short-hex", "GET", f"/v2/library/single/blobs/sha256:{HEX64[:63]}", *DIGEST_INVALID),
    case("long-hex", "GET", f"/v2/library/single/blobs/sha256:{HEX64}0", *DIGEST_INVALID),
    case("upper-hex", "GET", f"/v2/library/single/blobs/sha256:{HEX64.upper()}", *DIGEST_INVALID),
    case("no-algorithm", "GET", f"/v2/library/single/blobs/{HEX64}", *DIGEST_INVALID),
    case("empty-digest", "GET", "/v2/library/single/blobs/sha256:", *DIGEST_INVALID),
    case("sha512", "GET", f"/v2/library/single/blobs/sha512:{'ab' * 64}", *DIGEST_INVALID),
    case("md5", "GET", f"/v2/library/single/blobs/md5:{'ab' * 16}", *DIGEST_INVALID),
    case("upper-algorithm", "GET", f"/v2/library/single/blobs/SHA256:{HEX64}", *DIGEST_INVALID),
    case("head-md5", "HEAD", f"/v2/library/single/blobs/md5:{'ab' * 16}", *DIGEST_INVALID),
    case("manifest-md5", "GET", f"/v2/library/single/manifests/md5:{'ab' * 16}", *DIGEST_INVALID),
    case("manifest-bad-sha256", "GET", "/v2/library/single/manifests/sha256:xyz", *DIGEST_INVALID),
]

LONG_NAMES = [
    case("name-256", "GET", f"/v2/{'a' * 256}/manifests/1", *NAME_INVALID),
    case("name-300-library", "GET", f"/v2/library/{'a' * 292}/manifests/1", *NAME_INVALID),
    case("many-components", "GET", f"/v2/{'a/' * 200}b/blobs/{ABSENT}", *NAME_INVALID),
    case("name-4k", "GET", f"/v2/{'abc/' * 1024}x/manifests/1", *NAME_INVALID),
    case("tag-129", "GET", f"/v2/library/single/manifests/{'t' * 129}",
         (400, 404), ("TAG_INVALID", "MANIFEST_INVALID", "MANIFEST_UNKNOWN")),
    # 255 characters is still a valid name: the upstream just does not have it.
    case("name-255-valid", "GET", f"/v2/library/{'a' * 247}/manifests/1", 404, ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")),
]

PUSHES = [
    case("post-upload", "POST", "/v2/library/single/blobs/uploads/", *UNSUPPORTED),
    case("post-mount", "POST", f"/v2/library/single/blobs/uploads/?mount={ABSENT}&from=library/many", *UNSUPPORTED),
    case("post-upload-ns", "POST", "/v2/library/single/blobs/uploads/?ns=docker.io", *UNSUPPORTED),
    case("post-upload-prefix", "POST", "/v2/upstream.test/library/single/blobs/uploads/", *UNSUPPORTED),
    case("put-upload", "PUT", f"/v2/library/single/blobs/uploads/0123-4567?digest={ABSENT}", *UNSUPPORTED),
    case("patch-upload", "PATCH", "/v2/library/single/blobs/uploads/0123-4567", *UNSUPPORTED),
    case("delete-upload", "DELETE", "/v2/library/single/blobs/uploads/0123-4567", *UNSUPPORTED),
    case("put-manifest", "PUT", "/v2/library/single/manifests/2", *UNSUPPORTED),
    case("put-manifest-prefix", "PUT", "/v2/upstream.test/library/single/manifests/2", *UNSUPPORTED),
    case("delete-manifest", "DELETE", "/v2/library/single/manifests/1", *UNSUPPORTED),
    case("delete-blob", "DELETE", f"/v2/library/single/blobs/{ABSENT}", *UNSUPPORTED),
    case("post-manifest", "POST", "/v2/library/single/manifests/1", *UNSUPPORTED),
]

NAMESPACES = [
    case("unknown-ns", "GET", "/v2/library/single/manifests/1?ns=unknown.example.com", 404, "NAME_UNKNOWN"),
    case("unknown-ns-blob", "GET", f"/v2/library/single/blobs/{ABSENT}?ns=quay.example.org", 404, "NAME_UNKNOWN"),
    case("dotdot-ns", "GET", "/v2/library/single/manifests/1?ns=..%2f..%2fetc", (400, 404),
         ("NAME_INVALID", "NAME_UNKNOWN")),
    case("empty-ns", "GET", "/v2/library/single/manifests/1?ns=", (400, 404), ("NAME_INVALID", "NAME_UNKNOWN")),
]

ALL_CASES = TRAVERSAL + DIGESTS + LONG_NAMES + PUSHES + NAMESPACES


# -- the server under attack ------------------------------------------------------------------------

class Canary:
    """A listening socket that counts connections: an upstream nobody configured must stay untouched."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def canary():
    listener = Canary()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """The cache dir's parent, with bait where a `..` out of the cache dir would land."""
    root = tmp_path_factory.mktemp("sandbox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:bait\n")
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "secret").write_text("do not serve or overwrite\n")
    return root


@pytest.fixture(scope="module")
def server(upstream, sandbox, tmp_path_factory):
    # Started here (module-wide), so the PostgreSQL pass's database is made here too.
    database = fresh_postgres_database() if os.environ.get("PULLTHROUGH_TEST_DATABASE") == "postgresql" else None
    pt = Pullthrough.start(sandbox / "cache", default_registries(upstream),
                           workdir=tmp_path_factory.mktemp("hostile-run"), database_url=database)
    yield pt
    pt.stop()
    if database is not None:
        drop_postgres_database(database)


def send(server: Pullthrough, method: str, target: str, headers: tuple[tuple[str, str], ...] = ()) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        request = client.build_request(method, server.url + "/", headers=dict(headers),
                                       extensions={"target": target.encode()})
        return client.send(request)


def assert_oci_error(response: httpx.Response, statuses: tuple[int, ...], codes: tuple[str, ...],
                     method: str) -> None:
    described = f"{response.status_code} {response.text[:300]!r}"
    assert response.status_code < 500, described
    assert response.status_code in statuses, described
    if method == "HEAD":
        return
    assert response.headers.get("content-type", "").startswith("application/json"), described
    errors = response.json()["errors"]
    assert isinstance(errors[0]["code"], str) and isinstance(errors[0]["message"], str), described
    assert errors[0]["code"] in codes, described


def tree(root: Path, skip: Path) -> dict[str, tuple]:
    """Every file and directory under `root` but `skip`, with size, mtime and content hash."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        stat = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        snapshot[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, content)
    return snapshot


# -- the cases --------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_hostile_request_gets_4xx_with_oci_error_json(c: Case, server):
    assert_oci_error(send(server, c.method, c.target, c.headers), c.statuses, c.codes, c.method)


def test_known_ns_and_valid_names_still_work(server, upstream):
    """The control for the cases above: the same server does answer well-formed requests."""
    image = upstream.images["library/single:1"]
    for target in ("/v2/library/single/manifests/1?ns=docker.io", "/v2/upstream.test/library/single/manifests/1",
                   f"/v2/single/manifests/{image.manifest_digest}"):
        response = send(server, "GET", target, (("Accept", image.media_type),))
        assert response.status_code == 200, (target, response.status_code, response.text[:200])
        assert sha256_digest(response.content) == image.manifest_digest


def test_ns_naming_an_unconfigured_host_is_never_contacted(server, canary):
    for target in (f"/v2/library/single/manifests/1?ns=127.0.0.1:{canary.port}",
                   f"/v2/library/single/blobs/{ABSENT}?ns=127.0.0.1:{canary.port}",
                   f"/v2/127.0.0.1:{canary.port}/library/single/manifests/1",
                   f"/v2/localhost:{canary.port}/library/single/blobs/{ABSENT}"):
        response = send(server, "GET", target)
        assert_oci_error(response, (400, 404), ("NAME_UNKNOWN", "NAME_INVALID", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"),
                         "GET")
    assert canary.connections == 0


def test_pushes_never_reach_the_upstream(server, upstream):
    mark = upstream.mark()
    for c in PUSHES:
        send(server, c.method, c.target, c.headers)
    writes = [e for e in upstream.requests_since(mark) if e.method not in ("GET", "HEAD")]
    assert writes == []


# -- ranges past the end ----------------------------------------------------------------------------

def range_not_satisfiable(server: Pullthrough, name: str, digest: str, size: int, range_header: str) -> None:
    response = send(server, "GET", f"/v2/{name}/blobs/{digest}", (("Range", range_header),))
    assert response.status_code == 416, (range_header, response.status_code, response.text[:200])
    assert isinstance(response.json()["errors"][0]["code"], str)
    assert response.headers.get("content-range") == f"bytes */{size}"


@pytest.mark.parametrize("state", ["cold", "cached"])
def test_range_past_the_end_gets_416_with_error_json(state, server, upstream):
    # A layer no other test of this module fetches, so that "cold" is a first request.
    name = "library/many"
    layer = upstream.images["library/many:1"].layers[5 if state == "cold" else 6]
    url = f"/v2/{name}/blobs/{layer.digest}"
    if state == "cached":
        assert send(server, "GET", url).status_code == 200
    range_not_satisfiable(server, name, layer.digest, layer.size, f"bytes={layer.size}-")
    range_not_satisfiable(server, name, layer.digest, layer.size, f"bytes={layer.size + 100}-{layer.size + 200}")
    # And the blob is intact afterwards.
    full = send(server, "GET", url)
    assert full.status_code == 200 and sha256_digest(full.content) == layer.digest


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=--1"])
def test_malformed_range_is_ignored_or_refused_never_a_5xx(header, server, upstream):
    layer = upstream.images["library/single:1"].layers[0]
    response = send(server, "GET", f"/v2/library/single/blobs/{layer.digest}", (("Range", header),))
    assert response.status_code in (200, 206, 416), (response.status_code, response.text[:200])
    if response.status_code == 200:
        assert sha256_digest(response.content) == layer.digest
    if response.status_code == 416:
        assert isinstance(response.json()["errors"][0]["code"], str)


# -- the file system --------------------------------------------------------------------------------

def test_hostile_requests_touch_nothing_outside_the_cache_dir(server, sandbox, upstream):
    cache = sandbox / "cache"
    before = tree(sandbox, skip=cache)
    etc_passwd = os.stat("/etc/passwd")

    for c in ALL_CASES:
        send(server, c.method, c.target, c.headers)
    layer = upstream.images["library/single:1"].layers[0]
    send(server, "GET", f"/v2/library/single/blobs/{layer.digest}", (("Range", f"bytes={layer.size}-"),))

    assert tree(sandbox, skip=cache) == before
    assert os.stat("/etc/passwd").st_mtime_ns == etc_passwd.st_mtime_ns
    blobs = [p.relative_to(cache) for p in (cache / "blobs").rglob("*") if p.is_file()] \
        if (cache / "blobs").exists() else []
    for blob in blobs:
        parts = blob.parts
        assert len(parts) == 4 and parts[1] == "sha256" and parts[3].startswith(parts[2]), blob
        assert sha256_digest((cache / blob).read_bytes()) == "sha256:" + parts[3]
    assert not any(part in ("etc", "passwd", "..") for p in cache.rglob("*") for part in p.relative_to(cache).parts)
