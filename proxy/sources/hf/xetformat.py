"""The Xet formats the mirror must read to trust bytes: xorb chunk headers, chunk decompression
(none, LZ4 frames, byte-grouping 4 + LZ4) and the Merkle hashes that name chunks and xorbs.

Written from xet-core (xet_core_structures: xorb_object/xorb_chunk_format.rs, compression_scheme.rs,
byte_grouping/bg4.rs, merklehash/data_hash.rs and aggregated_hashes.rs). A xorb's hash covers its
chunks' hashes and uncompressed sizes; the footer that may follow the chunks is not covered.
"""

from __future__ import annotations

import re
import struct

import blake3
import lz4.frame

from proxy.store.blobs import DigestMismatch

# Keys of xet-core's keyed BLAKE3: data (chunk) hashes and internal Merkle nodes.
DATA_KEY = bytes([
    102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28, 157, 228, 33, 16, 155, 235, 43, 88, 180,
    208, 176, 75, 147, 173, 242, 41,
])
INTERNAL_NODE_KEY = bytes([
    1, 126, 197, 199, 165, 71, 41, 150, 253, 148, 102, 102, 180, 138, 2, 230, 93, 221, 83, 111, 55, 199, 109, 210, 248,
    99, 82, 230, 74, 83, 113, 63,
])
HEADER_BYTES = 8
FOOTER_IDENT = b"XETBLOB"  # the xorb's footer (chunk hashes and boundaries) starts here
MAX_CHUNK = 128 * 1024  # xet-core's MAX_CHUNK_SIZE: larger chunks are malformed
BRANCHING = 4  # AGGREGATED_HASHES_MEAN_TREE_BRANCHING_FACTOR
NONE, LZ4, BG4_LZ4 = 0, 1, 2
XET_HASH = re.compile(r"^[0-9a-f]{64}$")

Hash = bytes  # 32 raw bytes, as BLAKE3 gives them


class MalformedXorb(DigestMismatch):
    """Bytes that are no xorb at all: as untrustworthy as a xorb of the wrong hash."""


def hash_hex(raw: Hash) -> str:
    """xet-core's printed form: four little-endian u64 words, each as 16 hex digits."""
    return "".join(f"{word:016x}" for word in struct.unpack("<4Q", raw))


def hash_from_hex(text: str) -> Hash:
    if not XET_HASH.match(text):
        raise ValueError("not a Xet hash")
    return struct.pack("<4Q", *(int(text[i : i + 16], 16) for i in range(0, 64, 16)))


def chunk_hash(data: bytes | memoryview) -> Hash:
    return blake3.blake3(data, key=DATA_KEY).digest()


def _merged(entries: list[tuple[Hash, int]]) -> tuple[Hash, int]:
    text = "".join(f"{hash_hex(h)} : {size}\n" for h, size in entries)
    return blake3.blake3(text.encode(), key=INTERNAL_NODE_KEY).digest(), sum(size for _, size in entries)


def _next_cut(entries: list[tuple[Hash, int]], start: int) -> int:
    """How many entries from `start` merge into one node (a cut where a hash's last word % 4 == 0)."""
    remaining = len(entries) - start
    if remaining <= 2:
        return remaining
    end = min(2 * BRANCHING + 1, remaining)
    for i in range(2, end):
        if struct.unpack_from("<Q", entries[start + i][0], 24)[0] % BRANCHING == 0:
            return i + 1
    return end


def xorb_hash(chunks: list[tuple[Hash, int]]) -> Hash:
    """The Merkle hash of (chunk hash, uncompressed size) pairs: a xorb's name."""
    if not chunks:
        return bytes(32)
    level = list(chunks)
    while len(level) > 1:
        merged, start = [], 0
        while start < len(level):
            cut = _next_cut(level, start)
            merged.append(_merged(level[start : start + cut]))
            start += cut
        level = merged
    return level[0][0]


def decompress(scheme: int, data: bytes, size: int) -> bytes:
    if scheme == NONE:
        out = bytes(data)
    elif scheme == LZ4:
        out = lz4.frame.decompress(data)
    elif scheme == BG4_LZ4:
        out = _bg4_regroup(lz4.frame.decompress(data))
    else:
        raise MalformedXorb(f"unknown chunk compression {scheme}")
    if len(out) != size:
        raise MalformedXorb("a chunk decompressed to a size other than its header's")
    return out


def _bg4_regroup(grouped: bytes) -> bytes:
    """Undo xet-core's bg4_split: byte i % 4 of the data went to group i % 4, groups laid end to end."""
    n = len(grouped)
    split, rem = divmod(n, 4)
    sizes = [split + (1 if rem > k else 0) for k in range(4)]
    out = bytearray(n)
    offset = 0
    for k, size in enumerate(sizes):
        out[k::4] = grouped[offset : offset + size]
        offset += size
    return bytes(out)


class XorbCheck:
    """Verifies a xorb as its bytes stream in (the store's ContentCheck): each chunk is parsed,
    decompressed and hashed as soon as it is whole, so memory stays at about one chunk."""

    def __init__(self, expected_hex: str) -> None:
        self._expected = expected_hex
        self._pending = bytearray()
        self._chunks: list[tuple[Hash, int]] = []
        self._footer = False
        self.error: str | None = None

    def update(self, data: bytes | memoryview) -> None:
        if self._footer or self.error is not None:
            return
        self._pending += data
        try:
            self._parse()
        except MalformedXorb as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - LZ4 errors of a corrupt chunk: the xorb is bad
            self.error = f"a chunk did not decompress: {exc}"

    def _parse(self) -> None:
        pending = self._pending
        offset = 0
        while len(pending) - offset >= HEADER_BYTES:
            header = bytes(pending[offset : offset + HEADER_BYTES])
            if header.startswith(FOOTER_IDENT):
                self._footer = True
                break
            version, compressed, scheme, size = header[0], _u24(header, 1), header[4], _u24(header, 5)
            if version != 0 or size > MAX_CHUNK or compressed > 2 * MAX_CHUNK:
                raise MalformedXorb("a chunk header is not one xet-core writes")
            end = offset + HEADER_BYTES + compressed
            if len(pending) < end:
                break
            data = decompress(scheme, bytes(pending[offset + HEADER_BYTES : end]), size)
            self._chunks.append((chunk_hash(data), size))
            offset = end
        del pending[:offset]
        if self._footer:
            self._pending = bytearray()

    def verify(self, size: int) -> None:
        if self.error is not None:
            raise MalformedXorb(f"xorb {self._expected}: {self.error}")
        if self._pending and not self._footer:
            raise MalformedXorb(f"xorb {self._expected} ends inside a chunk")
        actual = hash_hex(xorb_hash(self._chunks))
        if actual != self._expected:
            raise DigestMismatch(f"the origin sent a xorb that hashes to {actual}, not {self._expected}")


def verify_xorb(data: bytes, expected_hex: str) -> None:
    """The whole xorb at once (tests, tools): raises DigestMismatch unless it is `expected_hex`."""
    check = XorbCheck(expected_hex)
    check.update(data)
    check.verify(len(data))


def _u24(data: bytes, at: int) -> int:
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16
