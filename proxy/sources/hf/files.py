"""HEAD and GET of /{repo}/resolve/{revision}/{path}: revision to commit, file metadata, the bytes.

A revision is resolved to a commit through a reference trusted for `revision_ttl` (stale while
the Hub is away); a file at a commit never changes, so its metadata and bytes are kept until
purged. LFS and Xet files are stored by their sha256 (the same store as OCI blobs) and stream to
the caller while they fill; regular files are verified by their git blob sha1. The caller always
gets a 200 from pullthrough, never a redirect to the Hub or its CDN, and no Xet headers.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response

from proxy.config import HfConfig
from proxy.http.ranges import RangeNotSatisfiable
from proxy.http.responses import FileSource, blob_response
from proxy.singleflight import SingleFlight
from proxy.sources.hf.access import AccessGuard
from proxy.sources.hf.errors import HfError, HubUnavailable, UpstreamHfError
from proxy.sources.hf.names import Repo, is_commit
from proxy.sources.hf.upstream import HubClient
from proxy.stats import Traffic
from proxy.store.cache import BlobCache
from proxy.store.digest import Digest
from proxy.store.fill import Origin
from proxy.store.index import Reference

log = logging.getLogger(__name__)

REVISIONS = "hf-rev"
FILES = "hf-file"
FOREVER = float(2**62)
MAX_SMALL_FILE = 64 * 1024 * 1024
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the Hub said of a file at a commit."""

    etag: str  # without quotes: sha256 for LFS/Xet files, git blob sha1 for regular ones
    size: int
    lfs: bool
    sha256: str | None  # the store's name for the bytes, once known
    content_type: str
    missing: bool = False  # EntryNotFound at this commit (kept: transformers probes optional files)
    error_body: str = ""
    hub_etag: str = ""  # the ETag header as the Hub sent it (for LFS, the pointer's git id)

    def as_meta(self) -> dict[str, object]:
        return {
            "etag": self.etag,
            "size": self.size,
            "lfs": self.lfs,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "missing": self.missing,
            "error_body": self.error_body,
            "hub_etag": self.hub_etag,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> FileMeta:
        return cls(
            etag=str(meta["etag"]),
            size=int(meta["size"]),  # type: ignore[arg-type]
            lfs=bool(meta["lfs"]),
            sha256=meta.get("sha256") or None,  # type: ignore[arg-type]
            content_type=str(meta.get("content_type") or "application/octet-stream"),
            missing=bool(meta.get("missing")),
            error_body=str(meta.get("error_body") or ""),
            hub_etag=str(meta.get("hub_etag") or ""),
        )


def normalize_etag(value: str | None) -> str:
    if not value:
        return ""
    return value.removeprefix("W/").strip('"')


class FileService:
    def __init__(self, config: HfConfig, client: HubClient, cache: BlobCache, access: AccessGuard, traffic: Traffic) -> None:
        self._config = config
        self._client = client
        self._cache = cache
        self._access = access
        self._traffic = traffic
        self._origin = hub_origin(config)
        self._small_fetches: SingleFlight[FileMeta] = SingleFlight()
        self._heads: SingleFlight[tuple[str, FileMeta]] = SingleFlight()

    async def resolve(self, repo: Repo, revision: str, path: str, request: Request, token: str | None) -> Response:
        await self._access.check(repo, token, files=True)
        commit, meta = await self._locate(repo, revision, path, token)
        headers = {"X-Repo-Commit": commit}
        if meta.missing:
            raise HfError(404, meta.error_body or f"{path} does not exist at {commit}", code="EntryNotFound", headers=headers)
        headers.update(_file_headers(meta))
        if request.method == "HEAD":
            return blob_response(None, meta.size, method="HEAD", range_header=None, headers=headers, media_type=meta.content_type)
        if not meta.lfs:
            meta, fetched = await self._ensure_small(repo, commit, path, meta, token)
            if fetched:
                self._traffic.miss(self._origin, repo.key)
            else:
                self._traffic.hit(self._origin, meta.size, repo.key)
        return await self._serve_bytes(repo, commit, path, meta, request, token, headers)

    async def fetch(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, int]:
        """Make sure the file is in the cache (prefetch); its digest and size."""
        commit, meta = await self._locate(repo, revision, path, token)
        if meta.missing:
            raise HfError(404, f"{path} does not exist at {commit}", code="EntryNotFound")
        if not meta.lfs:
            meta, _ = await self._ensure_small(repo, commit, path, meta, token)
        assert meta.sha256 is not None
        digest = Digest.from_hex(meta.sha256)
        if await self._cache.lookup(digest) is None:
            fill, _ = self._cache.fill(
                digest, lambda: self._client.open_file(repo, commit, path, token), origin=self._origin, expected_size=meta.size
            )
            if await fill.finished() is None:
                raise HubUnavailable(f"fetching {path} failed: {fill.error}")
        return str(digest), meta.size

    # -- revision and metadata ----------------------------------------------------------------
    async def _locate(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, FileMeta]:
        """The commit the revision names and the file's metadata there."""
        commit = revision if is_commit(revision) else None
        stale_commit = None
        if commit is None:
            ref = await self._cache.get_reference(REVISIONS, f"{repo.key}@{revision}")
            if ref is not None and ref.is_fresh():
                commit = ref.digest
            elif ref is not None:
                stale_commit = ref.digest
        if commit is not None:
            known = await self._cache.get_reference(FILES, _file_key(repo, commit, path))
            if known is not None:
                return commit, FileMeta.from_meta(dict(known.meta))
        try:
            return await self._heads.run(
                (repo.key, revision, path, token or ""), lambda: self._head(repo, commit or revision, path, token)
            )
        except HubUnavailable:
            if stale_commit is None:
                raise
            known = await self._cache.get_reference(FILES, _file_key(repo, stale_commit, path))
            if known is None:
                raise
            log.warning("the Hub is unreachable: serving %s@%s at its last known commit %s", repo.key, revision, stale_commit)
            return stale_commit, FileMeta.from_meta(dict(known.meta))

    async def _head(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, FileMeta]:
        try:
            response = await self._client.head_file(repo, revision, path, token)
        except UpstreamHfError as error:
            commit = error.replay_headers.get("x-repo-commit")
            if error.status == 404 and error.code == "EntryNotFound" and commit:
                await self.remember_revision(repo, revision, commit)
                meta = FileMeta("", 0, False, None, "", missing=True, error_body=error.message)
                await self._remember_file(repo, commit, path, meta)
            raise
        commit = response.headers.get("x-repo-commit")
        if not commit or not is_commit(commit):
            raise HubUnavailable("the Hub's answer carried no X-Repo-Commit")
        meta = _meta_from_head(response)
        await self.remember_revision(repo, revision, commit)
        await self._remember_file(repo, commit, path, meta)
        return commit, meta

    async def remember_revision(self, repo: Repo, revision: str, commit: str) -> None:
        if is_commit(revision):
            return
        now = time.time()
        await self._cache.put_reference(
            Reference(REVISIONS, f"{repo.key}@{revision}", commit, now, now + self._config.revision_ttl)
        )

    async def _remember_file(self, repo: Repo, commit: str, path: str, meta: FileMeta) -> None:
        now = time.time()
        await self._cache.put_reference(
            Reference(FILES, _file_key(repo, commit, path), meta.sha256 or "", now, FOREVER, meta=meta.as_meta())
        )

    # -- bytes ----------------------------------------------------------------------------------
    async def _ensure_small(
        self, repo: Repo, commit: str, path: str, meta: FileMeta, token: str | None
    ) -> tuple[FileMeta, bool]:
        """A regular file in the store, verified by its git blob sha1; its metadata now names it.
        Also whether it had to be fetched."""
        if meta.sha256 and await self._cache.lookup(Digest.from_hex(meta.sha256)) is not None:
            return meta, False
        fetched = await self._small_fetches.run(
            _file_key(repo, commit, path), lambda: self._fetch_small(repo, commit, path, meta, token)
        )
        return fetched, True

    async def _fetch_small(self, repo: Repo, commit: str, path: str, meta: FileMeta, token: str | None) -> FileMeta:
        response = await self._client.get_small_file(repo, commit, path, token)
        data = response.content
        if len(data) > MAX_SMALL_FILE:
            raise HubUnavailable(f"{path} is larger than a regular file may be")
        if _HEX40.match(meta.etag) and git_blob_sha1(data) != meta.etag:
            log.warning("the Hub sent bytes for %s@%s:%s that do not match git blob %s", repo.key, commit, path, meta.etag)
            raise HfError(502, f"the Hub sent bytes for {path} that do not match its ETag")
        if len(data) != meta.size:
            raise HfError(502, f"the Hub sent {len(data)} bytes for {path}, announced {meta.size}")
        digest = Digest.from_hex(hashlib.sha256(data).hexdigest())
        self._traffic.fetched(self._origin, len(data))
        await self._cache.put_small(data, digest, meta.content_type, self._origin)
        known = FileMeta(meta.etag, meta.size, False, digest.hex, meta.content_type, hub_etag=meta.hub_etag)
        await self._remember_file(repo, commit, path, known)
        return known

    async def _serve_bytes(
        self, repo: Repo, commit: str, path: str, meta: FileMeta, request: Request, token: str | None, headers: dict[str, str]
    ) -> Response:
        assert meta.sha256 is not None
        digest = Digest.from_hex(meta.sha256)
        range_header = request.headers.get("range")
        try:
            blob = await self._cache.lookup(digest)
            if blob is not None:
                if meta.lfs:
                    self._traffic.hit(self._origin, blob.size, repo.key)
                return blob_response(FileSource(blob, self._cache.in_use), blob.size, method="GET", range_header=range_header, headers=headers, media_type=meta.content_type)
            fill, joined = self._cache.fill(
                digest, lambda: self._client.open_file(repo, commit, path, token), origin=self._origin, expected_size=meta.size
            )
            self._traffic.miss(self._origin, repo.key, joined=joined)
            try:
                await fill.opened()
            except HfError:
                raise
            except Exception as exc:  # noqa: BLE001 - worded for the client, logged by the filler
                raise HubUnavailable(f"fetching {path} failed: {exc}") from None
            return blob_response(fill, meta.size, method="GET", range_header=range_header, headers=headers, media_type=meta.content_type)
        except RangeNotSatisfiable as exc:
            raise HfError(416, "requested range not satisfiable", headers={"Content-Range": f"bytes */{exc.size}"}) from None


def hub_origin(config: HfConfig) -> Origin:
    return Origin("hf", urlsplit(config.url).netloc)


def _file_key(repo: Repo, commit: str, path: str) -> str:
    return f"{repo.key}@{commit}/{path}"


def _meta_from_head(response: httpx.Response) -> FileMeta:
    headers = response.headers
    linked = normalize_etag(headers.get("x-linked-etag"))
    etag = linked or normalize_etag(headers.get("etag"))
    size_text = headers.get("x-linked-size") or (None if response.is_redirect else headers.get("content-length"))
    if not etag or size_text is None or not size_text.isdigit():
        raise HubUnavailable("the Hub's answer lacked the file's ETag or size")
    lfs = bool(_HEX64.match(etag))
    content_type = "application/octet-stream" if response.is_redirect else headers.get("content-type", "application/octet-stream")
    return FileMeta(etag, int(size_text), lfs, etag if lfs else None, content_type, hub_etag=headers.get("etag", ""))


def _file_headers(meta: FileMeta) -> dict[str, str]:
    headers = {"ETag": meta.hub_etag or f'"{meta.etag}"', "Accept-Ranges": "bytes"}
    if meta.lfs:
        headers["X-Linked-Etag"] = f'"{meta.etag}"'
        headers["X-Linked-Size"] = str(meta.size)
    return headers


def git_blob_sha1(data: bytes) -> str:
    """git's object id of a file: sha1 of 'blob <size>\\0' and the bytes."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()
