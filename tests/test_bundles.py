"""Air-gapped nodes: `pullthrough export --set` on a cache that reached its upstreams, `pullthrough
import` on a fresh `offline = true` cache with every upstream gone, and real clients served there;
a bundle with anything altered is refused whole."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_module
from tests.images import skopeo
from tests.servers.containerd import write_hosts_dir
from tests.servers.moto import MotoS3
from tests.servers.pullthrough import render_config
from tests.test_hf_mirror import Client
from tests.test_oci_runtimes import containerd  # noqa: F401 - a fixture
from tests.test_oci_skopeo import assert_dir_matches
from tests.test_resource_sets import MARKET, start_with_set, upstreams, wait_for_prefetch  # noqa: F401 - a fixture

pytestmark = pytest.mark.real

IMAGE = "docker.io/nosana/stats:v1.0.4"
UNET = "stable-diffusion/dreamshaper/8/unet.bin"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def offline_node(tmp_path: Path, name: str, registry_url: str, s3_url: str, hub_url: str) -> tuple[Path, dict, list[dict]]:
    """A fresh cache dir and its config file (offline, naming the same upstreams as node A, which
    will be gone): (config path, settings, registries) for the `pullthrough` fixture too."""
    settings = {
        "cache_dir": str(tmp_path / name), "offline": True,
        "s3": {"endpoint_url": s3_url, "access_key_id": "testing", "secret_access_key": "testing", "buckets": [{"name": "models"}]},
        "hf": {"url": hub_url},
    }
    registries = [{"name": "docker.io", "url": registry_url, "default": True}]
    config = tmp_path / f"{name}.toml"
    config.write_text(render_config(settings, registries))
    return config, settings, registries


def export(config: Path, bundle: Path, set_name: str = MARKET) -> dict:
    done = cli("export", "--config", str(config), "--set", set_name, str(bundle), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def cache_rows(cache_dir: Path) -> dict[str, int]:
    if not (cache_dir / "index.db").exists():
        return {"blobs": 0, "blob_scopes": 0, "refs": 0, "pins": 0}
    with sqlite3.connect(cache_dir / "index.db") as db:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("blobs", "blob_scopes", "refs", "pins")}


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_set_exported_from_one_cache_is_served_by_a_fresh_offline_cache_after_import(
    upstreams, pullthrough, containerd, tmp_path: Path  # noqa: F811 - the fixtures imported above
) -> None:
    require_module("huggingface_hub")
    registry, s3, hub = upstreams
    a = start_with_set(pullthrough, registry, s3, hub)
    wait_for_prefetch(a)
    bundle = tmp_path / "market.tar"
    exported = export(a.config_path, bundle)
    assert exported["blobs"] == 8 and exported["bundle_bytes"] == bundle.stat().st_size
    assert exported["listing"]["required_images"] == [IMAGE]

    image = registry.images["nosana/stats:v1.0.4"]
    unet = s3.client().get_object(Bucket="models", Key=UNET)["Body"].read()
    model = hub.repo("acme/tiny-model").files("main")
    a.stop()
    registry.stop()
    s3.stop()
    hub.stop()

    config, settings, registries = offline_node(tmp_path, "b", registry.url, s3.url, hub.url)
    b = pullthrough(registries, **settings)  # running already: it reads what the import writes
    config = b.config_path  # its index (a PostgreSQL database of its own in the PostgreSQL pass)
    imported = cli("import", "--config", str(config), str(bundle), "--json")
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert (summary["set"], summary["blobs"], summary["new_blobs"]) == (MARKET, 8, 8)

    out = tmp_path / "pulled"
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{b.host}/nosana/stats:v1.0.4", f"dir:{out}")
    assert_dir_matches(out, image)
    containerd.pull(IMAGE, write_hosts_dir(tmp_path / "hosts", "docker.io", b.url))
    assert containerd.images()[IMAGE].digest == image.manifest_digest
    assert httpx.get(f"{b.url}/s3/models/{UNET}", timeout=30).content == unet
    client = Client(b.url, tmp_path / "hf-clients")
    assert client.ok("download", repo="acme/tiny-model", filename="model.safetensors")["sha256"] == hashlib.sha256(
        model["model.safetensors"]).hexdigest()
    config_json = httpx.get(f"{b.url}/acme/tiny-model/resolve/main/config.json", timeout=30)
    assert config_json.status_code == 200 and config_json.content == model["config.json"]

    # Admitted only under the scopes node A admitted it under: another repository is not served it.
    layer = image.layers[0].digest
    assert httpx.get(f"{b.url}/v2/nosana/stats/blobs/{layer}", timeout=30).status_code == 200
    other = httpx.get(f"{b.url}/v2/someone/else/blobs/{layer}", timeout=30)
    assert other.status_code == 404 and other.json()["errors"][0]["code"] == "BLOB_UNKNOWN", other.text

    # Again: nothing new, nothing broken.
    again = cli("import", "--config", str(config), str(bundle), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["new_blobs"] == 0
    pins = cli("pins", "--config", str(config), "--json")
    assert json.loads(pins.stdout)[MARKET]["present"] == 8
    assert httpx.get(f"{b.url}/s3/models/{UNET}", timeout=30).content == unet


@pytest.fixture
def s3_bundle(pullthrough, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A bundle of a small S3-only set exported from a cache that read it from moto, and the
    config of a fresh offline node for it."""
    s3 = MotoS3.start()
    try:
        client = s3.client()
        client.create_bucket(Bucket="models")
        for key in ("weights/a.bin", "weights/b.bin"):
            client.put_object(Bucket="models", Key=key, Body=os.urandom(200_000))
        a = pullthrough([{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}],
                        s3={"endpoint_url": s3.url, "access_key_id": "testing", "secret_access_key": "testing",
                            "buckets": [{"name": "models"}]},
                        resource_sets=[{"name": "weights", "remote": [{"type": "S3", "url": "s3://models/weights/"}]}],
                        prefetch_on_start=False)
        bundle = tmp_path / "weights.tar"
        export(a.config_path, bundle, "weights")
        config, _, _ = offline_node(tmp_path, "fresh", "http://127.0.0.1:9", s3.url, "http://127.0.0.1:9")
        yield bundle, config, a.config_path
    finally:
        s3.stop()


def refused(config: Path, bundle: Path, cwd: Path) -> str:
    """Import, expecting a refusal: exit 2 with one line, and nothing of the bundle in the cache."""
    done = cli("import", "--config", str(config), str(bundle), cwd=cwd)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stdout + done.stderr
    cache_dir = Path(str(config).removesuffix(".toml"))
    assert files_under(cache_dir / "blobs") == [] and files_under(cache_dir / "tmp") == []
    assert cache_rows(cache_dir) == {"blobs": 0, "blob_scopes": 0, "refs": 0, "pins": 0}
    return done.stderr


def blob_members(bundle: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(bundle) as tar:
        return [m for m in tar.getmembers() if m.name.startswith("blobs/")]


def test_a_bundle_with_one_altered_byte_in_a_blob_is_refused_whole_naming_the_digest(s3_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, config, _ = s3_bundle
    member = blob_members(bundle)[-1]  # the last: every other blob was verified and staged before it
    data = bytearray(bundle.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    error = refused(config, bundle, tmp_path)
    assert member.name.replace("blobs/sha256/", "sha256:") in error and "altered" in error, error


def test_a_bundle_whose_list_was_altered_is_refused(s3_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, config, _ = s3_bundle
    data = bundle.read_bytes()
    assert data.count(b'"s3:models"') >= 1
    bundle.write_bytes(data.replace(b'"s3:models"', b'"s3:modelz"'))  # the read scope of every blob, still valid JSON
    assert "does not match its digest" in refused(config, bundle, tmp_path)


@pytest.mark.parametrize("name, kind", [("../escaped", tarfile.REGTYPE), ("blob path", tarfile.SYMTYPE)])
def test_a_bundle_with_a_member_outside_its_list_is_refused(s3_bundle, tmp_path: Path, name: str, kind: bytes) -> None:  # type: ignore[no-untyped-def]
    bundle, config, _ = s3_bundle
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    repacked = tmp_path / "repacked.tar"
    with tarfile.open(bundle) as source, tarfile.open(repacked, "w", format=tarfile.PAX_FORMAT) as target:
        members = source.getmembers()
        extra = tarfile.TarInfo(members[1].name if name == "blob path" else name)
        extra.type = kind
        payload = b"written by a hostile bundle"
        if kind == tarfile.SYMTYPE:
            extra.linkname = "/etc/passwd"
        else:
            extra.size = len(payload)
        target.addfile(members[0], source.extractfile(members[0]))
        target.addfile(extra, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
        for member in members[1:]:
            target.addfile(member, source.extractfile(member))
    error = refused(config, repacked, work)
    assert "is not a blob the bundle lists" in error, error
    assert not (tmp_path / "work" / "escaped").exists()


def test_a_bundle_goes_through_a_pipe_and_may_arrive_compressed(s3_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, config, source_config = s3_bundle
    command = [sys.executable, "-m", "proxy"]
    exporting = subprocess.Popen([*command, "export", "--config", str(source_config), "--set", "weights", "-"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imported = subprocess.run([*command, "import", "--config", str(config), "-", "--json"], stdin=exporting.stdout,
                              capture_output=True, text=True, timeout=300)
    assert exporting.stdout is not None
    exporting.stdout.close()
    assert exporting.wait(timeout=300) == 0 and b"weights: 2 blobs" in exporting.stderr.read()  # type: ignore[union-attr]
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["new_blobs"] == 2
    compressed = tmp_path / "weights.tar.gz"
    compressed.write_bytes(gzip.compress(bundle.read_bytes()))
    again = cli("import", "--config", str(config), str(compressed), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["new_blobs"] == 0, again.stderr


def test_bad_input_is_one_line_and_exit_2(s3_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, config, _ = s3_bundle
    unknown = cli("export", "--config", str(config), "--set", "no-such-set", str(tmp_path / "x.tar"))
    assert unknown.returncode == 2 and "no resource set named 'no-such-set'" in unknown.stderr, unknown.stderr
    assert not (tmp_path / "x.tar").exists()
    assert "no such file" in refused(config, tmp_path / "missing.tar", tmp_path)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bundle.read_bytes()[: blob_members(bundle)[-1].offset_data + 1000])
    error = refused(config, truncated, tmp_path)
    assert "cut short" in error or "not a readable bundle" in error, error


def test_a_sets_contents_are_its_blobs_their_scopes_and_the_names_that_reach_them(index_url: str, tmp_path: Path) -> None:
    from proxy.migrate import upgrade
    from proxy.store.index import Index, make_engine
    from proxy.store.records import Reference

    index = Index(make_engine(index_url))
    layer, weights, elsewhere = ("sha256:" + c * 64 for c in "abc")
    commit = "1" * 40
    for digest in (layer, weights, elsewhere):
        index.blobs.add(digest, 10, source="oci")
    index.blobs.admit("oci:docker.io/team/app", [layer])
    index.blobs.admit("hf:models/acme/tiny", [weights])
    index.blobs.admit("oci:docker.io/other/app", [elsewhere])
    refs = {
        "tag": Reference("oci", "docker.io/team/app:1", layer, 1.0, 2.0, {"etag": "x"}, {"media_type": "m"}),
        "file": Reference("hf-file", f"models/acme/tiny@{commit}/w.bin", weights.split(":")[1], 1.0, 2.0),
        "revision": Reference("hf-rev", "models/acme/tiny@main", commit, 1.0, 2.0),
        "visibility": Reference("hf-repo", "models/acme/tiny", "", 1.0, 2.0, meta={"visibility": "public"}),
        "other tag": Reference("oci", "docker.io/other/app:1", elsewhere, 1.0, 2.0),
        "missing": Reference("hf-missing", f"models/acme/tiny@{commit}/nope", "", 1.0, 2.0),
        "other repo": Reference("hf-repo", "models/acme/other", "", 1.0, 2.0),
    }
    for ref in refs.values():
        index.refs.put(ref)
    index.pins.replace("market", [layer, weights])

    contents = index.sets.contents("market")
    assert contents.digests == [layer, weights] and set(contents.records) == {layer, weights}
    assert contents.scopes == {layer: ["oci:docker.io/team/app"], weights: ["hf:models/acme/tiny"]}
    chosen = {name for name, ref in refs.items() if ref in contents.references}
    assert chosen == {"tag", "file", "revision", "visibility"}

    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(other_url)
    other = Index(make_engine(other_url))
    later = Reference("oci", "docker.io/team/app:1", layer, 5.0, 6.0)  # this node asked after the bundle's node
    other.refs.put(later)
    assert other.sets.load(contents) == 3  # the tag stays this node's later answer
    assert other.sets.load(contents) == 0  # again: nothing changes
    assert other.refs.get("oci", "docker.io/team/app:1") == later
    assert other.refs.get("hf-rev", "models/acme/tiny@main") == refs["revision"]
    assert other.blobs.admitted("hf:models/acme/tiny", weights) and not other.blobs.admitted("oci:docker.io/other/app", layer)
    assert other.pins.all() == {"market": {layer, weights}}
    index.dispose()
    other.dispose()
