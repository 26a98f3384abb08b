"""Deterministic test images: OCI layouts built from seeded random bytes, and pushing them with skopeo.

The same seed gives byte-identical tar layers (fixed mtimes and owners, gzip level 0 with no
timestamp), so digests are stable across runs and machines.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)
REF_NAME = "org.opencontainers.image.ref.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# -- building ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict | None = None

    def as_json(self) -> dict:
        value: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            value["platform"] = self.platform
        if self.annotations:
            value["annotations"] = self.annotations
        return value


class LayoutWriter:
    """Writes blobs into an OCI image layout directory (`oci-layout`, `blobs/sha256/..`, `index.json`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def add_blob(self, data: bytes, media_type: str, **extra) -> Descriptor:
        digest = sha256_digest(data)
        (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
        return Descriptor(media_type, digest, len(data), **extra)

    def add_layer(self, seed: int, sizes: list[int]) -> tuple[Descriptor, str]:
        """A gzip (level 0) tar layer holding one seeded random file per size; returns it and its diff_id."""
        rng = random.Random(seed)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            directory = tarfile.TarInfo(f"data{seed}")
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(directory)
            for number, size in enumerate(sizes):
                info = tarfile.TarInfo(f"data{seed}/file{number}.bin")
                info.size, info.mode, info.mtime = size, 0o644, 0
                tar.addfile(info, io.BytesIO(rng.randbytes(size)))
        tar_bytes = raw.getvalue()
        compressed = gzip.compress(tar_bytes, compresslevel=0, mtime=0)
        return self.add_blob(compressed, OCI_LAYER_GZIP), sha256_digest(tar_bytes)

    def add_image(self, seed: int, layer_sizes: list[list[int]], *, architecture: str = "amd64",
                  os_name: str = "linux") -> Descriptor:
        """An OCI image manifest with one layer per entry of `layer_sizes` and a minimal config."""
        layers, diff_ids = [], []
        for number, sizes in enumerate(layer_sizes):
            layer, diff_id = self.add_layer(seed * 1000 + number, sizes)
            layers.append(layer)
            diff_ids.append(diff_id)
        config = {
            "architecture": architecture,
            "os": os_name,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Labels": {"test.pullthrough.seed": str(seed)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"pullthrough test layer {i}"} for i in range(len(layers))],
        }
        config_desc = self.add_blob(_canonical(config), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.as_json(),
            "layers": [layer.as_json() for layer in layers],
        }
        return self.add_blob(_canonical(manifest), OCI_MANIFEST,
                             platform={"architecture": architecture, "os": os_name})

    def add_index(self, manifests: list[Descriptor]) -> Descriptor:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m.as_json() for m in manifests]}
        return self.add_blob(_canonical(index), OCI_INDEX)

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        """Name `descriptor` as `tag` in the layout's index.json (replacing an earlier entry of that name)."""
        index_path = self.path / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
        index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
        entry = Descriptor(descriptor.media_type, descriptor.digest, descriptor.size,
                           annotations={REF_NAME: tag}).as_json()
        index["manifests"].append(entry)
        index_path.write_text(json.dumps(index, indent=1))


@dataclass(frozen=True)
class ImageSpec:
    """What to build: `layers` is a list of layers, each a list of file sizes; `arches` > 1 makes an index."""

    name: str
    tag: str
    seed: int
    layers: list[list[int]]
    arches: tuple[str, ...] = ("amd64",)
    v2s2: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def is_index(self) -> bool:
        return len(self.arches) > 1


KIB, MIB = 1 << 10, 1 << 20

#: The images the session upstream holds (see tests/conftest.py `upstream`).
STANDARD_IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("library/single", "1", seed=1, layers=[[4 * KIB, 20 * KIB]]),
    ImageSpec("library/many", "1", seed=2, layers=[[(3 + i) * KIB] for i in range(8)]),
    ImageSpec("multi/index", "1", seed=3, layers=[[8 * KIB], [2 * KIB]], arches=("amd64", "arm64")),
    ImageSpec("multi/list", "1", seed=4, layers=[[6 * KIB], [1 * KIB]], arches=("amd64", "arm64"), v2s2=True),
    ImageSpec("library/big", "1", seed=5, layers=[[32 * MIB]]),
)


def build_layout(spec: ImageSpec, layout_dir: Path) -> Descriptor:
    """Build `spec` into the OCI layout `layout_dir`, tagged `spec.tag`; returns the top descriptor."""
    writer = LayoutWriter(layout_dir)
    if spec.is_index:
        children = [writer.add_image(spec.seed * 10 + n, spec.layers, architecture=arch)
                    for n, arch in enumerate(spec.arches)]
        top = writer.add_index(children)
    else:
        top = writer.add_image(spec.seed, spec.layers, architecture=spec.arches[0])
    writer.tag(top, spec.tag)
    return top


# -- pushing and reading back -----------------------------------------------------------------------

def push(layout_dir: Path, ref: str, registry_host: str, *, v2s2: bool = False, all: bool = False,
         tag: str | None = None) -> None:
    """`skopeo copy oci:LAYOUT:TAG docker://HOST/REF` over plain HTTP (`--format v2s2`, `--all` when asked).

    `tag` is the name inside the layout; it defaults to the tag of `ref`.
    """
    layout_tag = tag or ref.rsplit(":", 1)[1]
    args = ["copy", "--quiet", "--dest-tls-verify=false"]
    if v2s2:
        args += ["--format", "v2s2"]
    if all:
        args += ["--all"]
    skopeo(*args, f"oci:{layout_dir}:{layout_tag}", f"docker://{registry_host}/{ref}")


def skopeo(*args: str, registries_conf: Path | None = None, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `skopeo --insecure-policy [--registries-conf FILE] ARGS...`; raise with its stderr on failure."""
    argv = ["skopeo", "--insecure-policy"]
    if registries_conf is not None:
        argv += ["--registries-conf", str(registries_conf)]
    argv += list(args)
    result = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return result


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ImageInfo:
    """An image as the upstream serves it: the manifest's exact digest, its blobs, and for an index its children."""

    name: str
    tag: str
    manifest_digest: str
    media_type: str
    manifest_size: int
    config: BlobInfo | None = None
    layers: tuple[BlobInfo, ...] = ()
    children: tuple["ImageInfo", ...] = field(default=())

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def all_blobs(self) -> list[BlobInfo]:
        """Every config and layer blob, over all children of an index, without duplicates."""
        seen: dict[str, BlobInfo] = {}
        for image in (self, *self.children):
            for blob in ((image.config,) if image.config else ()) + image.layers:
                seen.setdefault(blob.digest, blob)
        return list(seen.values())

    def all_manifest_digests(self) -> list[str]:
        return [self.manifest_digest] + [child.manifest_digest for child in self.children]


def inspect_remote(registry_url: str, name: str, reference: str, *, client: httpx.Client | None = None) -> ImageInfo:
    """Read a manifest (and an index's child manifests) back from a registry, unchanged."""
    own = client is None
    client = client or httpx.Client(timeout=30)
    try:
        return _inspect(client, registry_url, name, reference, reference)
    finally:
        if own:
            client.close()


def _inspect(client: httpx.Client, registry_url: str, name: str, reference: str, tag: str) -> ImageInfo:
    response = client.get(f"{registry_url}/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT_ALL})
    response.raise_for_status()
    body = response.content
    digest = sha256_digest(body)
    manifest = json.loads(body)
    media_type = manifest.get("mediaType") or response.headers["content-type"].split(";")[0]
    if media_type in INDEX_TYPES:
        children = tuple(_inspect(client, registry_url, name, child["digest"], tag) for child in manifest["manifests"])
        return ImageInfo(name, tag, digest, media_type, len(body), children=children)
    config = manifest["config"]
    return ImageInfo(
        name, tag, digest, media_type, len(body),
        config=BlobInfo(config["digest"], config["size"], config["mediaType"]),
        layers=tuple(BlobInfo(layer["digest"], layer["size"], layer["mediaType"]) for layer in manifest["layers"]),
    )


def publish(specs: tuple[ImageSpec, ...] | list[ImageSpec], workdir: Path, registry_host: str) -> dict[str, ImageInfo]:
    """Build each spec into its own layout under `workdir`, push it, and read it back; ref -> ImageInfo."""
    images = {}
    for spec in specs:
        layout = Path(workdir) / spec.name.replace("/", "_") / spec.tag
        build_layout(spec, layout)
        push(layout, spec.ref, registry_host, v2s2=spec.v2s2, all=spec.is_index)
        images[spec.ref] = inspect_remote(f"http://{registry_host}", spec.name, spec.tag)
    return images
