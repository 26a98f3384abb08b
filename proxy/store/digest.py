"""Content digests: the only names that reach the cache's filesystem.

A Digest can only be built from a string that matched the strict grammar, so a path
made from one never contains a separator or a dot segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SHA256 = re.compile(r"^sha256:([a-f0-9]{64})$")
# The OCI grammar for any algorithm; used to tell "malformed" from "unsupported".
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


class InvalidDigest(ValueError):
    """Not a digest at all."""


class UnsupportedDigest(ValueError):
    """A well-formed digest of an algorithm the cache does not store (only sha256)."""


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _SHA256.match(text)
        if match:
            return cls("sha256", match.group(1))
        if _ANY_DIGEST.match(text) and len(text) <= 256 and not text.startswith("sha256:"):
            raise UnsupportedDigest(f"digest algorithm {text.split(':', 1)[0]!r} is not supported (only sha256)")
        raise InvalidDigest("invalid digest")

    @classmethod
    def from_hex(cls, hex_digest: str) -> Digest:
        return cls.parse(f"sha256:{hex_digest}")

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
