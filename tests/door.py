"""Driving the store's door in-process: scripted upstream bodies, requests for them, and the bytes a
client of `Store.serve` receives (the response run as an ASGI app, as uvicorn would run it)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from proxy.store.digest import Digest
from proxy.store.events import Outcome
from proxy.store.index import Index, make_engine
from proxy.store.records import Origin, ReadScope
from proxy.store.requests import BlobRequest
from proxy.store.store import Store

ORIGIN = Origin("test", "upstream.test")
SCOPE = ReadScope("test:repo")


class ScriptedUpstream:
    """An upstream body whose bytes the test can hold back, counting how often it was opened."""

    def __init__(self, data: bytes, *, chunk: int = 256 * 1024, announce: int | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.size = len(data) if announce is None else announce
        self.opens = 0
        self.pos = 0
        self.release = threading.Event()  # set: bytes flow; clear: the reader blocks at stall_at
        self.release.set()
        self.stall_at = 0  # offset from which bytes wait for release
        self.closed = False
        self.aborted = False

    async def open(self) -> ScriptedUpstream:
        self.opens += 1
        return self

    def read_into(self, buffer: bytearray) -> int:
        if self.pos >= self.stall_at and not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the upstream")
        data = self.data[self.pos : self.pos + min(len(buffer), self.chunk)]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def abort(self) -> None:
        self.aborted = True
        self.release.set()

    def close(self) -> None:
        self.closed = True


def digest_of(data: bytes) -> Digest:
    return Digest.from_hex(hashlib.sha256(data).hexdigest())


def as_is(exc: BaseException) -> Exception:
    """The error translation of a test: failures reach the test unchanged."""
    assert isinstance(exc, Exception)
    return exc


def request_for(digest: Digest, upstream: ScriptedUpstream, *, scope: ReadScope = SCOPE, **fields: object) -> BlobRequest:
    return BlobRequest(scope=scope, origin=ORIGIN, opener=upstream.open, translate=as_is, digest=digest, **fields)  # type: ignore[arg-type]


def new_store(tmp_path: Path, index_url: str, **options: object) -> Store:
    """A store on a migrated index (the `index_url` fixture: SQLite, or PostgreSQL in CI's second pass)."""
    events = options.pop("events", None) or Events()
    return Store(tmp_path / "cache", Index(make_engine(index_url)), node="node", events=events, **options)  # type: ignore[arg-type]


@dataclass
class Events:
    """The store's events, recorded."""

    requests: list[tuple[str, Outcome, bool]] = field(default_factory=list)
    sent: int = 0
    fetched_bytes: int = 0
    fills: list[tuple[int, bool]] = field(default_factory=list)

    def request(self, origin: Origin, scope: ReadScope, outcome: Outcome, *, joined: bool) -> None:
        self.requests.append((str(scope), outcome, joined))

    def sent_from_cache(self, origin: Origin, scope: ReadScope, nbytes: int) -> None:
        self.sent += nbytes

    def fetched(self, origin: Origin, nbytes: int) -> None:
        self.fetched_bytes += nbytes

    def fill_finished(self, origin: Origin, nbytes: int, seconds: float, ok: bool) -> None:
        self.fills.append((nbytes, ok))

    def fill_followed(self, origin: Origin) -> None:
        pass

    def fill_taken_over(self, origin: Origin) -> None:
        pass

    def fill_began(self, origin: Origin) -> None:
        pass

    def fill_ended(self, origin: Origin) -> None:
        pass


@dataclass
class Received:
    status: int
    headers: dict[str, str]
    body: bytes
    error: BaseException | None = None  # the response broke off (a truncated body)


async def receive_response(  # type: ignore[no-untyped-def]
    response, *, method: str = "GET", first_chunk: asyncio.Event | None = None, hold: asyncio.Event | None = None
) -> Received:
    """Run a Starlette response as the server would, collecting what a client receives. With
    `hold`, the client stops reading after its first bytes until the event is set."""
    received = Received(0, {}, b"")

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never hangs up
        return {}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            received.status = message["status"]
            received.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            received.body += message.get("body", b"")
            if first_chunk is not None and received.body:
                first_chunk.set()
            if hold is not None and received.body:
                await hold.wait()

    scope = {"type": "http", "method": method, "headers": [], "path": "/", "query_string": b""}
    try:
        await response(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - a broken-off response is what some tests look for
        received.error = exc
    return received


async def get(store: Store, request: BlobRequest, *, range_header: str | None = None, method: str = "GET") -> Received:
    response = await store.serve(request, method=method, range_header=range_header, headers={}, media_type="application/octet-stream")
    return await receive_response(response, method=method)
