"""An HTTP upstream the test scripts: path -> (status, headers, body), anything else a 404 with an
OCI error body; it records every request's raw path (query included). Its server and response
writing also serve forwarder.py."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = tuple[int, dict[str, str], bytes]
NOT_FOUND: Answer = (404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing (the test keeps its own record) and answers with `send_answer`."""

    def send_answer(self, status: int, headers: dict[str, str], body: bytes, length: str | None = None) -> None:
        """`headers` then Content-Length, of `body` unless `length` names another (a HEAD relaying a GET's);
        a HEAD gets no body."""
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body)) if length is None else length}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class LoopbackUpstream(ThreadingHTTPServer):
    """Serves `handler` on a free 127.0.0.1 port from a daemon thread, from the moment it is made."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Recorder(LoopbackUpstream):
    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers = answers or {}
        self.paths: list[str] = []
        recorder = self

        class Handler(QuietHandler):
            def _answer(self) -> None:
                recorder.paths.append(self.path)
                self.send_answer(*recorder.answers.get(self.path.split("?")[0], NOT_FOUND))

            do_GET = do_HEAD = do_POST = _answer

        super().__init__(Handler)
