"""How long each request took and what it was: raw ASGI middleware around the whole app (the
manifest hot path included), and the record of one exchange that the store's counting marks."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    the app, when it started, and what the store said about it (`outcome`, `origin`: set by the
    books the store reports to, proxy/stats.py, while the request runs)."""

    # `__self__` is the server's response cycle: ZeroCopyMiddleware (zerocopy.py) finds uvicorn's
    # cycle through `send.__self__`, and must still find it behind this wrapper.
    __slots__ = ("__self__", "family", "method", "started", "outcome", "origin", "_send", "_declared", "_body_bytes", "_done", "_finished")

    def __init__(self, family: str, method: str, send: Send, finished: Callable[[Exchange], None]) -> None:
        self.family = family
        self.method = method
        self.started = time.perf_counter()
        self.outcome: Any = None  # proxy.store.events.Outcome once a cache read answered
        self.origin: Any = None  # proxy.store.records.Origin of that read
        self.__self__ = getattr(send, "__self__", None)
        self._send = send
        self._declared: int | None = None
        self._body_bytes = 0
        self._done = False
        self._finished = finished

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self._body_bytes += len(message.get("body", b""))
            await self._send(message)
            if not message.get("more_body", False):
                self.finish()
            return
        await self._send(message)
        if kind == "http.response.start" and self.method != "HEAD" and getattr(self.__self__, "chunked_encoding", None) is False:
            self._declared = self.__self__.expected_content_length

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def sent(self) -> int:
        """Body bytes handed to the connection. uvicorn counts down what a response with a
        Content-Length still owes, sendfile's bytes (zerocopy.py) included, and stops counting when
        the client is gone; elsewhere, the bodies passed through here."""
        if self._declared is not None:
            return self._declared - int(self.__self__.expected_content_length)
        return self._body_bytes

    def finish(self) -> None:
        """Once: at the response's last byte, or when the app returns without one (an error)."""
        if not self._done:
            self._done = True
            self._finished(self)


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
