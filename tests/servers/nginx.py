"""nginx serving static files from one directory: a real HTTP origin for the /web/ and IPFS
gateway tests (with an access log to count requests), and the benchmark's speed-of-light
reference for a 1 GiB GET."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.servers.ports import free_port, start_process, stop_process, wait_http, wait_port_closed


class Nginx:
    """A foreground nginx with one worker on a free loopback port, its root at `root`."""

    def __init__(self, workdir: Path, root: Path, port: int, access_log: bool = False) -> None:
        self.workdir = workdir
        self.root = root
        self.port = port
        self.access_log = access_log
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, root: Path, *, access_log: bool = False) -> "Nginx":
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(workdir, root, free_port(), access_log)
        (workdir / "nginx.conf").write_text(server._config())
        server._proc = start_process(
            ["nginx", "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "stderr.log", "ab"),
        )
        wait_http(server.url + "/", timeout=15, proc=server._proc, log_path=workdir / "error.log")
        return server

    def _config(self) -> str:
        temp = self.workdir / "temp"
        temp.mkdir(exist_ok=True)
        # Running as root, workers would switch to `nobody`, who may not read the benchmark files.
        user = "user root root;" if os.geteuid() == 0 else ""
        return f"""
{user}
daemon off;
master_process on;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format counted '$request_method $request_uri $status $body_bytes_sent';
    {f"access_log {self.workdir}/access.log counted;" if self.access_log else "access_log off;"}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location = / {{ return 200 "ok\\n"; }}
    }}
}}
"""

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, uri, status) of every request logged so far (with access_log=True)."""
        log = self.workdir / "access.log"
        if not log.exists():
            return []
        entries = []
        for line in log.read_text().splitlines():
            method, uri, status, _ = line.split(" ")
            entries.append((method, uri, int(status)))
        return entries

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
            wait_port_closed(self.port)
