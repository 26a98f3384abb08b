"""uvicorn's HTTP/1.1 protocol with the limits a shared mirror needs against slow or hostile clients.

A request's head (request line and headers) must arrive whole within `header_timeout` of the
connection or of the previous response (uvicorn's keep-alive timer restarts with every byte, so a
client sending one byte at a time would hold a connection forever; overdue heads are swept once
a second), hold at most `max_headers` headers and `max_head_bytes` bytes; otherwise the client gets 408 or 431 and the connection closes.
The connection ceiling is uvicorn's own `limit_concurrency` (503), and a response body that makes
no progress is dropped by the sender (proxy/http/zerocopy.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_STATUS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclass(frozen=True)
class HeadLimits:
    header_timeout: float = 10.0
    max_headers: int = 100
    max_head_bytes: int = 64 * 1024


class _HeadRefused(Exception):
    """Raised from a parser callback: the head broke a limit."""


class _HeadWatch:
    """The connections waiting for a request head, and one timer that closes the overdue ones.

    One sweep per `interval` instead of a timer armed and cancelled per request: on a keep-alive
    connection serving thousands of cached manifests a second, that pair was a measurable share of
    the hot path. A head is refused between `header_timeout` and `header_timeout + interval` late.
    """

    def __init__(self, header_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.interval = min(1.0, header_timeout / 4)
        self.deadlines: dict[GuardedHttpProtocol, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def expect(self, connection: GuardedHttpProtocol) -> None:
        loop = connection.loop
        self.deadlines[connection] = loop.time() + self.header_timeout
        if self._timer is None:
            self._timer = loop.call_later(self.interval, self._sweep, loop)

    def arrived(self, connection: GuardedHttpProtocol) -> None:
        self.deadlines.pop(connection, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        overdue = [connection for connection, deadline in self.deadlines.items() if deadline <= now]
        for connection in overdue:
            self.deadlines.pop(connection, None)
            connection.head_timed_out()
        self._timer = loop.call_later(self.interval, self._sweep, loop) if self.deadlines else None


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with `limits` (a subclass per configuration: `guarded_protocol`)."""

    limits = HeadLimits()
    watch = _HeadWatch(HeadLimits.header_timeout)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def _expect_head(self) -> None:
        """Waiting for a request's head: count its bytes and headers, and give it a deadline."""
        self._head_bytes = 0
        self._header_count = 0
        self._reading_head = True
        self._refusal: int | None = None
        self.watch.expect(self)

    def data_received(self, data: bytes) -> None:
        reading = self._reading_head
        super().data_received(data)  # parses, and ends the head when its last header arrives
        if reading and self._reading_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = 431
            raise _HeadRefused()  # httptools turns it into a parser error: send_400_response below
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self.watch.arrived(self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._expect_head()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self.watch.arrived(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(self._refusal)
            return
        super().send_400_response(msg)

    def head_timed_out(self) -> None:
        if self._reading_head and not self.transport.is_closing():
            self._refuse(408)

    def _refuse(self, status: int) -> None:
        self._reading_head = False
        self.watch.arrived(self)
        if self.transport.is_closing():
            return
        reason = _STATUS[status]
        body = reason + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()


def guarded_protocol(limits: HeadLimits) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to these limits."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "watch": _HeadWatch(limits.header_timeout)})
