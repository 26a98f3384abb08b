"""OCI 1.1 referrers through the mirror: an artifact (an SBOM here) that refers to an image is listed
by `GET /v2/<name>/referrers/<digest>`, filtered by `artifactType`, cached per repository for
`referrers_ttl` (stale while the upstream is down) and pulled byte-exact.

The upstream is distribution 2.8, which has no referrers API: the artifact is pushed as oras and
cosign push it there, with the tag-schema index `sha256-<hex>` beside it, and the mirror answers
from that tag. A scripted upstream that does implement the API shows the pass-through side."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.images import ACCEPT_ALL, KIB, OCI_INDEX, OCI_MANIFEST, ImageSpec, publish, skopeo
from tests.servers.registry import Distribution
from tests.servers.scripted import ScriptedUpstream
from tests.test_oci_upstream_auth import APP, PASSWORD, USER, protected  # noqa: F401 - a fixture

pytestmark = pytest.mark.real

SBOM = "application/vnd.example.sbom.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
REPOSITORY = "team/app"
OTHER_REPOSITORY = "team/other"
ARTIFACT_TAG = "sbom-1"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Pushed:
    """What the upstream holds: the image, the artifact referring to it, and its blob."""

    subject: str  # the image manifest's digest
    artifact: bytes  # the artifact manifest, as pushed
    layer: bytes
    fallback: bytes  # the tag-schema index at sha256-<hex of subject>

    @property
    def artifact_digest(self) -> str:
        return digest_of(self.artifact)

    @property
    def fallback_tag(self) -> str:
        return self.subject.replace(":", "-")


def push_blob(http: httpx.Client, repository: str, data: bytes) -> dict:
    """A monolithic upload (POST, then PUT with the digest); the blob's descriptor without mediaType."""
    started = http.post(f"/v2/{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["location"]  # carries distribution's upload state in its query
    done = http.put(f"{location}{'&' if '?' in location else '?'}digest={digest_of(data)}", content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return {"digest": digest_of(data), "size": len(data)}


def push_manifest(http: httpx.Client, repository: str, reference: str, data: bytes, media_type: str) -> None:
    response = http.put(f"/v2/{repository}/manifests/{reference}", content=data, headers={"Content-Type": media_type})
    assert response.status_code == 201, response.text


def push_signed_image(registry: Distribution, workdir: Path) -> Pushed:
    """An image, an SBOM artifact whose subject it is, and the tag-schema index listing the SBOM,
    as an artifact client pushes them to a registry without the referrers API."""
    image = publish([ImageSpec(REPOSITORY, "1", seed=71, layers=[[2 * KIB]])], workdir, registry.host)[f"{REPOSITORY}:1"]
    publish([ImageSpec(OTHER_REPOSITORY, "1", seed=72, layers=[[KIB]])], workdir, registry.host)
    with httpx.Client(base_url=registry.url, timeout=30) as http:
        layer = json.dumps({"spdxVersion": "SPDX-2.3", "name": "app", "packages": [{"name": "libexample"}]}).encode()
        config = {"mediaType": EMPTY, **push_blob(http, REPOSITORY, b"{}"), "data": "e30="}
        annotations = {"org.opencontainers.image.created": "2026-12-02T00:00:00Z", "org.example.tool": "sbom-writer"}
        artifact = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SBOM, "config": config,
            "layers": [{"mediaType": "application/spdx+json", **push_blob(http, REPOSITORY, layer)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": image.manifest_size},
            "annotations": annotations,
        }, indent=2).encode()
        push_manifest(http, REPOSITORY, ARTIFACT_TAG, artifact, OCI_MANIFEST)  # as model weights are tagged
        listed = {"mediaType": OCI_MANIFEST, "digest": digest_of(artifact), "size": len(artifact), "artifactType": SBOM,
                  "annotations": annotations}
        fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [listed]}).encode()
        push_manifest(http, REPOSITORY, image.manifest_digest.replace(":", "-"), fallback, OCI_INDEX)
    return Pushed(image.manifest_digest, artifact, layer, fallback)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):  # type: ignore[no-untyped-def]
    """distribution 2.8 holding the signed image; tests that stop it start it again."""
    workdir = tmp_path_factory.mktemp("referrers")
    registry = Distribution.start(workdir / "registry")
    try:
        yield registry, push_signed_image(registry, workdir / "layouts")
    finally:
        registry.stop()


def mirror_of(url: str, **options: object) -> list[dict]:
    return [{"name": "docker.io", "url": url, "default": True, "tag_ttl": "1h", **options}]


def referrers(base_url: str, repository: str, subject: str, **params: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v2/{repository}/referrers/{subject}", params=params, timeout=60)


def test_an_artifact_referring_to_an_image_is_listed_through_the_mirror_from_the_tag_schema_of_distribution_2_8(
    signed, pullthrough
) -> None:  # type: ignore[no-untyped-def]
    registry, pushed = signed
    assert referrers(registry.url, REPOSITORY, pushed.subject).status_code == 404  # 2.8: no referrers API
    pt = pullthrough(mirror_of(registry.url))
    mark = registry.mark()
    listed = referrers(pt.url, REPOSITORY, pushed.subject)
    assert listed.status_code == 200 and listed.headers["content-type"] == OCI_INDEX
    assert "oci-filters-applied" not in listed.headers
    assert listed.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": json.loads(pushed.fallback)["manifests"]}
    entry = listed.json()["manifests"][0]
    assert (entry["digest"], entry["artifactType"], entry["annotations"]["org.example.tool"]) == (pushed.artifact_digest, SBOM, "sbom-writer")
    asked = registry.wait_requests(mark, lambda e: e.path.endswith(pushed.fallback_tag), count=1)
    assert [(e.method, e.path, e.status) for e in registry.requests_since(mark)] == [
        ("GET", f"/v2/{REPOSITORY}/referrers/{pushed.subject}", 404),
        ("GET", f"/v2/{REPOSITORY}/manifests/{pushed.fallback_tag}", 200),
    ] and len(asked) == 1
    # With the prefix and with containerd's ?ns=, the same list.
    prefixed = httpx.get(f"{pt.url}/v2/docker.io/{REPOSITORY}/referrers/{pushed.subject}", timeout=60)
    by_ns = httpx.get(f"{pt.url}/v2/{REPOSITORY}/referrers/{pushed.subject}?ns=docker.io", timeout=60)
    assert prefixed.content == by_ns.content == listed.content


def test_artifact_type_filters_the_cached_list_per_request(signed, pullthrough) -> None:  # type: ignore[no-untyped-def]
    registry, pushed = signed
    pt = pullthrough(mirror_of(registry.url))
    everything = referrers(pt.url, REPOSITORY, pushed.subject)
    assert len(everything.json()["manifests"]) == 1
    mark = registry.mark()
    matching = referrers(pt.url, REPOSITORY, pushed.subject, artifactType=SBOM)
    assert matching.status_code == 200 and matching.headers["oci-filters-applied"] == "artifactType"
    assert matching.json()["manifests"] == everything.json()["manifests"]
    none = referrers(pt.url, REPOSITORY, pushed.subject, artifactType="application/vnd.example.signature.v1")
    assert none.status_code == 200 and none.headers["oci-filters-applied"] == "artifactType"
    assert none.headers["content-type"] == OCI_INDEX and none.json()["manifests"] == []
    assert referrers(pt.url, REPOSITORY, pushed.subject).content == everything.content  # the cached list is whole
    assert registry.requests_since(mark) == []  # within referrers_ttl: three answers, no upstream request


def test_the_listed_artifact_its_blobs_and_the_tag_schema_index_pull_byte_exact_through_the_mirror(
    signed, pullthrough, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    registry, pushed = signed
    pt = pullthrough(mirror_of(registry.url))
    entry = referrers(pt.url, REPOSITORY, pushed.subject).json()["manifests"][0]
    with httpx.Client(base_url=pt.url, timeout=60, headers={"Accept": ACCEPT_ALL}) as http:
        for method in ("HEAD", "GET"):
            manifest = http.request(method, f"/v2/{REPOSITORY}/manifests/{entry['digest']}")
            assert manifest.status_code == 200 and manifest.headers["content-type"] == OCI_MANIFEST
            assert manifest.headers["docker-content-digest"] == pushed.artifact_digest
            assert int(manifest.headers["content-length"]) == len(pushed.artifact)
        assert manifest.content == pushed.artifact
        document = json.loads(manifest.content)
        assert document["artifactType"] == SBOM and document["subject"]["digest"] == pushed.subject
        for descriptor in (document["config"], *document["layers"]):
            blob = http.get(f"/v2/{REPOSITORY}/blobs/{descriptor['digest']}")
            assert blob.status_code == 200 and digest_of(blob.content) == descriptor["digest"]
        assert http.get(f"/v2/{REPOSITORY}/blobs/{document['layers'][0]['digest']}").content == pushed.layer
        # By tag, with the Accept of an artifact client (oras asks for the OCI types only).
        tagged = http.get(f"/v2/{REPOSITORY}/manifests/{ARTIFACT_TAG}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
        assert tagged.status_code == 200 and tagged.content == pushed.artifact
        assert (tagged.headers["content-type"], tagged.headers["docker-content-digest"]) == (OCI_MANIFEST, pushed.artifact_digest)
        # A client using the tag schema itself (cosign, oras against a 2.8 registry) pulls the tag.
        tag = http.get(f"/v2/{REPOSITORY}/manifests/{pushed.fallback_tag}")
        assert tag.status_code == 200 and tag.content == pushed.fallback and tag.headers["content-type"] == OCI_INDEX
        mark = registry.mark()
        assert http.get(f"/v2/{REPOSITORY}/manifests/{pushed.fallback_tag}").content == pushed.fallback
        assert registry.requests_since(mark) == []  # cached as a tag, like any other
    # skopeo copies the artifact (a non-image manifest) from the mirror into an OCI layout unchanged.
    layout = tmp_path / "artifact"
    skopeo("copy", "--src-tls-verify=false", f"docker://{pt.host}/{REPOSITORY}@{pushed.artifact_digest}", f"oci:{layout}:sbom")
    copied = json.loads((layout / "index.json").read_text())["manifests"][0]
    assert copied["digest"] == pushed.artifact_digest
    assert (layout / "blobs" / "sha256" / pushed.artifact_digest[7:]).read_bytes() == pushed.artifact
    assert (layout / "blobs" / "sha256" / digest_of(pushed.layer)[7:]).read_bytes() == pushed.layer


def test_the_list_is_served_stale_while_the_upstream_is_down_and_never_to_another_repository(
    signed, pullthrough
) -> None:  # type: ignore[no-untyped-def]
    registry, pushed = signed
    pt = pullthrough(mirror_of(registry.url, referrers_ttl="0s"))  # every request revalidates
    listed = referrers(pt.url, REPOSITORY, pushed.subject)
    assert listed.status_code == 200 and len(listed.json()["manifests"]) == 1
    mark = registry.mark()
    other = referrers(pt.url, OTHER_REPOSITORY, pushed.subject)
    assert other.status_code == 200 and other.json()["manifests"] == []  # its own answer, from its own upstream repository
    assert registry.wait_requests(mark, lambda e: e.path.startswith(f"/v2/{OTHER_REPOSITORY}/"), count=2)
    registry.stop()
    try:
        stale = referrers(pt.url, REPOSITORY, pushed.subject, artifactType=SBOM)
        assert stale.status_code == 200 and stale.json()["manifests"] == listed.json()["manifests"]
        cold = referrers(pt.url, "team/unseen", pushed.subject)
        assert cold.status_code == 503 and cold.json()["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        registry.restart()


def test_a_protected_upstream_is_asked_for_referrers_with_the_configured_credentials(protected, pullthrough) -> None:  # type: ignore[no-untyped-def]
    image = protected.images[APP.ref]
    entry = {"name": "docker.io", "url": protected.registry.url, "default": True}
    with_credentials = pullthrough([{**entry, "username": USER, "password": PASSWORD}])
    listed = referrers(with_credentials.url, APP.name, image.manifest_digest)
    assert listed.status_code == 200 and listed.json()["manifests"] == []  # no tag-schema index: nothing refers to it
    anonymous = pullthrough([entry])
    refused = referrers(anonymous.url, APP.name, image.manifest_digest)
    assert refused.status_code in (401, 403) and refused.json()["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")


# -- an upstream that implements the referrers API ------------------------------------------------------

SUBJECT = "sha256:" + "ab" * 32
SIGNATURE = "application/vnd.example.signature.v1"


def descriptor(n: int, artifact_type: str) -> dict:
    return {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{n:02x}" * 32, "size": 400 + n, "artifactType": artifact_type}


def paged_referrers(pages: list[bytes], headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A script answering the subject's referrers in `pages` (`?page=N`, linked), 404 elsewhere."""
    path = f"/v2/{REPOSITORY}/referrers/{SUBJECT}"

    def answer(method: str, target: str):  # type: ignore[no-untyped-def]
        if target.split("?")[0] == f"/v2/{REPOSITORY.replace('team', 'nobody')}/referrers/{SUBJECT}":
            return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repository"}]}'
        if target.split("?")[0] != path:
            return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}'
        number = int(target.partition("page=")[2] or 0)
        extra = {"Link": f'<{path}?page={number + 1}>; rel="next"'} if number + 1 < len(pages) else {}
        return 200, {"Content-Type": OCI_INDEX, **(headers or {}), **extra}, pages[number]

    return answer


def test_an_upstream_referrers_list_is_passed_through_byte_exact_and_cached(pullthrough) -> None:  # type: ignore[no-untyped-def]
    # Whitespace and key order of the upstream's own: a byte-exact pass-through keeps them.
    page = json.dumps({"manifests": [descriptor(1, SBOM), descriptor(2, SIGNATURE)], "schemaVersion": 2, "mediaType": OCI_INDEX}, indent=3).encode()
    upstream = ScriptedUpstream(paged_referrers([page]))
    try:
        pt = pullthrough(mirror_of(upstream.url))
        listed = referrers(pt.url, REPOSITORY, SUBJECT)
        assert listed.status_code == 200 and listed.content == page and listed.headers["content-type"] == OCI_INDEX
        head = httpx.head(f"{pt.url}/v2/{REPOSITORY}/referrers/{SUBJECT}", timeout=30)
        assert (head.status_code, head.content, int(head.headers["content-length"])) == (200, b"", len(page))
        signatures = referrers(pt.url, REPOSITORY, SUBJECT, artifactType=SIGNATURE)
        assert signatures.headers["oci-filters-applied"] == "artifactType"
        assert signatures.json()["manifests"] == [descriptor(2, SIGNATURE)]
        assert [path for _, _, path in upstream.requests("/referrers/")] == [f"/v2/{REPOSITORY}/referrers/{SUBJECT}"]
        unknown = referrers(pt.url, "nobody/app", SUBJECT)
        assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert upstream.requests("/manifests/") == []  # an upstream with the API is never asked for the tag schema
    finally:
        upstream.close()


def test_an_upstream_list_on_several_pages_is_merged_and_filtered_whole(pullthrough) -> None:  # type: ignore[no-untyped-def]
    pages = [
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(n, SBOM if n % 2 else SIGNATURE)]}).encode()
        for n in range(3)
    ]
    upstream = ScriptedUpstream(paged_referrers(pages))
    try:
        pt = pullthrough(mirror_of(upstream.url))
        listed = referrers(pt.url, REPOSITORY, SUBJECT)
        assert listed.status_code == 200 and "link" not in listed.headers
        assert listed.json()["manifests"] == [descriptor(0, SIGNATURE), descriptor(1, SBOM), descriptor(2, SIGNATURE)]
        sboms = referrers(pt.url, REPOSITORY, SUBJECT, artifactType=SBOM)
        assert sboms.json()["manifests"] == [descriptor(1, SBOM)] and sboms.headers["oci-filters-applied"] == "artifactType"
        assert [path.partition("?")[2] for _, _, path in upstream.requests("/referrers/")] == ["", "page=1", "page=2"]
    finally:
        upstream.close()


def test_a_bad_digest_or_an_unknown_registry_is_an_oci_error(pullthrough) -> None:  # type: ignore[no-untyped-def]
    upstream = ScriptedUpstream(paged_referrers([b"{}"]))
    try:
        pt = pullthrough(mirror_of(upstream.url))
        for digest in ("sha256:zz", "latest", "sha256:" + "a" * 63):
            bad = referrers(pt.url, REPOSITORY, digest)
            assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID", digest
        unknown = httpx.get(f"{pt.url}/v2/{REPOSITORY}/referrers/{SUBJECT}?ns=ghcr.io", timeout=30)
        assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert upstream.requests("/referrers/") == []
    finally:
        upstream.close()
