"""Who may read what, as on the Hub: public repos for anyone; a gated repo's metadata for anyone
but its files only for callers the Hub accepts; a private repo only for callers the Hub accepts.

A repo's visibility (public, gated or private) is learned from its metadata and kept in the
index, so that a restart without the Hub still serves public repos. Where a caller must be
accepted, its own token is checked with the Hub's auth-check, and the answer kept in memory per
(token hash, repo) for `access_ttl`. Both go through the store's revalidation policy; when the
Hub cannot be asked, a caller's access is refused (and that refusal is not remembered).
"""

from __future__ import annotations

import hashlib
import logging

from proxy.config import HfConfig
from proxy.sources.hf.errors import HfError, HubUnavailable, UpstreamHfError
from proxy.sources.hf.names import Repo
from proxy.sources.hf.upstream import HubClient
from proxy.store.freshness import Found, Freshness
from proxy.store.references import MemoryReferences
from proxy.store.store import Store

log = logging.getLogger(__name__)

VISIBILITY = "hf-repo"
DECISIONS = "hf-access"
PUBLIC, GATED, PRIVATE = "public", "gated", "private"


class AccessGuard:
    def __init__(self, config: HfConfig, client: HubClient, store: Store) -> None:
        self._config = config
        self._client = client
        self._store = store
        # Decisions are bound to a caller's token: memory only, never the index.
        # Not trusted past access_ttl when offline either: the Hub cannot be asked, so a gated or private
        # repo's files are refused (fail closed) rather than served to a token that may be revoked.
        self._decisions = Freshness(MemoryReferences(max_items=10_000))

    async def check(self, repo: Repo, token: str | None, *, files: bool) -> None:
        """Return if the caller may read the repo's files (or only its metadata); raise the Hub's refusal otherwise."""
        visibility = await self.visibility(repo)
        if visibility == PUBLIC or (visibility == GATED and not files):
            return
        try:
            resolved = await self._decisions.resolve(
                DECISIONS, f"{_token_hash(token)}:{repo.key}", ttl=self._config.access_ttl,
                revalidate=lambda _previous: self._ask_hub(repo, token), stale=False,
            )
        except HubUnavailable as exc:
            log.warning("cannot check access to %s: the Hub is unreachable; refusing", repo.key)
            raise HfError(503, f"cannot verify access to {repo.id}: {exc.message}") from None
        refusal = resolved.ref.meta.get("refusal")
        if refusal is not None:
            # A new exception each time: one kept in a cache and raised again grows its traceback.
            raise UpstreamHfError(int(refusal["status"]), dict(refusal["headers"]), str(refusal["body"]).encode())

    async def visibility(self, repo: Repo) -> str:
        """The last known visibility; PRIVATE (fail closed) when the Hub was never asked and cannot
        be, or does not show the repo to the mirror (private, or no such repo: not remembered, so
        that names a client makes up add no rows)."""
        try:
            resolved = await self._store.freshness.resolve(
                VISIBILITY, repo.key, ttl=self._config.revision_ttl, revalidate=lambda _previous: self._ask_visibility(repo)
            )
        except (HubUnavailable, _NotShown):
            return PRIVATE
        return str(resolved.ref.meta.get("visibility", PRIVATE))

    async def known_public(self, repo_key: str) -> bool:
        """Whether the repo was last seen public, from the cache alone (for /stats, which must not
        name a gated or private repo, nor ask the Hub)."""
        ref = await self._store.refs.get(VISIBILITY, repo_key)
        return ref is not None and ref.meta.get("visibility") == PUBLIC

    async def _ask_visibility(self, repo: Repo) -> Found:
        response = await self._client.api("GET", f"/api/{repo.api_kind}/{repo.id}", token=self._config.service_token())
        if response.status_code != 200:
            raise _NotShown()
        visibility = PRIVATE
        try:
            info = response.json()
            if isinstance(info, dict) and info.get("private") is False:
                visibility = GATED if info.get("gated") else PUBLIC
        except ValueError:
            pass
        return Found("", meta={"visibility": visibility})

    async def _ask_hub(self, repo: Repo, token: str | None) -> Found:
        response = await self._client.api("GET", f"/api/{repo.api_kind}/{repo.id}/auth-check", token=token)
        if response.is_success:
            return Found("")
        error = UpstreamHfError.from_response(response)
        return Found("", meta={"refusal": {"status": error.status, "headers": error.replay_headers, "body": error.body.decode("utf-8", "replace")}})


def _token_hash(token: str | None) -> str:
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


class _NotShown(Exception):
    """The Hub does not show the repo to the mirror's own token."""
