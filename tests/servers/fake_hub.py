"""A fake Hugging Face Hub and its LFS CDN on two loopback ports, built from repos declared in code.

It answers what huggingface.co answers to what huggingface_hub 2.x sends: small files through a
relative 307 to `/api/resolve-cache/...`, LFS and Xet files through an absolute 302 to a signed URL
on a separate CDN host (another port is a foreign host to the client), Xet headers, `xetHash` in
tree listings, a `xet-read-token` route pointing at a CAS that has nothing (or, with `FakeHub.start(dir,
cas=FakeCas.start(...))`, at that fake CAS, to which Xet files are then uploaded by the real hf_xet so their
`xetHash` is real), cursor-paginated trees with an absolute `Link`, and the Hub's errors (`X-Error-Code`,
`X-Error-Message`, JSON body).
Every request is recorded (`hits()`, `downloads()`), and the whole upstream can be stopped (connection
refused, live connections cut) or switched to 503.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .fake_cas import FakeCas
from .http_double import DoubleHandler, LoopbackHosts, LoopbackServer
from .ports import free_port

#: Files at least this big are stored in LFS (the Hub's default .gitattributes adds the extensions below).
DEFAULT_LFS_THRESHOLD = 64 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".h5", ".onnx", ".gguf", ".parquet", ".msgpack")

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

CREATED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

EXPOSE_HEADERS = ("X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,Link,Accept-Ranges,"
                  "Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub sends as ETag for a file stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def fake_xet_hash(data: bytes) -> str:
    """64 hex characters, as a Xet merkle hash is (the value is not a real Xet hash; nothing can use it)."""
    return hashlib.sha256(b"xet-merkle\0" + data).hexdigest()


@dataclass(frozen=True)
class FakeFile:
    path: str
    data: bytes
    lfs: bool
    xet: bool
    #: Set when the file was uploaded to a FakeCas: its real Xet file hash.
    real_xet_hash: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @functools.cached_property
    def oid(self) -> str:
        """The git blob id: of the pointer file for LFS files, of the content otherwise."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What the client names the blob by: sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.oid

    @functools.cached_property
    def xet_hash(self) -> str | None:
        if not self.xet:
            return None
        return self.real_xet_hash or fake_xet_hash(self.data)


@dataclass
class Commit:
    sha: str
    title: str
    date: datetime
    files: dict[str, FakeFile]

    def directories(self) -> set[str]:
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def tree_oid(self, directory: str) -> str:
        prefix = directory + "/"
        inner = sorted((p, f.oid) for p, f in self.files.items() if p.startswith(prefix))
        return hashlib.sha1(("tree\0" + json.dumps(inner)).encode()).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str
    private: bool
    gated: str | bool  # False, "auto" or "manual"
    xet: bool
    authorized_tokens: set[str]
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.repo_type, self.repo_id)

    @property
    def url_prefix(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> Commit | None:
        """A branch, tag, `refs/...` name, or a (prefix of a) commit sha -> the commit."""
        for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if ref in self.refs and (ref.startswith("refs/")):
                return self.commits[self.refs[ref]]
        if revision in self.commits:
            return self.commits[revision]
        if 7 <= len(revision) < 40 and all(c in "0123456789abcdef" for c in revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None

    def commit(self, revision: str = "main") -> str:
        """The commit sha `revision` points at (raises KeyError when it points nowhere)."""
        found = self.resolve(revision)
        if found is None:
            raise KeyError(revision)
        return found.sha

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return {path: f.data for path, f in self.resolve(revision).files.items()}


@dataclass(frozen=True)
class Hit:
    """One request the fake Hub or CDN answered."""

    host: str  # "hub" or "cdn"
    # resolve, resolve-cache, info, tree, paths-info, refs, auth-check, xet-token (hub);
    # lfs, xet-bridge, cas (cdn); other
    kind: str
    method: str
    target: str
    status: int
    repo: str | None = None  # "model:org/name"
    revision: str | None = None
    path: str | None = None  # file or folder path inside the repo
    authorization: str | None = None
    range: str | None = None
    user_agent: str | None = None


class _Server(LoopbackServer):
    def __init__(self, port: int, hub: "FakeHub", role: str) -> None:
        self.hub = hub
        super().__init__(port, _Handler, role)


class _Reply(Exception):
    """Raised inside a route to answer at once."""

    def __init__(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers or {}
        self.body = body


def hub_error(status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> _Reply:
    headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    headers.update(extra or {})
    return _Reply(status, headers, json.dumps({"error": message}).encode())


class FakeHub(LoopbackHosts):
    """The Hub at `url` and its CDN at `cdn_url`; declare repos with `add_repo`, read traffic with `hits()`."""

    def __init__(self, workdir: Path, *, lfs_threshold: int = DEFAULT_LFS_THRESHOLD, tree_page_size: int = 3,
                 small_file_redirect: bool = True, cas: FakeCas | None = None) -> None:
        super().__init__()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "fake_hub.log"
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        #: The Hub answers resolve of a git-stored file with a relative 307 to /api/resolve-cache/...
        self.small_file_redirect = small_file_redirect
        #: True: every request to the Hub and the CDN gets 503.
        self.unavailable = False
        #: Bytes per second for CDN bodies (None: as fast as possible), to keep a cold download in flight.
        self.cdn_rate: float | None = None
        #: While set to an unset Event, CDN answers send their headers and hold their bodies until it is set.
        self.cdn_gate: threading.Event | None = None
        #: Where Xet files live: None keeps the placeholder hashes and a CAS route that has nothing.
        self.cas = cas
        self._cas_hashes: dict[str, str] = {}  # sha256 -> Xet file hash of what was uploaded to `cas`
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.valid_tokens: set[str] = set()
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._secret = hashlib.sha256(str(time.time_ns()).encode()).digest()
        self.port = free_port()
        self.cdn_port = free_port()

    # -- lifecycle --------------------------------------------------------------------------------

    def _hosts(self) -> dict[str, int]:
        return {"hub": self.port, "cdn": self.cdn_port}

    def _server(self, port: int, role: str) -> _Server:
        return _Server(port, self, role)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    # -- content ----------------------------------------------------------------------------------

    def add_token(self, token: str) -> None:
        """A valid user token that has been granted nothing."""
        self.valid_tokens.add(token)

    def add_repo(self, repo_id: str, *, repo_type: str = "model", files: dict[str, bytes] | None = None,
                 branches: dict[str, dict[str, bytes]] | None = None, tags: dict[str, str] | None = None,
                 prs: dict[int, dict[str, bytes]] | None = None, private: bool = False,
                 gated: bool | str = False, xet: bool = False, authorized_tokens: Iterable[str] = (),
                 lfs_paths: Iterable[str] = ()) -> FakeRepo:
        """Declare a repo. `files` is `main`; `branches` adds (or replaces) branches; `tags` maps a tag
        to a branch name or commit; `prs` maps N to the files of `refs/pr/N`. Files of a Xet repo that
        are in LFS are Xet-backed (uploaded to the hub's FakeCas by the real hf_xet when it has one).
        Commit shas are derived from the content, so they are stable."""
        if repo_type not in URL_PREFIXES:
            raise ValueError(repo_type)
        if gated is True:
            gated = "manual"
        repo = FakeRepo(repo_id, repo_type, private, gated, xet, set(authorized_tokens))
        self.valid_tokens |= repo.authorized_tokens
        lfs_paths = set(lfs_paths)
        heads = {"main": files or {}}
        heads.update(branches or {})
        for n, pr_files in (prs or {}).items():
            heads[f"refs/pr/{n}"] = pr_files
        for n, (name, content) in enumerate(heads.items()):
            ref = name if name.startswith("refs/") else f"refs/heads/{name}"
            fake_files = {path: self._make_file(path, data, xet, path in lfs_paths) for path, data in content.items()}
            fake_files = self._upload_to_cas(fake_files)
            digest = hashlib.sha1(json.dumps([repo_type, repo_id, ref, sorted(
                (p, f.oid) for p, f in fake_files.items())]).encode()).hexdigest()
            title = "Initial commit" if ref == "refs/heads/main" else f"Update {ref}"
            repo.commits[digest] = Commit(digest, title, CREATED + timedelta(hours=n), fake_files)
            repo.refs[ref] = digest
        for tag, target in (tags or {}).items():
            repo.refs[f"refs/tags/{tag}"] = repo.commit(target)
        self.repos[repo.key] = repo
        return repo

    def _make_file(self, path: str, data: bytes, xet: bool, force_lfs: bool) -> FakeFile:
        lfs = force_lfs or len(data) >= self.lfs_threshold or path.endswith(LFS_SUFFIXES)
        return FakeFile(path, data, lfs=lfs, xet=xet and lfs)

    def _upload_to_cas(self, files: dict[str, FakeFile]) -> dict[str, FakeFile]:
        """With a CAS, Xet files get their real hash: uploaded once per content, all new ones in one hf_xet run."""
        if self.cas is None:
            return files
        pending = {f.sha256: f.data for f in files.values() if f.xet and f.sha256 not in self._cas_hashes}
        if pending:
            hashes = self.cas.upload_bytes(*pending.values())
            self._cas_hashes.update(zip(pending, hashes))
        return {path: dataclasses.replace(f, real_xet_hash=self._cas_hashes[f.sha256]) if f.xet else f
                for path, f in files.items()}

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        return self.repos[(repo_type, repo_id)]

    # -- traffic ----------------------------------------------------------------------------------

    def record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)
        auth = "-" if hit.authorization is None else \
            "auth#" + hashlib.sha256(hit.authorization.encode()).hexdigest()[:8]
        line = f"{time.strftime('%H:%M:%S')} {hit.host} {hit.method} {hit.target} {hit.status} {hit.kind} {auth}" \
               f" range={hit.range or '-'}\n"
        with self._lock, open(self.log_path, "a") as log:
            log.write(line)

    def hits(self, *, host: str | None = None, kind: str | Iterable[str] | None = None, method: str | None = None,
             path: str | None = None, repo: str | None = None) -> list[Hit]:
        """Recorded requests, filtered; `repo` is "org/name" (any type) or "dataset:org/name"."""
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind is not None else None
        with self._lock:
            hits = list(self._hits)
        out = []
        for hit in hits:
            if host and hit.host != host or kinds and hit.kind not in kinds or method and hit.method != method:
                continue
            if path is not None and hit.path != path:
                continue
            if repo is not None and hit.repo not in (repo, f"model:{repo}") and not (
                    hit.repo and ":" not in repo and hit.repo.split(":", 1)[1] == repo):
                continue
            out.append(hit)
        return out

    def count(self, **filters) -> int:
        return len(self.hits(**filters))

    def downloads(self, **filters) -> list[Hit]:
        """GETs that can carry file bytes: resolve (hub), resolve-cache (hub), LFS and Xet bridge (CDN)."""
        return self.hits(kind=("resolve", "resolve-cache", "lfs", "xet-bridge"), method="GET", **filters)

    def reset_hits(self) -> None:
        with self._lock:
            self._hits.clear()

    # -- signed CDN URLs --------------------------------------------------------------------------

    def sign(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}\0{expires}".encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, repo: FakeRepo, file: FakeFile) -> str:
        repo_hash = hashlib.sha256(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()
        if file.xet:
            path = f"/xet-bridge-us/{repo_hash[:24]}/{file.xet_hash}"
        else:
            path = f"/repos/{repo_hash[:2]}/{repo_hash[2:4]}/{repo_hash}/{file.sha256}"
        expires = int(time.time()) + 3600
        name = file.path.rsplit("/", 1)[-1]
        disposition = quote(f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";", safe="")
        return (f"{self.cdn_url}{path}?response-content-disposition={disposition}"
                f"&Expires={expires}&Signature={self.sign(path, expires)}&Key-Pair-Id=KFAKEHUB")

    def cdn_object(self, path: str) -> FakeFile | None:
        name = path.rsplit("/", 1)[-1]
        for repo in self.repos.values():
            for commit in repo.commits.values():
                for file in commit.files.values():
                    if file.lfs and (path.startswith("/repos/") and file.sha256 == name
                                     or path.startswith("/xet-bridge-us/") and file.xet_hash == name):
                        return file
        return None


class _Handler(DoubleHandler):
    server: _Server

    # -- plumbing ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.server.hub
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.hit_info: dict = {"kind": "other"}
        try:
            if hub.unavailable:
                raise _Reply(503, {"Content-Type": "text/plain"}, b"Service Unavailable")
            if self.server.role == "hub":
                self._hub_route()
            else:
                self._cdn_route()
            raise _Reply(404, {"Content-Type": "text/plain"}, b"Not Found")
        except _Reply as reply:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, reply: _Reply) -> None:
        hub = self.server.hub
        status = reply.status
        hub.record(Hit(host=self.server.role, method=self.command, target=self.path, status=status,
                       authorization=self.headers.get("Authorization"), range=self.headers.get("Range"),
                       user_agent=self.headers.get("User-Agent"), **self.hit_info))
        try:
            self.send_response(status)
            headers = dict(reply.headers)
            body = reply.body
            if "Content-Length" not in headers:
                headers["Content-Length"] = str(len(body))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                gate = hub.cdn_gate if self.server.role == "cdn" else None
                if gate is not None:
                    self.wfile.flush()
                    gate.wait(timeout=120)
                rate = hub.cdn_rate if self.server.role == "cdn" else None
                if rate:
                    self._write_body(body, 64 * 1024, 64 * 1024 / rate)
                else:
                    self._write_body(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    # -- access rules -----------------------------------------------------------------------------

    def _find_repo(self, repo_type: str, repo_id: str) -> FakeRepo:
        """The repo if this caller may see it exists; RepoNotFound (401 anonymous, 404 with a token) otherwise."""
        hub = self.server.hub
        token = self._bearer_token()
        if token is not None and token not in hub.valid_tokens:
            raise hub_error(401, None, "Invalid credentials in Authorization header")
        repo = hub.repos.get((repo_type, repo_id))
        if repo is None or repo.private and token not in repo.authorized_tokens:
            raise hub_error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _check_content_access(self, repo: FakeRepo) -> None:
        """Gated repos: file content only for tokens the repo authorized (401 anonymous, 403 others)."""
        if not repo.gated:
            return
        token = self._bearer_token()
        if token in repo.authorized_tokens:
            return
        kind = repo.repo_type
        if token is None:
            raise hub_error(401, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted. You must have access "
                                              f"to it and be authenticated to access it. Please log in.")
        raise hub_error(403, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted and you are not in the "
                                          f"authorized list. Visit https://huggingface.co/{repo.url_prefix} to ask "
                                          f"for access.")

    def _commit(self, repo: FakeRepo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # -- hub routes -------------------------------------------------------------------------------

    def _hub_route(self) -> None:
        raw_path = urlsplit(self.path).path
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if segments and segments[0] == "api":
            self._api_route(segments[1:])
            return
        if self.command not in ("GET", "HEAD"):
            return
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type = REPO_TYPES[segments[0]]
            segments = segments[1:]
        n = 1 if len(segments) > 1 and segments[1] == "resolve" else 2
        if len(segments) > n + 2 and segments[n] == "resolve":
            revision, rest = _split_revision(segments[n + 1:])
            self._resolve(repo_type, "/".join(segments[:n]), revision, "/".join(rest), cache=False)

    def _repo_id_length(self, repo_type: str, rest: list[str], actions: tuple[str, ...]) -> int:
        """How many of `rest`'s segments name the repo: 1 for a canonical id ("gpt2"), else 2."""
        if len(rest) == 1 or len(rest) >= 2 and rest[1] in actions and (repo_type, rest[0]) in self.server.hub.repos:
            return 1
        return 2

    def _api_route(self, segments: list[str]) -> None:
        if self.command not in ("GET", "HEAD", "POST"):
            return
        if len(segments) >= 4 and segments[0] == "resolve-cache" and segments[1] in REPO_TYPES:
            # /api/resolve-cache/{type}s/{repo id}/{commit}/{path}
            repo_type = REPO_TYPES[segments[1]]
            rest = segments[2:]
            n = 1 if len(rest) > 1 and len(rest[1]) == 40 and (repo_type, rest[0]) in self.server.hub.repos else 2
            if len(rest) >= n + 2 and self.command in ("GET", "HEAD"):
                self._resolve(repo_type, "/".join(rest[:n]), rest[n], "/".join(rest[n + 1:]), cache=True)
            return
        if len(segments) < 2 or segments[0] not in REPO_TYPES:
            return
        repo_type = REPO_TYPES[segments[0]]
        rest = segments[1:]
        actions = ("revision", "tree", "paths-info", "refs", "auth-check", "xet-read-token")
        n = self._repo_id_length(repo_type, rest, actions)
        repo_id = "/".join(rest[:n])
        tail = rest[n:]
        self.hit_info = {"kind": "info", "repo": f"{repo_type}:{repo_id}"}
        if not tail:
            if self.command == "GET":
                self._info(repo_type, repo_id, "main")
            return
        action = tail[0]
        if action not in actions:
            self.hit_info["kind"] = "other"
            return
        self.hit_info["kind"] = {"revision": "info", "xet-read-token": "xet-token"}.get(action, action)
        if action == "revision" and len(tail) >= 2 and self.command == "GET":
            revision, _ = _split_revision(tail[1:])
            self._info(repo_type, repo_id, revision)
        elif action == "tree" and len(tail) >= 2 and self.command == "GET":
            revision, folder = _split_revision(tail[1:])
            self._tree(repo_type, repo_id, revision, "/".join(folder))
        elif action == "paths-info" and len(tail) >= 2 and self.command == "POST":
            revision, _ = _split_revision(tail[1:])
            self._paths_info(repo_type, repo_id, revision)
        elif action == "refs" and self.command == "GET":
            self._refs(repo_type, repo_id)
        elif action == "auth-check" and self.command == "GET":
            self._auth_check(repo_type, repo_id)
        elif action == "xet-read-token" and len(tail) >= 2 and self.command == "GET":
            revision, _ = _split_revision(tail[1:])
            self._xet_read_token(repo_type, repo_id, revision)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, *, cache: bool) -> None:
        hub = self.server.hub
        self.hit_info = {"kind": "resolve-cache" if cache else "resolve", "repo": f"{repo_type}:{repo_id}",
                         "revision": revision, "path": path}
        repo = self._find_repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        self._check_content_access(repo)
        file = commit.files.get(path)
        if file is None:
            raise hub_error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        common = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Access-Control-Allow-Origin": "https://huggingface.co",
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
            "Vary": "Origin",
            "X-Request-Id": f"Root=1-{hashlib.sha1(self.path.encode()).hexdigest()[:24]}",
        }
        if file.lfs:
            location = hub.cdn_location(repo, file)
            headers = {**common, "Content-Type": "text/plain; charset=utf-8", "Location": location,
                       "X-Linked-Size": str(file.size), "X-Linked-ETag": f'"{file.sha256}"',
                       "ETag": f'"{file.oid}"'}
            if file.xet:
                token_route = f"{hub.url}/api/{repo_type}s/{repo_id}/xet-read-token/{commit.sha}"
                headers["X-Xet-Hash"] = file.xet_hash
                headers["X-Xet-Refresh-Route"] = f"/api/{repo_type}s/{repo_id}/xet-read-token/{commit.sha}"
                cas_url = hub.cas.url if hub.cas is not None else f"{hub.cdn_url}/xet-cas"
                headers["Link"] = (f'<{token_route}>; rel="xet-auth", '
                                   f'<{cas_url}/v1/reconstructions/{file.xet_hash}>; '
                                   f'rel="xet-reconstruction-info"')
            raise _Reply(302, headers, f"Found. Redirecting to {location}".encode())
        etag = f'"{file.oid}"'
        if not cache and hub.small_file_redirect:
            original = quote(f"/{repo.url_prefix}/resolve/{quote(revision, safe='')}/{path}", safe="")
            location = (f"/api/resolve-cache/{repo_type}s/{repo_id}/{commit.sha}/{quote(path)}"
                        f"?{original}=&etag={quote(etag, safe='')}")
            raise _Reply(307, {**common, "Content-Type": "text/plain; charset=utf-8", "Location": location,
                               "ETag": etag},
                         f"Temporary Redirect. Redirecting to {location}".encode())
        name = path.rsplit("/", 1)[-1]
        headers = {**common, "ETag": etag, "Content-Type": _content_type(path),
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
                   "Cache-Control": "public, max-age=31536000, immutable" if cache else "no-cache"}
        if self.headers.get("If-None-Match") == etag:
            raise _Reply(304, headers)
        raise _ranged(self.headers.get("Range"), file.data, headers)

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        self.hit_info.update(revision=revision)
        repo = self._find_repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        query = self._query()
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for path in sorted(commit.files):
            entry: dict = {"rfilename": path}
            if with_blobs:
                file = commit.files[path]
                entry.update(size=file.size, blobId=file.oid)
                if file.lfs:
                    entry["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
            siblings.append(entry)
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(CREATED),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo_type == "model":
            body.update(modelId=repo_id, library_name="transformers", spaces=[], pipeline_tag=None)
        elif repo_type == "dataset":
            body.update(description="", citation="", cardData={})
        else:
            body.update(sdk="static", runtime={"stage": "RUNNING"})
        raise _json(200, body)

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            file = commit.files[path]
            entry: dict = {"type": "file", "oid": file.oid, "size": file.size}
            if file.lfs:
                entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
            if file.xet:
                entry["xetHash"] = file.xet_hash
        else:
            entry = {"type": "directory", "oid": commit.tree_oid(path), "size": 0}
        entry["path"] = path
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": _iso(commit.date)}
            if entry["type"] == "file":
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                               "pickleImportScan": None}
        return entry

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        hub = self.server.hub
        self.hit_info.update(revision=revision, path=folder)
        repo = self._find_repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        query = self._query()
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        expand = query.get("expand", ["false"])[0].lower() in ("true", "1")
        directories = commit.directories()
        if folder and folder not in directories:
            raise hub_error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"",
                            {"X-Repo-Commit": commit.sha})
        prefix = folder + "/" if folder else ""
        paths = []
        for path in sorted(set(commit.files) | directories):
            if not path.startswith(prefix):
                continue
            if not recursive and "/" in path[len(prefix):]:
                continue
            paths.append(path)
        # folders first, as the Hub lists them
        paths.sort(key=lambda p: (p not in directories, p))
        after = None
        if "cursor" in query:
            try:
                after = json.loads(base64.b64decode(query["cursor"][0]))["file_name"]
                start = paths.index(after) + 1
            except (ValueError, KeyError, json.JSONDecodeError):
                raise hub_error(400, None, "Invalid cursor")
        else:
            start = 0
        page = paths[start:start + hub.tree_page_size]
        headers = {}
        if start + hub.tree_page_size < len(paths):
            cursor = base64.b64encode(json.dumps({"file_name": page[-1]}).encode()).decode()
            base = urlsplit(self.path).path
            link = (f"{hub.url}{base}?recursive={'true' if recursive else 'false'}"
                    f"&expand={'true' if expand else 'false'}&cursor={quote(cursor, safe='')}")
            headers["Link"] = f'<{link}>; rel="next"'
        raise _json(200, [self._entry(commit, p, expand) for p in page], headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        self.hit_info.update(revision=revision)
        repo = self._find_repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            data = json.loads(self.body or b"{}")
            paths = data.get("paths", [])
            expand = bool(data.get("expand", False))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("true", "1")
        if isinstance(paths, str):
            paths = [paths]
        directories = commit.directories()
        entries = [self._entry(commit, p.strip("/"), expand) for p in paths
                   if p.strip("/") in commit.files or p.strip("/") in directories]
        raise _json(200, entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._find_repo(repo_type, repo_id)
        include_prs = self._query().get("include_prs", ["0"])[0].lower() in ("1", "true")
        groups: dict[str, list] = {"branches": [], "converts": [], "tags": []}
        prs = []
        for ref, sha in sorted(repo.refs.items()):
            kind, _, name = ref[len("refs/"):].partition("/")
            item = {"name": name, "ref": ref, "targetCommit": sha}
            if kind == "heads":
                groups["branches"].append(item)
            elif kind == "tags":
                groups["tags"].append(item)
            elif kind == "convert":
                groups["converts"].append(item)
            elif kind == "pr":
                prs.append(item)
        if include_prs:
            groups["pullRequests"] = prs
        raise _json(200, groups)

    def _auth_check(self, repo_type: str, repo_id: str) -> None:
        repo = self._find_repo(repo_type, repo_id)
        self._check_content_access(repo)
        raise _json(200, {"auth": {"type": "access_token" if self._bearer_token() else "anonymous"}})

    def _xet_read_token(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.server.hub
        self.hit_info.update(revision=revision)
        repo = self._find_repo(repo_type, repo_id)
        self._commit(repo, revision)
        self._check_content_access(repo)
        expires = int(time.time()) + 3600
        token = "xet_" + hashlib.sha256(f"{repo_id}{expires}".encode()).hexdigest()[:32]
        cas = f"{hub.cdn_url}/xet-cas"
        if hub.cas is not None:
            token, cas = hub.cas.token, hub.cas.url
        raise _json(200, {"accessToken": token, "exp": expires, "casUrl": cas},
                    {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires)})

    # -- CDN --------------------------------------------------------------------------------------

    def _cdn_route(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        path = split.path
        if path.startswith("/xet-cas"):
            self.hit_info = {"kind": "cas"}
            raise _Reply(404, {"Content-Type": "application/json"}, b'{"error":"not found"}')
        kind = "xet-bridge" if path.startswith("/xet-bridge-us/") else "lfs" if path.startswith("/repos/") else "other"
        self.hit_info = {"kind": kind}
        if kind == "other" or self.command not in ("GET", "HEAD"):
            return
        query = parse_qs(split.query)
        file = hub.cdn_object(path)
        if file is not None:
            self.hit_info["path"] = file.path
        try:
            expires = int(query["Expires"][0])
            signature = query["Signature"][0]
        except (KeyError, ValueError):
            raise _Reply(403, {"Content-Type": "application/xml"},
                         b"<Error><Code>MissingKey</Code><Message>Missing Key-Pair-Id query parameter or cookie"
                         b" value</Message></Error>")
        if not hmac.compare_digest(signature, hub.sign(path, expires)) or expires < time.time():
            raise _Reply(403, {"Content-Type": "application/xml"},
                         b"<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>")
        if file is None:
            raise _Reply(404, {"Content-Type": "application/xml"}, b"<Error><Code>NoSuchKey</Code></Error>")
        headers = {"Content-Type": "binary/octet-stream", "ETag": f'"{file.sha256}"',
                   "Last-Modified": "Tue, 02 Jan 2024 03:04:05 GMT", "Accept-Ranges": "bytes",
                   "Cache-Control": "public, max-age=604800, immutable, s-maxage=604800",
                   "X-Cache": "Hit from cloudfront"}
        if "response-content-disposition" in query:
            headers["Content-Disposition"] = query["response-content-disposition"][0]
        if self.headers.get("If-None-Match") == headers["ETag"]:
            raise _Reply(304, headers)
        raise _ranged(self.headers.get("Range"), file.data, headers)


def _split_revision(segments: list[str]) -> tuple[str, list[str]]:
    """`refs/pr/1/...` (an unquoted special ref) or one segment (quoted, may hold '/') -> (revision, rest)."""
    if len(segments) >= 3 and segments[0] == "refs" and segments[1] in ("pr", "convert", "heads", "tags"):
        return "/".join(segments[:3]), segments[3:]
    return segments[0], segments[1:]


def _ranged(range_header: str | None, data: bytes, headers: dict[str, str]) -> _Reply:
    size = len(data)
    if range_header and range_header.startswith("bytes="):
        spec = range_header[len("bytes="):].split(",")[0].strip()
        first, _, last = spec.partition("-")
        try:
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
        except ValueError:
            return _Reply(200, headers, data)
        if start >= size or start > end:
            return _Reply(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
        return _Reply(206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}, data[start:end + 1])
    return _Reply(200, headers, data)


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                  json.dumps(body).encode())


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "text/plain; charset=utf-8"
    if path.endswith((".md", ".txt", ".py", ".gitattributes")) or path.rsplit("/", 1)[-1].startswith("."):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"
