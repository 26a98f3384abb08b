"""A private dockerd 20.10 (and the containerd it starts for itself) for the tests, driven with `docker -H`.

Socket, data-root, exec-root and pidfile live under one work directory; networking that would touch
the host (iptables, bridge, forwarding) is off and storage is `vfs`, so it runs in any container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .ports import start_process, stop_process

DOCKERD_BINARY = "dockerd"
DOCKER_BINARY = "docker"

# time="..." level=info msg="libcontainerd: started new containerd process" pid=10908
_CONTAINERD_STARTED = re.compile(r'started new containerd process"? pid=(\d+)')


def _dockerd_path() -> str | None:
    """dockerd lives in /usr/sbin, which a non-login PATH may lack."""
    found = shutil.which(DOCKERD_BINARY)
    if found is None and os.access(f"/usr/sbin/{DOCKERD_BINARY}", os.X_OK):
        found = f"/usr/sbin/{DOCKERD_BINARY}"
    return found


class Dockerd:
    """A dockerd process listening on a unix socket under `workdir`."""

    def __init__(self, workdir: Path, config: dict, short_dir: Path) -> None:
        self.workdir = Path(workdir)
        self.config = config
        self.short_dir = short_dir
        self.socket = str(short_dir / "docker.sock")
        self.exec_root = short_dir / "exec"
        self.config_path = self.workdir / "daemon.json"
        self.log_path = self.workdir / "dockerd.log"
        self.client_config_dir = self.workdir / "client"
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, *, registry_mirrors: Sequence[str] = (), insecure_registries: Sequence[str] = (),
              timeout: float = 60.0) -> "Dockerd":
        """Write daemon.json under `workdir`, start dockerd and return once its API answers.

        `registry_mirrors` are full URLs (`http://127.0.0.1:PORT`); dockerd sends only docker.io pulls there.
        """
        if _dockerd_path() is None or shutil.which(DOCKER_BINARY) is None:
            raise FileNotFoundError(f"{DOCKERD_BINARY} or {DOCKER_BINARY} is not installed")
        workdir = Path(workdir)
        # Unix socket paths must stay under 108 bytes: the API socket and the exec-root (which
        # holds containerd's sockets) get a short directory of their own, removed by stop().
        short_dir = Path(tempfile.mkdtemp(prefix="pt-dockerd-"))
        config = {
            "hosts": [f"unix://{short_dir / 'docker.sock'}"],
            "data-root": str(workdir / "data"),
            "exec-root": str(short_dir / "exec"),
            "pidfile": str(workdir / "docker.pid"),
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
            "registry-mirrors": list(registry_mirrors),
            "insecure-registries": list(insecure_registries),
            "max-concurrent-downloads": 3,
        }
        daemon = cls(workdir, config, short_dir)
        daemon._launch(timeout)
        return daemon

    def _launch(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_config_dir.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "ab") as log:
            self._proc = start_process([_dockerd_path() or DOCKERD_BINARY, "--config-file", str(self.config_path)], stdout=log,
                                       stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                returncode = self._proc.returncode
                self.stop()
                raise RuntimeError(f"dockerd exited with {returncode}:\n{self.log_tail()}")
            if Path(self.socket).exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"dockerd did not answer on {self.socket} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL) and then the containerd it started, which runs in its own session."""
        if self._proc is not None:
            stop_process(self._proc, timeout=20.0)
            self._proc = None
        self._stop_containerd()
        self._unmount_leftovers()
        shutil.rmtree(self.short_dir, ignore_errors=True)

    def _unmount_leftovers(self) -> None:
        # dockerd bind-mounts its data-root (and vfs/overlay layers) and undoes that on a clean
        # shutdown only; after a SIGKILL the mounts stay and the tmp dir cannot be removed.
        roots = (str(self.workdir) + "/", str(self.short_dir) + "/")
        try:
            mounts = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return
        points = [line.split()[1].replace("\\040", " ") for line in mounts if len(line.split()) > 1]
        for point in sorted({p for p in points if p.startswith(roots)}, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)

    def _stop_containerd(self) -> None:
        # dockerd starts containerd with setsid, so it is outside dockerd's process group; dockerd
        # stops it on a clean shutdown, but not when it was killed. Its pid is in dockerd's log,
        # and its command line names our exec-root, which makes sure the pid was not reused.
        for pid in self._containerd_pids():
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if not self._is_our_containerd(pid):
                    break
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and self._is_our_containerd(pid):
                    time.sleep(0.05)

    def _containerd_pids(self) -> list[int]:
        if not self.log_path.exists():
            return []
        return [int(pid) for pid in _CONTAINERD_STARTED.findall(self.log_path.read_text(errors="replace"))]

    def _is_our_containerd(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        return str(self.exec_root) in cmdline

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def containerd_running(self) -> bool:
        return any(self._is_our_containerd(pid) for pid in self._containerd_pids())

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def pull_errors(self, lines: int = 20) -> str:
        """dockerd's log lines that say why a registry endpoint failed.

        On a mirror error dockerd logs "Attempting next endpoint for pull after error: ..." and
        moves on to Docker Hub, so the CLI only shows the DNS failure of that last attempt.
        """
        if not self.log_path.exists():
            return ""
        wanted = ("Attempting next endpoint", "level=error", "Error getting v2 registry", "mirror")
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text if any(w in line for w in wanted)][-lines:])

    # -- docker CLI -----------------------------------------------------------------------------

    def docker(self, *args: str, check: bool = True, timeout: float = 90.0) -> subprocess.CompletedProcess:
        """Run `docker -H unix://SOCK ARGS...` with a private client config dir."""
        argv = [DOCKER_BINARY, "-H", f"unix://{self.socket}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.client_config_dir)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}\n"
                                 f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
                                 f"--- dockerd log, pull errors ---\n{self.pull_errors()}")
        return result

    def pull(self, ref: str, *, check: bool = True) -> subprocess.CompletedProcess:
        return self.docker("pull", ref, check=check)

    def inspect_image(self, ref: str) -> dict:
        """`docker image inspect REF` as a dict (Id, RepoDigests, Architecture, ...)."""
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def remove_image(self, ref: str) -> None:
        self.docker("image", "rm", "--force", ref)
