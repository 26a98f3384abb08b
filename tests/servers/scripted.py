"""An HTTP upstream whose answers a test scripts, and changes while it runs: a status for every
request, an answer that never comes (a hung upstream), or a sequence per path. It records when each
request arrived, so a test can measure the gap between a request and its retry."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = tuple[int, dict[str, str], bytes]
HANG = None  # an answer that never comes: the connection stays open until the server closes
Script = Callable[[str, str], "Answer | None"]  # (method, path) -> the answer


def always(status: int) -> Script:
    """Every request answered with `status` and an OCI error body."""
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"failing on purpose"}]}'
    return lambda method, path: (status, {"Content-Type": "application/json"}, body)


class ScriptedUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script, port: int = 0) -> None:
        self.script = script
        self.seen: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path) in arrival order
        self._released = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                upstream.seen.append((time.monotonic(), self.command, self.path))
                answer = upstream.script(self.command, self.path)
                if answer is HANG:
                    upstream._released.wait()
                    self.close_connection = True
                    return
                status, headers, body = answer
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, path_part: str = "") -> list[tuple[float, str, str]]:
        return [entry for entry in self.seen if path_part in entry[2]]

    def close(self) -> None:
        self._released.set()
        self.shutdown()
        self.server_close()
