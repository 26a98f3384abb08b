"""A fake Xet CAS on two loopback ports: the CAS API (`url`) and its transfer host (`transfer_url`).

Its content is real: files get in only through the real hf_xet client (`upload_bytes` / `upload_files` run
`hf_xet.upload_files` in a subprocess against this server), so xorbs and shards are what hf_xet writes, and
hf_xet (or a mirror) downloads them back the way it does from Hugging Face's CAS.

Usage::

    cas = FakeCas.start(tmp_path / "cas")         # .url, .transfer_url, .token; .stop() refuses connections
    [file_hash] = cas.upload_bytes(data)          # the real Xet file hash (what the Hub sends as xetHash)
    FakeHub.start(tmp_path / "hub", cas=cas)      # xet=True repos are then uploaded here for real
    cas.requests(kind="xorb-range")               # CasRequest(host, kind, method, target, status, range, sent,
                                                  #   received, authorized, headers); logged before the body goes
                                                  #   out, so a client that has its answer finds it logged
    cas.xorb_bytes_served()                       # body bytes the transfer host sent
    cas.plan(file_hash, start, end)               # the terms and xorb byte ranges a reconstruction answers

API (`url`), every route needs `Authorization: Bearer <token>` (401 otherwise; `add_token` adds more):
- `POST /v1/xorbs/default/{hash}` stores the xorb as sent (its chunk headers are parsed: 400 if malformed)
  -> `{"was_inserted": bool}`; `HEAD` the same path: 200/404.
- `POST /v1/xorb-grants/default/{hash}` -> 404 (hf_xet 1.8 asks first, then uploads directly).
- `POST /v2/shards` (NDJSON progress frames ending in `{"type":"result"}`) and `POST /v1/shards`
  (`{"result": 0|1}`): the shard is parsed; every term must name stored xorb chunks (400 otherwise).
- `GET /v1/chunks/default/{hash}` (global dedup) -> 404: this CAS offers no global dedup.
- `GET /v2/reconstructions/{file}` and `GET /v1/reconstructions/{file}`, with an optional `Range: bytes=`
  for part of a file (416 past the end) -> cas_types' QueryReconstructionResponse(V2) JSON; 404 unknown.
  `GET /v1/reconstructions?file_id=...` is the batch form. Set `v2 = False` to answer the v2 routes
  (reconstructions and shards) 404, as a CAS without them; hf_xet then falls back to v1.
- `POST /v1/telemetry` -> 200.
Set `unavailable = True` for an outage: both hosts answer 503.

Transfer host (`transfer_url`), no Authorization: `GET /xorbs/default/{hash}?ranges=S-E,...&Expires=&Signature=`,
the signed URLs reconstructions hand out. The signature covers hash, ranges and expiry (403 otherwise, as a
CDN answers); a `Range:` must fall inside the signed ranges (403 otherwise); one range is a 206, several a
206 `multipart/byteranges`; no `Range` sends the whole xorb.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, urlsplit

from .http_double import DoubleHandler, LoopbackHosts, LoopbackServer
from .ports import free_port
from .xet_formats import FormatError, Term, XorbLayout, is_hash, parse_shard, parse_xorb

#: hf_xet gives up at once instead of retrying for minutes when something is wrong.
FAST_FAILING_XET = {"HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "1", "HF_XET_CLIENT_RETRY_MAX_DURATION": "5s",
                    "HF_XET_CLIENT_RETRY_BASE_DELAY": "100ms"}

UPLOAD_SCRIPT = """
import json, sys, time
import hf_xet
endpoint, token, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
uploaded = hf_xet.upload_files(paths, endpoint, (token, int(time.time()) + 3600), None, None, "model")
hashed = hf_xet.hash_files(paths)
if sorted(i.hash for i in uploaded) != sorted(i.hash for i in hashed):
    sys.exit("hf_xet uploaded other hashes than it computes: %r %r" % (uploaded, hashed))
print(json.dumps([i.hash for i in hashed]))
"""


@dataclass(frozen=True)
class CasRequest:
    """One request the CAS or its transfer host answered."""

    host: str  # "cas" or "transfer"
    # cas: xorb-upload, xorb-head, xorb-grant, shard-upload, dedup, reconstruction, batch-reconstruction,
    # telemetry; transfer: xorb-range; both: other
    kind: str
    method: str
    target: str
    status: int
    range: str | None
    sent: int  # body bytes written
    received: int  # request body bytes read
    authorized: bool  # the CAS accepted its bearer token (always False on the transfer host, which takes none)
    headers: dict[str, str]  # as received, names lower-cased, an Authorization value replaced by "<present>"


@dataclass(frozen=True)
class Fetch:
    """One merged byte range of a xorb a reconstruction needs: chunks [chunk_start, chunk_end), bytes [start, end]."""

    chunk_start: int
    chunk_end: int
    byte_start: int
    byte_end: int  # inclusive, as HTTP ranges are


@dataclass(frozen=True)
class Plan:
    offset_into_first_range: int
    terms: tuple[Term, ...]
    fetches: dict[str, tuple[Fetch, ...]]  # xorb hash -> its merged ranges, by chunk start


class RangeNotSatisfiable(Exception):
    pass


def plan_reconstruction(terms: Iterable[Term], layouts: dict[str, XorbLayout], start: int = 0,
                        end: int | None = None) -> Plan:
    """Terms and xorb byte ranges for file bytes [start, end), as xet-core's `compute_reconstruction_ranges` does:
    chunks wholly outside the range are dropped from the first and last term, then each xorb's ranges are merged."""
    terms = list(terms)
    size = sum(t.unpacked_length for t in terms)
    if size == 0:
        return Plan(0, (), {})
    if start >= size:
        raise RangeNotSatisfiable
    end = size if end is None else min(end, size)
    out: list[Term] = []
    pieces: dict[str, list[Fetch]] = {}
    cumulative = 0
    first_chunk_start: int | None = None
    for term in terms:
        if cumulative >= end:
            break
        if cumulative + term.unpacked_length <= start:
            cumulative += term.unpacked_length
            continue
        layout = layouts[term.xorb_hash]
        chunk_start, chunk_end, length = term.chunk_start, term.chunk_end, term.unpacked_length
        while cumulative < start and cumulative + layout.unpacked_lengths[chunk_start] <= start:
            cumulative += layout.unpacked_lengths[chunk_start]
            length -= layout.unpacked_lengths[chunk_start]
            chunk_start += 1
        if first_chunk_start is None:
            first_chunk_start = cumulative
        while cumulative + length - layout.unpacked_lengths[chunk_end - 1] >= end:
            length -= layout.unpacked_lengths[chunk_end - 1]
            chunk_end -= 1
        byte_start, byte_end = layout.byte_range(chunk_start, chunk_end)
        out.append(Term(term.xorb_hash, length, chunk_start, chunk_end))
        pieces.setdefault(term.xorb_hash, []).append(Fetch(chunk_start, chunk_end, byte_start, byte_end - 1))
        cumulative += length
    fetches = {}
    for xorb, ranges in pieces.items():
        ranges.sort(key=lambda f: f.chunk_start)
        merged = [ranges[0]]
        for piece in ranges[1:]:
            last = merged[-1]
            if piece.chunk_start <= last.chunk_end:
                merged[-1] = Fetch(last.chunk_start, max(last.chunk_end, piece.chunk_end), last.byte_start,
                                   max(last.byte_end, piece.byte_end))
            else:
                merged.append(piece)
        fetches[xorb] = tuple(merged)
    return Plan(start - first_chunk_start, tuple(out), fetches)


def parse_byte_ranges(header: str) -> list[tuple[int | None, int | None]]:
    """`bytes=a-b,c-,-n` -> [(a, b), (c, None), (None, n)]; ValueError when malformed."""
    if not header.startswith("bytes="):
        raise ValueError(header)
    ranges = []
    for spec in header[len("bytes="):].split(","):
        first, dash, last = spec.strip().partition("-")
        if not dash or (not first and not last):
            raise ValueError(header)
        ranges.append((int(first) if first else None, int(last) if last else None))
    return ranges


def _resolve_range(spec: tuple[int | None, int | None], size: int) -> tuple[int, int]:
    """One parsed range against a size -> [start, end) (ValueError when inverted)."""
    first, last = spec
    if first is None:
        return max(size - last, 0), size
    if last is not None and last < first:
        raise ValueError("range start after its end")
    return first, size if last is None else min(last + 1, size)


class _Reply(Exception):
    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain",
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers or {}


def _json(body: object, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(body).encode(), "application/json")


class _Server(LoopbackServer):
    def __init__(self, port: int, cas: "FakeCas", role: str) -> None:
        self.cas = cas
        super().__init__(port, _Handler, role)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients drop pooled connections when they exit
            super().handle_error(request, client_address)


class FakeCas(LoopbackHosts):
    """Xorbs, files and the request log of a CAS; see the module docstring for routes and usage."""

    def __init__(self, workdir: Path, *, token: str | None = None, url_ttl: int = 3600) -> None:
        super().__init__()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        #: The bearer token the CAS accepts (what the fake Hub's xet-read-token hands out).
        self.token = token or "xet_cas_" + secrets.token_hex(16)
        self.tokens = {self.token}
        self.url_ttl = url_ttl
        #: False: the v2 routes answer 404, as a CAS that only has v1.
        self.v2 = True
        #: True: both hosts answer every request 503 (an outage; `stop()` refuses connections instead).
        self.unavailable = False
        self.xorbs: dict[str, bytes] = {}
        self.layouts: dict[str, XorbLayout] = {}
        self.files: dict[str, tuple[Term, ...]] = {}
        self._secret = secrets.token_bytes(32)
        self._log: list[CasRequest] = []
        self._lock = threading.Lock()
        self.port, self.transfer_port = free_port(), free_port()

    # -- lifecycle --------------------------------------------------------------------------------

    def _hosts(self) -> dict[str, int]:
        return {"cas": self.port, "transfer": self.transfer_port}

    def _server(self, port: int, role: str) -> _Server:
        return _Server(port, self, role)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def transfer_url(self) -> str:
        return f"http://127.0.0.1:{self.transfer_port}"

    def add_token(self, token: str) -> None:
        self.tokens.add(token)

    # -- content, through the real client ---------------------------------------------------------

    def upload_files(self, paths: Iterable[Path]) -> list[str]:
        """Upload files with the real `hf_xet.upload_files` (in a subprocess) -> their Xet file hashes, in order.
        Uploads share one hf_xet cache, so a later upload dedups against earlier ones as a real client does."""
        paths = [str(p) for p in paths]
        if not paths:
            return []
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(FAST_FAILING_XET, HF_XET_CACHE=str(self.workdir / "client-xet-cache"),
                   HF_HOME=str(self.workdir / "client-hf-home"))
        done = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, self.url, self.token, *paths], env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"hf_xet upload failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def upload_bytes(self, *blobs: bytes) -> list[str]:
        """`upload_files` for in-memory contents."""
        with tempfile.TemporaryDirectory(dir=self.workdir) as folder:
            paths = []
            for n, blob in enumerate(blobs):
                path = Path(folder) / f"blob-{n}"
                path.write_bytes(blob)
                paths.append(path)
            return self.upload_files(paths)

    def file_size(self, file_hash: str) -> int:
        return sum(t.unpacked_length for t in self.files[file_hash])

    # -- traffic ----------------------------------------------------------------------------------

    def record(self, request: CasRequest) -> CasRequest:
        with self._lock:
            self._log.append(request)
            with open(self.workdir / "fake_cas.log", "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {request.host} {request.method} {request.target} "
                          f"{request.status} {request.kind} range={request.range or '-'} sent={request.sent} "
                          f"received={request.received}\n")
        return request

    def amend(self, request: CasRequest, sent: int) -> None:
        """A logged answer whose connection broke after `sent` body bytes."""
        with self._lock:
            for n, logged in enumerate(self._log):
                if logged is request:
                    self._log[n] = dataclasses.replace(logged, sent=sent)

    def requests(self, *, host: str | None = None, kind: str | Iterable[str] | None = None,
                 method: str | None = None) -> list[CasRequest]:
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind is not None else None
        with self._lock:
            log = list(self._log)
        return [r for r in log if (host is None or r.host == host) and (kinds is None or r.kind in kinds)
                and (method is None or r.method == method)]

    def count(self, **filters) -> int:
        return len(self.requests(**filters))

    def xorb_bytes_served(self) -> int:
        """Body bytes the transfer host sent (xorb ranges)."""
        return sum(r.sent for r in self.requests(host="transfer", kind="xorb-range"))

    def xorb_bytes_received(self) -> int:
        """Xorb bytes uploads sent (successful POSTs only)."""
        return sum(r.received for r in self.requests(kind="xorb-upload", method="POST") if r.status == 200)

    def reset_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # -- what the routes compute ------------------------------------------------------------------

    def store_xorb(self, xorb_hash: str, data: bytes) -> bool:
        """Keep a xorb as sent -> True when it was new (FormatError when its chunks do not parse)."""
        layout = parse_xorb(data)
        with self._lock:
            if xorb_hash in self.xorbs:
                return False
            self.xorbs[xorb_hash] = data
            self.layouts[xorb_hash] = layout
            return True

    def store_shard(self, data: bytes) -> bool:
        """Register the files of an uploaded shard -> True when one was new (FormatError when invalid)."""
        shard = parse_shard(data)
        with self._lock:
            for xorb in shard.xorbs.values():
                layout = self.layouts.get(xorb.xorb_hash)
                if layout is None:
                    raise FormatError(f"shard lists xorb {xorb.xorb_hash}, which was not uploaded")
                if layout.unpacked_lengths != xorb.chunk_lengths:
                    raise FormatError(f"shard's chunks of xorb {xorb.xorb_hash} do not match the xorb")
            for file_hash, terms in shard.files.items():
                for term in terms:
                    layout = self.layouts.get(term.xorb_hash)
                    if layout is None or term.chunk_end > layout.num_chunks:
                        raise FormatError(f"file {file_hash} uses chunks the CAS does not have")
                    if sum(layout.unpacked_lengths[term.chunk_start:term.chunk_end]) != term.unpacked_length:
                        raise FormatError(f"file {file_hash}: a term's length does not match its chunks")
            new = [f for f in shard.files if f not in self.files]
            self.files.update(shard.files)
            return bool(new)

    def plan(self, file_hash: str, start: int = 0, end: int | None = None) -> Plan:
        with self._lock:
            terms = self.files[file_hash]
            layouts = {t.xorb_hash: self.layouts[t.xorb_hash] for t in terms}
        return plan_reconstruction(terms, layouts, start, end)

    def sign(self, xorb_hash: str, ranges: str, expires: int) -> str:
        return hmac.new(self._secret, f"{xorb_hash}\0{ranges}\0{expires}".encode(), hashlib.sha256).hexdigest()

    def fetch_url(self, xorb_hash: str, fetches: Iterable[Fetch]) -> str:
        """A signed, expiring transfer URL for some byte ranges of a xorb."""
        ranges = ",".join(f"{f.byte_start}-{f.byte_end}" for f in fetches)
        expires = int(time.time()) + self.url_ttl
        return (f"{self.transfer_url}/xorbs/default/{xorb_hash}?ranges={ranges}&Expires={expires}"
                f"&Signature={self.sign(xorb_hash, ranges, expires)}")

    def reconstruction_v1(self, plan: Plan) -> dict:
        return {
            "offset_into_first_range": plan.offset_into_first_range,
            "terms": [_term_json(t) for t in plan.terms],
            "fetch_info": {xorb: [{"range": {"start": f.chunk_start, "end": f.chunk_end},
                                   "url": self.fetch_url(xorb, [f]),
                                   "url_range": {"start": f.byte_start, "end": f.byte_end}} for f in fetches]
                           for xorb, fetches in plan.fetches.items()},
        }

    def reconstruction_v2(self, plan: Plan) -> dict:
        return {
            "offset_into_first_range": plan.offset_into_first_range,
            "terms": [_term_json(t) for t in plan.terms],
            "xorbs": {xorb: [{"url": self.fetch_url(xorb, fetches),
                              "ranges": [{"chunks": {"start": f.chunk_start, "end": f.chunk_end},
                                          "bytes": {"start": f.byte_start, "end": f.byte_end}} for f in fetches]}]
                      for xorb, fetches in plan.fetches.items()},
        }


def _term_json(term: Term) -> dict:
    return {"hash": term.xorb_hash, "unpacked_length": term.unpacked_length,
            "range": {"start": term.chunk_start, "end": term.chunk_end}}


class _Handler(DoubleHandler):
    server: _Server

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self) -> None:
        self.kind = "other"
        self.authorized = False
        try:
            self.body = self._read_body()
        except (ValueError, ConnectionError):
            self.close_connection = True
            return
        try:
            if self.server.cas.unavailable:
                raise _Reply(503, b"Service Unavailable")
            if self.server.role == "cas":
                self._cas_route()
            else:
                self._transfer_route()
            raise _Reply(404, b"Not Found")
        except _Reply as reply:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, reply: _Reply) -> None:
        # Recorded before the body goes out, so a client that has its answer always finds it in the log;
        # amended below when the connection breaks before every byte was written.
        body_size = 0 if self.command == "HEAD" else len(reply.body)
        headers = {name.lower(): "<present>" if name.lower() == "authorization" else value
                   for name, value in self.headers.items()}
        entry = self.server.cas.record(CasRequest(self.server.role, self.kind, self.command, self.path, reply.status,
                                                  self.headers.get("Range"), body_size, len(self.body),
                                                  self.authorized, headers))
        self.sent = 0
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("X-Request-Id", secrets.token_hex(8))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self._write_body(reply.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.server.cas.amend(entry, self.sent)

    # -- CAS API ----------------------------------------------------------------------------------

    def _cas_route(self) -> None:
        cas = self.server.cas
        split = urlsplit(self.path)
        parts = split.path.split("/")[1:]
        version = parts[0] if parts else ""
        route = tuple(parts[1:])
        self.kind = self._kind(version, route)
        if self._bearer_token() not in cas.tokens:
            raise _json({"error": "unauthorized"}, 401)
        self.authorized = True
        if version == "v2" and not cas.v2:
            raise _Reply(404, b"Not Found")
        method = self.command
        if self.kind in ("xorb-upload", "xorb-head", "xorb-grant", "dedup") and (
                route[1] != "default" or not is_hash(route[2])):
            raise _Reply(400, b"invalid key")
        if self.kind == "xorb-upload" and method == "POST":
            try:
                inserted = cas.store_xorb(route[2], self.body)
            except FormatError as error:
                raise _Reply(400, str(error).encode())
            raise _json({"was_inserted": inserted})
        if self.kind == "xorb-upload" and method == "HEAD":
            self.kind = "xorb-head"
            raise _Reply(200 if route[2] in cas.xorbs else 404)
        if self.kind == "xorb-grant" and method == "POST":
            raise _Reply(404, b"Not Found")
        if self.kind == "shard-upload" and method == "POST":
            self._shard_upload(version)
        if self.kind == "dedup" and method == "GET":
            raise _Reply(404, b"Shard not found")
        if self.kind == "reconstruction" and method == "GET":
            self._reconstruction(version, route[1])
        if self.kind == "batch-reconstruction" and method == "GET":
            self._batch_reconstruction(parse_qs(split.query).get("file_id", []))
        if self.kind == "telemetry" and method == "POST":
            raise _json({})

    @staticmethod
    def _kind(version: str, route: tuple[str, ...]) -> str:
        if version not in ("v1", "v2"):
            return "other"
        if len(route) == 3 and route[0] == "xorbs" and version == "v1":
            return "xorb-upload"
        if len(route) == 3 and route[0] == "xorb-grants" and version == "v1":
            return "xorb-grant"
        if len(route) == 3 and route[0] == "chunks" and version == "v1":
            return "dedup"
        if route == ("shards",):
            return "shard-upload"
        if len(route) == 2 and route[0] == "reconstructions":
            return "reconstruction"
        if route == ("reconstructions",) and version == "v1":
            return "batch-reconstruction"
        if route == ("telemetry",) and version == "v1":
            return "telemetry"
        return "other"

    def _shard_upload(self, version: str) -> None:
        cas = self.server.cas
        try:
            new = cas.store_shard(self.body)
        except FormatError as error:
            raise _Reply(400, str(error).encode())
        if version == "v1":
            raise _json({"result": 1 if new else 0})
        frames = [{"type": "validating", "verified": 0, "total": 1}, {"type": "validating", "verified": 1, "total": 1},
                  {"type": "committing", "stage": "uploading"}, {"type": "committing", "stage": "syncing"},
                  {"type": "result"}]
        raise _Reply(200, b"".join(json.dumps(f).encode() + b"\n" for f in frames), "application/x-ndjson")

    def _reconstruction(self, version: str, file_hash: str) -> None:
        cas = self.server.cas
        if not is_hash(file_hash):
            raise _Reply(400, b"invalid file id")
        if file_hash not in cas.files:
            raise _Reply(404, b"file not found")
        start, end = 0, None
        header = self.headers.get("Range")
        if header:
            try:
                specs = parse_byte_ranges(header)
                if len(specs) != 1:
                    raise ValueError(header)
                start, end = _resolve_range(specs[0], cas.file_size(file_hash))
            except ValueError:
                raise _Reply(416, b"invalid range")
        try:
            plan = cas.plan(file_hash, start, end)
        except RangeNotSatisfiable:
            raise _Reply(416, b"Range not satisfiable")
        raise _json(cas.reconstruction_v2(plan) if version == "v2" else cas.reconstruction_v1(plan))

    def _batch_reconstruction(self, file_ids: list[str]) -> None:
        cas = self.server.cas
        files, fetch_info = {}, {}
        for file_hash in file_ids:
            if file_hash in cas.files:
                body = cas.reconstruction_v1(cas.plan(file_hash))
                files[file_hash] = body["terms"]
                for xorb, infos in body["fetch_info"].items():
                    fetch_info.setdefault(xorb, []).extend(infos)
        raise _json({"files": files, "fetch_info": fetch_info})

    # -- transfer host ----------------------------------------------------------------------------

    def _transfer_route(self) -> None:
        cas = self.server.cas
        split = urlsplit(self.path)
        parts = split.path.split("/")[1:]
        if self.command not in ("GET", "HEAD") or len(parts) != 3 or parts[:2] != ["xorbs", "default"]:
            return
        self.kind = "xorb-range"
        xorb_hash = parts[2]
        query = parse_qs(split.query)
        try:
            ranges, expires, signature = query["ranges"][0], int(query["Expires"][0]), query["Signature"][0]
        except (KeyError, ValueError):
            raise _Reply(403, b"<Error><Code>AccessDenied</Code><Message>Missing signature</Message></Error>",
                         "application/xml")
        if not hmac.compare_digest(signature, cas.sign(xorb_hash, ranges, expires)) or expires < time.time():
            raise _Reply(403, b"<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>",
                         "application/xml")
        data = cas.xorbs.get(xorb_hash)
        if data is None:
            raise _Reply(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        granted = [tuple(int(n) for n in r.split("-")) for r in ranges.split(",")]
        header = self.headers.get("Range")
        if not header:
            raise _Reply(200, data, "application/octet-stream", {"Accept-Ranges": "bytes"})
        try:
            wanted = [_resolve_range(spec, len(data)) for spec in parse_byte_ranges(header)]
        except ValueError:
            raise _Reply(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
        for start, end in wanted:
            if start >= end:
                raise _Reply(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
            if not any(first <= start and end - 1 <= last for first, last in granted):
                raise _Reply(403, b"<Error><Code>AccessDenied</Code><Message>Range not signed</Message></Error>",
                             "application/xml")
        if len(wanted) == 1:
            start, end = wanted[0]
            raise _Reply(206, data[start:end], "application/octet-stream",
                         {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "Accept-Ranges": "bytes"})
        boundary = "xet_multipart_" + secrets.token_hex(8)
        body = b"".join(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Range: bytes {start}-{end - 1}/{len(data)}\r\n\r\n".encode() + data[start:end]
                        + b"\r\n" for start, end in wanted) + f"--{boundary}--\r\n".encode()
        raise _Reply(206, body, f"multipart/byteranges; boundary={boundary}")
