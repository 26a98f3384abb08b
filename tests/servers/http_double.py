"""What the fake upstreams (fake_hub.py, fake_cas.py) share: HTTP/1.1 hosts on loopback ports, one per role,
that can go down (connections refused, live ones cut) and come back on the same ports.

Only the plumbing lives here; what each fake answers, and how it logs it, stays in its own module.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self


class LoopbackServer(ThreadingHTTPServer):
    """One host of a fake on 127.0.0.1, playing `role`; it knows its open connections so it can cut them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], role: str) -> None:
        self.role = role
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), handler)

    def process_request(self, request, client_address):
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LoopbackHosts:
    """Base of a fake upstream: its hosts (`_hosts()`: role -> port), each served by a thread of its own.
    `_servers` is public enough for the benchmarks, which swap a server's RequestHandlerClass."""

    def __init__(self) -> None:
        self._servers: list[LoopbackServer] = []
        self._threads: list[threading.Thread] = []

    @classmethod
    def start(cls, workdir: Path, **options) -> Self:
        double = cls(workdir, **options)
        double.restart()
        return double

    def _hosts(self) -> dict[str, int]:
        raise NotImplementedError

    def _server(self, port: int, role: str) -> LoopbackServer:
        raise NotImplementedError

    def restart(self) -> None:
        """Serve (again, after `stop()`) on the same ports."""
        if self._servers:
            return
        for role, port in self._hosts().items():
            server = self._server(port, role)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)

    def stop(self) -> None:
        """Unreachable: every port refuses connections and open keep-alive connections are cut."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.cut_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    @property
    def running(self) -> bool:
        return bool(self._servers)


class DoubleHandler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 with GET, HEAD and POST going to `_dispatch`; the fake keeps its own log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: LoopbackServer

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _bearer_token(self) -> str | None:
        value = self.headers.get("Authorization")
        if value and value.lower().startswith("bearer "):
            return value[7:].strip()
        return None

    def _write_body(self, body: bytes, step: int = 1 << 20, pause: float = 0.0) -> None:
        """The body in `step`-byte writes, `pause` seconds after each (a slow link). `self.sent` counts the
        bytes written, so it is right also when the connection breaks part way."""
        self.sent = 0
        view = memoryview(body)
        for start in range(0, len(view), step):
            piece = view[start:start + step]
            self.wfile.write(piece)
            self.sent += len(piece)
            if pause:
                time.sleep(pause)
