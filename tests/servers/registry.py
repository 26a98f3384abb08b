"""CNCF distribution (Debian's docker-registry 2.8) as the tests' upstream, and a throttling TCP relay.

Distribution 2.8 writes its access log to stdout in Apache combined format, one line per finished
request; `Distribution.requests()` parses that file, which is how tests count upstream requests.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

from .ports import free_port, kill_process, start_process, stop_process, wait_http, wait_port_closed

REGISTRY_BINARY = "docker-registry"

# 127.0.0.1 - - [23/Nov/2026:16:00:31 +0000] "GET /v2/foo/blobs/sha256:00?x=1 HTTP/1.1" 404 157 "" "curl/7.88.1"
_COMBINED = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<target>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-)(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessEntry:
    """One request as distribution logged it once it had finished."""

    method: str
    path: str
    query: str
    status: int
    bytes_sent: int
    user_agent: str = ""

    @property
    def is_blob(self) -> bool:
        return "/blobs/" in self.path and "/blobs/uploads" not in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path

    def targets(self, digest_or_ref: str) -> bool:
        """True when the path ends with this digest or tag (`.../blobs/sha256:..`, `.../manifests/1`)."""
        return self.path.rsplit("/", 1)[-1] == digest_or_ref


def parse_access_line(line: str) -> AccessEntry | None:
    match = _COMBINED.match(line.strip())
    if match is None:
        return None
    target = match["target"]
    path, _, query = target.partition("?")
    return AccessEntry(
        method=match["method"],
        path=unquote(path),
        query=query,
        status=int(match["status"]),
        bytes_sent=0 if match["bytes"] == "-" else int(match["bytes"]),
        user_agent=match["agent"] or "",
    )


class Distribution:
    """A docker-registry process on a free loopback port with its own storage and YAML config."""

    def __init__(self, workdir: Path, port: int, config: dict) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.config = config
        self.storage_dir = Path(config["storage"]["filesystem"]["rootdirectory"])
        self.config_path = self.workdir / "config.yml"
        self.access_log_path = self.workdir / "access.log"
        self.log_path = self.workdir / "registry.log"
        self.images: dict = {}
        self._proc: subprocess.Popen | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, *, proxy_remote_url: str | None = None, auth_config: dict | None = None,
              extra_config: dict | None = None, port: int | None = None) -> "Distribution":
        """Write a config under `workdir` and start the registry; returns once `/v2/` answers.

        `proxy_remote_url` turns on distribution's pull-through mode (`proxy: {remoteurl: ..}`);
        `auth_config` is put under `auth:` as is (e.g. `{"token": {...}}`); `extra_config` is merged
        into the top level last (nested dicts merged key by key).
        """
        if shutil.which(REGISTRY_BINARY) is None:
            raise FileNotFoundError(f"{REGISTRY_BINARY} is not installed")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        config: dict = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(workdir / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": "pullthrough-tests"},
        }
        if proxy_remote_url is not None:
            config["proxy"] = {"remoteurl": proxy_remote_url}
        if auth_config is not None:
            config["auth"] = auth_config
        if extra_config:
            _merge(config, extra_config)
        registry = cls(workdir, port, config)
        registry._launch()
        return registry

    def _launch(self) -> None:
        # JSON is YAML: no YAML library needed, and no quoting surprises.
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        stdout = open(self.access_log_path, "ab")
        stderr = open(self.log_path, "ab")
        try:
            self._proc = start_process([REGISTRY_BINARY, "serve", str(self.config_path)], stdout=stdout,
                                       stderr=stderr)
        finally:
            stdout.close()
            stderr.close()
        # /v2/ answers 200, or 401 when auth is on: any answer means it is serving.
        wait_http(self.url + "/v2/", timeout=30, proc=self._proc, log_path=self.log_path)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL), and wait until the port is closed."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
            wait_port_closed(self.port)

    def kill(self) -> None:
        if self._proc is not None:
            kill_process(self._proc)
            self._proc = None
            wait_port_closed(self.port)

    def restart(self) -> None:
        """Stop and start again on the same port, storage and config (drops in-memory caches)."""
        self.stop()
        self._launch()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- addresses ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- access log ---------------------------------------------------------------------------

    def requests(self) -> list[AccessEntry]:
        """Every request logged so far (across restarts), oldest first."""
        if not self.access_log_path.exists():
            return []
        entries = []
        for line in self.access_log_path.read_text(errors="replace").splitlines():
            entry = parse_access_line(line)
            if entry is not None:
                entries.append(entry)
        return entries

    def mark(self) -> int:
        """A position in the access log; `requests_since(mark)` returns what came after it."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[AccessEntry]:
        return self.requests()[mark:]

    def wait_requests(self, mark: int, predicate: Callable[[AccessEntry], bool], count: int = 1,
                      timeout: float = 30.0, settle: float = 0.5) -> list[AccessEntry]:
        """Entries since `mark` matching `predicate`, once at least `count` are logged.

        Distribution logs a request when it finishes, a moment after the client has read the last
        byte; after `count` show up, this keeps watching for `settle` seconds so that a late extra
        request is counted too.
        """
        deadline = time.monotonic() + timeout
        while True:
            matching = [e for e in self.requests_since(mark) if predicate(e)]
            if len(matching) >= count:
                break
            if time.monotonic() > deadline:
                return matching
            time.sleep(0.05)
        if settle > 0:
            time.sleep(settle)
            matching = [e for e in self.requests_since(mark) if predicate(e)]
        return matching

    # -- storage ------------------------------------------------------------------------------

    def blob_data_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps the bytes of `digest`."""
        algorithm, hexpart = digest.split(":", 1)
        return (self.storage_dir / "docker" / "registry" / "v2" / "blobs" / algorithm / hexpart[:2] / hexpart
                / "data")


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


# -- a slow link ------------------------------------------------------------------------------------

class ThrottledRelay:
    """A TCP relay on a free loopback port that forwards to `target_port`, the answers slowed down.

    Put it between pullthrough and the upstream to keep a fill in progress for as long as a test
    needs one. `rate` (bytes per second, upstream to client) may be changed while it runs; `None`
    means unthrottled. Runs on daemon threads in the test process; `close()` stops it.
    """

    def __init__(self, target_port: int, rate: int | None = 1 << 20, chunk: int = 16 << 10) -> None:
        self.target_port = target_port
        self.rate = rate
        self.chunk = chunk
        self.connections = 0
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(self.chunk if throttled else 1 << 16)
                if not data:
                    break
                sink.sendall(data)
                rate = self.rate
                if throttled and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass
