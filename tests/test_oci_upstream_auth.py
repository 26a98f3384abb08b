"""An upstream that demands credentials: distribution in `auth: token` mode with a token issuer the tests run.

pullthrough must answer the upstream's bearer challenge with the configured credentials, cache one
token per scope, pass a refusal on to the client as OCI error JSON (401/403, never 5xx) without
caching anything, and never write a password or token to its log or its cache dir.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_module, require_tool
from tests.images import ACCEPT_ALL, KIB, ImageInfo, ImageSpec, build_layout, inspect_remote, sha256_digest
from tests.servers.pullthrough import Pullthrough
from tests.servers.registry import AccessEntry, Distribution
from tests.servers.token_issuer import Scope, TokenIssuer, TokenRequest

pytestmark = [pytest.mark.real, pytest.mark.timeout(180)]

USER = "puller"
#: Distinctive enough that finding it anywhere in a file cannot be a coincidence.
PASSWORD = "pw-" + uuid.uuid4().hex
PASSWORD_ENV = "PULLTHROUGH_TEST_UPSTREAM_PASSWORD"
REGISTRY_NAME = "upstream.test"

APP = ImageSpec("private/app", "1", seed=41, layers=[[3 * KIB], [5 * KIB, 7 * KIB]])
OTHER = ImageSpec("private/other", "1", seed=42, layers=[[4 * KIB]])


@dataclass
class ProtectedUpstream:
    """A token-protected distribution, its issuer, and what it holds (`images`: "name:tag" -> ImageInfo)."""

    issuer: TokenIssuer
    registry: Distribution
    images: dict[str, ImageInfo]

    def registry_config(self, **credentials: object) -> list[dict]:
        """The `[[registries]]` of a pullthrough that mirrors this upstream as upstream.test."""
        return [{"name": REGISTRY_NAME, "url": self.registry.url, "tag_ttl": "1h", **credentials}]


# -- the upstream --------------------------------------------------------------------------------------

def push_with_credentials(layout: Path, ref: str, registry_host: str, username: str, password: str) -> None:
    """skopeo copy into a registry that needs a token for push (tests/images.push sends no credentials)."""
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--dest-creds", f"{username}:{password}", f"oci:{layout}:{ref.rsplit(':', 1)[1]}",
            f"docker://{registry_host}/{ref}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"pushing {ref} failed ({result.returncode}): {result.stderr.strip()}")


@pytest.fixture(scope="module")
def protected(tmp_path_factory) -> ProtectedUpstream:
    require_tool("docker-registry")
    require_tool("skopeo")
    workdir = tmp_path_factory.mktemp("token-upstream")
    issuer = TokenIssuer.start(workdir / "issuer", users={USER: PASSWORD})
    registry = None
    try:
        registry = Distribution.start(workdir / "registry", auth_config=issuer.auth_config())
        images = {}
        for spec in (APP, OTHER):
            layout = workdir / "layouts" / spec.name.replace("/", "_")
            build_layout(spec, layout)
            push_with_credentials(layout, spec.ref, registry.host, USER, PASSWORD)
            token = issuer.token_for(USER, [f"repository:{spec.name}:pull"])
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
                images[spec.ref] = inspect_remote(registry.url, spec.name, spec.tag, client=client)
            # The guard against a vacuous pass: without a token the upstream says no.
            bare = httpx.get(f"{registry.url}/v2/{spec.name}/manifests/{spec.tag}", headers={"Accept": ACCEPT_ALL})
            assert bare.status_code == 401, bare
        yield ProtectedUpstream(issuer, registry, images)
    finally:
        if registry is not None:
            registry.stop()
        issuer.stop()


# -- helpers -------------------------------------------------------------------------------------------

def upstream_requests_settled(registry: Distribution, mark: int) -> list[AccessEntry]:
    """Upstream requests since `mark`, once everything sent before this call has been logged.

    A sentinel request sent now is logged after all earlier ones (distribution logs on completion).
    """
    sentinel = uuid.uuid4().hex
    httpx.get(f"{registry.url}/v2/", params={"sentinel": sentinel}, timeout=10)  # 401: logged all the same
    found = registry.wait_requests(mark, lambda e: sentinel in e.query, count=1, timeout=10, settle=0)
    assert found, "the upstream never logged the sentinel request"
    entries = registry.requests_since(mark)
    return entries[:next(i for i, e in enumerate(entries) if sentinel in e.query)]


def requests_for(requests: list[TokenRequest], repository: str) -> list[TokenRequest]:
    """Token requests whose scopes name `repository`."""
    return [r for r in requests if any((s := Scope.parse(text)) and s.name == repository for text in r.scopes)]


def assert_oci_refusal(response: httpx.Response) -> None:
    """401 UNAUTHORIZED or 403 DENIED as OCI error JSON; anything else (5xx above all) fails."""
    assert response.status_code in (401, 403), (response.status_code, response.text)
    if response.request.method == "HEAD":
        return
    body = response.json()
    codes = {error["code"] for error in body["errors"]}
    assert codes & {"UNAUTHORIZED", "DENIED"}, body


def cached_files(server: Pullthrough) -> list[Path]:
    """Every file under the cache dir's blobs/ and tmp/ (the index aside)."""
    return [p for sub in ("blobs", "tmp") for p in (server.cache_dir / sub).rglob("*") if p.is_file()]


def skopeo_pull(server: Pullthrough, ref: str, destination: Path) -> subprocess.CompletedProcess:
    """`skopeo copy` of upstream.test/`ref` through pullthrough's path prefix into a `dir:` layout."""
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
            f"docker://{server.host}/{REGISTRY_NAME}/{ref}", f"dir:{destination}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def assert_dir_matches(destination: Path, image: ImageInfo) -> None:
    """The `dir:` copy holds the upstream's manifest byte for byte and every blob with its digest."""
    manifest = (destination / "manifest.json").read_bytes()
    assert sha256_digest(manifest) == image.manifest_digest
    for blob in image.all_blobs():
        data = (destination / blob.digest.split(":", 1)[1]).read_bytes()
        assert sha256_digest(data) == blob.digest
        assert len(data) == blob.size


# -- the upstream really demands a token ------------------------------------------------------------------

def test_upstream_refuses_requests_without_a_token_and_accepts_the_issuers_tokens(protected):
    registry, issuer = protected.registry, protected.issuer
    image = protected.images[APP.ref]
    with httpx.Client(timeout=10) as client:
        bare = client.get(f"{registry.url}/v2/{APP.name}/manifests/{APP.tag}", headers={"Accept": ACCEPT_ALL})
        assert bare.status_code == 401
        challenge = bare.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert f'realm="{issuer.realm()}"' in challenge and f'service="{issuer.service}"' in challenge
        blob = client.get(f"{registry.url}/v2/{APP.name}/blobs/{image.layers[0].digest}")
        assert blob.status_code == 401

        anonymous = issuer.token_for(None, [f"repository:{APP.name}:pull"])
        refused = client.get(f"{registry.url}/v2/{APP.name}/manifests/{APP.tag}",
                             headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {anonymous}"})
        assert refused.status_code == 401

        granted = issuer.token_for(USER, [f"repository:{APP.name}:pull"])
        ok = client.get(f"{registry.url}/v2/{APP.name}/manifests/{APP.tag}",
                        headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {granted}"})
        assert ok.status_code == 200 and sha256_digest(ok.content) == image.manifest_digest
        other_repo = client.get(f"{registry.url}/v2/{OTHER.name}/manifests/{OTHER.tag}",
                                headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {granted}"})
        assert other_repo.status_code == 401, "a token must only open the repository it names"


# -- pulling with credentials --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["password", "password_env"])
def test_pull_with_configured_credentials_gets_the_upstream_digests(protected, pullthrough, tmp_path, how):
    if how == "password":
        server = pullthrough(protected.registry_config(username=USER, password=PASSWORD))
    else:
        server = pullthrough(protected.registry_config(username=USER, password_env=PASSWORD_ENV),
                             env={PASSWORD_ENV: PASSWORD})
    mark = protected.issuer.mark()

    result = skopeo_pull(server, APP.ref, tmp_path / "out")

    assert result.returncode == 0, result.stderr
    assert_dir_matches(tmp_path / "out", protected.images[APP.ref])
    served = requests_for(protected.issuer.requests_since(mark), APP.name)
    assert served and all(r.username == USER and r.status == 200 for r in served), served
    for blob in protected.images[APP.ref].all_blobs():
        path = server.cache_dir / "blobs" / "sha256" / blob.digest[7:9] / blob.digest[7:]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.digest[7:]


def test_tokens_are_fetched_once_per_scope_and_reused(protected, pullthrough):
    server = pullthrough(protected.registry_config(username=USER, password=PASSWORD))
    app, other = protected.images[APP.ref], protected.images[OTHER.ref]
    issuer, registry = protected.issuer, protected.registry
    issuer_mark, upstream_mark = issuer.mark(), registry.mark()
    base = f"{server.url}/v2/{REGISTRY_NAME}"

    with httpx.Client(timeout=30) as client:
        for blob in app.all_blobs():  # three blobs of one repository, each a cold GET upstream
            response = client.get(f"{base}/{APP.name}/blobs/{blob.digest}")
            assert response.status_code == 200 and sha256_digest(response.content) == blob.digest
        manifest = client.get(f"{base}/{APP.name}/manifests/{app.manifest_digest}", headers={"Accept": ACCEPT_ALL})
        assert manifest.status_code == 200 and sha256_digest(manifest.content) == app.manifest_digest
        assert len(requests_for(issuer.requests_since(issuer_mark), APP.name)) == 1

        response = client.get(f"{base}/{OTHER.name}/blobs/{other.layers[0].digest}")
        assert response.status_code == 200 and sha256_digest(response.content) == other.layers[0].digest

    served = issuer.requests_since(issuer_mark)
    assert len(requests_for(served, APP.name)) == 1, served
    assert len(requests_for(served, OTHER.name)) == 1, "a token for one repository must not be used for another"
    assert all(r.username == USER and r.status == 200 for r in served), served
    upstream = upstream_requests_settled(registry, upstream_mark)
    blob_gets = [e for e in upstream if e.method == "GET" and e.is_blob]
    assert {e.path.rsplit("/", 1)[-1] for e in blob_gets if e.status == 200} >= \
        {b.digest for b in app.all_blobs()} | {other.layers[0].digest}
    # Only a request that carried no token yet may be refused: at most one per repository.
    refused = [e for e in upstream if e.status == 401 and "sentinel" not in e.query]
    assert len([e for e in refused if f"/{APP.name}/" in e.path]) <= 1, refused
    assert len([e for e in refused if f"/{OTHER.name}/" in e.path]) <= 1, refused


def test_concurrent_first_requests_of_one_repository_share_one_token_request(protected, pullthrough):
    server = pullthrough(protected.registry_config(username=USER, password=PASSWORD))
    app = protected.images[APP.ref]
    mark = protected.issuer.mark()
    urls = [f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/blobs/{blob.digest}" for blob in app.all_blobs()] * 2

    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=len(urls))) as client, \
            ThreadPoolExecutor(max_workers=len(urls)) as pool:
        responses = list(pool.map(client.get, urls))

    for url, response in zip(urls, responses):
        assert response.status_code == 200 and sha256_digest(response.content) == url.rsplit("/", 1)[1]
    served = requests_for(protected.issuer.requests_since(mark), APP.name)
    assert len(served) == 1, served


def test_an_expired_token_is_not_used_again(protected, pullthrough):
    """A token past its `expires_in` is fetched anew (distribution's 60 s leeway would hide a stale one)."""
    server = pullthrough(protected.registry_config(username=USER, password=PASSWORD))
    app, issuer = protected.images[APP.ref], protected.issuer
    mark = issuer.mark()
    first, second = app.layers[0].digest, app.layers[1].digest
    saved, issuer.expires_in = issuer.expires_in, 2
    try:
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/blobs/{first}").status_code == 200
            time.sleep(2.5)  # the passage of time itself is what is under test: nothing to poll
            assert client.get(f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/blobs/{second}").status_code == 200
    finally:
        issuer.expires_in = saved
    assert len(requests_for(issuer.requests_since(mark), APP.name)) == 2


# -- pulling without (valid) credentials -----------------------------------------------------------------

@pytest.mark.parametrize("credentials", [{}, {"username": USER, "password": "not-" + PASSWORD}],
                         ids=["no-credentials", "wrong-password"])
def test_refused_upstream_gives_the_client_401_or_403_and_caches_nothing(protected, pullthrough, tmp_path,
                                                                         credentials):
    server = pullthrough(protected.registry_config(**credentials))
    image = protected.images[APP.ref]
    issuer_mark, upstream_mark = protected.issuer.mark(), protected.registry.mark()
    base = f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}"

    with httpx.Client(timeout=30) as client:
        for _ in range(2):  # a second try must not find anything cached by the first
            assert_oci_refusal(client.get(f"{base}/manifests/{APP.tag}", headers={"Accept": ACCEPT_ALL}))
            assert_oci_refusal(client.head(f"{base}/manifests/{APP.tag}", headers={"Accept": ACCEPT_ALL}))
            assert_oci_refusal(client.get(f"{base}/manifests/{image.manifest_digest}", headers={"Accept": ACCEPT_ALL}))
            assert_oci_refusal(client.get(f"{base}/blobs/{image.layers[0].digest}"))
            assert_oci_refusal(client.head(f"{base}/blobs/{image.layers[0].digest}"))
    result = skopeo_pull(server, APP.ref, tmp_path / "out")

    assert result.returncode != 0
    assert cached_files(server) == []
    upstream = upstream_requests_settled(protected.registry, upstream_mark)
    assert upstream, "pullthrough must have asked the upstream"
    assert not [e for e in upstream if e.status < 300], "the upstream must never have handed out content"
    served = protected.issuer.requests_since(issuer_mark)
    if credentials:
        assert served and all(r.username == USER and r.status == 401 for r in served), served
    else:
        assert all(not r.sent_credentials for r in served), served


def test_credentials_go_to_no_realm_on_another_host(protected, pullthrough, tmp_path_factory):
    """A challenge whose realm is on another host (here: localhost, not 127.0.0.1) gets no credentials."""
    issuer = protected.issuer
    workdir = tmp_path_factory.mktemp("foreign-realm")
    # Same storage, same issuer, but the challenge names the issuer as localhost:PORT.
    registry = Distribution.start(
        workdir, auth_config=issuer.auth_config(realm=issuer.realm(f"localhost:{issuer.port}")),
        extra_config={"storage": {"filesystem": {"rootdirectory": str(protected.registry.storage_dir)}}},
    )
    try:
        server = pullthrough([{"name": REGISTRY_NAME, "url": registry.url, "tag_ttl": "1h",
                               "username": USER, "password": PASSWORD}])
        mark = issuer.mark()
        response = httpx.get(f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/manifests/{APP.tag}",
                             headers={"Accept": ACCEPT_ALL}, timeout=30)
        assert_oci_refusal(response)
        assert not [r for r in issuer.requests_since(mark) if r.sent_credentials]
        assert cached_files(server) == []
    finally:
        registry.stop()


def test_a_token_the_upstream_refuses_is_dropped_and_fetched_again(protected, pullthrough):
    """The issuer's key changes (a rotation): tokens cached before it must not fail pulls until they expire."""
    server = pullthrough(protected.registry_config(username=USER, password=PASSWORD))
    app, issuer, registry = protected.images[APP.ref], protected.issuer, protected.registry
    first, second = app.layers[0].digest, app.layers[1].digest
    base = f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}"
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{base}/blobs/{first}").status_code == 200
        old_token = issuer.requests()[-1].token
        assert old_token is not None
        issuer.rotate_key()
        registry.restart()
        stale = httpx.get(f"{registry.url}/v2/{APP.name}/blobs/{second}",
                          headers={"Authorization": f"Bearer {old_token}"})
        assert stale.status_code == 401, "the upstream must refuse the old token, or this test proves nothing"
        mark = issuer.mark()

        response = client.get(f"{base}/blobs/{second}")

    assert response.status_code == 200, response.text
    assert sha256_digest(response.content) == second
    assert len(requests_for(issuer.requests_since(mark), APP.name)) == 1


# -- secrets stay secret ------------------------------------------------------------------------------------

def test_credentials_and_tokens_never_reach_the_log_or_the_cache_dir(protected, pullthrough, tmp_path):
    server = pullthrough(protected.registry_config(username=USER, password_env=PASSWORD_ENV),
                         env={PASSWORD_ENV: PASSWORD}, log_level="debug")
    mark = protected.issuer.mark()
    for spec in (APP, OTHER):
        result = skopeo_pull(server, spec.ref, tmp_path / spec.name.replace("/", "_"))
        assert result.returncode == 0, result.stderr
    # A refused request (wrong tag of a repository without a token yet) is logged too.
    httpx.get(f"{server.url}/v2/{REGISTRY_NAME}/private/none/manifests/1", timeout=30)
    tokens = [r.token for r in protected.issuer.requests_since(mark) if r.token]
    assert tokens, "pullthrough must have fetched tokens, or this test proves nothing"
    server.stop()  # flush the log and the database

    secrets = {"password": PASSWORD.encode(),
               "basic credentials": base64.b64encode(f"{USER}:{PASSWORD}".encode())}
    for number, token in enumerate(tokens):
        secrets[f"token {number}"] = token.encode()
        secrets[f"token {number} signature"] = token.rsplit(".", 1)[1].encode()
    files = [server.log_path] + [p for p in server.cache_dir.rglob("*") if p.is_file()]
    assert server.log_path.stat().st_size > 0 and len(files) > 2
    leaks = [(str(path), what) for path in files for what, needle in secrets.items()
             if needle in path.read_bytes()]
    assert leaks == []


# -- Basic auth directly ------------------------------------------------------------------------------------

def _htpasswd_line(username: str, password: str) -> str:
    """An htpasswd entry in bcrypt, the only format distribution's htpasswd reads (the `bcrypt`
    package: Python 3.13 has no crypt module)."""
    require_module("bcrypt")
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert hashed.startswith("$2b$")
    return f"{username}:{hashed}\n"


def test_basic_challenge_is_answered_with_the_configured_credentials(protected, pullthrough, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("htpasswd-upstream")
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(_htpasswd_line(USER, PASSWORD))
    registry = Distribution.start(
        workdir / "registry", auth_config={"htpasswd": {"realm": "pullthrough-tests", "path": str(htpasswd)}},
        extra_config={"storage": {"filesystem": {"rootdirectory": str(protected.registry.storage_dir)}}},
    )
    try:
        image = protected.images[APP.ref]
        bare = httpx.get(f"{registry.url}/v2/{APP.name}/manifests/{APP.tag}", timeout=10)
        assert bare.status_code == 401 and bare.headers["www-authenticate"].lower().startswith("basic ")

        anonymous = pullthrough([{"name": REGISTRY_NAME, "url": registry.url, "tag_ttl": "1h"}])
        refused = httpx.get(f"{anonymous.url}/v2/{REGISTRY_NAME}/{APP.name}/manifests/{APP.tag}",
                            headers={"Accept": ACCEPT_ALL}, timeout=30)
        assert_oci_refusal(refused)

        server = pullthrough([{"name": REGISTRY_NAME, "url": registry.url, "tag_ttl": "1h",
                               "username": USER, "password": PASSWORD}])
        with httpx.Client(timeout=30) as client:
            manifest = client.get(f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/manifests/{APP.tag}",
                                  headers={"Accept": ACCEPT_ALL})
            assert manifest.status_code == 200 and sha256_digest(manifest.content) == image.manifest_digest
            for blob in image.all_blobs():
                response = client.get(f"{server.url}/v2/{REGISTRY_NAME}/{APP.name}/blobs/{blob.digest}")
                assert response.status_code == 200 and sha256_digest(response.content) == blob.digest
        assert json.loads(manifest.content)["layers"]
    finally:
        registry.stop()
