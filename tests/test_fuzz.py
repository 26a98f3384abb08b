"""A fuzz test over every route family: hostile paths, headers and methods, sent raw (no client
normalizes them) to a pullthrough in front of an upstream of every kind that answers and records.

For every request: never a 5xx. Over the whole run: no file outside the cache dir touched, and no
upstream asked for anything its configuration does not admit (each upstream records what it got).
"""

from __future__ import annotations

import socket
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers.fake_hub import FakeHub
from tests.servers.moto import MotoS3
from tests.servers.pullthrough import Pullthrough
from tests.servers.recorder import Recorder
from tests.test_oci_hostile import tree
from tests.test_hf_mirror import MODEL, populate

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # type: ignore[no-untyped-def]
    sandbox = tmp_path_factory.mktemp("fuzz-sandbox")
    (sandbox / "etc").mkdir()
    (sandbox / "etc" / "passwd").write_text("root:x:0:0:bait\n")
    (sandbox / "secret").write_text("do not serve or overwrite\n")
    registry, web, gateway = Recorder(), Recorder(), Recorder()
    hub = FakeHub.start(tmp_path_factory.mktemp("fuzz-hub"))
    populate(hub)
    s3 = MotoS3.start()
    s3.client().create_bucket(Bucket="models")
    s3.client().create_bucket(Bucket="other")
    from tests.conftest import drop_postgres_database, fresh_postgres_database
    import os

    database = fresh_postgres_database() if os.environ.get("PULLTHROUGH_TEST_DATABASE") == "postgresql" else None
    pt = Pullthrough.start(
        sandbox / "cache",
        [{"name": "docker.io", "url": registry.url, "default": True}, {"name": "ghcr.io", "url": registry.url}],
        workdir=tmp_path_factory.mktemp("fuzz-run"), database_url=database,
        hf={"url": hub.url}, web={"allow": [f"{web.url}/models/"], "ipfs_gateways": [gateway.url]},
        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing", "buckets": [{"name": "models"}]},
    )
    before = tree(sandbox, skip=sandbox / "cache")
    s3_mark = len(s3.requests())
    yield {"pt": pt, "sandbox": sandbox, "before": before, "registry": registry, "web": web, "gateway": gateway,
           "hub": hub, "s3": s3, "s3_mark": s3_mark}
    pt.stop()
    s3.stop()
    hub.stop()
    for server in (registry, web, gateway):
        server.close()
    if database is not None:
        drop_postgres_database(database)


ATOMS = [
    "..", ".", "%2e%2e", "%2E%2e", "%2e", "%252e%252e", "..%2F..", "a%2Fb", "%2F", "%5C", "\\", "%00", "%0a", "%0d%0a",
    "%", "%zz", "%ff", "é", "%C3%A9", "a" * 300, "sha256:" + "0" * 64, "sha256:../x", "manifests", "blobs", "tags", "list",
    "uploads", "resolve", "main", "refs%2Fpr%2F1", "tree", "paths-info", "revision", "auth-check", "x", "library", "~",
    ";", "@", ":", "models", "other", "etc", "passwd", "secret", "", "ipfs", "web", "http:", "127.0.0.1:1", "%2e%2e%2f",
]
PREFIXES = [
    "/v2/", "/v2/library/", "/v2/ghcr.io/", "/v2/library/x/blobs/", "/v2/library/x/manifests/", "/api/models/",
    f"/api/models/{MODEL}/tree/main/", f"/api/models/{MODEL}/revision/", f"/{MODEL}/resolve/main/", f"/{MODEL}/resolve/",
    "/datasets/", "/s3/models/", "/s3/", "/ipfs/bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku/", "/ipfs/",
    "/web/", "/", "/stats", "/admin/purge", "/api/markets/",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
HEADER_VALUES = ["bytes=0-0", "bytes=-1", "bytes=9999999999999999999-", "bytes=1-" + " " * 300, "bytes=0-1,2-3", "bytes=x",
                 "Bearer x", "Bearer " + "a" * 500, "application/vnd.oci.image.index.v1+json", "*/*", "\xe9", "  "]


@st.composite
def requests(draw, web_url: str):  # type: ignore[no-untyped-def]
    prefix = draw(st.sampled_from(PREFIXES + [f"/web/{web_url}/models/", f"/web/{web_url}/"]))
    segments = draw(st.lists(st.sampled_from(ATOMS), max_size=6))
    query = draw(st.sampled_from(["", "?ns=docker.io", "?ns=evil.test", "?ns=%2e%2e", "?n=1&last=%00", "?recursive=true", "?x=" + "%2F" * 20]))
    method = draw(st.sampled_from(METHODS))
    headers = draw(st.dictionaries(st.sampled_from(["Range", "Authorization", "Accept", "If-None-Match", "Content-Length"]),
                                   st.sampled_from(HEADER_VALUES), max_size=3))
    return method, prefix + "/".join(segments) + query, headers


def send_raw(port: int, method: str, target: str, headers: dict[str, str]) -> int:
    lines = [f"{method} {target} HTTP/1.1", "Host: mirror.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name != "Content-Length"]
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        body = b'{"paths": ["config.json"]}'
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(raw)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), (method, target, answer[:200])
    return int(status_line.split()[1])


def test_hostile_requests_to_every_route_get_no_5xx_touch_nothing_and_reach_no_unadmitted_url(world) -> None:  # type: ignore[no-untyped-def]
    pt, web = world["pt"], world["web"]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(requests(web.url))
    def one(request: tuple[str, str, dict[str, str]]) -> None:
        method, target, headers = request
        status = send_raw(pt.port, method, target, headers)
        assert status < 500, (method, target, headers, status)

    one()
    sandbox = world["sandbox"]
    assert tree(sandbox, skip=sandbox / "cache") == world["before"], "a file outside the cache dir changed"
    cache_entries = {p.relative_to(sandbox / "cache").parts[0] for p in (sandbox / "cache").iterdir()}
    assert cache_entries <= {"blobs", "tmp", "index.db", "index.db-wal", "index.db-shm", "janitor.lock"}, cache_entries

    def climbs(path: str) -> bool:
        decoded = unquote(path.split("?", 1)[0])
        return any(part in (".", "..") for part in decoded.split("/")) or "\x00" in decoded or "\\" in decoded

    for name, prefix in (("registry", "/v2/"), ("web", "/models/"), ("gateway", "/ipfs/")):
        paths = world[name].paths
        assert [p for p in paths if not p.startswith(prefix) or climbs(p)] == [], name
    hub_paths = [h.target for h in world["hub"].hits()]
    assert [p for p in hub_paths if climbs(p)] == []
    s3_paths = [path for _, path, _ in world["s3"].requests()[world["s3_mark"]:]]
    assert [p for p in s3_paths if not p.startswith("/models") or climbs(p)] == []
