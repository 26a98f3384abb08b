"""Receive buffers for fills: a few fixed-size bytearrays per fill, reused for the life of the process.

A fill reads the upstream socket straight into one of these (`readinto`, no new bytes object per
read), writes it to the temp file and hands it to the hashing thread, which gives it back. Reading
into fresh 4 MiB bytes objects instead cost a page fault per 4 KiB and let glibc's per-thread
arenas grow with every concurrent fill; with reused buffers a fill holds at most `per_fill` of
them whatever the blob's size, and the process keeps at most `keep` idle ones.
"""

from __future__ import annotations

import threading

BUFFER_BYTES = 1024 * 1024
PER_FILL = 8  # buffers one fill may hold at once: received but not yet hashed
KEEP = 16  # idle buffers the process keeps for the next fills


class BufferPool:
    """The process's idle receive buffers. Thread-safe."""

    def __init__(self, size: int = BUFFER_BYTES, keep: int = KEEP, per_fill: int = PER_FILL) -> None:
        self.size = size
        self.per_fill = per_fill
        self._keep = keep
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()

    def ring(self) -> BufferRing:
        """The buffers of one fill: at most `per_fill` out at once."""
        return BufferRing(self)

    def _take(self) -> bytearray:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return bytearray(self.size)

    def _give(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(buffer)


class BufferRing:
    """One fill's share of the pool: `take` blocks while `per_fill` buffers wait to be hashed, which
    bounds a fill's memory and slows the socket reads to the hash's pace if it falls behind."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._slots = threading.BoundedSemaphore(pool.per_fill)

    def take(self) -> bytearray:
        self._slots.acquire()
        return self._pool._take()

    def give(self, buffer: bytearray) -> None:
        self._pool._give(buffer)
        self._slots.release()
