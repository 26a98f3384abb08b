"""Hostile and heavy traffic: each finding of the hostile-traffic review, tried as an attacker would.

Paths that climb out of their prefix through encoded separators and dot segments, redirects out of
the allow-list, header and range parsing that an attacker sizes, clients that never read or never
finish a request, bodies too large to hold, answers that multiply rows, and private names in
/stats. Every test here failed on the code before the fix.
"""

from __future__ import annotations

import hashlib
import socket
import time

import httpx
import pytest

from tests.conftest import default_registries
from tests.servers.fake_hub import FakeHub
from tests.servers.moto import MotoS3
from tests.servers.recorder import Recorder
from tests.test_hf_mirror import ALICE, GATED, MODEL, PRIVATE, populate

pytestmark = pytest.mark.real


@pytest.fixture
def hub(tmp_path):  # type: ignore[no-untyped-def]
    server = FakeHub.start(tmp_path / "hub")
    populate(server)
    yield server
    server.stop()


def wait_until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def raw_request(port: int, request: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if not read:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# -- 1. paths that climb -------------------------------------------------------------------------------


def test_encoded_separators_and_dot_segments_never_reach_another_repo_or_prefix(hub, origin, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    nginx, root = origin
    (root / "secret.txt").write_bytes(b"outside every allowed prefix")
    s3 = MotoS3.start()
    try:
        s3.client().create_bucket(Bucket="models")
        s3.client().create_bucket(Bucket="other")
        s3.client().put_object(Bucket="other", Key="x", Body=b"another bucket's object")
        pt = pullthrough(
            hf={"url": hub.url},
            web={"allow": [f"{nginx.url}/models/"], "ipfs_gateways": [nginx.url]},
            s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing", "buckets": [{"name": "models"}]},
        )
        private_config = hub.repo(PRIVATE).files()["config.json"]
        climb = "%2F".join([".."] * 7)
        targets = {
            f"/api/models/{MODEL}/tree/main/x%2F{climb}%2Facme%2Fprivate-model%2Fresolve%2Fmain%2Fconfig.json": "hf tree",
            f"/api/models/{MODEL}/tree/main/x%2F{climb}%2Fapi%2Fmodels%2Facme%2Fprivate-model": "hf tree, api",
            f"/{MODEL}/resolve/..%2F..%2Facme%2Fprivate-model%2Fresolve%2Fmain/config.json": "hf revision",
            f"/{MODEL}/resolve/main/x%2F..%2F..%2F..%2Facme%2Fprivate-model%2Fresolve%2Fmain%2Fconfig.json": "hf file path",
            f"/api/models/{MODEL}/revision/%2E%2E": "hf revision dots",
            "/s3/models/%2e%2e/other/x": "s3 bucket escape",
            "/s3/models/a/%2E%2E/%2E%2E/other/x": "s3 deeper",
            f"/web/{nginx.url}/models/%2e%2e/secret.txt": "web dot segment",
            f"/web/{nginx.url}/models/..%2Fsecret.txt": "web encoded slash",
            f"/web/{nginx.url}/models/x%00y": "web NUL",
            "/v2/library%2F..%2Fx/manifests/1": "oci encoded slash",
        }
        before_hub, before_s3 = len(hub.hits()), len(s3.requests())
        for target, what in targets.items():
            response = httpx.get(f"{pt.url}{target}", timeout=30)
            assert response.status_code == 400, (what, response.status_code, response.text[:200])
            assert private_config not in response.content and b"another bucket" not in response.content
        assert [h.target for h in hub.hits()[before_hub:] if "private" in h.target] == []
        assert [r for r in s3.requests()[before_s3:] if "/other" in r[1]] == []
        assert [r for r in nginx.requests() if "secret" in r[1]] == []
    finally:
        s3.stop()


def test_an_ipfs_path_encoded_twice_stays_under_the_gateways_ipfs_prefix(origin, pullthrough) -> None:  # type: ignore[no-untyped-def]
    from multiformats import CID, multihash

    nginx, root = origin
    (root / "secret.txt").write_bytes(b"outside the gateway's /ipfs/")
    cid = CID("base32", 1, "raw", multihash.wrap(hashlib.sha256(b"x").digest(), "sha2-256"))
    pt = pullthrough(web={"ipfs_gateways": [nginx.url]})
    response = httpx.get(f"{pt.url}/ipfs/{cid}/%252e%252e/%252e%252e/secret.txt", timeout=30)
    assert response.status_code == 404 and b"outside" not in response.content
    asked = [uri for _, uri, _ in nginx.requests() if uri != "/"]
    assert asked and all(uri.startswith(f"/ipfs/{cid}/%252e%252e/") for uri in asked), asked


# -- 2. redirects out of the allow-list ----------------------------------------------------------------


def test_a_redirect_out_of_the_web_allow_list_is_refused_and_the_other_host_never_asked(pullthrough) -> None:  # type: ignore[no-untyped-def]
    elsewhere = Recorder({"/x": (200, {"ETag": '"e"'}, b"not under any allowed prefix")})
    allowed = Recorder({"/models/r": (302, {"Location": f"{elsewhere.url}/x"}, b""),
                        "/models/ok": (302, {"Location": "/models/real"}, b""),
                        "/models/real": (200, {"ETag": '"r"'}, b"redirected inside the prefix")})
    try:
        pt = pullthrough(web={"allow": [f"{allowed.url}/models/"]})
        refused = httpx.get(f"{pt.url}/web/{allowed.url}/models/r", timeout=30)
        assert refused.status_code == 502 and refused.json()["error"] == "RedirectRefused"
        assert elsewhere.paths == []
        inside = httpx.get(f"{pt.url}/web/{allowed.url}/models/ok", timeout=30)
        assert inside.status_code == 200 and inside.content == b"redirected inside the prefix"
        assert [p.name for p in pt.committed_blobs()] in ([], [hashlib.sha256(inside.content).hexdigest()])
    finally:
        allowed.close()
        elsewhere.close()


# -- 3. parsing an attacker sizes ----------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_range_parsing_is_linear_in_the_header_whatever_its_length() -> None:
    from proxy.http.ranges import parse_range

    for spaces in (16_000, 1_000_000):  # quadratic parsing took seconds for 16k, hours for a million
        assert parse_range("bytes=1-" + " " * spaces, 100) is None
    assert parse_range(" bytes = 1 - 9 ", 100).length == 9  # type: ignore[union-attr]


def test_oversized_heads_get_431_and_the_server_stays_up(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(max_headers=50, max_head_size="16KiB")
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(20_000)) + b"\r\n"
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n"
    for head in (many, huge):
        answer = b""
        try:
            answer = raw_request(pt.port, head)
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed on the client while it was still sending: refused all the same
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(40)) + b"\r\n"
    assert raw_request(pt.port, fits).startswith(b"HTTP/1.1 200 ")  # within the limits: served
    assert httpx.get(f"{pt.url}/healthz", timeout=10).status_code == 200


# -- 4 and 5. clients that never read, never finish, or are too many -----------------------------------


def test_clients_that_never_read_a_big_blob_leave_the_small_ones_served(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    big = upstream.images["library/big:1"].layers[0]
    small = upstream.images["library/single:1"].layers[0]
    for layer, name in ((big, "big"), (small, "single")):
        assert httpx.get(f"{pt.url}/v2/library/{name}/blobs/{layer.digest}", timeout=60).status_code == 200
        wait_until(pt.blob_path(layer.digest).exists, "the commit")
    stuck = []
    for _ in range(80):  # more than the 64 threads that used to send files
        sock = socket.create_connection(("127.0.0.1", pt.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /v2/library/big/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stuck.append(sock)
    try:
        wait_until(lambda: httpx.get(f"{pt.url}/stats", timeout=10).json()["hits"] >= 80, "the stuck requests to be answered")
        response = httpx.get(f"{pt.url}/v2/library/single/blobs/{small.digest}", timeout=10)
        assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == small.digest[7:]
    finally:
        for sock in stuck:
            sock.close()


def test_half_sent_requests_are_closed_after_the_header_timeout_and_a_crowd_gets_503(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(header_timeout="2s", max_connections=40)
    slow = []
    for _ in range(30):
        sock = socket.create_connection(("127.0.0.1", pt.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        sock.settimeout(30)
        slow.append(sock)
    assert httpx.get(f"{pt.url}/healthz", timeout=10).status_code == 200  # served meanwhile
    for sock in slow:
        answer = sock.recv(1024)  # the server closes each one (408) instead of waiting forever
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
        sock.close()
    crowd = [socket.create_connection(("127.0.0.1", pt.port)) for _ in range(45)]
    try:
        answer = raw_request(pt.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")  # over the ceiling: refused at once, not hung
    finally:
        for sock in crowd:
            sock.close()
    wait_until(lambda: httpx.get(f"{pt.url}/healthz", timeout=10).status_code == 200, "service after the crowd left")


def test_cold_fills_against_a_silent_registry_hold_no_thread_lookups_need(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    silent.listen(200)
    port = silent.getsockname()[1]
    registries = [*default_registries(upstream), {"name": "silent.test", "url": f"http://127.0.0.1:{port}"}]
    pt = pullthrough(registries)
    small = upstream.images["library/single:1"].layers[0]
    assert httpx.get(f"{pt.url}/v2/library/single/blobs/{small.digest}", timeout=60).status_code == 200
    wait_until(pt.blob_path(small.digest).exists, "the commit")
    hanging = []
    for n in range(50):
        sock = socket.create_connection(("127.0.0.1", pt.port))
        sock.sendall(f"GET /v2/silent.test/app/blobs/sha256:{n:064x} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        hanging.append(sock)
    try:
        time.sleep(0.5)  # let them reach the silent registry
        for _ in range(5):
            response = httpx.get(f"{pt.url}/v2/library/single/blobs/{small.digest}", timeout=10)
            assert response.status_code == 200
    finally:
        for sock in hanging:
            sock.close()
        silent.close()


# -- 6. memory ------------------------------------------------------------------------------------------


def test_a_huge_paths_info_body_is_refused_before_it_is_read(hub, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(hf={"url": hub.url})
    head = (f"POST /api/models/{MODEL}/paths-info/main HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", pt.port), timeout=30) as sock:
        sock.sendall(head + b'{"paths": ["a"')  # a few bytes of the 64 MiB announced
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_an_s3_listing_is_fetched_once_within_its_ttl(pullthrough) -> None:  # type: ignore[no-untyped-def]
    s3 = MotoS3.start()
    try:
        s3.client().create_bucket(Bucket="models")
        s3.client().put_object(Bucket="models", Key="m/a.bin", Body=b"a")
        pt = pullthrough(s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing",
                             "object_ttl": "1h", "buckets": [{"name": "models"}]})
        for _ in range(3):
            assert httpx.get(f"{pt.url}/s3/models/m/", timeout=30).json()["objects"][0]["key"] == "m/a.bin"
        assert len([r for r in s3.requests() if r[0] == "GET" and "list-type=2" in r[1]]) == 1
        made_up = httpx.get(f"{pt.url}/s3/models/no-such-prefix/", timeout=30)
        assert made_up.status_code == 404 and made_up.json()["error"] == "NoSuchPrefix"
    finally:
        s3.stop()


# -- 7. a HEAD's error replayed to a GET ------------------------------------------------------------------


def test_an_error_learned_from_a_head_reaches_a_get_whole(hub, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough(hf={"url": hub.url})
    for _ in range(2):  # cold (the HEAD upstream answers), then remembered
        response = httpx.get(f"{pt.url}/{MODEL}/resolve/main/does-not-exist.bin", timeout=30)
        assert response.status_code == 404 and response.headers["x-error-code"] == "EntryNotFound"
        assert int(response.headers["content-length"]) == len(response.content) > 0
    head = httpx.head(f"{pt.url}/{MODEL}/resolve/main/does-not-exist.bin", timeout=30)
    assert head.status_code == 404 and head.headers["x-error-code"] == "EntryNotFound"


# -- 9. rows and names that clients make up ------------------------------------------------------------------


def test_made_up_names_add_no_lasting_rows_and_stats_name_no_gated_or_private_repo(hub, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from proxy.store.blobs import BlobStore
    from proxy.store.index import Index, make_engine
    from proxy.store.janitor import Janitor, Policy

    pt = pullthrough(hf={"url": hub.url}, admin_token="s3cret-admin")
    alice = {"Authorization": f"Bearer {ALICE}"}
    for repo, path in ((GATED, "model.safetensors"), (PRIVATE, "config.json"), (MODEL, "config.json")):
        assert httpx.get(f"{pt.url}/{repo}/resolve/main/{path}", headers=alice, timeout=30).status_code == 200
    for n in range(30):
        httpx.get(f"{pt.url}/{MODEL}/resolve/main/probe-{n}.json", timeout=30)
        httpx.get(f"{pt.url}/acme/made-up-{n}/resolve/main/config.json", timeout=30)
    public = httpx.get(f"{pt.url}/stats", timeout=10).json()["top_repositories"]
    assert {r["repository"] for r in public} == {f"models/{MODEL}"}
    admin = httpx.get(f"{pt.url}/stats", headers={"Authorization": "Bearer s3cret-admin"}, timeout=10).json()["top_repositories"]
    assert {f"models/{GATED}", f"models/{PRIVATE}"} <= {r["repository"] for r in admin}
    pt.stop()
    index = Index(make_engine(pt.database_url))
    try:
        rows = dict(index.engine.connect().execute(text("SELECT source, count(*) FROM refs GROUP BY source")).all())
        assert rows.get("hf-missing") == 30 and rows.get("hf-repo", 0) <= 3  # made-up repos left no row
        policy = Policy(default_ttl=86400 * 365, forget=("hf-missing",))
        Janitor(BlobStore(pt.cache_dir), index, policy).purge(now=time.time() + 8 * 86400)  # a week later
        rows = dict(index.engine.connect().execute(text("SELECT source, count(*) FROM refs GROUP BY source")).all())
        assert "hf-missing" not in rows and rows.get("hf-file", 0) >= 3  # what exists stays
    finally:
        index.dispose()


def test_the_per_repository_table_is_bounded_whatever_names_clients_send() -> None:
    from proxy.stats import MAX_REPOSITORIES, Traffic
    from proxy.store.events import Outcome
    from proxy.store.records import Origin, ReadScope

    traffic = Traffic(index=None, node="n")  # type: ignore[arg-type]
    for n in range(3 * MAX_REPOSITORIES):
        traffic.request(Origin("oci", "docker.io"), ReadScope.oci("docker.io", f"junk/{n}"), Outcome.MISS, joined=False)
    assert len(traffic._repos) <= MAX_REPOSITORIES


# -- 10. smaller ---------------------------------------------------------------------------------------------


def test_a_signed_urls_query_reaches_the_origin_but_no_log_and_no_key(pullthrough) -> None:  # type: ignore[no-untyped-def]
    origin = Recorder({"/models/w.bin": (200, {"ETag": '"w"'}, b"weights")})
    try:
        pt = pullthrough(web={"allow": [f"{origin.url}/models/"]}, access_log=True, log_level="debug")
        secret = "X-Amz-Signature=0123456789abcdefSECRET"
        response = httpx.get(f"{pt.url}/web/{origin.url}/models/w.bin?{secret}", timeout=30)
        assert response.status_code == 200 and response.content == b"weights"
        assert any(secret in p for p in origin.paths)  # the origin got the signature
        pt.stop()
        assert "SECRET" not in pt.log_text()
        for path in pt.cache_dir.rglob("*"):
            if path.is_file():
                assert b"SECRET" not in path.read_bytes(), path
    finally:
        origin.close()


def test_credentials_never_go_to_a_plain_http_realm_of_an_https_registry() -> None:
    import httpx as _httpx

    from proxy.config import RegistryConfig
    from proxy.http.download import BlobTransport
    from proxy.sources.oci.upstream import RegistryClient

    def client(url: str) -> RegistryClient:
        return RegistryClient(RegistryConfig(name="r.test", url=url, auth_realm_hosts=("auth.r.test",)), _httpx.AsyncClient(), BlobTransport("t"))

    secure = client("https://r.test")
    assert secure._may_receive_credentials("https://r.test/token")
    assert secure._may_receive_credentials("https://auth.r.test/token")
    assert not secure._may_receive_credentials("http://r.test/token")  # a downgrade
    assert not secure._may_receive_credentials("http://auth.r.test/token")
    assert not secure._may_receive_credentials("https://elsewhere.test/token")
    plain = client("http://r.test:5000")
    assert plain._may_receive_credentials("http://r.test:5001/token")  # the registry is plain http anyway
    assert not plain._may_receive_credentials("http://elsewhere.test/token")
