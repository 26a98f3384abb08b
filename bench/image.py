"""The benchmark image: one big single-layer OCI image built from seeded random data, and the
upstream registry storage it is pushed into; both are cached on disk between runs.

The layer is a tar holding one file, gzip level 0, so building 1 GiB takes seconds and every
rebuild is byte-identical (same seed, mtime 0, no file names in the gzip header).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

REPOSITORY = "bench/big"
TAG = "1"
_CHUNK = 4 << 20


@dataclass(frozen=True)
class BenchImage:
    """What the benchmark needs to know about the image it pushed."""

    layout_dir: Path
    manifest_digest: str
    manifest_size: int
    layer_digest: str
    layer_size: int

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = digest.split(":", 1)
        return self.layout_dir / "blobs" / algorithm / hexpart

    @property
    def layer_path(self) -> Path:
        return self.blob_path(self.layer_digest)

    @property
    def manifest_path(self) -> Path:
        return self.blob_path(self.manifest_digest)


class _RandomFile:
    """`size` bytes from random.Random(seed), read sequentially without holding them in memory."""

    def __init__(self, size: int, seed: int) -> None:
        self._left = size
        self._random = random.Random(seed)

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        self._left -= n
        return self._random.randbytes(n) if n else b""


class _HashingWriter(io.RawIOBase):
    """Passes writes through to `sink` while hashing them and counting bytes."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.sink.write(data)
        self.size += len(data)
        return len(data)


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def build_layout(layout_dir: Path, size: int, seed: int = 1) -> BenchImage:
    """Build (or reuse, when a previous run completed it) the OCI layout of the benchmark image."""
    done_marker = layout_dir / "bench-image.json"
    if done_marker.exists():
        info = json.loads(done_marker.read_text())
        return BenchImage(layout_dir=layout_dir, **info)
    if layout_dir.exists():
        shutil.rmtree(layout_dir)
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    partial = blobs / "layer.partial"
    with open(partial, "wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=0, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.USTAR_FORMAT,
                              bufsize=_CHUNK) as tar:
                member = tarfile.TarInfo("data.bin")
                member.size = size
                member.mtime = 0
                member.mode = 0o644
                tar.addfile(member, _RandomFile(size, seed))
    layer_digest = "sha256:" + compressed.sha256.hexdigest()
    diff_id = "sha256:" + uncompressed.sha256.hexdigest()
    partial.rename(blobs / layer_digest.split(":", 1)[1])

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_digest, config_size = _write_blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": compressed.size}],
    }
    manifest_digest, manifest_size = _write_blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": TAG},
        }],
    }
    (layout_dir / "index.json").write_text(json.dumps(index))
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    info = {"manifest_digest": manifest_digest, "manifest_size": manifest_size,
            "layer_digest": layer_digest, "layer_size": compressed.size}
    done_marker.write_text(json.dumps(info))
    return BenchImage(layout_dir=layout_dir, **info)


def push(image: BenchImage, registry_host: str) -> None:
    """Copy the layout into the registry at `registry_host` as REPOSITORY:TAG, blobs unchanged."""
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
         f"oci:{image.layout_dir}:{TAG}", f"docker://{registry_host}/{REPOSITORY}:{TAG}"],
        check=True,
    )
