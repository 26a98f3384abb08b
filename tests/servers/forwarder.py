"""A forwarding front for an upstream that records every request's method, path and headers: how a
test sees what pullthrough sent (a signature, a credential, an unsigned request) to a real server
that does not log headers itself (moto)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class Forwarder(ThreadingHTTPServer):
    """Forwards every request to `target` and records (method, path, headers). `status_for(method,
    path, headers, upstream_status)` may answer another status (and an empty body) in the
    upstream's place: a real S3 refuses what moto allows."""

    def __init__(self, target: str, status_for: Callable[[str, str, dict[str, str], int], int] | None = None) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}
                recorder.seen.append((self.command, self.path, headers))
                length = int(headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = httpx.request(self.command, target + self.path, headers={
                    k: v for k, v in headers.items() if k not in ("host", "connection")}, content=body, timeout=60)
                status = status_for(self.command, self.path, headers, upstream.status_code) if status_for else upstream.status_code
                if status != upstream.status_code:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(upstream.status_code)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                        self.send_header(name, value)
                payload = upstream.content if self.command != "HEAD" else b""
                length = upstream.headers.get("content-length", "0") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"
