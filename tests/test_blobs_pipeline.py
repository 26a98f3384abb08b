"""A fill's temp file with its pipeline (proxy/store/blobs.py): the write and the hash in threads of
their own, fed from a ring of reused receive buffers (proxy/store/buffers.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from proxy.store.blobs import TempBlob
from proxy.store.buffers import BufferPool


def fill_from(temp: TempBlob, data: bytes, pool: BufferPool, piece: int) -> None:
    ring = pool.ring()
    for offset in range(0, len(data), piece):
        buffer = ring.take()
        chunk = data[offset : offset + piece]
        buffer[: len(chunk)] = chunk
        temp.append_buffer(buffer, len(chunk), ring)


def test_the_pipeline_writes_and_hashes_every_byte_in_order_with_a_few_reused_buffers(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    pool = BufferPool(size=64 * 1024, keep=4, per_fill=3)
    temp = TempBlob(tmp_path / "t", pipelined=True)
    seen: list[int] = []
    temp.on_written = lambda written, caught_up: seen.append(written)
    fill_from(temp, data, pool, 64 * 1024)
    temp.flush()
    assert temp.written == len(data) and seen[-1] == len(data) and seen == sorted(seen)
    assert temp.hexdigest() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "t").read_bytes() == data
    assert len(pool._idle) <= 4  # at most `keep` idle buffers, whatever the size of the blob


def test_a_failed_write_reaches_the_producer_and_never_strands_it_waiting_for_a_buffer(tmp_path: Path) -> None:
    pool = BufferPool(size=64 * 1024, keep=4, per_fill=2)
    temp = TempBlob(tmp_path / "t", pipelined=True)
    read_only = os.open(tmp_path / "t", os.O_RDONLY)
    os.dup2(read_only, temp.fd)  # every write now fails (EBADF), as a full or broken disk would
    os.close(read_only)
    with pytest.raises(OSError):
        fill_from(temp, os.urandom(1024 * 1024), pool, 64 * 1024)  # 16 pieces through a ring of 2
        temp.flush()
    with pytest.raises(OSError):
        temp.hexdigest()
    temp.discard()
    assert not (tmp_path / "t").exists()
