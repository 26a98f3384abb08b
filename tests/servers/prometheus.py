"""A real Prometheus (Debian's `prometheus`) for the tests: scrapes given targets every second with
given rule files, on a loopback port, with its storage in a temp dir; queried over its HTTP API."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from .ports import free_port, start_process, stop_process, wait_http

T = TypeVar("T")


class Prometheus:
    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, binary: str, workdir: Path, *, job: str, targets: list[str], rule_files: list[Path] = ()) -> Prometheus:  # type: ignore[assignment]
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        server = cls(binary, workdir, free_port())
        with open(server.log_path, "ab") as log:
            server._proc = start_process(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{server.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )
        wait_http(server.url + "/-/ready", timeout=60, status=200, proc=server._proc, log_path=server.log_path)
        return server

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector result."""
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]

    def wait_for(self, probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
        """Poll `probe` until it returns something other than None (scrapes and rule evaluations
        come every second, later on a busy machine)."""
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
                raise AssertionError(f"{what}: not within {timeout} s\n--- prometheus log (tail) ---\n{log}")
            time.sleep(0.2)
