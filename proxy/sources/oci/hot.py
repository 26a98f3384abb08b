"""The hot path for manifests by digest: a repeated GET or HEAD answered before any routing.

A pull asks for the same manifests by digest over and over (every node, every layer's config). Once
the full path has answered one (decoded and checked the path, resolved the registry and repository,
checked the read scope), the answer is remembered under the exact request that got it: the raw
path, the query string (containerd's `?ns=`) and the Accept header. The same request then skips
Starlette's middleware, routing, request and response objects: this ASGI layer sends the stored
headers and the bytes the store still holds in memory (`SmallObjects.read_from_memory`, which checks
the read scope in memory and counts the hit as the full path would). Anything else, a conditional
request, a Range, a manifest the store no longer holds in memory or an answer older than
`HOT_SECONDS` (so the full path's hourly re-linking of a manifest's layers still runs), takes the
full path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.store.digest import Digest
from proxy.store.memo import Lru
from proxy.store.records import Origin, ReadScope
from proxy.store.small import SmallObjects

HOT_SECONDS = 60.0
HOT_ANSWERS = 4096
_PASS_THROUGH = frozenset({b"if-none-match", b"if-match", b"if-modified-since", b"range", b"authorization"})

RequestKey = tuple[bytes, bytes, bytes]  # raw path, query string, Accept


@dataclass(frozen=True, slots=True)
class HotAnswer:
    scope: ReadScope
    origin: Origin
    digest: Digest
    headers: list[tuple[bytes, bytes]]  # as the full path sent them, Content-Length and Content-Type included
    until: float


class HotManifests:
    """The answers, bounded (LRU): registered by the OCI source, read by `HotPath`."""

    def __init__(self, small_objects: SmallObjects) -> None:
        self.small_objects = small_objects
        self._answers: Lru[RequestKey, HotAnswer] = Lru(HOT_ANSWERS)

    def remember(self, asgi_scope: Scope, scope: ReadScope, origin: Origin, digest: Digest, headers: list[tuple[bytes, bytes]]) -> None:
        key = _key(asgi_scope)
        if key is not None:
            self._answers.put(key, HotAnswer(scope, origin, digest, headers, time.monotonic() + HOT_SECONDS))

    def answer(self, asgi_scope: Scope) -> tuple[HotAnswer, bytes] | None:
        key = _key(asgi_scope)
        if key is None:
            return None
        answer = self._answers.get(key)
        if answer is None:
            return None
        if time.monotonic() > answer.until:
            self._answers.pop(key)
            return None
        item = self.small_objects.read_from_memory(answer.scope, answer.origin, answer.digest, asgi_scope["method"])
        if item is None:
            self._answers.pop(key)
            return None
        return answer, item.data


def _key(asgi_scope: Scope) -> RequestKey | None:
    """The request's key, or None when a header asks for something the stored answer may not be."""
    accept = b""
    for name, value in asgi_scope["headers"]:
        if name == b"accept":
            accept = value if not accept else accept + b"," + value
        elif name in _PASS_THROUGH:
            return None
    return asgi_scope.get("raw_path") or asgi_scope["path"].encode(), asgi_scope.get("query_string", b""), accept


Answered = Callable[[float, Origin, int], None]  # (seconds, origin, body bytes) of a hot answer


class HotPath:
    """ASGI middleware in front of the application (the request timing included): hot answers go
    out here and report their own duration to `answered`, the rest passes on. A timing wrapper
    around every hot answer cost about a sixth of this path's rate."""

    def __init__(self, app: ASGIApp, manifests: HotManifests, answered: Answered | None = None) -> None:
        self.app = app
        self.manifests = manifests
        self.answered = answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and b"/manifests/sha256:" in scope.get("raw_path", b""):
            started = time.perf_counter()
            found = self.manifests.answer(scope)
            if found is not None:
                answer, data = found
                body = data if scope["method"] == "GET" else b""
                await send({"type": "http.response.start", "status": 200, "headers": answer.headers})
                await send({"type": "http.response.body", "body": body})
                if self.answered is not None:
                    self.answered(time.perf_counter() - started, answer.origin, len(body))
                return
        await self.app(scope, receive, send)
