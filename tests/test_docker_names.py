"""Docker's names: registry.hub.docker.com, index.docker.io and registry-1.docker.io are docker.io,
single names get library/ under each of them, and a registry may declare aliases of its own;
in image names (resource sets, the CLI), containerd's ?ns= and path prefixes alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.config import DOCKER_HUB_ALIASES, ConfigError, RegistryConfig, load_settings
from proxy.sources.oci.errors import NameInvalid, NameUnknown, OciError
from proxy.sources.oci.names import Router
from proxy.store.records import ReadScope
from tests.conftest import require_tool
from tests.images import ACCEPT_ALL, ImageInfo, sha256_digest, skopeo

DIGEST = "sha256:" + "0123456789abcdef" * 4


def router(*extra: RegistryConfig) -> Router:
    return Router([
        RegistryConfig(name="docker.io", url="https://registry-1.docker.io", default=True),
        RegistryConfig(name="ghcr.io", url="https://ghcr.io"),
        *extra,
    ])


# -- routes: path prefixes and ?ns= ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("rest", "ns", "repository", "prefix"),
    [
        ("registry.hub.docker.com/nosana/frpc/manifests/0.1.0", None, "nosana/frpc", "registry.hub.docker.com/"),
        ("index.docker.io/library/alpine/manifests/3", None, "library/alpine", "index.docker.io/"),
        ("index.docker.io/foo/manifests/3", None, "library/foo", "index.docker.io/"),
        ("registry-1.docker.io/foo/blobs/" + DIGEST, None, "library/foo", "registry-1.docker.io/"),
        ("registry.hub.docker.com/foo/tags/list", None, "library/foo", "registry.hub.docker.com/"),
        ("docker.io/foo/manifests/3", None, "library/foo", "docker.io/"),
        ("library/single/manifests/1", "registry-1.docker.io", "library/single", ""),
        ("single/manifests/1", "index.docker.io", "library/single", ""),
        ("vllm/vllm-openai/manifests/v0.5.4", "registry.hub.docker.com", "vllm/vllm-openai", ""),
    ],
)
def test_docker_hub_aliases_route_to_docker_io_with_library_for_single_names(rest, ns, repository, prefix) -> None:
    target = router().route(rest, ns)
    assert (target.registry.name, target.repository, target.prefix) == ("docker.io", repository, prefix)
    assert target.scope == ReadScope.oci("docker.io", repository)


def test_a_registrys_own_aliases_route_to_it_without_library() -> None:
    harbor = RegistryConfig(name="harbor.example", url="https://harbor.example", aliases=("registry.example", "harbor.example:443"))
    routes = router(harbor)
    for rest, ns in (("registry.example/app/manifests/1", None), ("harbor.example:443/app/manifests/1", None),
                     ("app/manifests/1", "registry.example"), ("harbor.example/app/manifests/1", None)):
        target = routes.route(rest, ns)
        assert (target.registry.name, target.repository) == ("harbor.example", "app"), (rest, ns)
        assert target.tag_key == "harbor.example/app:1"


def test_a_registry_that_aliases_docker_io_gives_single_names_library() -> None:
    hub = RegistryConfig(name="hub.mirror.example", url="https://hub.mirror.example", default=True, aliases=("docker.io",))
    routes = Router([hub])
    assert routes.route("docker.io/alpine/manifests/3", None).repository == "library/alpine"
    assert routes.route("alpine/manifests/3", None).repository == "library/alpine"


def test_without_aliases_docker_hubs_other_names_are_not_registries() -> None:
    bare = Router([RegistryConfig(name="docker.io", url="https://registry-1.docker.io", default=True, aliases=())])
    with pytest.raises(NameUnknown):
        bare.route("library/alpine/manifests/3", "index.docker.io")


# -- image names as resource sets and the CLI write them -------------------------------------------

@pytest.mark.parametrize(
    ("written", "tag_key"),
    [
        ("registry.hub.docker.com/nosana/frpc:0.1.0", "docker.io/nosana/frpc:0.1.0"),
        ("docker.io/vllm/vllm-openai:v0.5.4", "docker.io/vllm/vllm-openai:v0.5.4"),
        ("index.docker.io/foo", "docker.io/library/foo:latest"),
        ("index.docker.io/alpine:3", "docker.io/library/alpine:3"),
        ("registry-1.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("registry.hub.docker.com/single:1", "docker.io/library/single:1"),
        ("alpine:3", "docker.io/library/alpine:3"),
        ("  index.docker.io/alpine:3 ", "docker.io/library/alpine:3"),
        ("ghcr.io/owner/img:1", "ghcr.io/owner/img:1"),
    ],
)
def test_image_names_are_read_with_dockers_aliases(written: str, tag_key: str) -> None:
    assert router().image(written).tag_key == tag_key


def test_an_image_by_digest_under_an_alias_keeps_the_digest_and_drops_the_tag_beside_it() -> None:
    target = router().image(f"index.docker.io/alpine:3@{DIGEST}")
    assert (target.registry.name, target.repository, str(target.digest)) == ("docker.io", "library/alpine", DIGEST)


def test_an_image_fetched_under_any_name_is_one_read_scope() -> None:
    scopes = {router().image(name).scope for name in (
        "registry.hub.docker.com/library/single:1", "index.docker.io/single:1", "registry-1.docker.io/single:2",
        "docker.io/library/single:1", "single:1")}
    assert scopes == {ReadScope.oci("docker.io", "library/single")}


@pytest.mark.parametrize(
    ("written", "error"),
    [
        ("example.com/foo:1", NameUnknown),  # a host that is not configured: not docker.io/example.com/foo
        ("localhost:5000/foo:1", NameUnknown),
        ("localhost/foo", NameUnknown),
        ("index.docker.io/UPPER:1", NameInvalid),
        ("index.docker.io/foo:-bad", OciError),
    ],
)
def test_image_names_that_name_no_configured_registry_or_break_the_grammar_are_refused(written: str, error: type[OciError]) -> None:
    with pytest.raises(error):
        router().image(written)


# -- settings -------------------------------------------------------------------------------------

def settings_from(tmp_path: Path, registries: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(registries)
    return load_settings(path)


def test_built_in_and_declared_docker_io_carry_dockers_aliases_unless_they_set_their_own(tmp_path: Path) -> None:
    assert load_settings().registries[0].aliases == DOCKER_HUB_ALIASES
    declared = settings_from(tmp_path, '[[registries]]\nname = "docker.io"\nurl = "http://127.0.0.1:1"\ndefault = true\n'
                                       '[[registries]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n')
    assert [r.aliases for r in declared.registries] == [DOCKER_HUB_ALIASES, ()]
    none = settings_from(tmp_path, '[[registries]]\nname = "docker.io"\nurl = "http://127.0.0.1:1"\naliases = []\n')
    assert none.registries[0].aliases == ()
    own = settings_from(tmp_path, '[[registries]]\nname = "docker.io"\nurl = "http://127.0.0.1:1"\naliases = ["hub.internal"]\n')
    assert own.registries[0].aliases == ("hub.internal",)


@pytest.mark.parametrize(
    ("registries", "message"),
    [
        # docker.io's default aliases against a registry of that name
        ('[[registries]]\nname = "docker.io"\nurl = "https://a.example"\n'
         '[[registries]]\nname = "index.docker.io"\nurl = "https://b.example"\n',
         "registries: 'index.docker.io' names both docker.io and index.docker.io"),
        # two registries claiming one alias
        ('[[registries]]\nname = "a.example"\nurl = "https://a.example"\naliases = ["shared.example"]\n'
         '[[registries]]\nname = "b.example"\nurl = "https://b.example"\naliases = ["shared.example"]\n',
         "registries: 'shared.example' names both a.example and b.example"),
        # an alias that is another registry's name
        ('[[registries]]\nname = "a.example"\nurl = "https://a.example"\naliases = ["ghcr.io"]\n'
         '[[registries]]\nname = "ghcr.io"\nurl = "https://ghcr.io"\n',
         "registries: 'ghcr.io' names both a.example and ghcr.io"),
        ('[[registries]]\nname = "a.example"\nurl = "https://a.example"\naliases = ["Not A Host"]\n',
         "registries.0: alias 'Not A Host' of a.example must look like a host name"),
        ('[[registries]]\nname = "a.example"\nurl = "https://a.example"\naliases = ["a.example"]\n',
         "registries.0: aliases of a.example repeat a name"),
        ('[[registries]]\nname = "a.example"\nurl = "https://a.example"\naliases = "b.example"\n',
         "registries.0.aliases: Input should be a valid tuple"),  # a list, as TOML writes it
    ],
)
def test_clashing_or_malformed_aliases_are_a_one_line_config_error_naming_the_key(tmp_path: Path, registries: str,
                                                                                   message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(tmp_path, registries)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_config_check_refuses_a_clash_with_exit_2_and_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[registries]]\nname = "docker.io"\nurl = "https://a.example"\n'
                    '[[registries]]\nname = "registry-1.docker.io"\nurl = "https://b.example"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "config", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "registries: 'registry-1.docker.io' names both docker.io and registry-1.docker.io" in result.stderr


# -- through a running mirror, with the session upstream as docker.io -----------------------------

def assert_copied(dest: Path, image: ImageInfo) -> None:
    assert sha256_digest((dest / "manifest.json").read_bytes()) == image.manifest_digest
    for blob in image.all_blobs():
        assert sha256_digest((dest / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest


def blob_gets(upstream, mark: int) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.path.rsplit("/", 1)[-1] for e in upstream.requests_since(mark) if e.is_blob and e.method == "GET"]


@pytest.mark.real
def test_skopeo_pulls_docker_hub_names_through_alias_path_prefixes(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_tool("skopeo")
    pt = pullthrough()
    image = upstream.images["library/single:1"]
    # A path prefix that is an alias, with a single name: /v2/registry.hub.docker.com/single/...
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{pt.host}/registry.hub.docker.com/single:1",
           f"dir:{tmp_path / 'direct'}")
    assert_copied(tmp_path / "direct", image)
    # A podman/skopeo mirror of registry.hub.docker.com at HOST/index.docker.io: /v2/index.docker.io/library/many/...
    conf = tmp_path / "registries.conf"
    conf.write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n\n'
                    '[[registry]]\nprefix = "registry.hub.docker.com"\nlocation = "registry.hub.docker.com"\n\n'
                    f'[[registry.mirror]]\nlocation = "{pt.host}/index.docker.io"\ninsecure = true\n')
    many = upstream.images["library/many:1"]
    skopeo("copy", "--quiet", "docker://registry.hub.docker.com/library/many:1", f"dir:{tmp_path / 'mirror'}",
           registries_conf=conf)
    assert_copied(tmp_path / "mirror", many)


@pytest.mark.real
def test_containerd_ns_of_a_docker_hub_alias_is_docker_io(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    image = upstream.images["library/single:1"]
    manifest = httpx.get(f"{pt.url}/v2/library/single/manifests/1?ns=registry-1.docker.io",
                         headers={"Accept": ACCEPT_ALL}, timeout=30)
    assert manifest.status_code == 200, manifest.text
    assert manifest.headers["docker-content-digest"] == image.manifest_digest == sha256_digest(manifest.content)
    layer = image.layers[0]
    blob = httpx.get(f"{pt.url}/v2/single/blobs/{layer.digest}?ns=index.docker.io", timeout=30)
    assert blob.status_code == 200 and sha256_digest(blob.content) == layer.digest


def wait_for_listing(pt, name: str) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 90
    listing: dict = {}
    while time.monotonic() < deadline:
        listing = httpx.get(f"{pt.url}/api/markets/{name}/required-resources", timeout=10).json()
        states = listing["status"]["images"].values()
        if states and all(s["cached"] or s["error"] for s in states):
            return listing
        time.sleep(0.2)
    raise AssertionError(f"prefetch did not finish: {listing}")


@pytest.mark.real
def test_a_set_naming_one_image_two_ways_is_pinned_once_and_listed_as_written(upstream, pullthrough, tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_tool("skopeo")
    written = ["registry.hub.docker.com/library/single:1", "index.docker.io/single:1"]
    image = upstream.images["library/single:1"]
    mark = upstream.mark()
    pt = pullthrough(resource_sets=[{"name": "market-a", "images": written}])
    listing = wait_for_listing(pt, "market-a")
    assert listing["required_images"] == written
    assert list(listing["status"]["images"]) == written
    assert all(s["cached"] and s["error"] is None for s in listing["status"]["images"].values()), listing
    blobs = {b.digest for b in image.all_blobs()}
    assert httpx.get(f"{pt.url}/stats", timeout=10).json()["pins"]["market-a"]["blobs"] == len(blobs) + 1  # and the manifest
    fetched = blob_gets(upstream, mark)
    assert sorted(fetched) == sorted(blobs), "each blob is fetched from upstream once, however the image is named"
    # Read under the canonical name (scope oci:docker.io/library/single): from the cache, nothing upstream.
    after = upstream.mark()
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{pt.host}/docker.io/library/single:1",
           f"dir:{tmp_path / 'canonical'}")
    assert_copied(tmp_path / "canonical", image)
    assert upstream.wait_requests(after, lambda e: e.is_blob or e.is_manifest, count=1, timeout=0.5, settle=0) == []


@pytest.mark.real
def test_cli_prefetch_of_an_alias_name_fills_the_cache_the_canonical_name_reads(upstream, pullthrough) -> None:  # type: ignore[no-untyped-def]
    pt = pullthrough()
    pt.stop()  # the command works on the configured cache with no server
    run = [sys.executable, "-m", "proxy", "prefetch", "--config", str(pt.config_path), "--json"]
    fetched = subprocess.run([*run, "index.docker.io/many:1"], capture_output=True, text=True, timeout=180)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    document = json.loads(fetched.stdout)
    assert document["failed"] == 0 and document["resources"][0]["resource"] == "index.docker.io/many:1"
    refused = subprocess.run([*run, "example.com/many:1"], capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1 and "registry 'example.com' is not configured" in refused.stdout + refused.stderr
    pt.restart()
    mark = upstream.mark()
    layer = upstream.images["library/many:1"].layers[0]
    served = httpx.get(f"{pt.url}/v2/docker.io/library/many/blobs/{layer.digest}", timeout=30)
    assert served.status_code == 200 and sha256_digest(served.content) == layer.digest
    assert blob_gets(upstream, mark) == []
