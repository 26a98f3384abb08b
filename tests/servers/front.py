"""An HTTP front for a real upstream (distribution): it forwards every request, and on the test's
say-so adds response headers or answers some requests itself with an error status. Counts what it
saw, so a test can tell which requests reached the upstream and which were retried."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

Match = Callable[[str, str], bool]  # (method, path) -> whether a rule applies


@dataclass
class Failure:
    """Answer `times` requests that `match` with `status` (an OCI error body), then let them through."""

    match: Match
    status: int
    times: int


@dataclass
class Front:
    target: str  # the upstream's base URL
    extra_headers: dict[str, str] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    basic_auth: tuple[str, str] | None = None  # answer 401 with a Basic challenge without these credentials
    redirect_blobs_to: str | None = None  # answer blob GETs with a 307 to this base URL + the path
    seen: list[tuple[str, str, int, str | None]] = field(default_factory=list)  # method, path, status, Authorization

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=self.target, timeout=60)
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                front._handle(self)

            do_GET = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, match: Match, status: int, times: int = 1_000_000) -> None:
        with self._lock:
            self.failures.append(Failure(match, status, times))

    def _failure_for(self, method: str, path: str) -> Failure | None:
        with self._lock:
            for failure in self.failures:
                if failure.times > 0 and failure.match(method, path):
                    failure.times -= 1
                    return failure
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        authorization = handler.headers.get("Authorization")
        if self.basic_auth is not None and authorization != _basic(*self.basic_auth):
            self.seen.append((method, path, 401, authorization))  # before the reply: the test may look once it has it
            self._reply(handler, 401, {"WWW-Authenticate": 'Basic realm="front"'}, b"")
            return
        if self.redirect_blobs_to and method == "GET" and "/blobs/sha256:" in path:
            self.seen.append((method, path, 307, authorization))
            self._reply(handler, 307, {"Location": self.redirect_blobs_to + path}, b"")
            return
        failure = self._failure_for(method, path)
        if failure is not None:
            code = {429: "TOOMANYREQUESTS"}.get(failure.status, "UNAVAILABLE")
            body = json.dumps({"errors": [{"code": code, "message": "failing on purpose"}]}).encode()
            self.seen.append((method, path, failure.status, authorization))
            self._reply(handler, failure.status, {"Content-Type": "application/json"}, body)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        upstream = self._client.request(method, path, headers=headers)
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in ("connection", "transfer-encoding", "content-encoding")}
        out.update(self.extra_headers)
        self.seen.append((method, path, upstream.status_code, authorization))
        self._reply(handler, upstream.status_code, out, upstream.content)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        handler.send_response(status)
        length = str(len(body))
        for name, value in headers.items():
            if name.lower() == "content-length":
                length = value if handler.command == "HEAD" else length  # a HEAD announces the GET's length
                continue
            handler.send_header(name, value)
        handler.send_header("Content-Length", length)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def requests(self, method: str, path_part: str) -> list[tuple[str, str, int, str | None]]:
        return [r for r in self.seen if r[0] == method and path_part in r[1]]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
