"""Real container runtimes (containerd 1.6, dockerd 20.10, podman 4.3) pulling through pullthrough.

Each runtime is configured the way an operator would do it (hosts.toml, registry-mirrors,
registries.conf) and must end up with exactly the upstream's digests, while the upstream sees every
blob once on a cold pull and none on a warm one.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import default_registries, require_tool
from tests.images import STANDARD_IMAGES, ImageInfo, publish
from tests.servers.containerd import Containerd, write_hosts_dir
from tests.servers.dockerd import Dockerd
from tests.servers.podman import Podman
from tests.servers.pullthrough import Pullthrough
from tests.servers.ports import free_port
from tests.servers.registry import AccessEntry, Distribution, ThrottledRelay

pytestmark = [pytest.mark.real, pytest.mark.timeout(120)]

#: User-Agent fragments of the runtimes; none of them may reach the upstream directly.
RUNTIME_AGENTS = ("containerd/", "docker/", "containers/")


# -- helpers -------------------------------------------------------------------------------------------

def settled_requests(upstream: Distribution, mark: int) -> list[AccessEntry]:
    """Upstream requests since `mark`, once every request sent before this call has been logged.

    distribution logs a request when it has finished; a marker request sent now is logged after
    all earlier ones, so waiting for it replaces a sleep when a test asserts that nothing came.
    """
    sentinel = uuid.uuid4().hex
    httpx.get(f"{upstream.url}/v2/", params={"sentinel": sentinel}, timeout=10).raise_for_status()
    entries = upstream.wait_requests(mark, lambda e: sentinel in e.query, count=1, timeout=10, settle=0)
    assert entries, "the upstream never logged the sentinel request"
    requests = upstream.requests_since(mark)
    cut = next(i for i, e in enumerate(requests) if sentinel in e.query)
    return requests[:cut]


def only_upstream_test_is_reachable(upstream: Distribution) -> list[dict]:
    """Registries where the default (docker.io) points at a closed port and only "upstream.test" works.

    A pull that succeeds through this configuration was routed by name (ns or path prefix), not by
    falling through to the default registry.
    """
    return [
        {"name": "docker.io", "url": f"http://127.0.0.1:{free_port()}", "default": True, "tag_ttl": "1h"},
        {"name": "upstream.test", "url": upstream.url, "tag_ttl": "1h"},
    ]


def blob_gets(entries: list[AccessEntry]) -> list[AccessEntry]:
    return [e for e in entries if e.method == "GET" and e.is_blob]


def manifest_gets(entries: list[AccessEntry]) -> list[AccessEntry]:
    return [e for e in entries if e.method == "GET" and e.is_manifest]


def blob_get_counts(entries: list[AccessEntry]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in blob_gets(entries):
        digest = entry.path.rsplit("/", 1)[-1]
        counts[digest] = counts.get(digest, 0) + 1
    return counts


def cached_blob_path(server: Pullthrough, digest: str) -> Path:
    algorithm, hexpart = digest.split(":", 1)
    return server.cache_dir / "blobs" / algorithm / hexpart[:2] / hexpart


def image_blobs(upstream: Distribution, image: ImageInfo, architecture: str | None = None) -> list[str]:
    """Config and layer digests of `image`, or for an index those of its child for `architecture`."""
    if image.is_index:
        assert architecture is not None
        image = child_for(upstream, image, architecture)
    return [image.config.digest] + [layer.digest for layer in image.layers]


def child_for(upstream: Distribution, index: ImageInfo, architecture: str) -> ImageInfo:
    """The child manifest of `index` for linux/`architecture`, as the index itself says.

    Call it before taking a mark: it reads the index from the upstream.
    """
    response = httpx.get(f"{upstream.url}/v2/{index.name}/manifests/{index.manifest_digest}",
                         headers={"Accept": index.media_type}, timeout=10)
    response.raise_for_status()
    digests = [m["digest"] for m in response.json()["manifests"]
               if m.get("platform", {}).get("architecture") == architecture]
    assert len(digests) == 1, f"{index.ref} has {len(digests)} children for {architecture}"
    return next(child for child in index.children if child.manifest_digest == digests[0])


def assert_cold_pull_went_through_pullthrough(upstream: Distribution, entries: list[AccessEntry],
                                              server: Pullthrough, digests: list[str]) -> None:
    """Each blob was fetched from upstream exactly once, by pullthrough, and is now in its cache."""
    direct = [e for e in entries if any(agent in e.user_agent for agent in RUNTIME_AGENTS)]
    assert not direct, f"the runtime reached the upstream directly: {direct}"
    counts = blob_get_counts(entries)
    assert {d: counts.get(d, 0) for d in digests} == {d: 1 for d in digests}, (
        f"upstream blob GETs per digest on the cold pull: {counts}")
    # The commit follows the verified last byte the runtime already has: wait for it.
    deadline = time.monotonic() + 30
    while (missing := [d for d in digests if not cached_blob_path(server, d).is_file()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not missing, f"not in pullthrough's cache after the pull: {missing}"


def assert_warm_pull_stayed_local(entries: list[AccessEntry]) -> None:
    """A warm pull sends no blob GET and no manifest GET upstream (a tag HEAD is allowed)."""
    assert blob_gets(entries) == [], f"blob GETs upstream on a warm pull: {blob_gets(entries)}"
    assert manifest_gets(entries) == [], f"manifest GETs upstream on a warm pull: {manifest_gets(entries)}"


# -- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture
def containerd(tmp_path):
    require_tool("containerd")
    require_tool("ctr")
    daemon = Containerd.start(tmp_path / "containerd")
    yield daemon
    daemon.stop()


@pytest.fixture
def start_dockerd(tmp_path):
    """Factory: `start_dockerd(mirror_url)` starts a private dockerd using that registry mirror."""
    require_tool("dockerd")
    require_tool("docker")
    started: list[Dockerd] = []

    def start(mirror_url: str) -> Dockerd:
        daemon = Dockerd.start(tmp_path / f"dockerd{len(started)}", registry_mirrors=[mirror_url])
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        assert not daemon.containerd_running(), "dockerd's containerd outlived it"


@pytest.fixture
def create_podman(tmp_path):
    """Factory: `create_podman(mirror)` writes a podman configuration whose docker.io mirror is `mirror`."""
    require_tool("podman")
    created: list[Podman] = []

    def create(mirror: str) -> Podman:
        podman = Podman.create(tmp_path / f"podman{len(created)}", mirrors=[mirror])
        created.append(podman)
        return podman

    yield create
    for podman in created:
        podman.close()


# -- containerd ------------------------------------------------------------------------------------------

def test_containerd_pulls_through_hosts_toml_mirror_and_a_cold_repull_sends_no_blob_upstream(
        upstream, pullthrough, containerd, tmp_path):
    server = pullthrough()
    image = upstream.images["library/single:1"]
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "docker.io", server.url)

    mark = upstream.mark()
    containerd.pull("docker.io/library/single:1", hosts_dir)
    cold = settled_requests(upstream, mark)

    pulled = containerd.images()["docker.io/library/single:1"]
    assert pulled.digest == image.manifest_digest
    assert pulled.media_type == image.media_type
    assert set(image_blobs(upstream, image)) <= containerd.content_digests()
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))

    containerd.remove_image("docker.io/library/single:1")
    assert not set(image_blobs(upstream, image)) & containerd.content_digests(), "images rm --sync kept blobs"
    mark = upstream.mark()
    containerd.pull("docker.io/library/single:1", hosts_dir)
    warm = settled_requests(upstream, mark)

    assert containerd.images()["docker.io/library/single:1"].digest == image.manifest_digest
    assert set(image_blobs(upstream, image)) <= containerd.content_digests()
    assert_warm_pull_stayed_local(warm)


def test_containerd_default_hosts_dir_sends_every_registry_through_pullthrough(
        upstream, pullthrough, containerd, tmp_path):
    server = pullthrough()
    image = upstream.images["library/many:1"]
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "_default", server.url)

    mark = upstream.mark()
    containerd.pull("docker.io/library/many:1", hosts_dir)
    cold = settled_requests(upstream, mark)

    assert containerd.images()["docker.io/library/many:1"].digest == image.manifest_digest
    assert set(image_blobs(upstream, image)) <= containerd.content_digests()
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))


def test_containerd_pulls_one_platform_of_an_oci_index_and_fetches_only_its_blobs(
        upstream, pullthrough, containerd, tmp_path):
    server = pullthrough()
    index = upstream.images["multi/index:1"]
    arm64, amd64 = image_blobs(upstream, index, "arm64"), image_blobs(upstream, index, "amd64")
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "docker.io", server.url)

    mark = upstream.mark()
    containerd.pull("docker.io/multi/index:1", hosts_dir, platform="linux/arm64")
    cold = settled_requests(upstream, mark)

    pulled = containerd.images()["docker.io/multi/index:1"]
    assert pulled.digest == index.manifest_digest
    assert pulled.media_type == index.media_type
    assert set(arm64) <= containerd.content_digests()
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, arm64)
    assert not set(amd64) & set(blob_get_counts(cold)), "the amd64 blobs were fetched for an arm64 pull"


def test_containerd_pulls_all_platforms_of_a_docker_manifest_list(upstream, pullthrough, containerd, tmp_path):
    server = pullthrough()
    manifest_list = upstream.images["multi/list:1"]
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "docker.io", server.url)

    mark = upstream.mark()
    containerd.pull("docker.io/multi/list:1", hosts_dir, all_platforms=True)
    cold = settled_requests(upstream, mark)

    pulled = containerd.images()["docker.io/multi/list:1"]
    assert pulled.digest == manifest_list.manifest_digest
    assert pulled.media_type == manifest_list.media_type
    blobs = [blob.digest for blob in manifest_list.all_blobs()]
    assert set(blobs) | set(manifest_list.all_manifest_digests()) <= containerd.content_digests()
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, blobs)


def test_containerd_ns_parameter_routes_another_registry_to_its_own_upstream(
        upstream, pullthrough, containerd, tmp_path):
    server = pullthrough(registries=only_upstream_test_is_reachable(upstream))
    image = upstream.images["library/single:1"]
    # containerd sends ?ns=upstream.test; the fallback server must never be needed.
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "upstream.test", server.url, server="https://upstream.test")

    mark = upstream.mark()
    containerd.pull("upstream.test/library/single:1", hosts_dir)
    cold = settled_requests(upstream, mark)

    assert containerd.images()["upstream.test/library/single:1"].digest == image.manifest_digest
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))


# -- dockerd ---------------------------------------------------------------------------------------------

def test_dockerd_pulls_through_registry_mirror_and_a_fresh_daemon_sends_no_blob_upstream(
        upstream, pullthrough, start_dockerd):
    server = pullthrough()
    image = upstream.images["library/many:1"]

    daemon = start_dockerd(server.url)
    mark = upstream.mark()
    daemon.pull("library/many:1")
    cold = settled_requests(upstream, mark)

    pulled = daemon.inspect_image("library/many:1")
    assert pulled["Id"] == image.config.digest
    assert [d.rsplit("@", 1)[1] for d in pulled["RepoDigests"]] == [image.manifest_digest]
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))
    daemon.stop()

    fresh = start_dockerd(server.url)
    mark = upstream.mark()
    fresh.pull("library/many:1")
    warm = settled_requests(upstream, mark)

    assert fresh.inspect_image("library/many:1")["Id"] == image.config.digest
    assert_warm_pull_stayed_local(warm)


def test_dockerd_pulls_the_amd64_image_of_a_docker_manifest_list_through_the_mirror(
        upstream, pullthrough, start_dockerd):
    server = pullthrough()
    manifest_list = upstream.images["multi/list:1"]
    amd64 = image_blobs(upstream, manifest_list, "amd64")

    daemon = start_dockerd(server.url)
    mark = upstream.mark()
    daemon.pull("multi/list:1")
    cold = settled_requests(upstream, mark)

    pulled = daemon.inspect_image("multi/list:1")
    assert pulled["Architecture"] == "amd64"
    assert pulled["Id"] == amd64[0]
    assert [d.rsplit("@", 1)[1] for d in pulled["RepoDigests"]] == [manifest_list.manifest_digest]
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, amd64)


# -- podman ----------------------------------------------------------------------------------------------

def test_podman_pulls_through_registries_conf_mirror_and_a_fresh_store_sends_no_blob_upstream(
        upstream, pullthrough, create_podman):
    server = pullthrough()
    image = upstream.images["library/single:1"]

    podman = create_podman(server.host)
    mark = upstream.mark()
    podman.pull("docker.io/library/single:1")
    cold = settled_requests(upstream, mark)

    pulled = podman.inspect_image("docker.io/library/single:1")
    assert pulled["Digest"] == image.manifest_digest
    assert "sha256:" + pulled["Id"] == image.config.digest
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))

    fresh = create_podman(server.host)
    mark = upstream.mark()
    fresh.pull("docker.io/library/single:1")
    warm = settled_requests(upstream, mark)

    assert fresh.inspect_image("docker.io/library/single:1")["Digest"] == image.manifest_digest
    assert_warm_pull_stayed_local(warm)


def test_podman_path_prefix_mirror_routes_to_the_named_registry(upstream, pullthrough, create_podman):
    server = pullthrough(registries=only_upstream_test_is_reachable(upstream))
    index = upstream.images["multi/index:1"]
    arm64 = image_blobs(upstream, index, "arm64")

    # podman puts the mirror's path in front of the repository: /v2/upstream.test/multi/index/...
    podman = create_podman(f"{server.host}/upstream.test")
    mark = upstream.mark()
    podman.pull("docker.io/multi/index:1", platform="linux/arm64")
    cold = settled_requests(upstream, mark)

    pulled = podman.inspect_image("docker.io/multi/index:1")
    assert pulled["Architecture"] == "arm64"
    assert pulled["Digest"] == index.manifest_digest
    assert "sha256:" + pulled["Id"] == arm64[0]
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, arm64)
    assert all(e.path.startswith("/v2/multi/index/") for e in cold if e.path != "/v2/"), (
        "the path prefix reached the upstream")


# -- all three at once -----------------------------------------------------------------------------------

def test_concurrent_cold_pulls_by_containerd_dockerd_and_podman_fetch_each_blob_upstream_once(
        upstream, pullthrough, containerd, start_dockerd, create_podman, tmp_path, request):
    # Three clients asking for the same cold manifest and blobs in their own ways at once (HEAD by
    # tag with ?ns=, HEAD by tag then GET by digest, GET by tag): each must get the upstream's bytes
    # and media type, and the upstream must still see each blob once.
    # A slow link keeps the 32 MiB layer's fill in flight for seconds, so the three pulls overlap.
    relay = ThrottledRelay(upstream.port, rate=4 << 20)
    request.addfinalizer(relay.close)
    server = pullthrough([{"name": "docker.io", "url": relay.url, "default": True, "tag_ttl": "1h"}])
    image = upstream.images["library/big:1"]
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "docker.io", server.url)
    daemon = start_dockerd(server.url)
    podman = create_podman(server.host)

    pulls = {
        "containerd": lambda: containerd.pull("docker.io/library/big:1", hosts_dir),
        "dockerd": lambda: daemon.pull("library/big:1"),
        "podman": lambda: podman.pull("docker.io/library/big:1"),
    }
    mark = upstream.mark()
    with ThreadPoolExecutor(max_workers=len(pulls)) as pool:
        futures = {name: pool.submit(pull) for name, pull in pulls.items()}
        failures = {name: future.exception() for name, future in futures.items() if future.exception()}
    assert not failures, f"pulls failed: {failures}"
    cold = settled_requests(upstream, mark)

    assert containerd.images()["docker.io/library/big:1"].digest == image.manifest_digest
    assert daemon.inspect_image("library/big:1")["Id"] == image.config.digest
    assert podman.inspect_image("docker.io/library/big:1")["Digest"] == image.manifest_digest
    assert_cold_pull_went_through_pullthrough(upstream, cold, server, image_blobs(upstream, image))
    # The other two clients joined the first one's fill of the layer rather than waiting or refetching.
    assert httpx.get(f"{server.url}/stats", timeout=10).json()["coalesced"] >= 2


# -- tags after their TTL, and an upstream that is down ------------------------------------------------

def test_containerd_pull_after_the_tag_ttl_revalidates_with_one_head_and_no_get(
        upstream, pullthrough, containerd, tmp_path):
    server = pullthrough(registries=default_registries(upstream, tag_ttl="0s"))
    image = upstream.images["library/single:1"]
    hosts_dir = write_hosts_dir(tmp_path / "hosts", "docker.io", server.url)
    containerd.pull("docker.io/library/single:1", hosts_dir)
    containerd.remove_image("docker.io/library/single:1")

    mark = upstream.mark()
    containerd.pull("docker.io/library/single:1", hosts_dir)
    warm = settled_requests(upstream, mark)

    assert containerd.images()["docker.io/library/single:1"].digest == image.manifest_digest
    assert [(e.method, e.path) for e in warm] == [("HEAD", "/v2/library/single/manifests/1")]


def test_dockerd_pulls_a_cached_image_while_the_upstream_is_down(pullthrough, start_dockerd, tmp_path):
    require_tool("docker-registry")
    require_tool("skopeo")
    own_upstream = Distribution.start(tmp_path / "upstream")
    try:
        spec = next(spec for spec in STANDARD_IMAGES if spec.ref == "library/single:1")
        image = publish([spec], tmp_path / "layouts", own_upstream.host)["library/single:1"]
        server = pullthrough(registries=default_registries(own_upstream, tag_ttl="0s"))
        start_dockerd(server.url).pull("library/single:1")
    finally:
        own_upstream.stop()

    fresh = start_dockerd(server.url)
    fresh.pull("library/single:1")

    pulled = fresh.inspect_image("library/single:1")
    assert pulled["Id"] == image.config.digest
    assert [d.rsplit("@", 1)[1] for d in pulled["RepoDigests"]] == [image.manifest_digest]
