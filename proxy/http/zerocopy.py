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
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXTENSION = "http.response.zerocopysend"
SEND_TIMEOUT = 60.0  # seconds a client may take no bytes at all before it is dropped (settings: send_timeout)


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class ZeroCopyMiddleware:
    def __init__(self, app: ASGIApp, *, send_timeout: float = SEND_TIMEOUT) -> None:
        self.app = app
        self.send_timeout = send_timeout

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
                await _zerocopy_send(cycle, send, message, self.send_timeout)
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


async def _zerocopy_send(cycle: Any, send: Send, message: Message, send_timeout: float) -> None:
    if cycle.chunked_encoding or getattr(cycle, "disconnected", False):
        raise ClientGone("no zero-copy on this response")
    transport = cycle.transport
    try:
        await _flushed(transport, send_timeout)
        sock_fd = transport.get_extra_info("socket").fileno()
        offset, count = message.get("offset", 0), message["count"]
        file = message["file"]
        file_fd = file if isinstance(file, int) else file.fileno()
        sent = await _sendfile(asyncio.get_running_loop(), sock_fd, file_fd, offset, count, send_timeout)
    except ClientGone:
        transport.close()  # uvicorn marks the cycle disconnected when the loop reports it lost
        for _ in range(3):
            await asyncio.sleep(0)
        raise
    cycle.expected_content_length -= sent
    await send({"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)})


async def _flushed(transport: Any, send_timeout: float) -> None:
    """Wait until the status line and headers (written through the transport) have left its buffer."""
    deadline, pause = time.monotonic() + send_timeout, 0.001
    while transport.get_write_buffer_size():
        if transport.is_closing() or time.monotonic() > deadline:
            raise ClientGone("client stopped reading")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def _sendfile(loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int, offset: int, count: int, send_timeout: float) -> int:
    """sendfile(2) on the non-blocking socket, in the event loop: when the socket is full, wait for
    it to drain through the loop (a duplicate descriptor, so the transport's own registration is
    untouched). No thread waits on a client, so clients that stop reading cannot take the threads
    others need; one that makes no progress for `send_timeout` is dropped."""
    watch = os.dup(sock_fd)
    try:
        sent = 0
        while sent < count:
            try:
                n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
            except BlockingIOError:
                await _writable(loop, watch, send_timeout)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                    raise ClientGone(str(exc)) from None
                raise
            if n == 0:
                raise OSError(f"file ended {count - sent} bytes early")
            sent += n
        return sent
    finally:
        os.close(watch)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    except asyncio.TimeoutError:
        raise ClientGone("client stopped reading") from None
    finally:
        loop.remove_writer(fd)
