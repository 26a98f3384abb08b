"""What the README promises of the registry API that only an upstream misbehaving on purpose can
show: manifest ETags and 304, tags/list passed through, retries on 502/503/504, 429 passed through,
`ratelimit-remaining` in /stats, and CDN redirects that never carry the registry's credentials.

The upstream is the session's distribution behind tests/servers/front.py, which forwards every
request and, on the test's say-so, adds headers, fails requests or redirects blobs."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.images import ACCEPT_ALL
from tests.servers.front import Front

pytestmark = pytest.mark.real


@pytest.fixture
def front(upstream):  # type: ignore[no-untyped-def]
    server = Front(upstream.url)
    yield server
    server.close()


def only(front: Front, **options: object) -> list[dict]:
    return [{"name": "docker.io", "url": front.url, "default": True, "tag_ttl": "1h", **options}]


def test_a_manifest_has_its_digest_as_etag_and_if_none_match_gets_304(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    image = upstream.images["library/single:1"]
    with httpx.Client(base_url=pt.url, timeout=30, headers={"Accept": ACCEPT_ALL}) as http:
        first = http.get("/v2/library/single/manifests/1")
        assert first.status_code == 200 and first.headers["etag"] == f'"{image.manifest_digest}"'
        assert first.headers["docker-content-digest"] == image.manifest_digest
        for reference in ("1", image.manifest_digest):
            for method in ("GET", "HEAD"):
                for if_none_match in (first.headers["etag"], image.manifest_digest):
                    again = http.request(method, f"/v2/library/single/manifests/{reference}", headers={"If-None-Match": if_none_match})
                    assert (again.status_code, again.content) == (304, b""), (method, reference, if_none_match)
        other = http.get("/v2/library/single/manifests/1", headers={"If-None-Match": '"sha256:' + "0" * 64 + '"'})
        assert other.status_code == 200 and hashlib.sha256(other.content).hexdigest() == image.manifest_digest[7:]


def test_tags_list_is_passed_through_with_pagination_kept_inside_the_mirror(upstream, front, pullthrough) -> None:  # type: ignore[no-untyped-def]
    # distribution 2.8 does not paginate tags: the front adds the Link a paginating registry sends.
    front.extra_headers["Link"] = f'<{front.url}/v2/library/single/tags/list?last=1&n=1>; rel="next"'
    pt = pullthrough([{"name": "docker.io", "url": front.url, "default": True}, {"name": "upstream.test", "url": front.url}])
    direct = httpx.get(f"{upstream.url}/v2/library/single/tags/list", timeout=30)
    through = httpx.get(f"{pt.url}/v2/library/single/tags/list", timeout=30)
    assert through.status_code == 200 and through.json() == direct.json() == {"name": "library/single", "tags": ["1"]}
    assert through.headers["link"] == '</v2/library/single/tags/list?last=1&n=1>; rel="next"'
    page = httpx.get(f"{pt.url}/v2/upstream.test/library/single/tags/list", params={"n": "1", "last": "0"}, timeout=30)
    assert page.status_code == 200 and page.json() == direct.json()
    assert page.headers["link"] == '</v2/upstream.test/library/single/tags/list?last=1&n=1>; rel="next"'
    assert [r[1] for r in front.requests("GET", "/tags/list")][-1] == "/v2/library/single/tags/list?n=1&last=0"


@pytest.mark.parametrize("status", [502, 503, 504])
def test_idempotent_upstream_requests_are_retried_on_502_503_504(status, upstream, front, pullthrough) -> None:  # type: ignore[no-untyped-def]
    image = upstream.images["library/single:1"]
    layer = image.layers[0].digest
    front.fail(lambda method, path: path.endswith(f"/blobs/{layer}"), status, times=1)
    front.fail(lambda method, path: "/manifests/" in path, status, times=1)
    pt = pullthrough(only(front))
    blob = httpx.get(f"{pt.url}/v2/library/single/blobs/{layer}", timeout=60)
    assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == layer[7:]
    assert [r[2] for r in front.requests("GET", f"/blobs/{layer}")] == [status, 200]
    manifest = httpx.get(f"{pt.url}/v2/library/single/manifests/1", headers={"Accept": ACCEPT_ALL}, timeout=60)
    assert manifest.status_code == 200
    assert [r[2] for r in front.seen if "/manifests/" in r[1]][:2] == [status, 200]


def test_an_upstream_429_reaches_the_client_as_toomanyrequests(upstream, front, pullthrough) -> None:  # type: ignore[no-untyped-def]
    front.fail(lambda method, path: "/manifests/" in path, 429)
    pt = pullthrough(only(front))
    response = httpx.get(f"{pt.url}/v2/library/single/manifests/1", headers={"Accept": ACCEPT_ALL}, timeout=60)
    assert response.status_code == 429 and response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(front.requests("HEAD", "/manifests/1")) == 1  # not retried: 429 is the upstream's answer


def test_the_last_ratelimit_remaining_of_each_registry_is_in_stats(upstream, front, pullthrough) -> None:  # type: ignore[no-untyped-def]
    front.extra_headers["RateLimit-Remaining"] = "42;w=21600"
    pt = pullthrough(only(front))
    assert httpx.get(f"{pt.url}/v2/library/single/manifests/1", headers={"Accept": ACCEPT_ALL}, timeout=60).status_code == 200
    stats = httpx.get(f"{pt.url}/stats", timeout=10).json()
    assert stats["ratelimit_remaining"] == {"docker.io": "42;w=21600"}
    front.extra_headers["RateLimit-Remaining"] = "41;w=21600"
    layer = upstream.images["library/single:1"].layers[0].digest
    assert httpx.get(f"{pt.url}/v2/library/single/blobs/{layer}", timeout=60).status_code == 200
    assert httpx.get(f"{pt.url}/stats", timeout=10).json()["ratelimit_remaining"] == {"docker.io": "41;w=21600"}


def test_blob_redirects_to_a_cdn_are_followed_without_the_registrys_credentials(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    cdn = Front(upstream.url)
    registry = Front(upstream.url, basic_auth=("mirror", "s3cret"), redirect_blobs_to=cdn.url)
    try:
        pt = pullthrough(only(registry, username="mirror", password="s3cret"))
        image = upstream.images["library/single:1"]
        for blob in image.all_blobs():
            response = httpx.get(f"{pt.url}/v2/library/single/blobs/{blob.digest}", timeout=60)
            assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == blob.digest[7:]
        redirected = [r for r in registry.seen if r[2] == 307]
        assert len(redirected) == len(image.all_blobs()) and all(r[3] and r[3].startswith("Basic ") for r in redirected)
        assert cdn.seen and [r for r in cdn.seen if r[3] is not None] == []  # the CDN never got them
    finally:
        registry.close()
        cdn.close()
