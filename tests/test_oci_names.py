"""Routing of /v2/ paths: ns, path prefix, default registry, library/, and the name grammar."""

from __future__ import annotations

import pytest

from proxy.config import RegistryConfig
from proxy.sources.oci.errors import DigestInvalid, NameInvalid, NameUnknown, OciError, TagInvalid, Unsupported
from proxy.sources.oci.names import Kind, Router

HUB = RegistryConfig(name="docker.io", url="https://registry-1.docker.io", default=True)
GHCR = RegistryConfig(name="ghcr.io", url="https://ghcr.io")
DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.fixture
def router() -> Router:
    return Router([HUB, GHCR])


def test_single_name_on_docker_hub_gets_library(router: Router) -> None:
    target = router.route("alpine/manifests/3.20", None)
    assert (target.registry.name, target.repository, target.kind, target.reference) == (
        "docker.io", "library/alpine", Kind.MANIFEST, "3.20")
    assert target.tag_key == "docker.io/library/alpine:3.20"


def test_ns_parameter_selects_the_registry(router: Router) -> None:
    target = router.route(f"owner/img/blobs/{DIGEST}", "ghcr.io")
    assert (target.registry.name, target.repository, str(target.digest)) == ("ghcr.io", "owner/img", DIGEST)


def test_path_prefix_selects_the_registry_and_is_stripped(router: Router) -> None:
    target = router.route("ghcr.io/owner/img/manifests/1", None)
    assert (target.registry.name, target.repository, target.prefix) == ("ghcr.io", "owner/img", "ghcr.io/")


def test_ghcr_single_names_do_not_get_library(router: Router) -> None:
    assert router.route("ghcr.io/img/manifests/1", None).repository == "img"


def test_tags_list_is_routed(router: Router) -> None:
    target = router.route("library/alpine/tags/list", None)
    assert (target.kind, target.repository) == (Kind.TAGS, "library/alpine")


@pytest.mark.parametrize(
    ("rest", "ns", "error"),
    [
        ("../../etc/passwd/blobs/" + DIGEST, None, NameInvalid),
        ("library/..%2f/manifests/1", None, NameInvalid),
        ("UPPER/manifests/1", None, NameInvalid),
        ("a" * 300 + "/manifests/1", None, NameInvalid),
        ("alpine/manifests/" + "x" * 200, None, TagInvalid),
        ("alpine/manifests/-bad", None, TagInvalid),
        ("alpine/blobs/sha256:abc", None, DigestInvalid),
        ("alpine/blobs/sha512:" + "a" * 128, None, DigestInvalid),
        ("alpine/blobs/md5:0123", None, DigestInvalid),
        ("alpine/blobs/uploads/", None, Unsupported),
        ("alpine/manifests/1", "evil.example", NameUnknown),
        ("nothing-here", None, NameInvalid),
    ],
)
def test_invalid_requests_raise_oci_errors(router: Router, rest: str, ns: str | None, error: type[OciError]) -> None:
    with pytest.raises(error):
        router.route(rest, ns)


def test_without_default_a_bare_name_is_unknown() -> None:
    with pytest.raises(NameUnknown):
        Router([GHCR]).route("alpine/manifests/1", None)
