"""The real huggingface_hub client (hf_xet installed and enabled) with HF_ENDPOINT pointed at pullthrough.

Upstream is tests/servers/fake_hub.py: a fake Hub with a separate CDN port, relative redirects for
small files, signed absolute redirects for LFS, Xet headers and `xetHash`, a paginated tree with
absolute `Link`s, gated and private repos. Every client action runs in its own process with a fresh
HF_HOME, so nothing is shared between "clients" except what pullthrough caches. The `test_fake_hub_*`
tests point the client straight at the fake: they show the fake triggers the client's real
behaviour (Xet, gating, pagination), which is what makes the pullthrough tests mean something.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_module, require_tool
from tests.servers.fake_hub import FakeHub, git_blob_sha1
from tests.servers.ports import free_port
from tests.servers.pullthrough import Pullthrough, render_config

pytestmark = pytest.mark.real

ALICE = "hf_alice_is_authorized_0123456789"  # granted access to the gated and private repos
BOB = "hf_bob_is_a_valid_user_9876543210"  # a valid user who was granted nothing
SERVICE = "hf_pullthrough_service_token_42"  # pullthrough's own token for public metadata

MODEL = "acme/tiny-model"
XET_MODEL = "acme/xet-model"
GATED = "acme/gated-model"
PRIVATE = "acme/private-model"
DATASET = "acme/tiny-dataset"
BERT = "acme/bert-tiny"


def payload(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def model_files() -> dict[str, bytes]:
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                          b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# tiny model\n",
        "config.json": json.dumps({"model_type": "tiny", "hidden_size": 8}).encode(),
        "tokenizer_config.json": b"{}",
        "model.safetensors": payload("model", 3 * 1024 * 1024 + 17),  # LFS, not a multiple of any chunk size
        "extra/weights.bin": payload("weights", 1000),  # LFS by extension although small
        "extra/notes/deep.txt": b"deep inside\n",
        "empty.txt": b"",
    }


def bert_files() -> dict[str, bytes]:
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    config = {"model_type": "bert", "vocab_size": 4, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "architectures": ["BertModel"]}
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]",
                                             "pad_token": "[PAD]"}).encode(),
    }


def populate(hub: FakeHub) -> None:
    files = model_files()
    hub.add_repo(MODEL, files=files,
                 branches={"dev": {**files, "config.json": b'{"model_type": "tiny", "branch": "dev"}'}},
                 tags={"v1.0": "main"},
                 prs={1: {**files, "config.json": b'{"model_type": "tiny", "pr": 1}', "pr-only.txt": b"from pr 1\n"}})
    hub.add_repo(XET_MODEL, xet=True, files={
        "config.json": b'{"model_type": "xet"}',
        "model.safetensors": payload("xet-model", 2 * 1024 * 1024 + 5),
        "shards/part-00001.bin": payload("xet-shard", 300 * 1024),
    })
    hub.add_repo(GATED, gated=True, authorized_tokens={ALICE}, files={
        "config.json": b'{"model_type": "gated"}',
        "model.safetensors": payload("gated", 512 * 1024),
    })
    hub.add_repo(PRIVATE, private=True, authorized_tokens={ALICE}, files={
        "config.json": b'{"model_type": "private"}',
        "model.safetensors": payload("private", 256 * 1024),
    })
    hub.add_repo(DATASET, repo_type="dataset", files={
        "README.md": b"---\nlicense: mit\n---\n# tiny dataset\n",
        "data/train.parquet": payload("train", 400 * 1024),
        "data/test.csv": b"a,b\n1,2\n3,4\n",
    })
    hub.add_repo(BERT, files=bert_files())
    hub.add_token(BOB)
    hub.add_token(SERVICE)


@pytest.fixture
def hub(tmp_path) -> FakeHub:
    server = FakeHub.start(tmp_path / "hub")
    populate(server)
    yield server
    server.stop()


# -- pullthrough with an [hf] table --------------------------------------------------------------------


def start_pullthrough(tmp_path: Path, hub: FakeHub, *, revision_ttl: str = "5m", token_env: str | None = None,
                      env: dict[str, str] | None = None, name: str = "pt", access_ttl: str | None = None) -> Pullthrough:
    """Pullthrough.start cannot write a TOML table, so the `[hf]` table is appended here."""
    cache_dir = tmp_path / name
    workdir = tmp_path / f"{name}.run"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    top = {"listen": f"127.0.0.1:{port}", "cache_dir": str(cache_dir), "log_level": "debug", "access_log": True}
    # Xet stripped: these tests cover resolve, the plain-HTTP path every client without hf_xet takes
    # (tests/test_xet_mirror.py covers xet = "native" against a real CAS of the fake Hub).
    hf = [f'url = "{hub.url}"', f'revision_ttl = "{revision_ttl}"', 'xet = "strip"']
    if token_env:
        hf.append(f'token_env = "{token_env}"')
    if access_ttl:
        hf.append(f'access_ttl = "{access_ttl}"')
    text = render_config(top, []) + "\n[hf]\n" + "\n".join(hf) + "\n"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PULLTHROUGH_", "HF_"))}
    child_env.update(env or {})
    server = Pullthrough(cache_dir, port, text, workdir, child_env)
    server._launch(60.0)
    return server


@pytest.fixture
def pullthrough_hf(tmp_path, hub):
    """Factory: `pullthrough_hf(**options)` starts pullthrough in front of `hub`; stopped after the test."""
    started: list[Pullthrough] = []

    def start(**options) -> Pullthrough:
        server = start_pullthrough(tmp_path, hub, name=f"pt{len(started)}", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        tail = server.log_text().splitlines()[-40:]
        print(f"--- {server.log_path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    print(f"--- {hub.log_path} ---\n{hub.log_path.read_text() if hub.log_path.exists() else ''}")


@pytest.fixture
def pt(pullthrough_hf) -> Pullthrough:
    return pullthrough_hf()


# -- the client, one process per action -----------------------------------------------------------------

CLIENT = r'''
import hashlib, json, os, sys, traceback

def digest_tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".cache"]
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def run(action, a):
    import huggingface_hub as hh
    if action == "download":
        path = hh.hf_hub_download(a["repo"], a["filename"], repo_type=a.get("repo_type"), revision=a.get("revision"),
                                  token=a.get("token"))
        return {"path": path, "sha256": sha(path), "blob": os.path.basename(os.path.realpath(path)),
                "commit": path.split("/snapshots/")[1].split("/")[0]}
    if action == "snapshot":
        path = hh.snapshot_download(a["repo"], repo_type=a.get("repo_type"), revision=a.get("revision"),
                                    token=a.get("token"))
        return {"path": path, "files": digest_tree(path), "commit": os.path.basename(path)}
    if action == "fs_read":
        fs = hh.HfFileSystem(token=a.get("token"))
        out = {}
        with fs.open(a["path"], "rb", block_size=a.get("block_size", 4096)) as f:
            f.seek(a["offset"])
            out["range"] = hashlib.sha256(f.read(a["length"])).hexdigest()
        out["size"] = fs.info(a["path"])["size"]
        out["ls"] = sorted(e["name"] for e in fs.ls(a["dir"], detail=True))
        return out
    if action == "tree":
        api = hh.HfApi(token=a.get("token"))
        return sorted(f.path for f in api.list_repo_tree(a["repo"], recursive=True, repo_type=a.get("repo_type"),
                                                           revision=a.get("revision"), expand=a.get("expand", False)))
    if action == "refs":
        refs = hh.HfApi(token=a.get("token")).list_repo_refs(a["repo"], include_pull_requests=True)
        return {"branches": {r.name: r.target_commit for r in refs.branches},
                "tags": {r.name: r.target_commit for r in refs.tags},
                "prs": {r.ref: r.target_commit for r in refs.pull_requests or []}}
    if action == "auth_check":
        hh.HfApi().auth_check(a["repo"], token=a.get("token"))
        return True
    if action == "info":
        info = hh.HfApi().repo_info(a["repo"], repo_type=a.get("repo_type"), revision=a.get("revision"),
                                     token=a.get("token"), files_metadata=True)
        return {"sha": info.sha, "gated": info.gated, "private": info.private,
                "siblings": {s.rfilename: [s.size, s.blob_id, s.lfs.sha256 if s.lfs else None] for s in info.siblings}}
    if action == "paths_info":
        entries = hh.HfApi().get_paths_info(a["repo"], a["paths"], repo_type=a.get("repo_type"),
                                            revision=a.get("revision"), token=a.get("token"))
        return {e.path: getattr(e, "xet_hash", None) for e in entries}
    if action == "transformers":
        from transformers import AutoConfig, AutoTokenizer
        config = AutoConfig.from_pretrained(a["repo"])
        tokenizer = AutoTokenizer.from_pretrained(a["repo"])
        return {"model_type": config.model_type, "hidden_size": config.hidden_size,
                "ids": tokenizer("hello world")["input_ids"]}
    raise ValueError(action)

try:
    value = run(sys.argv[1], json.loads(sys.argv[2]))
    result = {"ok": True, "value": value}
except BaseException as exc:
    response = getattr(exc, "response", None)
    result = {"ok": False, "error": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
              "status": getattr(response, "status_code", None), "message": str(exc)[-3000:],
              "trace": traceback.format_exc()[-3000:]}
print("@@RESULT@@" + json.dumps(result))
'''


class Client:
    """Runs one huggingface_hub action per process, each with a fresh HF_HOME, against `endpoint`."""

    def __init__(self, endpoint: str, home_root: Path) -> None:
        self.endpoint = endpoint
        self.home_root = home_root
        self.runs = 0

    def env(self, home: Path | None = None, token: str | None = None) -> tuple[dict[str, str], Path]:
        self.runs += 1
        home = home or self.home_root / f"home{self.runs}"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
        env.update({
            "HF_HOME": str(home),
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_XET_CLIENT_RETRY_MAX_ATTEMPTS": "1",
            "HF_XET_CLIENT_RETRY_MAX_DURATION": "5s",
            "HF_XET_CLIENT_RETRY_BASE_DELAY": "100ms",
            "HF_HUB_ETAG_TIMEOUT": "10",
            "HF_HUB_DOWNLOAD_TIMEOUT": "20",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        if token:
            env["HF_TOKEN"] = token
        return env, home

    def run(self, action: str, timeout: float = 90.0, home: Path | None = None, **args) -> dict:
        env, home = self.env(home)
        proc = subprocess.run([sys.executable, "-c", CLIENT, action, json.dumps(args)], env=env, cwd=home,
                              capture_output=True, text=True, timeout=timeout)
        for line in proc.stdout.splitlines():
            if line.startswith("@@RESULT@@"):
                result = json.loads(line[len("@@RESULT@@"):])
                result["home"] = str(home)
                result["stderr"] = proc.stderr[-3000:]
                return result
        raise AssertionError(f"client {action} {args} printed no result (exit {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def ok(self, action: str, **args):
        result = self.run(action, **args)
        assert result["ok"], f"{action} {args} failed: {result['error']} (HTTP {result['status']}): " \
                             f"{result['message']}\n{result['trace']}\n{result['stderr']}"
        return result["value"]

    def cli(self, *argv: str, token: str | None = None,
            timeout: float = 90.0) -> tuple[subprocess.CompletedProcess, Path]:
        hf = require_tool("hf")
        env, home = self.env(token=token)
        proc = subprocess.run([hf, *argv], env=env, cwd=home, capture_output=True, text=True, timeout=timeout)
        return proc, home


@pytest.fixture
def client(pt, tmp_path) -> Client:
    """The real client pointed at pullthrough."""
    return Client(pt.url, tmp_path / "clients")


@pytest.fixture
def direct(hub, tmp_path) -> Client:
    """The real client pointed straight at the fake Hub."""
    return Client(hub.url, tmp_path / "direct-clients")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_digests(hub: FakeHub, repo: str, revision: str = "main", repo_type: str = "model") -> dict[str, str]:
    return {path: sha256(data) for path, data in hub.repo(repo, repo_type).files(revision).items()}


def upstream_file_downloads(hub: FakeHub) -> list[str]:
    return [f"{h.host} {h.method} {h.target} -> {h.status}" for h in hub.downloads()]


# -- the fake is faithful: the real client against the fake directly ------------------------------------


def test_fake_hub_serves_a_snapshot_to_the_client_through_redirects_and_pages(hub, direct):
    value = direct.ok("snapshot", repo=MODEL)
    assert value["files"] == expected_digests(hub, MODEL)
    assert value["commit"] == hub.repo(MODEL).commit("main")
    assert any("cursor=" in h.target for h in hub.hits(kind="tree")), "the tree listing was not paginated"
    assert hub.count(kind="resolve-cache", method="GET") > 0, "small files were not fetched through resolve-cache"
    assert hub.count(kind="lfs", method="GET", path="model.safetensors") == 1
    assert hub.count(kind="resolve", method="HEAD", path="empty.txt") == 1
    assert hub.count(kind=("resolve", "resolve-cache", "lfs"), method="GET", path="empty.txt") == 0


def test_fake_hub_xet_repo_sends_the_client_to_a_xet_cas(hub, direct):
    result = direct.run("download", repo=XET_MODEL, filename="model.safetensors", timeout=60)
    assert not result["ok"], "a Xet file downloaded without a CAS: the fake does not trigger the Xet path"
    assert hub.count(kind="xet-token") >= 1
    assert hub.count(kind="xet-bridge") == 0


def test_fake_hub_answers_private_missing_pr_and_unavailable_like_the_hub(hub, direct):
    private = direct.run("download", repo=PRIVATE, filename="config.json")
    assert not private["ok"] and "RepositoryNotFoundError" in private["mro"], private
    assert direct.ok("download", repo=PRIVATE, filename="config.json", token=ALICE)["sha256"] == \
        sha256(hub.repo(PRIVATE).files()["config.json"])
    missing = direct.run("download", repo=MODEL, filename="does-not-exist.json")
    assert "EntryNotFoundError" in missing["mro"], missing
    revision = direct.run("download", repo=MODEL, filename="config.json", revision="no-such-branch")
    assert revision["error"] == "RevisionNotFoundError", revision
    pr = direct.ok("download", repo=MODEL, filename="pr-only.txt", revision="refs/pr/1")
    assert pr["sha256"] == sha256(b"from pr 1\n") and pr["commit"] == hub.repo(MODEL).commit("refs/pr/1")
    hub.unavailable = True
    down = direct.run("info", repo=MODEL)
    assert (down["ok"], down["status"]) == (False, 503) and "HfHubHTTPError" in down["mro"], down


def test_fake_hub_gated_repo_answers_like_the_hub(hub, direct):
    anonymous = direct.run("download", repo=GATED, filename="config.json")
    assert (anonymous["error"], anonymous["status"]) == ("GatedRepoError", 401)
    bob = direct.run("download", repo=GATED, filename="config.json", token=BOB)
    assert (bob["error"], bob["status"]) == ("GatedRepoError", 403)
    alice = direct.ok("download", repo=GATED, filename="config.json", token=ALICE)
    assert alice["sha256"] == sha256(b'{"model_type": "gated"}')


# -- downloads through pullthrough ----------------------------------------------------------------------


def test_small_file_download_has_the_hub_etag_and_commit(hub, pt, client):
    value = client.ok("download", repo=MODEL, filename="config.json")
    data = hub.repo(MODEL).files()["config.json"]
    assert value["sha256"] == sha256(data)
    assert value["blob"] == git_blob_sha1(data), "the client's blob is named by the ETag: a git blob sha1"
    assert value["commit"] == hub.repo(MODEL).commit("main")


def test_lfs_file_download_is_streamed_from_pullthrough_not_the_cdn(hub, pt, client):
    value = client.ok("download", repo=MODEL, filename="model.safetensors")
    data = hub.repo(MODEL).files()["model.safetensors"]
    assert value["sha256"] == sha256(data)
    assert value["blob"] == sha256(data), "the client's blob is named by X-Linked-Etag: the sha256"
    small = client.ok("download", repo=MODEL, filename="extra/weights.bin")
    assert small["sha256"] == sha256(hub.repo(MODEL).files()["extra/weights.bin"])
    assert hub.count(kind="lfs", method="GET", path="model.safetensors") == 1, upstream_file_downloads(hub)


def test_resolve_answers_200_with_the_hub_headers_never_a_redirect(hub, pt):
    data = hub.repo(MODEL).files()["model.safetensors"]
    commit = hub.repo(MODEL).commit("main")
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        for method in ("HEAD", "GET"):
            r = http.request(method, f"/{MODEL}/resolve/main/model.safetensors",
                             headers={"Accept-Encoding": "identity"})
            assert r.status_code == 200, (method, r.status_code, dict(r.headers))
            assert r.headers.get("x-repo-commit") == commit
            assert r.headers.get("x-linked-etag", r.headers.get("etag", "")).strip('"') == sha256(data)
            assert int(r.headers.get("x-linked-size") or r.headers["content-length"]) == len(data)
            assert "location" not in r.headers
            assert r.headers.get("accept-ranges") == "bytes"
        assert r.content == data
        r = http.get(f"/{MODEL}/resolve/main/model.safetensors", headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == data[1000:2000], (r.status_code, dict(r.headers))
        small = http.head(f"/{MODEL}/resolve/main/config.json", headers={"Accept-Encoding": "identity"})
        assert small.status_code == 200, (small.status_code, dict(small.headers))
        assert small.headers.get("etag") == f'"{git_blob_sha1(hub.repo(MODEL).files()["config.json"])}"'


def test_tag_branch_and_pr_revisions_download_their_own_commit(hub, pt, client):
    repo = hub.repo(MODEL)
    tagged = client.ok("download", repo=MODEL, filename="config.json", revision="v1.0")
    assert (tagged["commit"], tagged["sha256"]) == (repo.commit("v1.0"), sha256(repo.files("v1.0")["config.json"]))
    dev = client.ok("download", repo=MODEL, filename="config.json", revision="dev")
    assert (dev["commit"], dev["sha256"]) == (repo.commit("dev"), sha256(repo.files("dev")["config.json"]))
    pr = client.ok("download", repo=MODEL, filename="config.json", revision="refs/pr/1")
    assert (pr["commit"], pr["sha256"]) == (repo.commit("refs/pr/1"), sha256(repo.files("refs/pr/1")["config.json"]))
    pr_only = client.ok("download", repo=MODEL, filename="pr-only.txt", revision="refs/pr/1")
    assert pr_only["sha256"] == sha256(b"from pr 1\n")
    by_commit = client.ok("download", repo=MODEL, filename="config.json", revision=repo.commit("dev"))
    assert by_commit["sha256"] == dev["sha256"]


def test_snapshot_download_is_complete_and_a_second_one_into_an_empty_cache_downloads_nothing_upstream(hub, pt, client):
    first = client.ok("snapshot", repo=MODEL)
    assert first["files"] == expected_digests(hub, MODEL)
    assert first["commit"] == hub.repo(MODEL).commit("main")
    hub.reset_hits()
    second = client.ok("snapshot", repo=MODEL)
    assert second["files"] == expected_digests(hub, MODEL)
    assert upstream_file_downloads(hub) == []


def test_concurrent_cold_downloads_of_one_file_make_one_upstream_download(hub, pt, client, tmp_path):
    # The CDN holds the body until all three clients' GETs are answered (their responses start as
    # they join the fill): they overlap for certain, and the coalesced count says the other two
    # joined the first one's fill (their HEADs too, when they came after the fill began).
    hub.cdn_gate = threading.Event()
    get_line = f'"GET /{MODEL}/resolve/main/model.safetensors HTTP/1.1" 200'
    procs = []
    for n in range(3):
        env, home = client.env()
        procs.append(subprocess.Popen([sys.executable, "-c", CLIENT, "download", json.dumps(
            {"repo": MODEL, "filename": "model.safetensors"})], env=env, cwd=home, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 60
        while pt.log_text().count(get_line) < 3:
            assert time.monotonic() < deadline, "the three clients never all joined the one fill"
            assert all(proc.poll() is None for proc in procs), "a client ended while the CDN held the file"
            time.sleep(0.05)
    finally:
        hub.cdn_gate.set()
    expected = sha256(hub.repo(MODEL).files()["model.safetensors"])
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        result = json.loads(out.split("@@RESULT@@", 1)[1])
        assert result["ok"] and result["value"]["sha256"] == expected, (result, err[-2000:])
    assert hub.count(kind="lfs", method="GET", path="model.safetensors") == 1, upstream_file_downloads(hub)
    assert 2 <= httpx.get(f"{pt.url}/stats", timeout=10).json()["coalesced"] <= 4


def test_warm_snapshot_within_revision_ttl_sends_nothing_upstream(hub, pt, client):
    client.ok("snapshot", repo=MODEL)
    hub.reset_hits()
    client.ok("snapshot", repo=MODEL)
    assert [f"{h.method} {h.target} -> {h.status}" for h in hub.hits()] == []


def test_hf_download_cli_downloads_a_repo_and_a_file(hub, pt, client, tmp_path):
    target = tmp_path / "cli-out"
    proc, _ = client.cli("download", MODEL, "--local-dir", str(target))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path, data in hub.repo(MODEL).files().items():
        assert sha256((target / path).read_bytes()) == sha256(data), path
    proc, _ = client.cli("download", DATASET, "data/test.csv", "--repo-type", "dataset", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]).read_bytes() == b"a,b\n1,2\n3,4\n"


def test_hffilesystem_ranged_read_and_listing(hub, pt, client):
    data = hub.repo(MODEL).files()["model.safetensors"]
    value = client.ok("fs_read", path=f"{MODEL}/model.safetensors", offset=1_000_000, length=5000,
                      dir=f"{MODEL}/extra")
    assert value["range"] == sha256(data[1_000_000:1_005_000])
    assert value["size"] == len(data)
    assert value["ls"] == [f"{MODEL}/extra/notes", f"{MODEL}/extra/weights.bin"]
    ranged = [h for h in hub.hits(method="GET") if h.range]
    assert hub.count(kind="lfs", method="GET", path="model.safetensors") <= 1, ranged


def test_dataset_snapshot_and_file(hub, pt, client):
    snapshot = client.ok("snapshot", repo=DATASET, repo_type="dataset")
    assert snapshot["files"] == expected_digests(hub, DATASET, repo_type="dataset")
    single = client.ok("download", repo=DATASET, filename="data/train.parquet", repo_type="dataset")
    assert single["sha256"] == sha256(hub.repo(DATASET, "dataset").files()["data/train.parquet"])
    info = client.ok("paths_info", repo=DATASET, repo_type="dataset", paths=["data/test.csv", "data", "missing"])
    assert set(info) == {"data/test.csv", "data"}


def test_api_listing_refs_and_info_match_the_hub(hub, pt, client, direct):
    for action, args in (("tree", {"repo": MODEL}), ("tree", {"repo": MODEL, "expand": True}),
                         ("tree", {"repo": DATASET, "repo_type": "dataset"}), ("refs", {"repo": MODEL}),
                         ("info", {"repo": MODEL}), ("info", {"repo": MODEL, "revision": "refs/pr/1"})):
        assert client.ok(action, **args) == direct.ok(action, **args), (action, args)
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        r = http.get(f"/api/models/{MODEL}/tree/main", params={"recursive": "true"})
        assert r.status_code == 200
        link = r.links.get("next", {}).get("url", "")
        assert link.startswith(pt.url + "/"), f"page two leaves the mirror: Link {r.headers.get('link')!r}"


def test_gated_repo_metadata_is_public_as_on_the_hub(hub, pt, client, direct):
    """The Hub shows a gated repo's info, tree and refs to anyone; only file content is gated."""
    for action, args in (("info", {"repo": GATED}), ("tree", {"repo": GATED}), ("refs", {"repo": GATED})):
        assert direct.ok(action, **args) == client.ok(action, **args), (action, args)


@pytest.mark.timeout(240)
def test_transformers_autoconfig_and_autotokenizer(hub, pt, client):
    require_module("transformers")  # no torch needed
    value = client.ok("transformers", repo=BERT, timeout=180)
    assert value == {"model_type": "bert", "hidden_size": 8, "ids": [2, 3]}


# -- Xet -----------------------------------------------------------------------------------------------


def test_xet_repo_downloads_through_pullthrough_over_plain_http(hub, pt, client):
    snapshot = client.ok("snapshot", repo=XET_MODEL, timeout=120)
    assert snapshot["files"] == expected_digests(hub, XET_MODEL)
    single = client.ok("download", repo=XET_MODEL, filename="model.safetensors")
    assert single["sha256"] == sha256(hub.repo(XET_MODEL).files()["model.safetensors"])
    assert hub.count(kind=("xet-token", "cas")) == 0, "somebody asked for a Xet token or the CAS"
    assert hub.count(kind="xet-bridge", method="GET", path="model.safetensors") == 1, upstream_file_downloads(hub)
    xet_hashes = client.ok("paths_info", repo=XET_MODEL, paths=["model.safetensors", "config.json"])
    assert xet_hashes == {"model.safetensors": None, "config.json": None}


def test_xet_headers_and_tree_hashes_are_stripped(hub, pt):
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        head = http.head(f"/{XET_MODEL}/resolve/main/model.safetensors", headers={"Accept-Encoding": "identity"})
        assert head.status_code == 200, (head.status_code, dict(head.headers))
        assert not [h for h in head.headers if h.lower().startswith("x-xet-")], dict(head.headers)
        assert "xet" not in head.headers.get("link", ""), head.headers.get("link")
        assert head.headers.get("x-linked-etag", head.headers.get("etag", "")).strip('"') == \
            sha256(hub.repo(XET_MODEL).files()["model.safetensors"])
        entries = []
        url = f"/api/models/{XET_MODEL}/tree/main?recursive=true"
        while url:
            r = http.get(url)
            assert r.status_code == 200
            entries += r.json()
            url = r.links.get("next", {}).get("url")
        assert entries and not [e for e in entries if "xetHash" in e], entries
        assert [e for e in entries if e.get("lfs")], "lfs must stay in the tree entries"
        token = http.get(f"/api/models/{XET_MODEL}/xet-read-token/{hub.repo(XET_MODEL).commit()}")
        assert token.status_code != 200 and "x-xet-access-token" not in token.headers


# -- access ----------------------------------------------------------------------------------------------


def test_gated_file_cached_for_an_authorized_token_is_refused_to_others(hub, pt, client):
    alice = client.ok("download", repo=GATED, filename="model.safetensors", token=ALICE)
    assert alice["sha256"] == sha256(hub.repo(GATED).files()["model.safetensors"])
    bob = client.run("download", repo=GATED, filename="model.safetensors", token=BOB)
    assert (bob["ok"], bob["error"], bob["status"]) == (False, "GatedRepoError", 403), bob["message"]
    anonymous = client.run("download", repo=GATED, filename="model.safetensors")
    assert (anonymous["ok"], anonymous["error"], anonymous["status"]) == (False, "GatedRepoError", 401), \
        anonymous["message"]
    assert any(h.authorization == f"Bearer {BOB}" for h in hub.hits()), "bob's token was never checked upstream"
    with httpx.Client(base_url=pt.url, timeout=30) as http:
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {BOB}"}, 403)):
            r = http.get(f"/{GATED}/resolve/main/model.safetensors", headers=headers)
            assert (r.status_code, r.headers.get("x-error-code")) == (status, "GatedRepo"), headers
            assert len(r.content) < 1000
    alice_again = client.ok("download", repo=GATED, filename="model.safetensors", token=ALICE)
    assert alice_again["sha256"] == alice["sha256"]


def test_private_repo_is_invisible_without_an_authorized_token(hub, pt, client):
    alice = client.ok("snapshot", repo=PRIVATE, token=ALICE)
    assert alice["files"] == expected_digests(hub, PRIVATE)
    for token in (None, BOB):
        denied = client.run("download", repo=PRIVATE, filename="config.json", token=token)
        assert not denied["ok"] and "RepositoryNotFoundError" in denied["mro"], denied
        info = client.run("info", repo=PRIVATE, token=token)
        assert not info["ok"] and "RepositoryNotFoundError" in info["mro"], info


def test_a_callers_access_is_trusted_for_access_ttl_then_asked_again(hub, pullthrough_hf, tmp_path):
    server = pullthrough_hf(access_ttl="3s")
    url = f"{server.url}/{GATED}/resolve/main/model.safetensors"
    alice = {"Authorization": f"Bearer {ALICE}"}
    assert httpx.get(url, headers=alice, timeout=30).status_code == 200
    checked_at = time.monotonic()
    checks = hub.count(kind="auth-check")
    hub.repo(GATED).authorized_tokens.discard(ALICE)  # the Hub revokes her access
    assert httpx.get(url, headers=alice, timeout=30).status_code == 200  # inside access_ttl: not asked again
    assert time.monotonic() - checked_at < 3, "the machine was too slow to ask inside access_ttl"
    assert hub.count(kind="auth-check") == checks
    while time.monotonic() - checked_at < 3.2:
        time.sleep(0.05)  # access_ttl runs out
    refused = httpx.get(url, headers=alice, timeout=30)
    assert (refused.status_code, refused.headers.get("x-error-code")) == (403, "GatedRepo")
    assert hub.count(kind="auth-check") == checks + 1


def test_a_caller_the_hub_cannot_be_asked_about_is_refused_and_that_is_not_remembered(hub, pt):
    url = f"{pt.url}/{GATED}/resolve/main/model.safetensors"
    assert httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30).status_code == 200
    hub.unavailable = True
    bob = httpx.get(url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
    assert bob.status_code == 503 and b"cannot verify access" in bob.content
    alice = httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert alice.status_code == 200 and alice.content == hub.repo(GATED).files()["model.safetensors"]  # checked before
    hub.unavailable = False
    hub.repo(GATED).authorized_tokens.add(BOB)  # the Hub answers again, and now grants bob: not a cached refusal
    deadline = time.monotonic() + 30
    while (bob := httpx.get(url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)).status_code == 503:
        assert time.monotonic() < deadline, "the refusal during the outage was remembered"
        time.sleep(0.2)  # the mirror fails fast for a few seconds after the Hub failed
    assert bob.status_code == 200


def test_auth_check_passes_the_callers_answer_through(hub, pt, client):
    assert client.ok("auth_check", repo=GATED, token=ALICE) is True
    bob = client.run("auth_check", repo=GATED, token=BOB)
    assert (bob["error"], bob["status"]) == ("GatedRepoError", 403)
    assert client.ok("auth_check", repo=MODEL) is True


def test_tokens_never_reach_the_log_or_the_cache(hub, pullthrough_hf, tmp_path):
    server = pullthrough_hf(token_env="PT_HF_TOKEN", env={"PT_HF_TOKEN": SERVICE})
    client = Client(server.url, tmp_path / "token-clients")
    client.ok("download", repo=GATED, filename="model.safetensors", token=ALICE)
    client.run("download", repo=GATED, filename="model.safetensors", token=BOB)
    client.ok("snapshot", repo=PRIVATE, token=ALICE)
    client.ok("snapshot", repo=MODEL)
    server.stop()
    secrets = [t.encode() for t in (ALICE, BOB, SERVICE)]
    log = server.log_path.read_bytes()
    assert not [s for s in secrets if s in log], "a token is in pullthrough's log"
    for path in server.cache_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [s for s in secrets if s in content], f"a token is stored in {path}"


# -- errors and outages ------------------------------------------------------------------------------------


def test_missing_file_raises_entry_not_found_and_is_remembered(hub, pt, client):
    result = client.run("download", repo=MODEL, filename="does-not-exist.json")
    assert result["error"] == "RemoteEntryNotFoundError" and "EntryNotFoundError" in result["mro"], result
    commit = hub.repo(MODEL).commit()
    no_exist = Path(result["home"]) / "hub" / "models--acme--tiny-model" / ".no_exist" / commit / "does-not-exist.json"
    assert no_exist.exists(), "the 404 lacked X-Repo-Commit, so the client cannot remember the file is missing"
    revision = client.run("download", repo=MODEL, filename="config.json", revision="no-such-branch")
    assert revision["error"] == "RevisionNotFoundError", revision
    repo = client.run("download", repo="acme/no-such-repo", filename="config.json")
    assert "RepositoryNotFoundError" in repo["mro"], repo


def test_cached_snapshot_downloads_with_the_hub_down(hub, pt, client):
    client.ok("snapshot", repo=MODEL)
    client.ok("download", repo=DATASET, filename="data/test.csv", repo_type="dataset")
    hub.stop()
    again = client.ok("snapshot", repo=MODEL, timeout=120)
    assert again["files"] == expected_digests(hub, MODEL)
    single = client.ok("download", repo=DATASET, filename="data/test.csv", repo_type="dataset", timeout=120)
    assert single["sha256"] == sha256(b"a,b\n1,2\n3,4\n")


def test_cached_snapshot_is_served_stale_while_the_hub_answers_503(hub, pullthrough_hf, tmp_path):
    server = pullthrough_hf(revision_ttl="1s")
    client = Client(server.url, tmp_path / "503-clients")
    client.ok("snapshot", repo=MODEL)
    hub.unavailable = True
    time.sleep(1.5)
    again = client.ok("snapshot", repo=MODEL, timeout=120)
    assert again["files"] == expected_digests(hub, MODEL)
    single = client.ok("download", repo=MODEL, filename="config.json", timeout=120)
    assert single["sha256"] == sha256(hub.repo(MODEL).files()["config.json"])


def test_cached_snapshot_is_served_stale_after_revision_ttl_when_the_hub_is_down(hub, pullthrough_hf, tmp_path):
    server = pullthrough_hf(revision_ttl="1s")
    client = Client(server.url, tmp_path / "stale-clients")
    client.ok("snapshot", repo=MODEL)
    hub.stop()
    time.sleep(1.5)
    again = client.ok("snapshot", repo=MODEL, timeout=120)
    assert again["files"] == expected_digests(hub, MODEL)
