"""Moving an upstream body into a temp file: receive, hash and write, telling the fill's readers as
bytes land. A blocking body is read in a thread of the store's fill pool; an async one (aioboto3)
in the event loop, written in batches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

from proxy.store.blobs import TempBlob
from proxy.store.fill import AsyncUpstreamBody, FillFailed, FillWriter, UpstreamBody
from proxy.store.pools import Pools

READ_CHUNK = 4 * 1024 * 1024
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

    def copy() -> None:
        told, told_at = 0, 0.0
        while not stop.is_set():
            data = body.read_some(READ_CHUNK)
            if not data:
                return
            temp.append(data)
            if check is not None:
                check.update(data)
            # Wake the readers per MiB or every 50 ms, not per socket read: each wake-up costs
            # every reader a round through the event loop and a send.
            now = time.monotonic()
            if temp.written - told >= NOTIFY_BYTES or now - told_at >= NOTIFY_SECONDS:
                told, told_at = temp.written, now
                loop.call_soon_threadsafe(writer.advance, told)
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
