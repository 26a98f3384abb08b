"""The Hub's JSON API through the mirror: repo info, tree, paths-info, refs, auth-check.

Answers at a commit never change and are kept until purged; answers for a branch or tag are kept
for `revision_ttl` and served stale while the Hub is away. Xet fields are removed (so the client
fetches bytes through the mirror, not from the Xet CAS) unless [hf] xet = "native" (the mirror's
own CAS serves them then), and pagination links point back at the mirror.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.config import HfConfig
from proxy.sources.hf.access import AccessGuard
from proxy.http.bounded import TooLarge, read_request_body
from proxy.sources.hf.errors import HfError, UpstreamHfError, translate
from proxy.sources.hf.files import FileService, hub_origin
from proxy.sources.hf.names import Repo, is_commit, quote_path, quote_revision
from proxy.sources.hf.upstream import HubClient
from proxy.store.records import ReadScope
from proxy.store.small import Document
from proxy.store.store import Store

log = logging.getLogger(__name__)

SOURCE = "hf-api"
MAX_BODY = 1024 * 1024  # a paths-info POST lists paths: a megabyte holds thousands
# The query parameters huggingface_hub sends (tree, repo info, refs); others are neither passed on
# nor part of a cache key, so that made-up parameters cannot multiply the cached answers.
API_PARAMETERS = frozenset({"recursive", "expand", "cursor", "limit", "blobs", "securityStatus", "include_prs"})
_LINK_PART = re.compile(r"<([^>]*)>\s*((?:;\s*[^,;]+)*)")


def strip_xet(value: Any) -> Any:
    """The JSON without Xet fields (xetHash, xetEnabled, …), at any depth."""
    if isinstance(value, dict):
        return {k: strip_xet(v) for k, v in value.items() if not k.lower().startswith("xet")}
    if isinstance(value, list):
        return [strip_xet(v) for v in value]
    return value


def mirror_links(header: str, upstream_base: str, *, keep_xet: bool = False) -> str:
    """A Link header with upstream URLs made mirror-relative ("/api/…") and xet relations dropped
    (unless the mirror speaks Xet: then they point at the mirror too)."""
    kept = []
    for match in _LINK_PART.finditer(header):
        url, params = match.group(1), match.group(2)
        if "xet" in params.lower() and not keep_xet:
            continue
        if url.startswith(upstream_base):
            url = url[len(upstream_base):]
        kept.append(f"<{url}>{params}")
    return ", ".join(kept)


def absolute_links(header: str, base_url: str) -> str:
    """Mirror-relative Link URLs made absolute for this caller (the client follows them as given)."""
    return re.sub(r"<(/[^>]*)>", lambda m: f"<{base_url.rstrip('/')}{m.group(1)}>", header)


class ApiService:
    def __init__(self, config: HfConfig, client: HubClient, store: Store, access: AccessGuard, files: FileService) -> None:
        self._config = config
        self._client = client
        self._store = store
        self._access = access
        self._files = files
        self._origin = hub_origin(config)

    async def auth_check(self, repo: Repo, token: str | None) -> Response:
        response = await self._client.api("GET", f"/api/{repo.api_kind}/{repo.id}/auth-check", token=token)
        if not response.is_success:
            raise UpstreamHfError.from_response(response)
        return Response(response.content, media_type=response.headers.get("content-type", "application/json"))

    async def answer(self, repo: Repo, path: str, revision: str | None, request: Request, token: str | None) -> Response:
        """Any cacheable API call: `path` is the upstream path after the host."""
        await self._access.check(repo, token, files=False)
        try:
            body = await read_request_body(request, MAX_BODY) if request.method == "POST" else b""
        except TooLarge:
            raise HfError(413, f"request body larger than {MAX_BODY} bytes") from None
        query = [(k, v) for k, v in request.query_params.multi_items() if k in API_PARAMETERS and len(v) <= 256]
        native = self._config.xet == "native"
        # Answers with and without Xet fields are different documents: the mode is part of the key.
        key = _cache_key(request.method, path, query, body) + (" xet" if native else "")
        immutable = revision is not None and is_commit(revision)

        async def fetch() -> Document:
            response = await self._client.api(
                request.method,
                path,
                token=token or self._config.service_token(),
                params=query,
                content=body or None,
                content_type=request.headers.get("content-type") if body else None,
            )
            if response.status_code != 200:
                raise UpstreamHfError.from_response(response)
            data, content_type = response.content, response.headers.get("content-type", "application/json")
            if content_type.startswith("application/json"):
                parsed = json.loads(data)
                parsed = parsed if native else strip_xet(parsed)
                data = json.dumps(parsed, separators=(",", ":")).encode()
                await self._note_commit(repo, revision, parsed)
            link = mirror_links(response.headers.get("link", ""), self._client.base_url, keep_xet=native)
            return Document(data, content_type, {"link": link})

        item, ref = await self._store.small_objects.document(
            ReadScope.hf(repo.key), self._origin, (SOURCE, key), ttl=None if immutable else self._config.revision_ttl,
            fetch=fetch, method=request.method, translate=translate,
        )
        return _json_response(item.data, item.media_type or "application/json", str(ref.meta.get("link") or ""), request)

    async def _note_commit(self, repo: Repo, revision: str | None, parsed: Any) -> None:
        """Repo info names the commit of a branch: remember it for resolve too."""
        if revision is None or is_commit(revision) or not isinstance(parsed, dict):
            return
        sha = parsed.get("sha")
        if isinstance(sha, str) and is_commit(sha):
            await self._files.remember_revision(repo, revision, sha)


def repo_info_path(repo: Repo, revision: str | None) -> str:
    path = f"/api/{repo.api_kind}/{repo.id}"
    return f"{path}/revision/{quote_revision(revision)}" if revision is not None else path


def tree_path(repo: Repo, revision: str, subpath: str | None) -> str:
    path = f"/api/{repo.api_kind}/{repo.id}/tree/{quote_revision(revision)}"
    return f"{path}/{quote_path(subpath)}" if subpath else path


def _cache_key(method: str, path: str, query: list[tuple[str, str]], body: bytes) -> str:
    key = f"{method} {path}?{'&'.join(f'{k}={v}' for k, v in sorted(query))}"
    if body:
        key += f" body:{hashlib.sha256(body).hexdigest()}"
    return key


def _json_response(data: bytes, content_type: str, link: str, request: Request) -> Response:
    headers = {"Link": absolute_links(link, str(request.base_url))} if link else {}
    return Response(data, media_type=content_type, headers=headers)
