"""Moving an upstream body into a temp file: receive, hash and write, telling the fill's readers as
bytes land. A blocking body is read in a thread of the store's fill pool, straight into reused
receive buffers (buffers.py); each buffer is written to the file in a thread of its own and then
hashed in another (blobs.TempBlob), so the socket, the disk and the hash overlap. An async body
(aioboto3) is read in the event loop and written in batches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

from proxy.store.blobs import TempBlob
from proxy.store.fill import AsyncUpstreamBody, FillFailed, FillWriter, UpstreamBody
from proxy.store.pools import Pools

READ_CHUNK = 4 * 1024 * 1024  # batches of an async body
NOTIFY_BYTES = 1024 * 1024
NOTIFY_SECONDS = 0.05


class ContentCheck(Protocol):
    """A check besides the sha256 the store always computes (a git blob id, an upstream checksum)."""

    def update(self, data: bytes) -> None: ...

    def verify(self, size: int) -> None:
        """Raise DigestMismatch unless the `size` bytes seen are the ones expected."""
        ...


async def receive(
    writer: FillWriter, body: UpstreamBody | AsyncUpstreamBody, temp: TempBlob, pools: Pools, check: ContentCheck | None
) -> None:
    """Copy the whole body into `temp`, advancing the fill as it goes."""
    if isinstance(body, AsyncUpstreamBody):
        await _receive_async(writer, body, temp, pools, check)
    else:
        await _receive_blocking(writer, body, temp, pools, check)


async def _receive_blocking(
    writer: FillWriter, body: UpstreamBody, temp: TempBlob, pools: Pools, check: ContentCheck | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    ring = pools.buffers.ring()
    temp.on_written = _Waker(loop, writer).written

    def copy() -> None:
        while not stop.is_set():
            buffer = ring.take()
            length = body.read_into(buffer)
            if not length:
                ring.give(buffer)
                temp.flush()  # every byte on disk: `written` is final for the readers and the checks
                return
            if check is not None:
                check.update(memoryview(buffer)[:length])
            temp.append_buffer(buffer, length, ring)
        raise FillFailed("the fill was cancelled")

    copying = loop.run_in_executor(pools.fills, copy)
    try:
        await asyncio.shield(copying)
    except asyncio.CancelledError:
        stop.set()
        body.abort()
        await asyncio.gather(copying, return_exceptions=True)
        raise
    writer.advance(temp.written)


class _Waker:
    """Wakes the fill's readers as bytes land on disk: per MiB, every 50 ms, and whenever the
    writer has caught up (an upstream that pauses must not leave written bytes unannounced). Each
    wake-up costs every reader a round through the event loop and a send, so not per write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: FillWriter) -> None:
        self._loop = loop
        self._writer = writer
        self._told = 0
        self._told_at = 0.0

    def written(self, written: int, caught_up: bool) -> None:
        now = time.monotonic()
        if caught_up or written - self._told >= NOTIFY_BYTES or now - self._told_at >= NOTIFY_SECONDS:
            self._told, self._told_at = written, now
            self._loop.call_soon_threadsafe(self._writer.advance, written)


async def _receive_async(
    writer: FillWriter, body: AsyncUpstreamBody, temp: TempBlob, pools: Pools, check: ContentCheck | None
) -> None:
    batch = bytearray()

    async def flush() -> None:
        data = bytes(batch)
        batch.clear()
        await pools.files(temp.append, data)
        if check is not None:
            check.update(data)
        writer.advance(temp.written)

    async for chunk in body.chunks():
        batch += chunk
        if len(batch) >= READ_CHUNK:
            await flush()
    if batch:
        await flush()
    writer.advance(temp.written)
