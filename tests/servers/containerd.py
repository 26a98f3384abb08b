"""A private containerd 1.6 daemon for the tests, driven with `ctr`, and its hosts.toml mirror dirs.

Everything the daemon writes (root, state, sockets, temp, opt) lives under one work directory; the
CRI plugin is off so that it neither needs nor touches a node's Kubernetes configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .ports import start_process, stop_process

CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr"


@dataclass(frozen=True)
class CtrImage:
    """One row of `ctr images ls`: the name, the media type and digest of its top manifest."""

    ref: str
    media_type: str
    digest: str


def write_hosts_dir(hosts_dir: Path, registry: str, mirror_url: str, *, server: str | None = None) -> Path:
    """Write `hosts_dir/<registry>/hosts.toml` sending pulls and resolves of `registry` to `mirror_url`.

    `registry` is the host as containerd sees it (`docker.io`) or `_default` (used for every
    registry without a directory of its own). `server` is the fallback containerd would use after
    the mirror; it defaults to Docker Hub's real host, which cannot be reached here, so a mirror
    failure shows up as a failed pull and not as a silent bypass.
    """
    directory = Path(hosts_dir) / registry
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    if server is None and registry == "docker.io":
        server = "https://registry-1.docker.io"
    if server is not None:
        lines.append(f'server = "{server}"')
    lines += [f'[host."{mirror_url}"]', '  capabilities = ["pull", "resolve"]', ""]
    (directory / "hosts.toml").write_text("\n".join(lines))
    return Path(hosts_dir)


class Containerd:
    """A containerd process with its own root, state and gRPC socket under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        # A unix socket path must stay under 108 bytes, which a deep pytest tmp path can exceed:
        # the sockets get a short directory of their own, removed again by stop().
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pt-ctd-"))
        self.address = str(self.socket_dir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, timeout: float = 30.0) -> "Containerd":
        for binary in (CONTAINERD_BINARY, CTR_BINARY):
            if shutil.which(binary) is None:
                raise FileNotFoundError(f"{binary} is not installed")
        daemon = cls(workdir)
        daemon._launch(timeout)
        return daemon

    def _launch(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for directory in ("root", "state", "temp", "opt"):
            (self.workdir / directory).mkdir(exist_ok=True)
        self.config_path.write_text("\n".join([
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            f'temp = "{self.workdir / "temp"}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  address = ""',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.workdir / "opt"}"',
            "",
        ]))
        with open(self.log_path, "ab") as log:
            self._proc = start_process([CONTAINERD_BINARY, "--config", str(self.config_path)], stdout=log,
                                       stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self._proc.returncode}:\n{self.log_tail()}")
            if Path(self.address).exists() and self.ctr("version", check=False, timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"containerd did not answer on {self.address} within {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=15.0)
            self._proc = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- ctr ------------------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 90.0) -> subprocess.CompletedProcess:
        """Run `ctr --address SOCK ARGS...`; with `check`, a failure raises with ctr's output quoted."""
        argv = [CTR_BINARY, "--address", self.address, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            # ctr redraws its progress table many times a second: the last lines are the useful ones.
            stdout = "\n".join(result.stdout.splitlines()[-15:])
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}\n"
                                 f"--- stdout (tail) ---\n{stdout}\n--- stderr ---\n{result.stderr}")
        return result

    def pull(self, ref: str, hosts_dir: Path, *, platform: str | None = None, all_platforms: bool = False,
             check: bool = True) -> subprocess.CompletedProcess:
        """`ctr images pull --hosts-dir DIR REF`, unpacked with the native snapshotter (works anywhere)."""
        args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native"]
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return self.ctr(*args, ref, check=check)

    def images(self) -> dict[str, CtrImage]:
        """The images containerd knows, by name."""
        out = self.ctr("images", "ls").stdout.splitlines()
        images = {}
        for line in out[1:]:
            fields = line.split()
            if len(fields) >= 3:
                images[fields[0]] = CtrImage(ref=fields[0], media_type=fields[1], digest=fields[2])
        return images

    def content_digests(self) -> set[str]:
        """Digests of every blob in containerd's content store."""
        return {line.strip() for line in self.ctr("content", "ls", "--quiet").stdout.splitlines() if line.strip()}

    def remove_image(self, ref: str) -> None:
        """Remove the image and, synchronously, the content only it referenced (a cold start for the next pull)."""
        self.ctr("images", "rm", "--sync", ref)
