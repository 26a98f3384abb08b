"""Native Xet through the mirror ([hf] xet = "native"), with the real huggingface_hub + hf_xet.

Upstream is the fake Hub wired to the fake CAS (tests/servers/fake_cas.py), whose xorbs and shards
the real hf_xet uploaded. Each client runs in its own process with a fresh HF_HOME and
`MAX_HTTP_DOWNLOAD_SIZE` lowered, so that plain HTTP refuses the file and only the Xet path can
fetch it; its TCP sockets are read from /proc while it runs (hf_xet connects from Rust).
"""

from __future__ import annotations

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

from proxy.sources.hf.errors import HfError
from proxy.sources.hf.xetformat import DigestMismatch, verify_xorb
from proxy.sources.hf.xettokens import XetGrant, XetTokens, XorbGrant
from tests.conftest import drop_postgres_database, fresh_postgres_database, require_tool
from tests.servers.fake_hub import FakeHub
from tests.servers.ports import free_port
from tests.servers.pullthrough import Pullthrough, render_config
from tests.test_hf_mirror import ALICE, BOB, SERVICE, payload
from tests.xet_fixtures import cas, client_env, hub_with, run_client_script, sha256, xet_hash  # noqa: F401 - a fixture
from tests.xet_sockets import SocketWatch

pytestmark = pytest.mark.real

XET_MODEL = "acme/xet-model"
GATED = "acme/gated-xet-model"


def compressible(seed: str, size: int) -> bytes:
    """Text-like and float-like bytes, so that hf_xet writes LZ4 and byte-grouped chunks too."""
    rnd = random.Random(seed)
    words = b"".join(rnd.choice([b"tensor ", b"weight ", b"bias ", b"layer.0 ", b"\n"]) for _ in range(size // 12))
    floats = b"".join(rnd.getrandbits(16).to_bytes(2, "little") + b"\x80\x3f" for _ in range(size // 8))
    return (words + floats)[:size]


MODEL_BYTES = payload("xet-model", 3 * 1024 * 1024 + 5) + compressible("xet-model", 1024 * 1024)
# A revision of the model with about a tenth of it rewritten in the middle (a fine-tuned layer).
_CUT = len(MODEL_BYTES) // 2
REVISED_BYTES = MODEL_BYTES[:_CUT] + payload("revised", len(MODEL_BYTES) // 10) + MODEL_BYTES[_CUT + len(MODEL_BYTES) // 10 :]
GATED_BYTES = payload("gated-xet", 1024 * 1024 + 3)


# -- servers ------------------------------------------------------------------------------------------


def declare_repos(hub: FakeHub) -> None:
    hub.add_repo(XET_MODEL, xet=True, files={
        "config.json": b'{"model_type": "xet"}',
        "model.safetensors": MODEL_BYTES,
    }, branches={"revised": {"config.json": b'{"model_type": "xet"}', "model.safetensors": REVISED_BYTES}})
    hub.add_repo(GATED, xet=True, gated=True, authorized_tokens={ALICE}, files={
        "config.json": b'{"model_type": "gated"}',
        "model.safetensors": GATED_BYTES,
    })
    hub.add_token(BOB)
    hub.add_token(SERVICE)


hub = hub_with(declare_repos)


def start_mirror(tmp_path: Path, hub: FakeHub, xet: str, *, name: str = "pt", cache_dir: Path | None = None,
                 **top_settings: object) -> Pullthrough:
    cache_dir, workdir = cache_dir or tmp_path / name, tmp_path / f"{name}.run"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    top = {"listen": f"127.0.0.1:{port}", "cache_dir": str(cache_dir), "log_level": "debug", "access_log": True,
           **top_settings}
    hf = [f'url = "{hub.url}"', 'revision_ttl = "5m"', 'token_env = "PT_HF_SERVICE"', f'xet = "{xet}"']
    text = render_config(top, []) + "\n[hf]\n" + "\n".join(hf) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULLTHROUGH_", "HF_"))}
    env["PT_HF_SERVICE"] = SERVICE
    server = Pullthrough(cache_dir, port, text, workdir, env)
    server._launch(60.0)
    return server


@pytest.fixture
def mirror(tmp_path, hub):
    server = start_mirror(tmp_path, hub, "native")
    yield server
    server.stop()
    print("--- pullthrough log (tail) ---\n" + "\n".join(server.log_text().splitlines()[-60:]))


# -- the client ---------------------------------------------------------------------------------------

CLIENT = r'''
import hashlib, json, os, sys, traceback
import huggingface_hub as hh
from huggingface_hub import constants
a = json.loads(sys.argv[1])
if a.get("max_http") is not None:
    constants.MAX_HTTP_DOWNLOAD_SIZE = a["max_http"]  # plain HTTP refuses anything larger: only Xet can fetch it
try:
    path = hh.hf_hub_download(a["repo"], a["filename"], revision=a.get("revision"), token=a.get("token") or False)
    with open(path, "rb") as f:
        result = {"ok": True, "sha256": hashlib.sha256(f.read()).hexdigest()}
except BaseException as exc:
    result = {"ok": False, "error": type(exc).__name__, "message": str(exc)[-2000:], "trace": traceback.format_exc()[-3000:]}
print("@@RESULT@@" + json.dumps(result))
'''


def download(endpoint: str, home: Path, repo: str, filename: str, *, token: str | None = None, xet: bool = True,
             watch: SocketWatch | None = None, revision: str | None = None) -> dict:
    """One hf_hub_download in its own process; its remote TCP endpoints go to `watch` while it runs."""
    home.mkdir(parents=True, exist_ok=True)
    env = client_env(home, endpoint)
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    args = {"repo": repo, "filename": filename, "token": token, "max_http": 1000 if xet else None, "revision": revision}
    return run_client_script(CLIENT, [json.dumps(args)], env, home, watch=watch)


def ok(result: dict) -> str:
    assert result["ok"], f"{result['error']}: {result['message']}\n{result['trace']}\n{result['stderr']}"
    return result["sha256"]


# -- the xorb verifier, on xorbs the real hf_xet wrote --------------------------------------------------


def test_xorbs_written_by_hf_xet_verify_and_tampered_ones_do_not(tmp_path, cas):
    cas.upload_bytes(payload("a", 2 * 1024 * 1024), compressible("b", 2 * 1024 * 1024))
    assert cas.xorbs
    schemes = set()
    for xorb_hash, data in cas.xorbs.items():
        verify_xorb(data, xorb_hash)
        schemes |= {layout for layout in _schemes(data)}
    assert {0, 1, 2} & schemes and len(schemes) >= 2, f"chunk compressions seen: {schemes}"
    xorb_hash, data = next(iter(cas.xorbs.items()))
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x01
    other = next((h for h in cas.xorbs if h != xorb_hash), "0" * 64)
    for bad, expected in ((bytes(flipped), xorb_hash), (data[: len(data) // 2], xorb_hash), (data, other),
                          (b"not a xorb at all", xorb_hash)):
        with pytest.raises(DigestMismatch):
            verify_xorb(bad, expected)


def _schemes(data: bytes) -> list[int]:
    seen, offset = [], 0
    while offset + 8 <= len(data) and not data[offset:].startswith(b"XETBLOB"):
        seen.append(data[offset + 4])
        offset += 8 + int.from_bytes(data[offset + 1 : offset + 4], "little")
    return seen


def test_mirror_tokens_are_refused_when_expired_forged_of_another_kind_or_from_another_start():
    tokens = XetTokens()
    grant = XetGrant("model", GATED, "main", "abc", time.time() + 60)
    assert tokens.check(tokens.mint(grant)) == XetGrant("model", GATED, "main", "abc", float(int(grant.expires)))
    xorb = "ab" * 32
    signed = tokens.sign_xorb(XorbGrant(grant, "cd" * 32, "", xorb), time.time() + 60)
    assert tokens.check_xorb(signed, xorb).grant.repo_id == GATED
    body, mac = tokens.mint(grant).split(".")
    refused = [
        tokens.mint(XetGrant("model", GATED, "main", "abc", time.time() - 1)),  # expired
        tokens.mint(XetGrant("model", XET_MODEL, "main", "abc", time.time() + 60)).split(".")[0] + "." + mac,  # forged
        signed,  # a xorb URL's signature is no access token
        XetTokens().mint(grant),  # another start's key
        None, "", "a.b.c",
    ]
    for token in refused:
        with pytest.raises(HfError) as error:
            tokens.check(token)
        assert error.value.status == 401
    with pytest.raises(HfError):
        tokens.check_xorb(signed, "ef" * 32)  # signed for another xorb
    with pytest.raises(HfError):
        tokens.check_xorb(tokens.mint(grant), xorb)


# -- through the mirror ---------------------------------------------------------------------------------


def test_xet_file_downloads_through_the_mirror_and_the_client_talks_to_no_other_host(tmp_path, hub, cas, mirror):
    watch = SocketWatch()
    result = download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors", watch=watch)
    assert ok(result) == sha256(MODEL_BYTES)
    assert watch.remotes, "no socket of the client was seen"
    assert watch.remotes == {("127.0.0.1", mirror.port)}, f"the client connected to {watch.remotes}"
    # The transfer host served whole xorbs to the mirror only: hf_xet always asks ranges.
    transfers = cas.requests(host="transfer", kind="xorb-range")
    assert transfers and all(r.range is None for r in transfers), transfers
    assert len({r.target.split("?")[0] for r in transfers}) == len(transfers), "a xorb was fetched twice"
    # A client without hf_xet reads the same bytes through resolve.
    assert ok(download(mirror.url, tmp_path / "c2", XET_MODEL, "model.safetensors", xet=False)) == sha256(MODEL_BYTES)


def test_second_download_into_an_empty_client_cache_fetches_no_xorb_bytes_from_the_origin(tmp_path, hub, cas, mirror):
    assert ok(download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)
    first = cas.xorb_bytes_served()
    assert first > 0
    print(f"first download: {first} xorb bytes from the origin for a {len(MODEL_BYTES)}-byte file")
    cas.reset_requests()
    assert ok(download(mirror.url, tmp_path / "c2", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)
    assert cas.xorb_bytes_served() == 0
    assert cas.count(kind="reconstruction") == 0


def test_two_nodes_sharing_a_cache_fetch_each_xorb_from_the_origin_once(tmp_path, hub, cas):
    require_tool("pg_isready")
    database = fresh_postgres_database()
    nodes = [start_mirror(tmp_path, hub, "native", name=f"node{n}", cache_dir=tmp_path / "shared",
                          database_url=database, node=f"node{n}") for n in (1, 2)]
    try:
        results: dict[int, dict] = {}
        clients = [threading.Thread(target=lambda n=n: results.__setitem__(
            n, download(nodes[n].url, tmp_path / f"c{n}", XET_MODEL, "model.safetensors"))) for n in (0, 1)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=150)
        assert [ok(results[n]) for n in (0, 1)] == [sha256(MODEL_BYTES)] * 2
        fetched = [r.target.split("?")[0] for r in cas.requests(host="transfer", kind="xorb-range") if r.status == 200]
        assert fetched and len(fetched) == len(set(fetched)), fetched
    finally:
        for node in nodes:
            node.stop()
        drop_postgres_database(database)


def test_a_revision_sharing_most_chunks_fetches_little_from_the_origin(tmp_path, hub, cas, mirror):
    assert ok(download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)
    cas.reset_requests()
    revised = download(mirror.url, tmp_path / "c2", XET_MODEL, "model.safetensors", revision="revised")
    assert ok(revised) == sha256(REVISED_BYTES)
    fetched = cas.xorb_bytes_served()
    print(f"revised model: {fetched} xorb bytes from the origin for {len(REVISED_BYTES)} bytes "
          f"({fetched / len(REVISED_BYTES):.2f}x)")
    assert 0 < fetched <= 0.25 * len(REVISED_BYTES)


def test_an_expired_origin_url_in_a_cached_reconstruction_is_renewed(tmp_path, hub, cas, mirror):
    """The mirror keeps reconstructions, but the origin's signed URLs in them expire: a xorb not yet
    fetched is then opened at the URL of a fresh reconstruction."""
    commit = hub.repo(XET_MODEL).refs["refs/heads/main"]
    file_hash = xet_hash(hub, XET_MODEL, commit)
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        token = http.get(f"/api/models/{XET_MODEL}/xet-read-token/{commit}").json()["accessToken"]
        # What hf_xet asks for the whole file, cached by the mirror before any xorb is fetched.
        cached = http.get(f"/xet-cas/v1/reconstructions/{file_hash}",
                          headers={"Authorization": f"Bearer {token}", "Range": f"bytes=0-{len(MODEL_BYTES) - 1}"})
        assert cached.status_code == 200
    cas._secret = os.urandom(32)  # every transfer URL signed so far is refused from now on, as an expired one
    assert ok(download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)
    statuses = [r.status for r in cas.requests(host="transfer", kind="xorb-range")]
    assert 403 in statuses and statuses[-1] == 200, statuses


def test_a_prefetched_xet_repo_downloads_with_the_hub_and_cas_stopped(tmp_path, hub, cas, mirror):
    done = subprocess.run([sys.executable, "-m", "proxy", "prefetch", "--config", str(mirror.config_path),
                           f"hf://{XET_MODEL}@main"], capture_output=True, text=True, timeout=180, env=mirror.env)
    assert done.returncode == 0 and f"hf://{XET_MODEL}@main: 2 files" in done.stdout, done.stdout + done.stderr
    assert cas.xorb_bytes_served() > 0
    hub.stop()
    cas.stop()
    assert ok(download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)


def test_cached_xet_file_downloads_with_the_hub_and_cas_stopped(tmp_path, hub, cas, mirror):
    assert ok(download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)
    hub.stop()
    cas.stop()
    assert ok(download(mirror.url, tmp_path / "c2", XET_MODEL, "model.safetensors")) == sha256(MODEL_BYTES)


def test_gated_xet_file_is_refused_to_other_callers(tmp_path, hub, cas, mirror):
    assert ok(download(mirror.url, tmp_path / "alice", GATED, "model.safetensors", token=ALICE)) == sha256(GATED_BYTES)
    for name, token in (("bob", BOB), ("anonymous", None)):
        result = download(mirror.url, tmp_path / name, GATED, "model.safetensors", token=token)
        assert not result["ok"] and result["error"] in ("GatedRepoError", "HfHubHTTPError", "RepositoryNotFoundError"), result
    commit = hub.repo(GATED).refs["refs/heads/main"]
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        route = f"/api/models/{GATED}/xet-read-token/{commit}"
        assert http.get(route, headers={"Authorization": f"Bearer {BOB}"}).status_code in (401, 403)
        assert http.get(route).status_code in (401, 403)
        alice = http.get(route, headers={"Authorization": f"Bearer {ALICE}"})
        assert alice.status_code == 200 and alice.json()["casUrl"] == f"{mirror.url}/xet-cas"
        # A token of the mirror for the public repo does not open the gated repo's cached xorbs.
        public_commit = hub.repo(XET_MODEL).refs["refs/heads/main"]
        public = http.get(f"/api/models/{XET_MODEL}/xet-read-token/{public_commit}").json()["accessToken"]
        file_hash = xet_hash(hub, GATED, commit)
        gated = http.get(f"/xet-cas/v1/reconstructions/{file_hash}",
                         headers={"Authorization": f"Bearer {alice.json()['accessToken']}"}).json()
        xorb, [entry, *_] = next(iter(gated["fetch_info"].items()))
        assert entry["url"].startswith(f"{mirror.url}/xet-cas/xorbs/{xorb}?")
        signed_for_public = http.get(f"/xet-cas/v1/reconstructions/{xet_hash(hub, XET_MODEL, public_commit)}",
                                     headers={"Authorization": f"Bearer {public}"}).json()
        public_url = next(iter(signed_for_public["fetch_info"].values()))[0]["url"]
        stolen = f"/xet-cas/xorbs/{xorb}?{public_url.split('?', 1)[1]}"
        assert http.get(stolen, headers={"Range": "bytes=0-99"}).status_code == 403
        assert http.get(f"/xet-cas/xorbs/{xorb}", headers={"Range": "bytes=0-99"}).status_code == 401
        forged = public[:-2] + ("AA" if not public.endswith("AA") else "BB")
        assert http.get(f"/xet-cas/v1/reconstructions/{file_hash}",
                        headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_a_xorb_that_does_not_match_its_hash_is_neither_served_nor_stored(tmp_path, hub, cas, mirror):
    for xorb_hash, data in list(cas.xorbs.items()):
        if len(data) > 100_000:
            spoiled = bytearray(data)
            spoiled[len(data) // 2] ^= 0xFF
            cas.xorbs[xorb_hash] = bytes(spoiled)
    result = download(mirror.url, tmp_path / "c1", XET_MODEL, "model.safetensors")
    assert not result["ok"], result
    stored = {sha256(p.read_bytes()) for p in mirror.committed_blobs()}
    assert not stored & {sha256(d) for d in cas.xorbs.values()}
    assert "xorb" in mirror.log_text() and ("hashes to" in mirror.log_text() or "decompress" in mirror.log_text())


def test_resolve_and_api_keep_xet_headers_pointing_at_the_mirror(tmp_path, hub, cas, mirror):
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        head = http.head(f"/{XET_MODEL}/resolve/main/model.safetensors")
        assert head.status_code == 200 and len(head.headers["x-xet-hash"]) == 64
        assert head.links["xet-auth"]["url"].startswith(f"{mirror.url}/api/models/{XET_MODEL}/xet-read-token/")
        tree = http.get(f"/api/models/{XET_MODEL}/tree/main").json()
        assert {e["path"]: e.get("xetHash") for e in tree}["model.safetensors"] == head.headers["x-xet-hash"]
    # xet = "strip" keeps all of it away from the client.
    stripped = start_mirror(tmp_path / "strip", hub, "strip")
    try:
        with httpx.Client(base_url=stripped.url, timeout=30) as http:
            head = http.head(f"/{XET_MODEL}/resolve/main/model.safetensors")
            assert head.status_code == 200 and "x-xet-hash" not in head.headers and "xet-auth" not in head.links
            assert "xetHash" not in http.get(f"/api/models/{XET_MODEL}/tree/main").text
            assert http.get(f"/api/models/{XET_MODEL}/xet-read-token/main").status_code == 404
            assert http.get(f"/xet-cas/v1/reconstructions/{'0' * 64}").status_code == 404
    finally:
        stripped.stop()
