"""The store's worker threads: one bounded pool each for fills, index queries and file calls.

They are kept apart so that one kind of work cannot starve another: a fill holds its thread for
the whole transfer (a registry that never answers holds it until the read timeout), so a burst of
cold fills must not leave cache lookups or SQL waiting for a thread. The store owns the pools,
sizes them from the settings and shuts them down when the application stops.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from proxy.store.buffers import BufferPool

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class PoolSizes:
    fills: int = 128  # upstream transfers at once: each reads its socket in a thread of its own
    index: int = 8  # SQL at once (PostgreSQL's pool holds 30 connections)
    files: int = 16  # stat, open, fsync, rename and hashing of files already on disk


class Pools:
    def __init__(self, sizes: PoolSizes = PoolSizes()) -> None:
        self.sizes = sizes
        self.buffers = BufferPool()  # fills' receive buffers, reused (buffers.py)
        self.fills = ThreadPoolExecutor(max_workers=sizes.fills, thread_name_prefix="fill")
        self._index = ThreadPoolExecutor(max_workers=sizes.index, thread_name_prefix="index")
        self._files = ThreadPoolExecutor(max_workers=sizes.files, thread_name_prefix="files")

    async def index(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking index query in the index pool."""
        return await _run(self._index, call, *args, **kwargs)

    async def files(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking file call in the file pool."""
        return await _run(self._files, call, *args, **kwargs)

    def shutdown(self) -> None:
        """Stop taking work; threads still running finish on their own (none is joined here, so a
        stuck upstream read cannot hold up the process's exit)."""
        for pool in (self.fills, self._index, self._files):
            pool.shutdown(wait=False, cancel_futures=True)


async def _run(pool: ThreadPoolExecutor, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(call, *args, **kwargs))
