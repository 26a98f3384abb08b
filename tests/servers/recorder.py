"""An HTTP upstream the test scripts: path -> (status, headers, body), anything else a 404 with an
OCI error body; it records every request's raw path (query included)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = tuple[int, dict[str, str], bytes]
NOT_FOUND: Answer = (404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')


class Recorder(ThreadingHTTPServer):
    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers = answers or {}
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.paths.append(self.path)
                status, headers, body = recorder.answers.get(self.path.split("?")[0], NOT_FOUND)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
