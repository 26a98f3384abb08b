"""HEAD and GET of /{repo}/resolve/{revision}/{path}: revision to commit, file metadata, the bytes.

A revision is resolved to a commit through a reference trusted for `revision_ttl` (stale while
the Hub is away); a file at a commit never changes, so its metadata and bytes are kept until
purged. Every file streams to the caller while it fills: LFS and Xet files are stored by their
sha256 (the same store as OCI blobs), regular files are verified by their git blob sha1 as they
arrive and then known by the sha256 they hashed to. Bytes are read under the repo's scope, after
the caller's access check. The caller always
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
from proxy.singleflight import SingleFlight
from proxy.sources.hf.access import AccessGuard
from proxy.sources.hf.errors import HfError, HubUnavailable, UpstreamHfError, translate
from proxy.sources.hf.names import Repo, is_commit
from proxy.sources.hf.upstream import HubClient
from proxy.store.blobs import BlobFile, DigestMismatch
from proxy.store.digest import Digest
from proxy.store.freshness import FOREVER, Found
from proxy.store.records import Origin, ReadScope, Reference
from proxy.store.requests import BlobRequest
from proxy.store.store import Store

log = logging.getLogger(__name__)

REVISIONS = "hf-rev"
FILES = "hf-file"
MISSING = "hf-missing"  # forgettable: the janitor removes these once expired
MISSING_SECONDS = 7 * 86400.0
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
    xet_hash: str = ""  # X-Xet-Hash: the file's Xet Merkle hash, when the Hub stores it in Xet

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
            "xet_hash": self.xet_hash,
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
            xet_hash=str(meta.get("xet_hash") or ""),
        )


def normalize_etag(value: str | None) -> str:
    if not value:
        return ""
    return value.removeprefix("W/").strip('"')


class GitBlobCheck:
    """A regular file's git blob id, computed as its bytes arrive (the Hub names them by it)."""

    def __init__(self, expected: str, size: int) -> None:
        self._expected = expected
        self._size = size
        self._hash = hashlib.sha1(usedforsecurity=False)
        self._hash.update(b"blob %d\0" % size)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def verify(self, size: int) -> None:
        if size != self._size or self._hash.hexdigest() != self._expected:
            raise DigestMismatch(f"the Hub sent bytes that do not match git blob {self._expected}")


class FileService:
    def __init__(self, config: HfConfig, client: HubClient, store: Store, access: AccessGuard) -> None:
        self._config = config
        self._client = client
        self._store = store
        self._access = access
        self._origin = hub_origin(config)
        self._heads: SingleFlight[tuple[str, FileMeta]] = SingleFlight()

    async def resolve(self, repo: Repo, revision: str, path: str, request: Request, token: str | None) -> Response:
        await self._access.check(repo, token, files=True)
        commit, meta = await self._locate(repo, revision, path, token)
        headers = {"X-Repo-Commit": commit}
        if meta.missing:
            raise HfError(404, meta.error_body or f"{path} does not exist at {commit}", code="EntryNotFound", headers=headers)
        headers.update(_file_headers(meta))
        if self._config.xet == "native" and meta.xet_hash:
            headers.update(xet_headers(repo, commit, meta.xet_hash, str(request.base_url)))
        return await self._store.serve(
            self._request(repo, commit, path, meta, token),
            method=request.method, range_header=request.headers.get("range"), headers=headers, media_type=meta.content_type,
        )

    async def fetch(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, int]:
        """Make sure the file is in the cache (prefetch); its digest and size."""
        commit, meta = await self._locate(repo, revision, path, token)
        if meta.missing:
            raise HfError(404, f"{path} does not exist at {commit}", code="EntryNotFound")
        blob = await self._store.fetch(self._request(repo, commit, path, meta, token))
        return str(blob.digest), blob.size

    async def meta(self, repo: Repo, commit: str, path: str, token: str | None) -> FileMeta:
        """What the Hub said of a file at a commit (kept until purged)."""
        return await self._file_meta(repo, commit, path, token)

    def _request(self, repo: Repo, commit: str, path: str, meta: FileMeta, token: str | None) -> BlobRequest:
        """LFS and Xet files by their sha256; a regular file by its git blob id, and by the sha256 its
        bytes hashed to once they were fetched."""

        async def confirm() -> int:
            return meta.size  # the Hub's metadata for this repo names the file, for a caller it accepts

        async def remember_sha256(blob: BlobFile) -> None:
            known = FileMeta(
                meta.etag, meta.size, False, blob.digest.hex, meta.content_type, hub_etag=meta.hub_etag, xet_hash=meta.xet_hash
            )
            await self._remember_file(repo, commit, path, known)

        regular = not meta.lfs
        return BlobRequest(
            scope=ReadScope.hf(repo.key),
            origin=self._origin,
            opener=lambda: self._client.open_file(repo, commit, path, token),
            translate=translate,
            digest=Digest.from_hex(meta.sha256) if meta.sha256 else None,
            name=f"{FILES}:{_file_key(repo, commit, path)}" if meta.sha256 is None else None,
            size=meta.size,
            confirm=confirm,
            check=GitBlobCheck(meta.etag, meta.size) if regular and _HEX40.match(meta.etag) else None,
            after_commit=remember_sha256 if regular and meta.sha256 is None else None,
        )

    # -- revision and metadata ----------------------------------------------------------------
    async def _locate(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, FileMeta]:
        """The commit the revision names (trusted for `revision_ttl`, stale while the Hub is away)
        and the file's metadata there (immutable)."""
        if is_commit(revision):
            return revision, await self._file_meta(repo, revision, path, token)
        heads: list[FileMeta] = []

        async def revalidate(_previous: Reference | None) -> Found:
            commit, meta = await self._head_once(repo, revision, path, token)
            heads.append(meta)
            return Found(commit)

        resolved = await self._store.freshness.resolve(
            REVISIONS, f"{repo.key}@{revision}", ttl=self._config.revision_ttl, revalidate=revalidate
        )
        commit = resolved.ref.digest
        if resolved.stale:
            log.warning("the Hub is unreachable: serving %s@%s at its last known commit %s", repo.key, revision, commit)
        return commit, heads[0] if heads else await self._file_meta(repo, commit, path, token)

    async def _file_meta(self, repo: Repo, commit: str, path: str, token: str | None) -> FileMeta:
        for source in (FILES, MISSING):
            known = await self._store.refs.get(source, _file_key(repo, commit, path))
            if known is not None:
                return FileMeta.from_meta(dict(known.meta))
        _, meta = await self._head_once(repo, commit, path, token)
        return meta

    async def _head_once(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, FileMeta]:
        """One HEAD for concurrent callers with the same token (answers differ by token)."""
        key = (repo.key, revision, path, hashlib.sha256((token or "").encode()).hexdigest())
        return await self._heads.run(key, lambda: self._head(repo, revision, path, token))

    async def _head(self, repo: Repo, revision: str, path: str, token: str | None) -> tuple[str, FileMeta]:
        try:
            response = await self._client.head_file(repo, revision, path, token)
        except UpstreamHfError as error:
            commit = error.replay_headers.get("x-repo-commit")
            if error.status == 404 and error.code == "EntryNotFound" and commit and is_commit(commit):
                await self.remember_revision(repo, revision, commit)
                meta = FileMeta("", 0, False, None, "", missing=True, error_body=error.message)
                await self._remember_missing(repo, commit, path, meta)
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
        await self._store.refs.put(Reference(REVISIONS, f"{repo.key}@{revision}", commit, now, now + self._config.revision_ttl))

    async def _remember_missing(self, repo: Repo, commit: str, path: str, meta: FileMeta) -> None:
        """A file the Hub says does not exist at a commit (transformers probes optional files): kept
        for MISSING_SECONDS, then forgotten by the janitor, so that probes of made-up names do not
        add rows forever."""
        now = time.time()
        await self._store.refs.put(
            Reference(MISSING, _file_key(repo, commit, path), "", now, now + MISSING_SECONDS, meta=meta.as_meta())
        )

    async def _remember_file(self, repo: Repo, commit: str, path: str, meta: FileMeta) -> None:
        now = time.time()
        await self._store.refs.put(
            Reference(FILES, _file_key(repo, commit, path), meta.sha256 or "", now, FOREVER, meta=meta.as_meta())
        )


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
    xet_hash = headers.get("x-xet-hash", "")
    return FileMeta(
        etag, int(size_text), lfs, etag if lfs else None, content_type, hub_etag=headers.get("etag", ""),
        xet_hash=xet_hash if _HEX64.match(xet_hash) else "",
    )


def xet_headers(repo: Repo, commit: str, xet_hash: str, base_url: str) -> dict[str, str]:
    """What tells huggingface_hub to fetch the file with hf_xet, through this mirror's token route."""
    route = f"/api/{repo.api_kind}/{repo.id}/xet-read-token/{commit}"
    return {
        "X-Xet-Hash": xet_hash,
        "X-Xet-Refresh-Route": route,
        "Link": f'<{base_url.rstrip("/")}{route}>; rel="xet-auth"',
    }


def _file_headers(meta: FileMeta) -> dict[str, str]:
    headers = {"ETag": meta.hub_etag or f'"{meta.etag}"', "Accept-Ranges": "bytes"}
    if meta.lfs:
        headers["X-Linked-Etag"] = f'"{meta.etag}"'
        headers["X-Linked-Size"] = str(meta.size)
    return headers
