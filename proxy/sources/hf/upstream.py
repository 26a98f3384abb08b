"""Talking to the Hub: resolve HEADs without following its CDN redirect, file bytes, and the API.

The caller's own token goes upstream with each request made on its behalf; it is never logged
or stored.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx
import urllib3

from proxy.config import HfConfig
from proxy.http.download import (
    ATTEMPTS, BlobDownload, BlobTransport, RetryableAnswer, TransferFailed, check_retryable, retrying,
)
from proxy.http.bounded import TooLarge, send_bounded
from proxy.http.offline import MESSAGE as OFFLINE
from proxy.http.offline import Offline
from proxy.sources.hf.errors import HfError, HubOffline, HubUnavailable, UpstreamHfError
from proxy.sources.hf.names import Repo, quote_path, quote_revision
from proxy.upstreams import Failure, UpstreamHealth, classify, status_failure

MAX_REDIRECTS = 5
MAX_ANSWER = 32 * 1024 * 1024  # an API answer (a tree page, a paths-info) is held whole: at most this
# After the Hub failed, requests fail at once for this long instead of each retrying: cached
# answers are served without a second's wait per file during an outage.
OUTAGE_SECONDS = 10.0


def _offline(what: str) -> HubOffline:
    """The transports refused (offline = true): the cache did not hold what the caller asked."""
    return HubOffline(f"{OFFLINE}; {what[:300]} is not in it")


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class HubClient:
    """Requests to the Hub on behalf of callers."""

    def __init__(
        self, config: HfConfig, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth | None = None
    ) -> None:
        self.config = config
        self.base_url = config.base_url
        self._http = http
        self._blobs = blobs
        self._down_until = 0.0
        self._outage_message = ""
        self._health = health or UpstreamHealth()
        self.upstream = f"hf:{urlsplit(config.base_url).netloc}"  # its name in metrics and log lines
        self._health.watch(self.upstream)

    def _check_outage(self) -> None:
        if time.monotonic() < self._down_until:
            raise HubUnavailable(self._outage_message)

    def _outage(self, failure: Failure) -> HubUnavailable:
        """The attempts are spent: the Hub is down, and the client learns why."""
        self._health.down(self.upstream, failure)
        self._down_until = time.monotonic() + OUTAGE_SECONDS
        # Requests during the outage window fail at once with the same cause.
        self._outage_message = f"the Hub {failure.cause}" if failure.kind.startswith("http_") else f"the Hub is unreachable: {failure.summary}"
        return HubUnavailable(self._outage_message)

    def _count_retryable(self, status: int, headers: Mapping[str, str], content: bytes = b"", response: object = None) -> None:
        """RetryableAnswer (counted as a failed attempt) for an answer worth asking again for."""
        try:
            check_retryable(status, headers, content, response)
        except RetryableAnswer:
            failure = status_failure(status)
            assert failure is not None  # only 5xx and 429 are retried
            self._health.failed(self.upstream, failure)
            raise

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
        try:
            async for attempt in retrying(TransferFailed):
                with attempt:
                    response, body = await self._open(url, authorization)
        except TransferFailed as exc:
            raise self._outage(classify(exc)) from None
        except Offline:
            raise _offline(f"{repo.url_prefix}{repo.id}@{commit}/{path}") from None
        except RetryableAnswer as answer:  # counted already
            response, body = answer.response, answer.content
        else:
            self._health.status(self.upstream, response.status)
        assert isinstance(response, urllib3.BaseHTTPResponse)
        if 200 <= response.status < 300:
            return BlobDownload(response)
        failure = status_failure(response.status)
        if failure is not None:
            self._health.down(self.upstream, failure)
            if response.status >= 500:
                raise self._outage(failure)
        raise UpstreamHfError(response.status, dict(response.headers), body)

    async def _open(self, url: str, authorization: str | None) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        try:
            response = await self._blobs.open(url, authorization)
        except TransferFailed as exc:
            self._health.failed(self.upstream, classify(exc))
            raise
        if 200 <= response.status < 300:
            return response, b""
        body = await self._blobs.drain(response)
        self._count_retryable(response.status, response.headers, body, response)
        return response, body

    def _rejected(self, status: int) -> HubUnavailable:
        """A final 5xx or 429 (already counted): an outage, or a rate limit that is no outage."""
        if status == 429:
            self._health.down(self.upstream, Failure("http_429", "answered 429"))
            return HubUnavailable("the Hub is rate-limiting")
        failure = status_failure(status)
        assert failure is not None  # 5xx: the only other answers rejected
        return self._outage(failure)

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
        try:
            async for attempt in retrying(httpx.TransportError, attempts=ATTEMPTS if idempotent else 1):
                with attempt:
                    response = await self._send_once(method, url, headers, params, content, follow)
        except httpx.TransportError as exc:
            raise self._outage(classify(exc)) from None
        except Offline:
            raise _offline(urlsplit(url).path) from None
        except RetryableAnswer as answer:
            raise self._rejected(answer.status) from None
        failure = status_failure(response.status_code)
        if failure is not None:
            self._health.failed(self.upstream, failure)
            raise self._rejected(response.status_code)
        self._health.answered(self.upstream)
        self._down_until = 0.0
        return response

    async def _send_once(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: Mapping[str, str] | list[tuple[str, str]] | None,
        content: bytes | None,
        follow: bool,
    ) -> httpx.Response:
        try:
            request = self._http.build_request(method, url, headers=headers, params=params, content=content)
            response = await send_bounded(self._http, request, MAX_ANSWER, follow_redirects=follow)
        except TooLarge:
            raise HfError(502, f"the Hub's answer is larger than {MAX_ANSWER} bytes: not held by the mirror") from None
        except httpx.TransportError as exc:
            self._health.failed(self.upstream, classify(exc))
            raise
        self._count_retryable(response.status_code, response.headers, response=response)
        return response
