"""Talking to one upstream registry: the token flow, retries, redirects, and its errors.

Tokens are cached per scope until they expire, credentials go only to the registry itself or a
realm host the configuration names, and neither is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import urllib3

from proxy.config import RegistryConfig
from proxy.http.bounded import TooLarge, send_bounded
from proxy.http.download import BlobDownload, BlobTransport, RetryableAnswer, TransferFailed, check_retryable, retrying
from proxy.http.offline import MESSAGE as OFFLINE
from proxy.http.offline import Offline
from proxy.sources.oci.errors import (
    BY_CODE,
    BlobUnknown,
    Denied,
    ManifestUnknown,
    OciError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.upstreams import UpstreamHealth, classify, status_failure

log = logging.getLogger(__name__)


MAX_ANSWER = 8 * 1024 * 1024  # manifests (4 MiB at most), tag lists, token answers: held whole, so bounded
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    realm: str
    service: str | None


def parse_challenge(header: str) -> Challenge | None:
    """The WWW-Authenticate challenge of a registry: `Bearer realm="…",service="…",scope="…"`."""
    scheme, _, params = header.strip().partition(" ")
    values = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _CHALLENGE_PARAM.finditer(params)}
    scheme = scheme.lower()
    if scheme == "basic":
        return Challenge("basic", values.get("realm", ""), None)
    if scheme == "bearer" and values.get("realm"):
        return Challenge("bearer", values["realm"], values.get("service"))
    return None


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens per (realm, service, scope), fetched once however many requests need one."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str | None, str], _Token] = {}
        self._locks: dict[tuple[str, str | None, str], asyncio.Lock] = {}

    def get(self, key: tuple[str, str | None, str]) -> str | None:
        token = self._tokens.get(key)
        if token is None or token.expires_at <= time.monotonic():
            return None
        return token.value

    def lock(self, key: tuple[str, str | None, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, key: tuple[str, str | None, str]) -> None:
        self._tokens.pop(key, None)

    def put(self, key: tuple[str, str | None, str], value: str, expires_in: float) -> None:
        # Renew a little early so that a token never expires between check and use.
        lifetime = max(expires_in * 0.9 - 5, 1)
        self._tokens[key] = _Token(value, time.monotonic() + lifetime)


class RegistryClient:
    """Requests to one upstream registry on behalf of the mirror."""

    def __init__(
        self, registry: RegistryConfig, http: httpx.AsyncClient, blobs: BlobTransport, health: UpstreamHealth | None = None
    ) -> None:
        self.registry = registry
        self._http = http
        self._blobs = blobs
        self._health = health or UpstreamHealth()
        self.upstream = f"oci:{registry.name}"  # its name in metrics and log lines
        self._health.watch(self.upstream)
        self._tokens = TokenCache()
        self._challenge: Challenge | None = None
        self.ratelimit_remaining: str | None = None

    # -- public operations ------------------------------------------------------------------
    async def head_manifest(self, repository: str, reference: str, accept: list[str]) -> httpx.Response:
        return await self._request("HEAD", repository, f"manifests/{reference}", accept=accept, missing=ManifestUnknown)

    async def get_manifest(self, repository: str, reference: str, accept: list[str]) -> httpx.Response:
        return await self._request("GET", repository, f"manifests/{reference}", accept=accept, missing=ManifestUnknown)

    async def head_blob(self, repository: str, digest: str) -> httpx.Response:
        return await self._request("HEAD", repository, f"blobs/{digest}", missing=BlobUnknown)

    async def open_blob(self, repository: str, digest: str) -> BlobDownload:
        """The blob's body, open: the same auth, retries and errors as every other request."""
        url = f"{self.registry.base_url}/v2/{repository}/blobs/{digest}"
        scope = f"repository:{repository}:pull"
        try:
            async for attempt in retrying(TransferFailed):
                with attempt:
                    response, content = await self._open_authorized(url, scope)
        except TransferFailed as exc:
            raise self._unreachable(exc) from None
        except RetryableAnswer as answer:
            raise self._gave_up(answer, answer.content, BlobUnknown) from None
        except Offline:
            raise self._offline(BlobUnknown, repository, f"blobs/{digest}") from None
        self._health.status(self.upstream, response.status)
        if 200 <= response.status < 300:
            return BlobDownload(response)
        raise self._error_from(response.status, content, BlobUnknown)

    async def _open_authorized(self, url: str, scope: str) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        auth, from_cache = await self._authorization(scope)
        response, content = await self._open(url, auth)
        if response.status != 401:
            return response, content
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        if challenge is None or (challenge == self._challenge and auth is not None and not from_cache):
            return response, content  # credentials fetched just now were refused: they are not enough
        self._learn_challenge(challenge, scope, from_cache)
        auth, _ = await self._authorization(scope)
        return await self._open(url, auth)

    async def _open(self, url: str, auth: str | None) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        """One GET of a blob: the response, body unread when it succeeded, else read (at most 64 KiB)."""
        try:
            response = await self._blobs.open(url, auth)
        except TransferFailed as exc:
            self._health.failed(self.upstream, classify(exc))
            raise
        self._note_ratelimit(response.headers)
        if 200 <= response.status < 300:
            return response, b""
        content = await self._blobs.drain(response)
        self._check_retryable(response.status, response.headers, content)
        return response, content

    async def get_tags(self, repository: str, params: dict[str, str]) -> httpx.Response:
        return await self._request("GET", repository, "tags/list", params=params, missing=ManifestUnknown)

    async def get_referrers(self, repository: str, digest: str, accept: list[str], params: dict[str, str]) -> httpx.Response:
        """OCI 1.1's referrers list; an upstream without the API answers 404 (ManifestUnknown)."""
        return await self._request("GET", repository, f"referrers/{digest}", accept=accept, params=params, missing=ManifestUnknown)

    # -- the request loop -------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        missing: type[OciError],
        accept: list[str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        url = f"{self.registry.base_url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        headers = {"Accept": ", ".join(accept)} if accept else {}
        try:
            async for attempt in retrying(httpx.TransportError):
                with attempt:
                    response = await self._send_authorized(method, url, headers, params, scope)
                    self._note_ratelimit(response.headers)
                    self._check_retryable(response.status_code, response.headers, response.content)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        except RetryableAnswer as answer:
            raise self._gave_up(answer, b"" if method == "HEAD" else answer.content, missing) from None
        except Offline:
            raise self._offline(missing, repository, path) from None
        self._health.status(self.upstream, response.status_code)
        if response.is_success:
            return response
        raise self._error_from(response.status_code, b"" if method == "HEAD" else response.content, missing)

    def _check_retryable(self, status: int, headers: Mapping[str, str], content: bytes) -> None:
        """RetryableAnswer (counted as a failed attempt) for an answer worth asking again for."""
        try:
            check_retryable(status, headers, content)
        except RetryableAnswer as answer:
            failure = status_failure(answer.status)
            assert failure is not None  # only 5xx and 429 are retried
            self._health.failed(self.upstream, failure)
            raise

    def _unreachable(self, exc: BaseException, what: str = "") -> UpstreamUnavailable:
        """The attempts are spent: the upstream is down, and the client learns why."""
        failure = classify(exc)
        self._health.down(self.upstream, failure)
        return UpstreamUnavailable(f"{what}{self.registry.name} unreachable: {failure.summary}")

    def _offline(self, missing: type[OciError], repository: str, path: str) -> OciError:
        """The transports refused (offline = true): the cache does not hold what the client asked.

        A 404 MANIFEST_UNKNOWN or BLOB_UNKNOWN whose message says so, not a 503: clients built on
        distribution's client (docker, skopeo, podman, CRI-O) show an error body only for a 4xx, so
        a 503 reached the user as a bare "503 Service Unavailable"; dockerd retries a 5xx layer five
        times and fails a 404 at once; containerd tries its next host on either. Nothing remembers
        the answer (no negative caching), so the same name is served once the cache holds it."""
        return missing(f"{OFFLINE}; {self.registry.name}/{repository}/{path[:100]} is not in it")

    def _gave_up(self, answer: RetryableAnswer, content: bytes, missing: type[OciError]) -> OciError:
        failure = status_failure(answer.status)
        if failure is not None:
            self._health.down(self.upstream, failure)
        return self._error_from(answer.status, content, missing)

    async def _send_authorized(
        self, method: str, url: str, headers: dict[str, str], params: dict[str, str] | None, scope: str
    ) -> httpx.Response:
        auth, from_cache = await self._authorization(scope)
        response = await self._send(method, url, headers, params, auth)
        if response.status_code != 401:
            return response
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        if challenge is None or (challenge == self._challenge and auth is not None and not from_cache):
            return response  # credentials fetched just now were refused: they are not enough
        self._learn_challenge(challenge, scope, from_cache)
        auth, _ = await self._authorization(scope)
        return await self._send(method, url, headers, params, auth)

    async def _send(
        self, method: str, url: str, headers: dict[str, str], params: dict[str, str] | None, auth: str | None
    ) -> httpx.Response:
        request_headers = dict(headers)
        if auth is not None:
            request_headers["Authorization"] = auth
        request = self._http.build_request(method, url, headers=request_headers, params=params)
        # httpx drops Authorization when a redirect leaves the origin (a CDN), as it must.
        try:
            return await send_bounded(self._http, request, MAX_ANSWER, follow_redirects=True)
        except httpx.TransportError as exc:
            self._health.failed(self.upstream, classify(exc))
            raise
        except TooLarge:
            raise UpstreamError(502, "UNKNOWN", f"{self.registry.name} answered with more than {MAX_ANSWER} bytes") from None

    def _learn_challenge(self, challenge: Challenge, scope: str, token_was_cached: bool) -> None:
        if token_was_cached and self._challenge is not None:
            # A cached token the upstream no longer takes (key rotation, revocation): fetch once more.
            self._tokens.forget((self._challenge.realm, self._challenge.service, scope))
        self._challenge = challenge

    async def _authorization(self, scope: str) -> tuple[str | None, bool]:
        """The Authorization header for this scope, and whether it is a token from the cache."""
        challenge = self._challenge
        if challenge is None:
            return None, False
        credentials = self.registry.credentials()
        if challenge.scheme == "basic":
            return (_basic_authorization(*credentials) if credentials else None), False
        key = (challenge.realm, challenge.service, scope)
        token = self._tokens.get(key)
        if token is not None:
            return f"Bearer {token}", True
        async with self._tokens.lock(key):
            token = self._tokens.get(key)
            if token is None:
                token = await self._fetch_token(challenge, scope, key)
        return (f"Bearer {token}" if token else None), False

    async def _fetch_token(self, challenge: Challenge, scope: str, key: tuple[str, str | None, str]) -> str | None:
        params = {"scope": scope}
        if challenge.service:
            params["service"] = challenge.service
        credentials = self.registry.credentials() if self._may_receive_credentials(challenge.realm) else None
        try:
            response = await self._http.get(
                challenge.realm, params=params, auth=httpx.BasicAuth(*credentials) if credentials else None
            )
        except httpx.TransportError as exc:
            self._health.failed(self.upstream, classify(exc))
            raise self._unreachable(exc, what="token service of ") from None
        self._health.status(self.upstream, response.status_code)
        if response.status_code in (401, 403):
            raise Unauthorized(f"{self.registry.name} refused the configured credentials")
        if not response.is_success:
            raise UpstreamUnavailable(f"token service of {self.registry.name} answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamUnavailable(f"token service of {self.registry.name} sent an unreadable answer") from None
        if not token:
            return None
        self._tokens.put(key, token, expires_in)
        return token

    def _may_receive_credentials(self, realm: str) -> bool:
        """The registry's own host or a configured realm host, over https; over plain http only the
        registry's own host, and only when the registry itself is configured as http (the
        credentials travel in the clear to it anyway): never a downgrade from an https registry."""
        realm_parts, registry = urlsplit(realm), urlsplit(self.registry.base_url)
        if realm_parts.scheme == "https":
            return realm_parts.hostname == registry.hostname or realm_parts.hostname in self.registry.auth_realm_hosts
        return realm_parts.scheme == "http" and registry.scheme == "http" and realm_parts.hostname == registry.hostname

    def _note_ratelimit(self, headers: Mapping[str, str]) -> None:
        remaining = headers.get("ratelimit-remaining")
        if remaining is not None:
            self.ratelimit_remaining = remaining

    def _error_from(self, status: int, content: bytes, missing: type[OciError]) -> OciError:
        """The upstream's own OCI error when it sent one, else one from its status."""
        code, message, detail = _oci_error_body(content)
        if status == 404:
            cls = BY_CODE.get(code or "", missing)
            return cls(message or f"not found upstream at {self.registry.name}", detail=detail)
        if status == 401:
            return Unauthorized(message or f"{self.registry.name} requires authentication", detail=detail)
        if status == 403:
            return Denied(message or f"{self.registry.name} denied access", detail=detail)
        if status == 429:
            return TooManyRequests(message or f"{self.registry.name} rate limit reached", detail=detail)
        if status >= 500:
            return UpstreamUnavailable(f"{self.registry.name} answered {status}")
        return UpstreamError(status if 400 <= status < 500 else 502, code or "UNKNOWN", message or f"upstream answered {status}")


def _basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _oci_error_body(content: bytes) -> tuple[str | None, str | None, object]:
    if not content:
        return None, None, None
    try:
        errors = json.loads(content).get("errors") or []
        first = errors[0]
        return str(first.get("code")), str(first.get("message", ""))[:500], first.get("detail")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None, None, None
