"""Sending a blob to a client, from a committed file or from a fill still in progress.

Both are byte sources: a descriptor and how far it may be read yet. The bytes go out by
sendfile(2) where the server offers zero-copy (see zerocopy.py), else in 4 MiB chunks read in a
worker thread: with Starlette's 64 KiB default a 1 GiB file served 5x slower under uvicorn.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.http.ranges import ByteRange, parse_range
from proxy.http.zerocopy import EXTENSION as ZEROCOPY

CHUNK = 4 * 1024 * 1024


class Reader(Protocol):
    """A descriptor of the reader's own, and how far it may be read yet."""

    fd: int

    async def readable(self, pos: int, end: int) -> int:
        """Wait until bytes past `pos` may be read; how far [pos, end) may be read now. May move
        `fd` to another file holding the same bytes (a fill taken over by another process)."""
        ...

    def close(self) -> None: ...


class ByteSource(Protocol):
    async def reader(self) -> Reader: ...


async def iter_bytes(source: ByteSource, start: int, end: int) -> AsyncIterator[bytes]:
    """The bytes [start, end) of a source as they become readable."""
    reader = await source.reader()
    try:
        pos = start
        while pos < end:
            limit = await reader.readable(pos, end)
            data = await anyio.to_thread.run_sync(os.pread, reader.fd, min(CHUNK, limit - pos), pos)
            if not data:
                raise OSError(f"blob file ended at {pos}, expected {end} bytes")
            pos += len(data)
            yield data
    finally:
        reader.close()


class BlobResponse(Response):
    """200 or 206 with the bytes of a source, sent as they become readable."""

    def __init__(self, source: ByteSource, span: ByteRange, status_code: int, headers: Mapping[str, str]) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self._source = source
        self._span = span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        start, end = self._span.start, self._span.end
        if ZEROCOPY not in scope.get("extensions", {}):
            async for data in iter_bytes(self._source, start, end):
                start += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": start < end})
            return
        reader = await self._source.reader()
        try:
            pos = start
            while pos < end:
                limit = await reader.readable(pos, end)
                await send({"type": ZEROCOPY, "file": reader.fd, "offset": pos, "count": limit - pos, "more_body": limit < end})
                pos = limit
        finally:
            reader.close()


def blob_response(
    source: ByteSource | None,
    size: int,
    *,
    method: str,
    range_header: str | None,
    headers: Mapping[str, str],
    media_type: str = "application/octet-stream",
) -> Response:
    """200 or 206 for GET and HEAD; raises RangeNotSatisfiable for the source to word as it likes."""
    byte_range = parse_range(range_header, size)
    out = {"accept-ranges": "bytes", **{k.lower(): v for k, v in headers.items()}, "content-type": media_type}
    status = 200
    span = ByteRange(0, size)
    if byte_range is not None:
        status, span = 206, byte_range
        out["content-range"] = byte_range.content_range(size)
    out["content-length"] = str(span.length)
    if method == "HEAD" or span.length == 0 or source is None:
        return Response(b"", status_code=status, headers=out)
    return BlobResponse(source, span, status, out)
