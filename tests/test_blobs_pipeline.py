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


def test_an_upstream_body_is_read_as_its_bytes_arrive_not_a_buffer_at_a_time() -> None:
    # A slow upstream sends 1000 bytes and pauses: they must reach the fill now, not once a whole
    # receive buffer has come in (http.client's readinto reads until the buffer is full).
    import socket
    import threading

    from proxy.http.download import BlobDownload, BlobTransport

    rest = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    body = os.urandom(3000)

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + body[:1000])
            rest.wait(10)
            connection.sendall(body[1000:])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    transport = BlobTransport("test")
    download = BlobDownload(transport.get(f"http://127.0.0.1:{listener.getsockname()[1]}/blob", None))
    buffer = bytearray(1024 * 1024)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(download.read_into(buffer)), daemon=True)
    reader.start()
    reader.join(5)
    assert got == [1000], "the first bytes waited for the rest of the buffer"
    rest.set()
    received = bytes(buffer[:1000])
    while count := download.read_into(buffer):
        received += bytes(buffer[:count])
    assert received == body and download.read_into(buffer) == 0
    download.close()
    transport.close()
    listener.close()
