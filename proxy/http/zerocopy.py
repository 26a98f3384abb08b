"""ASGI's `http.response.zerocopysend` extension on uvicorn: file bytes go to the socket by sendfile(2).

uvicorn does not offer the extension itself. Copying a 1 GiB blob through Python buffers costs
about half again the time of sendfile, so this middleware offers it when the server underneath is
uvicorn's HTTP/1.1 cycle (the only server pullthrough ships with), and stays out of the way on any
other server: responses then stream in 4 MiB chunks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXTENSION = "http.response.zerocopysend"
STALL_TIMEOUT = 120.0  # seconds a client may take no bytes at all before it is dropped
_SENDFILE_THREADS = anyio.CapacityLimiter(64)  # kept apart from the pool the index uses


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class ZeroCopyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = getattr(send, "__self__", None)
        if scope["type"] != "http" or not _is_uvicorn_cycle(cycle):
            await self.app(scope, receive, send)
            return
        extensions = {**scope.get("extensions", {}), EXTENSION: {}}

        async def send_with_zerocopy(message: Message) -> None:
            if message["type"] != EXTENSION:
                await send(message)
                return
            try:
                await _zerocopy_send(cycle, send, message)
            except ClientGone:
                pass  # the connection is closed; uvicorn sees the response as abandoned by the client

        await self.app({**scope, "extensions": extensions}, receive, send_with_zerocopy)


def _is_uvicorn_cycle(cycle: Any) -> bool:
    transport = getattr(cycle, "transport", None)
    return (
        transport is not None
        and hasattr(cycle, "expected_content_length")
        and hasattr(cycle, "chunked_encoding")
        and transport.get_extra_info("socket") is not None
    )


async def _zerocopy_send(cycle: Any, send: Send, message: Message) -> None:
    if cycle.chunked_encoding or getattr(cycle, "disconnected", False):
        raise ClientGone("no zero-copy on this response")
    transport = cycle.transport
    # The status line and headers went through the transport's buffer: flush them first.
    deadline = time.monotonic() + STALL_TIMEOUT
    while transport.get_write_buffer_size():
        if transport.is_closing() or time.monotonic() > deadline:
            raise ClientGone("client stopped reading")
        await asyncio.sleep(0.001)
    sock_fd = transport.get_extra_info("socket").fileno()
    offset, count = message.get("offset", 0), message["count"]
    file = message["file"]
    file_fd = file if isinstance(file, int) else file.fileno()
    try:
        sent = await anyio.to_thread.run_sync(_sendfile, sock_fd, file_fd, offset, count, limiter=_SENDFILE_THREADS)
    except ClientGone:
        transport.close()  # uvicorn marks the cycle disconnected when the loop reports it lost
        for _ in range(3):
            await asyncio.sleep(0)
        raise
    cycle.expected_content_length -= sent
    await send({"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)})


def _sendfile(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Blocking: sendfile on the non-blocking socket, waiting for it to drain with poll."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT | select.POLLERR | select.POLLHUP)
    sent, last_progress = 0, time.monotonic()
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            for _, events in poller.poll(1000):
                if events & (select.POLLERR | select.POLLHUP):
                    raise ClientGone("client closed the connection") from None
            if time.monotonic() - last_progress > STALL_TIMEOUT:
                raise ClientGone("client stopped reading") from None
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise ClientGone(str(exc)) from None
            raise
        if n == 0:
            raise OSError(f"file ended {count - sent} bytes early")
        sent += n
        last_progress = time.monotonic()
    return sent
