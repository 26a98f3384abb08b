"""Request paths, decoded exactly once and checked before anything else sees them.

Every route takes its segments from the raw request path and percent-decodes each one once. A
segment is refused when it decodes to "." or "..", or holds "/", "\\", NUL or another control
character: an encoded separator or dot segment is how a path climbs out of its prefix once a later
layer (an HTTP client normalizing a URL, an upstream decoding again) reads it differently. Upstream
URLs are built from the checked segments, each quoted again, so that no HTTP client can normalize
them into something else.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

from starlette.types import Scope

MAX_PATH = 8192


class UnsafePath(ValueError):
    """A request path no route may act on; each source words it as its protocol's 400."""


def raw_path(scope: Scope) -> str:
    """The request path as the client sent it (still percent-encoded), without the query."""
    raw = scope.get("raw_path")
    text = raw.decode("latin-1") if raw else quote(scope["path"])
    return text.split("?", 1)[0]


def raw_segments_after(scope: Scope, prefix: str) -> list[str]:
    """The raw segments after `prefix` (a route's fixed start, such as "/s3/"), still encoded."""
    path = raw_path(scope)
    if len(path) > MAX_PATH:
        raise UnsafePath("request path too long")
    if not path.startswith(prefix):
        raise UnsafePath(f"not a path under {prefix}")  # the prefix itself was sent encoded
    return path[len(prefix):].split("/")


def decode_segment(raw: str, *, slashes: bool = False) -> str:
    """One segment, percent-decoded once; UnsafePath when it could climb or hide. With `slashes`,
    an encoded "/" is allowed inside (HF revisions such as refs%2Fpr%2F1), but no part between
    slashes may then be empty or a dot segment."""
    if "%" not in raw and "\\" not in raw and raw not in (".", "..") and raw.isprintable():
        return raw  # nothing encoded, nothing to refuse: the common case, on every request
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise UnsafePath("a path segment is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or "\\" in value:
        raise UnsafePath("a path segment holds a control character or a backslash")
    parts = value.split("/") if slashes else [value]
    if not slashes and "/" in value:
        raise UnsafePath("a path segment holds an encoded slash")
    if any(part in (".", "..") for part in parts) or (slashes and "" in parts):
        raise UnsafePath("a path segment is a dot segment")
    return value


def decode_segments(raws: Iterable[str]) -> list[str]:
    return [decode_segment(raw) for raw in raws]


def quote_segment(segment: str) -> str:
    """A checked segment for an upstream URL: every reserved character encoded, "/" included."""
    return quote(segment, safe="")


def quote_segments(segments: Iterable[str]) -> str:
    return "/".join(quote_segment(s) for s in segments)
