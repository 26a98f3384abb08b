"""Who may read what, as on the Hub: public repos for anyone; a gated repo's metadata for anyone
but its files only for callers the Hub accepts; a private repo only for callers the Hub accepts.

A repo's visibility (public, gated or private) is learned from its metadata and kept in the
index, so that a restart without the Hub still serves public repos. Where a caller must be
accepted, its own token is checked with the Hub's auth-check, remembered per (token hash, repo)
for `access_ttl`; when the check cannot be made, access is refused.
"""

from __future__ import annotations

import hashlib
import logging
import time

from proxy.config import HfConfig
from proxy.sources.hf.errors import HfError, HubUnavailable, UpstreamHfError
from proxy.sources.hf.names import Repo
from proxy.sources.hf.upstream import HubClient
from proxy.store.cache import BlobCache
from proxy.store.index import Reference

log = logging.getLogger(__name__)

SOURCE = "hf-repo"
PUBLIC, GATED, PRIVATE = "public", "gated", "private"


class AccessGuard:
    def __init__(self, config: HfConfig, client: HubClient, cache: BlobCache) -> None:
        self._config = config
        self._client = client
        self._cache = cache
        self._decisions: dict[tuple[str, str], tuple[float, HfError | None]] = {}

    async def check(self, repo: Repo, token: str | None, *, files: bool) -> None:
        """Return if the caller may read the repo's files (or only its metadata); raise the Hub's refusal otherwise."""
        visibility = await self.visibility(repo)
        if visibility == PUBLIC or (visibility == GATED and not files):
            return
        key = (_token_hash(token), repo.key)
        now = time.monotonic()
        decided = self._decisions.get(key)
        if decided is None or decided[0] <= now:
            decided = (now + self._config.access_ttl, await self._ask_hub(repo, token))
            self._decisions[key] = decided
            self._forget_expired(now)
        if decided[1] is not None:
            raise decided[1]

    async def visibility(self, repo: Repo) -> str:
        ref = await self._cache.get_reference(SOURCE, repo.key)
        if ref is not None and ref.is_fresh():
            return str(ref.meta.get("visibility", PRIVATE))
        try:
            response = await self._client.api("GET", f"/api/{repo.api_kind}/{repo.id}", token=self._config.service_token())
        except HubUnavailable:
            # Last known while the Hub is away; unknown counts as private, which fails closed.
            return str(ref.meta.get("visibility", PRIVATE)) if ref is not None else PRIVATE
        visibility = PRIVATE
        if response.status_code == 200:
            try:
                info = response.json()
                if info.get("private") is False:
                    visibility = GATED if info.get("gated") else PUBLIC
            except ValueError:
                pass
        now = time.time()
        await self._cache.put_reference(
            Reference(SOURCE, repo.key, digest="", fetched_at=now, expires_at=now + self._config.revision_ttl, meta={"visibility": visibility})
        )
        return visibility

    async def _ask_hub(self, repo: Repo, token: str | None) -> HfError | None:
        try:
            response = await self._client.api("GET", f"/api/{repo.api_kind}/{repo.id}/auth-check", token=token)
        except HubUnavailable:
            log.warning("cannot check access to %s: the Hub is unreachable; refusing", repo.key)
            return HfError(503, f"cannot verify access to {repo.id} while the Hub is unreachable")
        if response.is_success:
            return None
        return UpstreamHfError.from_response(response)

    def _forget_expired(self, now: float) -> None:
        if len(self._decisions) > 10_000:
            self._decisions = {k: v for k, v in self._decisions.items() if v[0] > now}


def _token_hash(token: str | None) -> str:
    return hashlib.sha256(token.encode()).hexdigest() if token else ""
