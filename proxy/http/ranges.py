"""The Range header (RFC 9110 §14): one byte range; anything else is served whole."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RANGE_HEADER = 200  # "bytes=" and two 20-digit numbers fit many times over; anything longer is ignored


class RangeNotSatisfiable(Exception):
    """The range starts at or past the end of the representation (416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"requested range not satisfiable for {size} bytes")
        self.size = size


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The requested range, or None to serve the whole body.

    Malformed headers, overlong ones and multi-range requests are ignored, as RFC 9110 allows; a
    range that starts past the end raises RangeNotSatisfiable. Parsing is linear in the header's
    length (no regular expression that can backtrack), and the header's length is bounded anyway.
    """
    if not header or len(header) > MAX_RANGE_HEADER:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or first == last == "":
        return None
    if not first.isascii() or not last.isascii():
        return None  # str.isdigit takes other scripts' digits too
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(size - suffix, 0), size)
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, end)
