"""podman 4.3 with private registries.conf, storage.conf and containers.conf, for pulling through mirrors.

podman has no daemon: each command is one process. All of its state (vfs graph root, run root,
libpod tmp dir, network config, events file) is kept under one work directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

PODMAN_BINARY = "podman"


def _toml_string(value: str) -> str:
    return json.dumps(value)


class Podman:
    """A podman configuration under `workdir`; `podman(...)` runs commands against it; `close()` when done."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.registries_conf = self.workdir / "registries.conf"
        self.storage_conf = self.workdir / "storage.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.graphroot = self.workdir / "graph"
        # podman refuses a runroot of 50 characters or more, and the libpod tmp dir holds sockets:
        # both go to a short directory of their own, which close() removes.
        self.short_dir = Path(tempfile.mkdtemp(prefix="pt-podman-"))
        self.runroot = self.short_dir / "run"
        self.tmpdir = self.short_dir / "tmp"
        self.network_dir = self.workdir / "networks"

    @classmethod
    def create(cls, workdir: Path, *, prefix: str = "docker.io", location: str = "docker.io",
               mirrors: Sequence[str] = ()) -> "Podman":
        """Write the configuration: pulls of `prefix` try each of `mirrors` (insecure, plain HTTP), then `location`.

        A mirror may carry a path (`127.0.0.1:PORT/upstream.test`), which podman puts in front of the
        repository name.
        """
        if shutil.which(PODMAN_BINARY) is None:
            raise FileNotFoundError(f"{PODMAN_BINARY} is not installed")
        podman = cls(workdir)
        podman.workdir.mkdir(parents=True, exist_ok=True)
        for directory in (podman.graphroot, podman.runroot, podman.tmpdir, podman.network_dir):
            directory.mkdir(exist_ok=True)
        lines = [
            "unqualified-search-registries = []",
            "[[registry]]",
            f"prefix = {_toml_string(prefix)}",
            f"location = {_toml_string(location)}",
        ]
        for mirror in mirrors:
            lines += ["[[registry.mirror]]", f"location = {_toml_string(mirror)}", "insecure = true"]
        podman.registries_conf.write_text("\n".join(lines) + "\n")
        podman.storage_conf.write_text("\n".join([
            "[storage]",
            'driver = "vfs"',
            f"graphroot = {_toml_string(str(podman.graphroot))}",
            f"runroot = {_toml_string(str(podman.runroot))}",
            "",
        ]))
        podman.containers_conf.write_text("\n".join([
            "[engine]",
            'events_logger = "file"',
            f"events_logfile_path = {_toml_string(str(podman.workdir / 'events.log'))}",
            f"tmp_dir = {_toml_string(str(podman.tmpdir))}",
            'cgroup_manager = "cgroupfs"',
            "[network]",
            f"network_config_dir = {_toml_string(str(podman.network_dir))}",
            "",
        ]))
        return podman

    def close(self) -> None:
        """Remove the run root and tmp dir; the graph root stays under `workdir`."""
        shutil.rmtree(self.short_dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")}
        env.update({
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
        })
        return env

    def podman(self, *args: str, check: bool = True, timeout: float = 90.0) -> subprocess.CompletedProcess:
        """Run `podman --events-backend file --root .. --runroot .. --tmpdir .. ARGS...`."""
        argv = [PODMAN_BINARY, "--events-backend", "file", "--storage-driver", "vfs",
                "--root", str(self.graphroot), "--runroot", str(self.runroot), "--tmpdir", str(self.tmpdir),
                "--network-config-dir", str(self.network_dir), "--cgroup-manager", "cgroupfs", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(),
                                stdin=subprocess.DEVNULL, start_new_session=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}\n"
                                 f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
                                 f"--- registries.conf ---\n{self.registries_conf.read_text()}")
        return result

    def pull(self, ref: str, *, platform: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        args = ["pull"]
        if platform is not None:
            args += ["--platform", platform]
        return self.podman(*args, ref, check=check)

    def inspect_image(self, ref: str) -> dict:
        """`podman image inspect REF` as a dict (Id = config digest, Digest = manifest digest, RepoDigests)."""
        return json.loads(self.podman("image", "inspect", ref).stdout)[0]

    def remove_image(self, ref: str) -> None:
        self.podman("image", "rm", "--force", ref)
