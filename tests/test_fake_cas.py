"""The fake Xet CAS (tests/servers/fake_cas.py) is faithful: the real hf_xet uploads to it and downloads from it.

Content gets in only through the real client (`hf_xet.upload_files`), so xorbs and shards are real; the real
huggingface_hub, with HF_ENDPOINT at the fake Hub and hf_xet enabled, then downloads the file from the CAS's
reconstructions and signed xorb ranges, while plain HTTP would refuse the file (MAX_HTTP_DOWNLOAD_SIZE is lowered
in the client process). The client's own TCP sockets show which servers it talked to. Each client runs in its
own process with a clean environment. The last tests break the fake on purpose and watch the client fail.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

from tests.servers.fake_hub import FakeHub
from tests.xet_fixtures import cas, client_env, hub_with, run_client_script, sha256, xet_hash  # noqa: F401 - a fixture
from tests.xet_sockets import SocketWatch

pytestmark = pytest.mark.real

REPO = "acme/xet-weights"
SIZE = 6 * 1024 * 1024 + 123  # several xorb-sized reads, not a multiple of any chunk size
TOKEN = "hf_fake_cas_user_0123456789"

CLIENT = r'''
import hashlib, json, sys, time, traceback

def run(action, a):
    import huggingface_hub as hh
    from huggingface_hub import constants
    constants.MAX_HTTP_DOWNLOAD_SIZE = 1024  # plain HTTP refuses these files: only Xet can fetch them
    if action == "download":
        path = hh.hf_hub_download(a["repo"], a["filename"], revision=a.get("revision"), token=a.get("token"))
        with open(path, "rb") as f:
            return {"sha256": hashlib.sha256(f.read()).hexdigest()}
    if action == "stream":
        import hf_xet
        group = hf_xet.XetSession().new_download_stream_group(endpoint=a["endpoint"], token=a["token"],
                                                              token_expiry_unix_secs=int(time.time()) + 3600)
        info = hf_xet.XetFileInfo(a["hash"], a["size"])
        data = b"".join(group.download_stream(info, a["start"], a["end"]))
        return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
    raise ValueError(action)

try:
    result = {"ok": True, "value": run(sys.argv[1], json.loads(sys.argv[2]))}
except BaseException as exc:
    result = {"ok": False, "error": type(exc).__name__, "message": str(exc)[-2000:],
              "trace": traceback.format_exc()[-3000:]}
print("@@RESULT@@" + json.dumps(result))
'''


def run_client(tmp_path: Path, action: str, hf_endpoint: str | None = None, extra_env: dict[str, str] | None = None,
               **args) -> dict:
    """One client in its own process; "ports" are the remote ports of the TCP sockets it held."""
    home = tmp_path / f"client-{len(list(tmp_path.glob('client-*')))}"
    home.mkdir(parents=True)
    env = client_env(home, hf_endpoint)
    env.update(HF_XET_CACHE=str(home / "xet"), **(extra_env or {}))
    watch = SocketWatch()
    result = run_client_script(CLIENT, [action, json.dumps(args)], env, home, watch=watch)
    result["ports"] = sorted({port for _, port in watch.remotes})
    return result


def ok(result: dict) -> dict:
    assert result["ok"], f"{result['error']}: {result['message']}\n{result['trace']}\n{result['stderr']}"
    return result["value"]


def revisions() -> tuple[bytes, bytes]:
    """Two versions of a weights file; the second shares about 90 % of its bytes with the first."""
    rnd = random.Random("fake-cas")
    first = rnd.randbytes(SIZE)
    second = bytearray(first)
    second[SIZE // 2:SIZE // 2 + SIZE // 10] = rnd.randbytes(SIZE // 10)
    return first, bytes(second)


def declare_repos(hub: FakeHub) -> None:
    first, second = revisions()
    hub.add_repo(REPO, xet=True, authorized_tokens={TOKEN}, files={
        "config.json": b'{"model_type": "xet"}', "model.safetensors": first},
        branches={"v2": {"config.json": b'{"model_type": "xet"}', "model.safetensors": second}})


hub = hub_with(declare_repos)


# -- uploads --------------------------------------------------------------------------------------------


def test_second_revision_upload_sends_only_the_xorb_bytes_it_does_not_share(cas):
    first, second = revisions()
    [first_hash] = cas.upload_bytes(first)
    first_sent = cas.xorb_bytes_received()
    [second_hash] = cas.upload_bytes(second)
    second_sent = cas.xorb_bytes_received() - first_sent
    assert first_sent >= SIZE, "the first upload did not send the whole file"
    assert 0 < second_sent < SIZE // 4, f"the second upload sent {second_sent} xorb bytes for ~{SIZE // 10} new ones"
    assert first_hash != second_hash and cas.file_size(first_hash) == cas.file_size(second_hash) == SIZE
    shared = {t.xorb_hash for t in cas.files[first_hash]} & {t.xorb_hash for t in cas.files[second_hash]}
    assert shared, "the second file's shard does not reuse the first file's xorbs"
    kinds = {r.kind for r in cas.requests()}
    assert {"xorb-upload", "shard-upload"} <= kinds, kinds


# -- downloads by the real client -----------------------------------------------------------------------


def test_real_client_downloads_a_xet_file_from_the_fake_cas_and_not_from_the_hub(hub, cas, tmp_path):
    first, second = revisions()
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", token=TOKEN)
    assert ok(result)["sha256"] == sha256(first)
    reconstructions = cas.requests(kind="reconstruction")
    assert [r.target for r in reconstructions] == [f"/v2/reconstructions/{xet_hash(hub, REPO)}"]
    assert all(r.status == 200 and r.authorized for r in reconstructions)
    ranges = cas.requests(kind="xorb-range")
    assert ranges and all(r.status == 206 and r.range.startswith("bytes=") for r in ranges), ranges
    assert cas.xorb_bytes_served() >= SIZE
    # the Hub gave metadata and a token, never the bytes
    assert hub.count(kind="xet-token") >= 1
    assert hub.count(kind=("resolve", "resolve-cache", "lfs", "xet-bridge"), method="GET") == 0, hub.downloads()
    # The watch saw the client's sockets (so what it did not see means something); the CAS's own log
    # above proves both CAS hosts were used, which a 2 ms sampling can miss for a short connection.
    assert {cas.port, cas.transfer_port} & set(result["ports"]), result["ports"]
    assert hub.cdn_port not in result["ports"] and set(result["ports"]) <= {hub.port, cas.port, cas.transfer_port}

    cas.reset_requests()
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", revision="v2",
                        token=TOKEN)
    assert ok(result)["sha256"] == sha256(second)
    assert [r.target for r in cas.requests(kind="reconstruction")] == [
        f"/v2/reconstructions/{xet_hash(hub, REPO, 'v2')}"]


def test_real_client_reads_part_of_a_file_through_a_ranged_reconstruction(hub, cas, tmp_path):
    first, _ = revisions()
    start, end = 1_000_003, 2_500_017
    result = run_client(tmp_path, "stream", endpoint=cas.url, token=cas.token, hash=xet_hash(hub, REPO), size=SIZE,
                        start=start, end=end)
    assert ok(result) == {"sha256": sha256(first[start:end]), "length": end - start}
    [reconstruction] = cas.requests(kind="reconstruction")
    assert reconstruction.range == f"bytes={start}-{end - 1}"
    assert 0 < cas.xorb_bytes_served() < SIZE // 2, "a partial read fetched more than the chunks it needs"


def test_client_falls_back_to_v1_reconstructions_on_a_cas_without_v2(hub, cas, tmp_path):
    first, _ = revisions()
    cas.v2 = False
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", token=TOKEN)
    assert ok(result)["sha256"] == sha256(first)
    assert [(r.target, r.status) for r in cas.requests(kind="reconstruction")] == [
        (f"/v2/reconstructions/{xet_hash(hub, REPO)}", 404), (f"/v1/reconstructions/{xet_hash(hub, REPO)}", 200)]


def test_client_with_multirange_fetching_reads_two_ranges_of_a_xorb_in_one_multipart_answer(hub, cas, tmp_path):
    _, second = revisions()
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", revision="v2",
                        token=TOKEN, extra_env={"HF_XET_CLIENT_ENABLE_MULTIRANGE_FETCHING": "true"})
    assert ok(result)["sha256"] == sha256(second)
    multi = [r for r in cas.requests(kind="xorb-range") if "," in (r.range or "")]
    assert len(multi) == 1 and multi[0].status == 206, cas.requests(kind="xorb-range")


def test_transfer_urls_are_signed_for_their_xorb_and_ranges(hub, cas):
    headers = {"Authorization": f"Bearer {cas.token}"}
    url = f"{cas.url}/v2/reconstructions/{xet_hash(hub, REPO)}"
    v2 = httpx.get(url, headers={**headers, "Range": "bytes=0-99"}).json()
    [[fetch]] = v2["xorbs"].values()  # the first chunk only: the xorb goes on after it
    first, last = fetch["ranges"][0]["bytes"]["start"], fetch["ranges"][0]["bytes"]["end"]
    assert httpx.get(fetch["url"], headers={"Range": f"bytes={first}-{last}"}).status_code == 206
    assert httpx.get(fetch["url"], headers={"Range": f"bytes={first}-{last + 1}"}).status_code == 403
    tampered = fetch["url"].replace(f"ranges={first}-{last}", f"ranges={first}-{last + 1}")
    assert httpx.get(tampered, headers={"Range": f"bytes={first}-{last}"}).status_code == 403
    assert all("authorization" not in r.headers for r in cas.requests(host="transfer"))


def test_reconstruction_json_has_the_shape_of_cas_types(hub, cas):
    headers = {"Authorization": f"Bearer {cas.token}"}
    v2 = httpx.get(f"{cas.url}/v2/reconstructions/{xet_hash(hub, REPO)}", headers=headers).json()
    assert set(v2) == {"offset_into_first_range", "terms", "xorbs"} and v2["offset_into_first_range"] == 0
    assert sum(t["unpacked_length"] for t in v2["terms"]) == SIZE
    assert set(v2["terms"][0]) == {"hash", "unpacked_length", "range"}
    for fetches in v2["xorbs"].values():
        for fetch in fetches:
            assert fetch["url"].startswith(cas.transfer_url) and set(fetch["ranges"][0]) == {"chunks", "bytes"}
    v1_url = f"{cas.url}/v1/reconstructions/{xet_hash(hub, REPO)}"
    v1 = httpx.get(v1_url, headers={**headers, "Range": "bytes=10-20"}).json()
    assert set(v1) == {"offset_into_first_range", "terms", "fetch_info"} and v1["offset_into_first_range"] == 10
    [[info]] = v1["fetch_info"].values()
    assert set(info) == {"range", "url", "url_range"} and info["url_range"]["start"] == 0
    past_end = httpx.get(v1_url, headers={**headers, "Range": f"bytes={SIZE}-"})
    assert past_end.status_code == 416


# -- refusals, and the client failing when the fake lies ------------------------------------------------


def test_cas_refuses_a_wrong_token_with_401_and_the_client_fails(hub, cas, tmp_path):
    url = f"{cas.url}/v2/reconstructions/{xet_hash(hub, REPO)}"
    assert httpx.get(url, headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {cas.token}"}).status_code == 200
    cas.reset_requests()
    cas.tokens = {"only-this-one"}  # the token the Hub hands out is refused from now on
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", token=TOKEN)
    assert not result["ok"], f"the real client downloaded with a refused token: {result} {cas.requests()}"
    assert cas.requests() and all(r.status == 401 for r in cas.requests()), cas.requests()
    assert cas.xorb_bytes_served() == 0


def test_real_client_fails_when_the_fake_serves_a_wrong_url_range(hub, cas, tmp_path, monkeypatch):
    honest = cas.reconstruction_v2

    def shifted(plan):
        body = honest(plan)
        for fetches in body["xorbs"].values():
            for fetch in fetches:
                for r in fetch["ranges"]:
                    r["bytes"]["start"] += 8  # skips the first chunk header
        return body

    monkeypatch.setattr(cas, "reconstruction_v2", shifted)
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", token=TOKEN)
    assert not result["ok"], "the client accepted xorb bytes that do not start at a chunk"
    assert cas.count(kind="xorb-range") >= 1


def test_an_unavailable_cas_fails_the_client_fast_without_xorb_bytes(hub, cas, tmp_path):
    cas.unavailable = True
    result = run_client(tmp_path, "download", hub.url, repo=REPO, filename="model.safetensors", token=TOKEN)
    assert not result["ok"], "the client downloaded from a CAS that answers 503"
    assert cas.requests() and all(r.status == 503 for r in cas.requests()) and cas.xorb_bytes_served() == 0
