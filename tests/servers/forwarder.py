"""A forwarding front for an upstream that records every request's method, path and headers: how a
test sees what pullthrough sent (a signature, a credential, an unsigned request) to a real server
that does not log headers itself (moto)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.servers.recorder import LoopbackUpstream, QuietHandler

#: Not relayed: the hop's own framing, which this server writes anew (httpx has already decoded the body).
HOP_HEADERS = ("transfer-encoding", "connection", "content-length", "content-encoding")


class Forwarder(LoopbackUpstream):
    """Forwards every request to `target` and records (method, path, headers). `status_for(method,
    path, headers, upstream_status)` may answer another status (and an empty body) in the
    upstream's place: a real S3 refuses what moto allows."""

    def __init__(self, target: str, status_for: Callable[[str, str, dict[str, str], int], int] | None = None) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(QuietHandler):
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
                    self.send_answer(status, {}, b"")
                    return
                relayed = {name: value for name, value in upstream.headers.items() if name.lower() not in HOP_HEADERS}
                head_length = upstream.headers.get("content-length", "0") if self.command == "HEAD" else None
                self.send_answer(upstream.status_code, relayed, upstream.content, head_length)

            do_GET = do_HEAD = _forward

        super().__init__(Handler)
