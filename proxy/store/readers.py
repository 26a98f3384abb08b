"""Readers of committed blobs: a descriptor of the response's own on the file, with the blob marked
in use (so no janitor removes it meanwhile) until the response closes it."""

from __future__ import annotations

import os

from proxy.store.blobs import BlobFile
from proxy.store.memo import BlobsInUse
from proxy.store.pools import Pools


class FileReader:
    def __init__(self, fd: int, blob: BlobFile, in_use: BlobsInUse) -> None:
        self.fd = fd
        self._blob = blob
        self._in_use = in_use
        in_use.opened(blob)

    async def readable(self, pos: int, end: int) -> int:
        return end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._in_use.closed(self._blob)


class FileSource:
    """A committed blob on disk: everything is readable at once."""

    def __init__(self, blob: BlobFile, in_use: BlobsInUse, pools: Pools) -> None:
        self.blob = blob
        self._in_use = in_use
        self._pools = pools

    async def reader(self) -> FileReader:
        fd = await self._pools.files(os.open, self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        return FileReader(fd, self.blob, self._in_use)
