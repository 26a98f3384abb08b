"""Drop-behind: a fill's file does not grow the page cache by its whole size.

A buffered write puts every byte of a new blob into fresh page-cache pages, and fresh pages are
what costs: the kernel must reclaim older pages for them on a server whose memory is full, and a
VM whose host takes free guest memory back faults each one in from the host (on the benchmark's
VM a buffered write of 1 GiB costs 2.2 s of CPU, the same write with drop-behind 0.4 s). So a
long fill keeps only its last `window` bytes or so in the page cache: for the range `window`
behind the write head the kernel is asked to start writeback, and the range one `window` further
behind (written back by then) is dropped. The pages freed that way are the ones the next writes
take, still warm. Readers following the fill read near its head, within what is kept; one that
falls further behind reads from the disk, which is also how a later warm GET reads the blob's
early part once. This is the kernel's own RWF_DONTCACHE idea (Linux 6.14), done with
posix_fadvise so that it works on every Linux and keeps a tail for the followers.
"""

from __future__ import annotations

import os

WINDOW = 64 * 1024 * 1024  # by measurement on the benchmark's VM: 16 to 64 MiB alike, 128 MiB already slower
STEP = WINDOW // 2


class DropBehind:
    """Called with a file's size after each append (in the writing thread)."""

    def __init__(self, fd: int, window: int = WINDOW) -> None:
        self._fd = fd
        self._window = window
        self._step = window // 2
        self._done = 0  # every range below this was handed to the kernel for writeback

    def written(self, size: int) -> None:
        while size - self._done >= self._window + self._step:
            start = self._done
            self._done += self._step
            # DONTNEED starts writeback of dirty pages and drops the clean ones: the first call
            # starts writing the range, the second (one window later) drops it.
            self._advise(start, self._step)
            if start >= self._window:
                self._advise(start - self._window, self._step)

    def synced(self) -> None:
        """After the file's fsync: every range dropped while the fill ran is dropped again, now that
        it is clean for sure (a range whose writeback had not finished in time stayed cached)."""
        if self._done > self._window:
            self._advise(0, self._done - self._window)

    def _advise(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: a filesystem that refuses it keeps its pages
            pass
