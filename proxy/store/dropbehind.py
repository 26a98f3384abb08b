"""Drop-behind: a fill's file does not grow the page cache by its whole size.

A buffered write puts every byte of a new blob into fresh page-cache pages, and fresh pages are
what costs: the kernel must reclaim older pages for them on a server whose memory is full, and a
VM whose host takes free guest memory back faults each one in from the host (on the benchmark's
VM a buffered write of 1 GiB costs 2.2 s of CPU, the same write with drop-behind 0.3-0.4 s). So a
long fill keeps only its tail in the page cache: for the range one `window` behind the write head
the kernel is asked to start writeback, and what lies one more window behind (written back by
then) is dropped, the last few windows' worth again each time in case a range was still being
written back at its first drop. The pages freed that way are the ones the next writes take, still
warm. After the commit's fsync everything but the last two windows is dropped once more, now
that all of it is clean: a committed blob keeps its last 128 MiB cached, and a blob of up to
128 MiB stays cached whole. Readers following a fill read near its head, within what is kept; one
that falls further behind reads from the disk, which is also how the first GET after the fill
reads the blob's early part. This is the kernel's own RWF_DONTCACHE idea (Linux 6.14), done with
posix_fadvise so that it works on every Linux and keeps a tail for the followers.
"""

from __future__ import annotations

import os

WINDOW = 64 * 1024 * 1024  # by measurement on the benchmark's VM: 16 to 64 MiB alike, 128 MiB already slower
# A drop covers this many windows behind its range too: a range whose writeback had not finished
# at its first drop (a disk slower than the upstream) is dropped at a later one, not at the commit.
REDROP_WINDOWS = 4


class DropBehind:
    """Told a file's size after each append (in the writing thread), and when it has been fsynced."""

    def __init__(self, fd: int, window: int = WINDOW) -> None:
        self._fd = fd
        self._window = window
        self._step = window // 2
        self._started = 0  # writeback was asked for every range below this

    def written(self, size: int) -> None:
        while size - self._started >= self._window + self._step:
            start = self._started
            self._started += self._step
            # DONTNEED starts writeback of the dirty pages of a range and drops its clean ones: this
            # range (one window behind the head) is written back, what is a window behind it dropped.
            self._advise(start, self._step)
            drop_end = start - self._window + self._step
            if drop_end > 0:
                drop_start = max(0, drop_end - REDROP_WINDOWS * self._window)
                self._advise(drop_start, drop_end - drop_start)

    def fsynced(self, size: int) -> None:
        """After the file's fsync every page is clean: drop all but the last two windows."""
        if size > 2 * self._window:
            self._advise(0, size - 2 * self._window)

    def _advise(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: a filesystem that refuses it keeps its pages
            pass
