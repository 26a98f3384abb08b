"""The hot path for manifests by digest (proxy/sources/oci/hot.py): a repeated request is answered
before routing with the bytes the store holds in memory, counted as a hit, and only the very same
request (path, query string, Accept) is; conditional and Range requests, another repository's
path, and a manifest the store no longer holds in memory or may not serve take the full path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.responses import Response

from proxy.sources.oci.hot import HotManifests, HotPath
from proxy.store.events import Outcome
from proxy.store.records import ReadScope
from proxy.store.store import Store
from tests.door import ORIGIN, digest_of, new_store

MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()
MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
SCOPE = ReadScope.oci("docker.io", "library/app")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def http_scope(path: str, *, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, query: bytes = b"") -> dict:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
            "headers": headers if headers is not None else [(b"accept", MEDIA_TYPE.encode())]}


async def call(app, scope: dict) -> tuple[int, dict[bytes, bytes], bytes]:  # type: ignore[no-untyped-def]
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@dataclass
class Served:
    """A store holding MANIFEST under SCOPE, the hot path in front of a stand-in for the OCI source's
    full path, and the paths that reached the full path."""

    store: Store
    hot: HotManifests
    app: HotPath
    routed: list[str]


@pytest.fixture
async def served(tmp_path: Path, index_url: str):  # type: ignore[no-untyped-def]
    store = new_store(tmp_path, index_url)
    await store.start()
    digest = digest_of(MANIFEST)
    await store.small_objects.put(SCOPE, ORIGIN, MANIFEST, digest, MEDIA_TYPE)
    hot = HotManifests(store.small_objects)
    routed: list[str] = []

    async def full_path(scope, receive, send):  # type: ignore[no-untyped-def]
        """What the OCI source does: answer, and remember the answer for this request."""
        routed.append(scope["path"])
        response = Response(MANIFEST, media_type=MEDIA_TYPE, headers={"Docker-Content-Digest": str(digest)})
        hot.remember(scope, SCOPE, ORIGIN, digest, response.raw_headers)
        await response(scope, receive, send)

    yield Served(store, hot, HotPath(full_path, hot), routed)
    await store.aclose()


async def test_only_the_same_request_is_answered_before_routing_and_it_is_counted_as_a_hit(served: Served) -> None:
    store, app, routed = served.store, served.app, served.routed
    digest = digest_of(MANIFEST)
    path = f"/v2/library/app/manifests/{digest}"
    first = await call(app, http_scope(path))
    events = store._events
    hits_before = [r for r in events.requests if r[1] is Outcome.HIT]  # type: ignore[attr-defined]
    again = await call(app, http_scope(path))
    head = await call(app, http_scope(path, method="HEAD"))
    assert routed == [path]  # the repeats never reached the application
    assert again == first and again[2] == MANIFEST
    assert head[0] == 200 and head[1][b"content-length"] == str(len(MANIFEST)).encode() and head[2] == b""
    hits = [r for r in events.requests if r[1] is Outcome.HIT]  # type: ignore[attr-defined]
    assert len(hits) - len(hits_before) == 2 and hits[-1][0] == str(SCOPE)

    # Anything but the very same request takes the full path.
    await call(app, http_scope(path, headers=[(b"accept", b"application/vnd.docker.distribution.manifest.v2+json")]))
    await call(app, http_scope(path, headers=[(b"accept", MEDIA_TYPE.encode()), (b"if-none-match", f'"{digest}"'.encode())]))
    await call(app, http_scope(path, headers=[(b"accept", MEDIA_TYPE.encode()), (b"range", b"bytes=0-1")]))
    await call(app, http_scope(path, query=b"ns=ghcr.io"))
    other = f"/v2/someone/else/manifests/{digest}"
    await call(app, http_scope(other))
    assert routed == [path] * 5 + [other]


async def test_a_manifest_the_store_no_longer_holds_in_memory_or_may_not_serve_takes_the_full_path(served: Served) -> None:
    store, hot, app, routed = served.store, served.hot, served.app, served.routed
    digest = digest_of(MANIFEST)
    path = f"/v2/library/app/manifests/{digest}"
    await call(app, http_scope(path))
    store.small_objects._memory.forget(digest)  # evicted from memory: the full path reads it again
    await call(app, http_scope(path))
    assert len(routed) == 2
    # Back in memory, but remembered under a scope the store does not know as admitted: never
    # answered early.
    assert await store.small_objects.get(SCOPE, digest) is not None
    await call(app, http_scope(path))
    assert len(routed) == 2  # answered early again
    hot.remember(http_scope(path), ReadScope.oci("docker.io", "private/repo"), ORIGIN, digest, [])
    await call(app, http_scope(path))
    assert len(routed) == 3
