"""The Hub's routes at the root of pullthrough (so HF_ENDPOINT=http://host:port works), dispatched
to files and API, with every error worded as the Hub words it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from proxy.config import Settings
from proxy.resources import Fetched, FetchedFile, Resource, ResourceKind
from proxy.http.download import BlobTransport
from proxy.sources.hf.access import AccessGuard
from proxy.sources.hf.api import ApiService, repo_info_path, tree_path
from proxy.sources.hf.errors import HfError, HubUnavailable, NotFound, UpstreamHfError
from proxy.sources.hf.files import MISSING, FileService
from proxy.sources.hf.names import REPO_TYPES, Repo, parse_file_path, parse_repo, parse_revision, quote_revision, raw_segments
from proxy.sources.hf.upstream import HubClient
from proxy.sources.hf.xet import CAS_PREFIX, XetService
from proxy.sources.source import ttl_rule
from proxy.store.janitor import TtlRule
from proxy.store.records import Reference
from proxy.store.store import Store
from proxy.upstreams import UpstreamHealth

log = logging.getLogger(__name__)

_API_ACTIONS = {"revision", "tree", "paths-info", "refs", "auth-check", "xet-read-token"}
SNAPSHOTS = "hf-snapshot"  # a repo's file list at a revision, as the last prefetch saw it


class HfMirror:
    name = "hf"
    resource_kinds: tuple[ResourceKind, ...] = ("hf",)
    expiring_references: tuple[str, ...] = (MISSING,)

    def __init__(
        self, settings: Settings, store: Store, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth
    ) -> None:
        config = settings.hf
        self.config = config
        self._store = store
        self.client = HubClient(config, http, blobs, health)
        self.access = AccessGuard(config, self.client, store)
        self.files = FileService(config, self.client, store, self.access)
        self.api = ApiService(config, self.client, store, self.access, self.files)
        self.xet = XetService(config, self.client, store, self.access, http, blobs) if config.xet == "native" else None

    @staticmethod
    def purge_rules(settings: Settings) -> list[TtlRule]:
        return ttl_rule(settings, "hf", urlsplit(settings.hf.url).netloc, settings.hf.ttl, settings.hf.ttl_from)

    async def aclose(self) -> None:
        pass

    async def prefetch(self, resource: Resource, platforms: Sequence[str]) -> Fetched:
        repo = parse_repo(resource.repo_type, resource.repo_id.split("/"))
        files = await self.prefetch_repo(repo, resource.revision)
        return Fetched(resource, [FetchedFile(path, digest, size) for path, digest, size in files])

    async def prefetch_repo(self, repo: Repo, revision: str) -> list[tuple[str, str, int]]:
        """Every file of the repo at the revision into the cache; (path, digest, size) of each.

        The file list is remembered, so that with the Hub away the same call answers from the cache.
        """
        token = self.config.service_token()
        try:
            await self.access.visibility(repo)  # remembered, so that offline callers of a public repo are served
            response = await self.client.api("GET", repo_info_path(repo, revision), token=token)
        except HubUnavailable:
            snapshot = await self._store.refs.get(SNAPSHOTS, f"{repo.key}@{revision}")
            if snapshot is None:
                raise
            commit, files = str(snapshot.meta["commit"]), list(snapshot.meta["files"])
        else:
            if not response.is_success:
                raise UpstreamHfError.from_response(response)
            info = response.json()
            commit = info.get("sha") or revision
            files = [s["rfilename"] for s in info.get("siblings", []) if isinstance(s, dict) and s.get("rfilename")]
            await self.files.remember_revision(repo, revision, commit)
            now = time.time()
            await self._store.refs.put(
                Reference(SNAPSHOTS, f"{repo.key}@{revision}", commit, now, now, meta={"commit": commit, "files": files})
            )
        fetched = [(path, *await self.files.fetch(repo, commit, path, token)) for path in files]
        if self.xet is not None:
            # hf_xet clients read xorbs, not the whole files: those are cached too.
            for path in files:
                meta = await self.files.meta(repo, commit, path, token)
                if meta.xet_hash:
                    await self.xet.prefetch(repo, commit, meta.xet_hash)
        return fetched

    def routes(self) -> list[BaseRoute]:
        cas = [Route(CAS_PREFIX + "/{rest:path}", self.dispatch_cas, methods=["GET", "HEAD"])] if self.xet else []
        return cas + [
            Route("/api/{rest:path}", self.dispatch_api, methods=["GET", "HEAD", "POST"]),
            Route("/{rest:path}", self.dispatch_resolve, methods=["GET", "HEAD"]),
        ]

    async def dispatch_api(self, request: Request) -> Response:
        return await self._guarded(request, self._api)

    async def dispatch_resolve(self, request: Request) -> Response:
        return await self._guarded(request, self._resolve)

    async def dispatch_cas(self, request: Request) -> Response:
        assert self.xet is not None  # routed only when xet = "native"
        return await self._guarded(request, self.xet.cas)

    async def _guarded(self, request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            return await handler(request)
        except HfError as exc:
            return exc.response(request.method)
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return HfError(500, "internal error in the mirror").response(request.method)

    async def _resolve(self, request: Request) -> Response:
        segments = raw_segments(request.scope)
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
        for id_length in (1, 2):
            if len(segments) > id_length + 2 and segments[id_length] == "resolve":
                repo = parse_repo(repo_type, segments[:id_length])
                revision = parse_revision(segments[id_length + 1])
                path = parse_file_path(segments[id_length + 2 :])
                return await self.files.resolve(repo, revision, path, request, _token(request))
        raise NotFound(f"no route for {request.url.path[:200]}")

    async def _api(self, request: Request) -> Response:
        segments = raw_segments(request.scope)[1:]
        if not segments or segments[0] not in REPO_TYPES:
            raise NotFound(f"no route for {request.url.path[:200]}")
        repo_type, rest = REPO_TYPES[segments[0]], segments[1:]
        id_length = 2 if len(rest) >= 2 and rest[1] not in _API_ACTIONS else 1
        if not rest or len(rest) < id_length:
            raise NotFound("no repository in the path")
        repo = parse_repo(repo_type, rest[:id_length])
        action, tail = (rest[id_length], rest[id_length + 1 :]) if len(rest) > id_length else ("", [])
        token = _token(request)
        if request.method == "POST" and action != "paths-info":
            raise HfError(405, "pullthrough is a read-only mirror")
        if action == "":
            return await self.api.answer(repo, repo_info_path(repo, None), None, request, token)
        if action == "revision" and len(tail) == 1:
            revision = parse_revision(tail[0])
            return await self.api.answer(repo, repo_info_path(repo, revision), revision, request, token)
        if action == "tree" and tail:
            revision = parse_revision(tail[0])
            subpath = parse_file_path(tail[1:]) if len(tail) > 1 else None
            return await self.api.answer(repo, tree_path(repo, revision, subpath), revision, request, token)
        if action == "paths-info" and len(tail) == 1 and request.method == "POST":
            revision = parse_revision(tail[0])
            path = f"/api/{repo.api_kind}/{repo.id}/paths-info/{quote_revision(revision)}"
            return await self.api.answer(repo, path, revision, request, token)
        if action == "refs" and not tail:
            return await self.api.answer(repo, f"/api/{repo.api_kind}/{repo.id}/refs", None, request, token)
        if action == "xet-read-token" and len(tail) == 1 and self.xet is not None:
            return await self.xet.read_token(repo, parse_revision(tail[0]), request, token)
        if action == "auth-check" and not tail:
            return await self.api.auth_check(repo, token)
        raise NotFound(f"no route for {request.url.path[:200]}")


def _token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()

