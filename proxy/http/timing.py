"""How long each request took and what it was: raw ASGI middleware around the whole app (the
manifest hot path included), and the record of one exchange that the store's counting marks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# First path segment -> route family; paths not listed are the Hub's file routes or "other".
_FAMILIES = {
    "v2": "oci", "api": "hf", "s3": "s3", "web": "web", "ipfs": "ipfs",
    "": "ops", "stats": "ops", "metrics": "ops", "admin": "ops", "healthz": "ops", "livez": "ops", "readyz": "ops",
}


def route_family(path: str) -> str:
    """The label a request's path falls under: oci, hf, s3, web, ipfs, ops or other."""
    family = _FAMILIES.get(path[1:].partition("/")[0])
    if family == "hf" and path.startswith("/api/markets/"):
        return "ops"  # resource sets (pins.py) live under the Hub's /api/ prefix
    if family is None:
        return "hf" if "/resolve/" in path else "other"
    return family


class Exchange:
    """One request and its response, as the timing middleware sees it: the ASGI `send` it hands
    the app, when it started, and what the store said about it (`result` and `origin`: set by the
    books the store reports to, proxy/stats.py, while the request runs)."""

    # `__self__` is the server's response cycle: ZeroCopyMiddleware (zerocopy.py) finds uvicorn's
    # cycle through `send.__self__`, and must still find it behind this wrapper.
    __slots__ = ("__self__", "family", "started", "result", "origin", "_send", "_head", "_declared", "_body_bytes", "_done", "_finished")

    def __init__(self, family: str, method: str, send: Send, finished: Callable[[Exchange], None]) -> None:
        self.family = family
        self.started = time.perf_counter()
        self.result = "none"  # "hit" or "miss" once a cache read answered
        self.origin: Any = None  # proxy.store.records.Origin of that read
        self.__self__ = getattr(send, "__self__", None)
        self._send = send
        self._head = method == "HEAD"
        self._declared: int | None = None
        self._body_bytes = 0
        self._done = False
        self._finished = finished

    def __call__(self, message: Message) -> Awaitable[None]:
        # A plain function handing back the server's own awaitable (a coroutine of our own for the
        # last body only): the manifest hot path sends two messages a request, and each coroutine
        # of ours is measurable there.
        if message["type"] == "http.response.start":
            if not self._head:
                self._declared = _content_length(message)
            return self._send(message)
        if message["type"] != "http.response.body":
            return self._send(message)
        self._body_bytes += len(message.get("body", b""))
        if message.get("more_body", False):
            return self._send(message)
        return self._last(message)

    async def _last(self, message: Message) -> None:
        # uvicorn arms its keep-alive timer inside this send, and a timer keeps a copy of the
        # current context until the loop drops it, even once cancelled: the exchange (and through
        # it the server's request cycle) must not outlive its request that long.
        CURRENT.set(None)
        await self._send(message)
        self.finish()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def sent(self) -> int:
        """Body bytes handed to the connection. uvicorn counts down what a response with a
        Content-Length still owes, sendfile's bytes (zerocopy.py) included, and stops counting when
        the client is gone; elsewhere, the bodies passed through here."""
        owed = getattr(self.__self__, "expected_content_length", None)
        if self._declared is not None and owed is not None and getattr(self.__self__, "chunked_encoding", None) is False:
            return self._declared - int(owed)
        return self._body_bytes

    def finish(self) -> None:
        """Once: at the response's last byte, or when the app returns without one (an error)."""
        if not self._done:
            self._done = True
            self._finished(self)


def _content_length(message: Message) -> int | None:
    for name, value in message.get("headers", ()):
        if name == b"content-length":  # ASGI header names are lower-case
            return int(value)
    return None


CURRENT: ContextVar[Exchange | None] = ContextVar("pullthrough_exchange", default=None)


class RequestTiming:
    """Times every HTTP request from its arrival until its response's last byte is sent, and
    hands the finished exchange to `finished`."""

    def __init__(self, app: ASGIApp, finished: Callable[[Exchange], None]) -> None:
        self.app = app
        self._finished = finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(route_family(scope["path"]), scope["method"], send, self._finished)
        token = CURRENT.set(exchange)
        try:
            await self.app(scope, receive, exchange)
        finally:
            CURRENT.reset(token)
            exchange.finish()
