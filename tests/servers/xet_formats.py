"""Xet's binary formats as a CAS reads them: merkle hash strings, uploaded shards, and xorb chunk headers.

Layouts follow huggingface/xet-core (`merklehash/data_hash.rs`, `metadata_shard/{shard_format,file_structs,
xorb_structs}.rs`, `xorb_object/xorb_chunk_format.rs`); nothing here hashes or decompresses (no blake3, no lz4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HASH_SIZE = 32
ENTRY_SIZE = 48  # every shard record (file header/entry, xorb header/entry) is a hash + 16 bytes
SHARD_TAG = bytes([*b"HFRepoMetaData", 0, 85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74,
                   169])
SHARD_HEADER_SIZE = 48  # tag, version u64, footer_size u64
BOOKEND = b"\xff" * HASH_SIZE
FILE_FLAG_WITH_VERIFICATION = 1 << 31
FILE_FLAG_WITH_METADATA_EXT = 1 << 30
CHUNK_HEADER_SIZE = 8
MAX_CHUNK_SIZE = 128 * 1024
COMPRESSION_SCHEMES = (0, 1, 2)  # none, LZ4, byte-grouping-4 + LZ4
XORB_FOOTER_IDENT = b"XETBLOB"


class FormatError(ValueError):
    """Bytes that are not a valid shard or xorb."""


def hash_hex(raw: bytes) -> str:
    """A merkle hash's string form: four little-endian u64 words, each printed as 16 hex digits."""
    if len(raw) != HASH_SIZE:
        raise FormatError(f"a hash is {HASH_SIZE} bytes, not {len(raw)}")
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, HASH_SIZE, 8))


def hash_raw(text: str) -> bytes:
    """The inverse of `hash_hex` (raises FormatError for anything but 64 hex digits)."""
    if len(text) != 64:
        raise FormatError("a hash is 64 hex digits")
    try:
        return b"".join(bytes.fromhex(text[i:i + 16])[::-1] for i in range(0, 64, 16))
    except ValueError as error:
        raise FormatError(str(error)) from None


def is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Term:
    """A file segment: chunks [chunk_start, chunk_end) of a xorb, `unpacked_length` bytes once decompressed."""

    xorb_hash: str
    unpacked_length: int
    chunk_start: int
    chunk_end: int


@dataclass(frozen=True)
class ShardXorb:
    """A xorb as a shard lists it: each chunk's hash and uncompressed length (shards give no stored offsets)."""

    xorb_hash: str
    chunk_hashes: tuple[str, ...]
    chunk_lengths: tuple[int, ...]


@dataclass(frozen=True)
class Shard:
    files: dict[str, tuple[Term, ...]]  # file hash -> terms in order
    xorbs: dict[str, ShardXorb]


def parse_shard(data: bytes) -> Shard:
    """An uploaded shard: header, file info section, xorb info section, each ended by a bookend (no footer needed)."""
    if len(data) < SHARD_HEADER_SIZE or data[:32] != SHARD_TAG:
        raise FormatError("not a shard (wrong magic number)")
    version, _footer_size = struct.unpack_from("<QQ", data, 32)
    if version != 2:
        raise FormatError(f"shard header version {version}, expected 2")
    offset = SHARD_HEADER_SIZE
    files: dict[str, tuple[Term, ...]] = {}
    while True:
        raw, flags, count = _record(data, offset, "<II")
        offset += ENTRY_SIZE
        if raw == BOOKEND:
            break
        terms = []
        for _ in range(count):
            xorb, _xorb_flags, length, start, end = _record(data, offset, "<IIII")
            offset += ENTRY_SIZE
            if start >= end:
                raise FormatError("a file term with an empty chunk range")
            terms.append(Term(hash_hex(xorb), length, start, end))
        # verification entries (one per term) and the sha256 extension are not needed to serve the file
        offset += ENTRY_SIZE * ((count if flags & FILE_FLAG_WITH_VERIFICATION else 0)
                                + (1 if flags & FILE_FLAG_WITH_METADATA_EXT else 0))
        files[hash_hex(raw)] = tuple(terms)
    xorbs: dict[str, ShardXorb] = {}
    while True:
        raw, _flags, count, _bytes_in_xorb, _bytes_on_disk = _record(data, offset, "<IIII")
        offset += ENTRY_SIZE
        if raw == BOOKEND:
            break
        hashes, lengths = [], []
        for _ in range(count):
            chunk, _start, length, _chunk_flags, _unused = _record(data, offset, "<IIII")
            offset += ENTRY_SIZE
            hashes.append(hash_hex(chunk))
            lengths.append(length)
        xorbs[hash_hex(raw)] = ShardXorb(hash_hex(raw), tuple(hashes), tuple(lengths))
    return Shard(files, xorbs)


def _record(data: bytes, offset: int, layout: str) -> tuple:
    if offset + ENTRY_SIZE > len(data):
        raise FormatError("shard truncated")
    return (data[offset:offset + HASH_SIZE], *struct.unpack_from(layout, data, offset + HASH_SIZE))


@dataclass(frozen=True)
class XorbLayout:
    """Where each chunk of a stored xorb starts (`offsets[i]`; `offsets[-1]` is the end of the last chunk)."""

    offsets: tuple[int, ...]
    unpacked_lengths: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.unpacked_lengths)

    def byte_range(self, chunk_start: int, chunk_end: int) -> tuple[int, int]:
        """Bytes [start, end) holding chunks [chunk_start, chunk_end), headers included."""
        return self.offsets[chunk_start], self.offsets[chunk_end]


def parse_xorb(data: bytes) -> XorbLayout:
    """Walk a xorb's 8-byte chunk headers (version, compressed length u24, scheme, uncompressed length u24) up to
    its end or its footer (`XETBLOB`), as the CAS does when it indexes an upload."""
    offsets, lengths = [0], []
    position = 0
    while position < len(data):
        if data[position:position + len(XORB_FOOTER_IDENT)] == XORB_FOOTER_IDENT:
            break
        header = data[position:position + CHUNK_HEADER_SIZE]
        if len(header) < CHUNK_HEADER_SIZE:
            raise FormatError("xorb truncated inside a chunk header")
        version, scheme = header[0], header[4]
        stored = int.from_bytes(header[1:4], "little")
        unpacked = int.from_bytes(header[5:8], "little")
        if version != 0 or scheme not in COMPRESSION_SCHEMES or unpacked > MAX_CHUNK_SIZE or stored > 2 * MAX_CHUNK_SIZE:
            raise FormatError(f"bad chunk header at byte {position}")
        position += CHUNK_HEADER_SIZE + stored
        if position > len(data):
            raise FormatError("xorb truncated inside a chunk")
        offsets.append(position)
        lengths.append(unpacked)
    if not lengths:
        raise FormatError("a xorb without chunks")
    return XorbLayout(tuple(offsets), tuple(lengths))
