"""`pullthrough serve` as a subprocess for the integration tests: TOML config file, log file, restarts.

The server runs in its own process group; `kill()` is a SIGKILL of that group (a crash), `stop()` a
SIGTERM (a shutdown), and `restart()` starts it again on the same port and cache dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .ports import free_port, kill_process, start_process, stop_process, wait_http, wait_port_closed


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(settings: dict, registries: list[dict]) -> str:
    """The TOML text for top-level `settings` (a dict value becomes a table, e.g. `hf={...}` is
    `[hf]`) plus one `[[registries]]` table per entry."""
    scalars = {k: v for k, v in settings.items() if v is not None and not isinstance(v, dict)}
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    lines = [f"{key} = {toml_value(value)}" for key, value in scalars.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None]
    for registry in registries:
        lines += ["", "[[registries]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in registry.items() if value is not None]
    return "\n".join(lines) + "\n"


def pullthrough_command() -> list[str]:
    """The console script when it is installed, else `python -m proxy` from this interpreter."""
    script = shutil.which("pullthrough")
    if script is None:
        candidate = Path(sys.executable).parent / "pullthrough"
        script = str(candidate) if candidate.exists() else None
    return [script, "serve"] if script else [sys.executable, "-m", "proxy", "serve"]


class Pullthrough:
    """One running `pullthrough serve` with its config at `config_path` and its stderr in `log_path`."""

    def __init__(self, cache_dir: Path, port: int, config_text: str, workdir: Path, env: dict[str, str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.port = port
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "pullthrough.toml"
        self.log_path = self.workdir / "pullthrough.log"
        self.config_text = config_text
        self.env = env
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, cache_dir: Path, registries: list[dict], *, workdir: Path | None = None,
              port: int | None = None, env: dict[str, str] | None = None, timeout: float = 60.0,
              **settings: object) -> "Pullthrough":
        """Write the config and start the server; returns once `GET /healthz` answers 200.

        `registries` are the `[[registries]]` tables; other top-level keys (`default_ttl`,
        `database_url`, ...) come as keyword `settings`. Config and log go to `workdir`, by default
        a directory beside the cache dir, so that the cache dir holds only what the server writes.
        """
        cache_dir = Path(cache_dir)
        workdir = Path(workdir) if workdir else cache_dir.parent / f"{cache_dir.name}.run"
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        top = {"listen": f"127.0.0.1:{port}", "cache_dir": str(cache_dir), **settings}
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("PULLTHROUGH_")}
        child_env.update(env or {})
        server = cls(cache_dir, port, render_config(top, registries), workdir, child_env)
        server._launch(timeout)
        return server

    def _launch(self, timeout: float = 60.0) -> None:
        self.config_path.write_text(self.config_text)
        log = open(self.log_path, "ab")
        try:
            self._proc = start_process(pullthrough_command() + ["--config", str(self.config_path)],
                                       stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        finally:
            log.close()
        wait_http(self.url + "/healthz", timeout=timeout, status=200, proc=self._proc, log_path=self.log_path)

    def stop(self) -> None:
        """SIGTERM to the process group (SIGKILL after 10 s); waits until the port is free."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
            wait_port_closed(self.port)

    def kill(self) -> None:
        """SIGKILL to the process group: the server gets no chance to clean up."""
        if self._proc is not None:
            kill_process(self._proc)
            self._proc = None
            wait_port_closed(self.port)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again (after a stop or kill, or stopping it first) on the same port, config and cache dir."""
        self.stop()
        self._launch(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where a committed blob lives: `<cache_dir>/blobs/sha256/ab/abcdef...`."""
        algorithm, hexpart = digest.split(":", 1)
        return self.cache_dir / "blobs" / algorithm / hexpart[:2] / hexpart

    def committed_blobs(self) -> list[Path]:
        root = self.cache_dir / "blobs"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def tmp_files(self) -> list[Path]:
        """Files under `<cache_dir>/tmp/`: fills in progress, or leftovers of a crash."""
        root = self.cache_dir / "tmp"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def largest_tmp_file(self) -> int:
        """Size in bytes of the biggest file under tmp/ (0 when none): how far a fill has got."""
        sizes = [0]
        for path in self.tmp_files():
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:  # committed or swept between listing and stat
                pass
        return max(sizes)

    @property
    def database_url(self) -> str:
        """The index this server uses: its configured database_url, else SQLite in the cache dir."""
        import tomllib

        return tomllib.loads(self.config_text).get("database_url") or f"sqlite:///{self.cache_dir / 'index.db'}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
