"""A market's published listing of required resources, as a dashboard serves it: one JSON document
that a test changes while pullthrough follows it, with an ETag (conditional requests answered 304),
or a failure (`status`) or a body that is not a listing. It records each request's conditional
headers and the status it answered."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ListingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listing: dict | bytes, path: str = "/api/markets/market-a/required-resources") -> None:
        self.path = path
        self.status = 200  # anything else: answered with an error body, as a failing dashboard would
        self.answered: list[tuple[str | None, int]] = []  # (If-None-Match sent, status answered)
        self._lock = threading.Lock()
        self.set(listing)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server._lock:
                    status, body, etag = server.status, server.body, server.etag
                sent = self.headers.get("If-None-Match")
                if self.path != server.path:
                    status, body = 404, b'{"error": "not found"}'
                elif status == 200 and sent == etag:
                    status, body = 304, b""
                elif status != 200:
                    body = b"<html>bad gateway</html>"
                server.answered.append((sent, status))
                self.send_response(status)
                if status in (200, 304):
                    self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def set(self, listing: dict | bytes) -> None:
        """The document served from now on (a dict as JSON, bytes as they are), with a new ETag."""
        body = listing if isinstance(listing, bytes) else json.dumps(listing).encode()
        with self._lock:
            self.body = body
            self.etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.path}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
