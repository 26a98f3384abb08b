"""Talking to the Hub: resolve HEADs without following its CDN redirect, file bytes, and the API.

The caller's own token goes upstream with each request made on its behalf; it is never logged
or stored.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import httpx

from proxy.config import HfConfig
from proxy.http.download import RETRIES, RETRY_STATUSES, BlobDownload, BlobTransport, TransferFailed, retry_pause
from proxy.http.bounded import TooLarge, send_bounded
from proxy.sources.hf.errors import HfError, HubUnavailable, UpstreamHfError
from proxy.sources.hf.names import Repo, quote_path, quote_revision

MAX_REDIRECTS = 5
MAX_ANSWER = 32 * 1024 * 1024  # an API answer (a tree page, a paths-info) is held whole: at most this
# After the Hub failed, requests fail at once for this long instead of each retrying: cached
# answers are served without a second's wait per file during an outage.
OUTAGE_SECONDS = 10.0


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class HubClient:
    """Requests to the Hub on behalf of callers."""

    def __init__(self, config: HfConfig, http: httpx.AsyncClient, blobs: BlobTransport) -> None:
        self.config = config
        self.base_url = config.base_url
        self._http = http
        self._blobs = blobs
        self._down_until = 0.0

    def _check_outage(self) -> None:
        if time.monotonic() < self._down_until:
            raise HubUnavailable("the Hub was unreachable moments ago")

    def _outage(self, message: str) -> HubUnavailable:
        self._down_until = time.monotonic() + OUTAGE_SECONDS
        return HubUnavailable(message)

    def resolve_url(self, repo: Repo, revision: str, path: str) -> str:
        return f"{self.base_url}/{repo.url_prefix}{repo.id}/resolve/{quote_revision(revision)}/{quote_path(path)}"

    async def head_file(self, repo: Repo, revision: str, path: str, token: str | None) -> httpx.Response:
        """HEAD of resolve, relative redirects followed (renamed repos), the CDN redirect not."""
        url = self.resolve_url(repo, revision, path)
        headers = {"Accept-Encoding": "identity", **bearer(token)}
        for _ in range(MAX_REDIRECTS):
            response = await self._send("HEAD", url, headers=headers)
            location = response.headers.get("location", "")
            if response.is_redirect and location.startswith("/"):
                url = f"{self.base_url}{location}"
                continue
            if response.is_redirect or response.is_success:
                return response
            raise UpstreamHfError.from_response(response)
        raise HubUnavailable("the Hub redirected too many times")

    async def open_file(self, repo: Repo, commit: str, path: str, token: str | None) -> BlobDownload:
        """A large file's body, open, for the store to read in a worker thread."""
        url = self.resolve_url(repo, commit, path)
        authorization = f"Bearer {token}" if token else None
        self._check_outage()
        for attempt in range(RETRIES + 1):
            try:
                response = await self._blobs.open(url, authorization)
            except TransferFailed as exc:
                if attempt < RETRIES:
                    await retry_pause(attempt)
                    continue
                raise self._outage(f"the Hub is unreachable: {exc}") from None
            if 200 <= response.status < 300:
                return BlobDownload(response)
            body = await self._blobs.drain(response)
            if response.status in RETRY_STATUSES and attempt < RETRIES:
                await retry_pause(attempt)
                continue
            if response.status >= 500:
                raise self._outage(f"the Hub answered {response.status}")
            raise UpstreamHfError(response.status, dict(response.headers), body)
        raise HubUnavailable("the Hub kept failing")

    async def api(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        """An API call; any answer below 500 is returned for the caller to pass on."""
        headers = bearer(token)
        if content_type:
            headers["Content-Type"] = content_type
        response = await self._send(method, f"{self.base_url}{path}", headers=headers, params=params, content=content, follow=True)
        return response

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        content: bytes | None = None,
        follow: bool = False,
    ) -> httpx.Response:
        idempotent = method in ("GET", "HEAD")
        self._check_outage()
        for attempt in range(RETRIES + 1):
            try:
                request = self._http.build_request(method, url, headers=headers, params=params, content=content)
                response = await send_bounded(self._http, request, MAX_ANSWER, follow_redirects=follow)
            except TooLarge:
                raise HfError(502, f"the Hub's answer is larger than {MAX_ANSWER} bytes: not held by the mirror") from None
            except httpx.TransportError as exc:
                if idempotent and attempt < RETRIES:
                    await retry_pause(attempt)
                    continue
                raise self._outage(f"the Hub is unreachable: {type(exc).__name__}") from None
            if response.status_code in RETRY_STATUSES and idempotent and attempt < RETRIES:
                await retry_pause(attempt)
                continue
            if response.status_code >= 500:
                raise self._outage(f"the Hub answered {response.status_code}")
            if response.status_code == 429:
                raise HubUnavailable("the Hub is rate-limiting")
            self._down_until = 0.0
            return response
        raise HubUnavailable("the Hub kept failing")
